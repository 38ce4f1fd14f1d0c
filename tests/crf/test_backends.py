"""The CRF backend registries: what is registered is what the config accepts; ``batched`` decides
whether crf_imap hands a backend many images per call or one."""
import numpy as np
import pytest

from hsc_fast.config import load_config
from hsc_fast.crf import crf_batch, register_backend
from hsc_fast.errors import ConfigError
from hsc_fast.registry import CRF_BACKENDS, TRAIN_CRF_BACKENDS


def test_registered_backends_are_the_config_choices():
    assert CRF_BACKENDS.names() == ("pydensecrf", "gpu")
    assert TRAIN_CRF_BACKENDS.names() == ("lattice", "dense", "pydensecrf")
    assert [CRF_BACKENDS.get(n).batched for n in CRF_BACKENDS] == [False, True]
    with pytest.raises(ConfigError, match=r"'loss.crf.backend': 'latice' is not one of lattice, dense"):
        load_config("hsc_seam", ["loss.crf.backend=latice"])
    with pytest.raises(ConfigError, match=r"'seeds.crf.backend': 'cuda' is not one of pydensecrf, gpu"):
        load_config("hsc_seam", ["seeds.crf.backend=cuda"])


@pytest.mark.parametrize("batched, calls", [(True, [3, 2]), (False, [1, 1, 1, 1, 1])])
def test_batched_flag_decides_images_per_call(batched, calls):
    """A toy backend (marginals = softmax of -unary, no pairwise term) sees batches of gpu_batch
    images when batched, one image per call otherwise; the results are the same either way."""
    seen = []

    def toy(images, unaries, params):
        seen.append(len(images))
        return [np.exp(-u) / np.exp(-u).sum(0, keepdims=True) for u in unaries]

    register_backend("toy", toy, batched=batched)
    try:
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (6, 7, 3), dtype=np.uint8) for _ in range(5)]
        probs = [rng.dirichlet(np.ones(3), (6, 7)).transpose(2, 0, 1).astype(np.float32) for _ in range(5)]
        out = crf_batch(images, probs, backend="toy", gpu_batch=3, return_labels=True)
        assert seen == calls
        assert all(np.array_equal(o, p.argmax(0)) for o, p in zip(out, probs))
        assert "toy" in load_config("seam", ["seeds.crf.backend=toy"]).seeds.crf.backend
    finally:
        CRF_BACKENDS._entries.pop("toy")


def test_a_backend_file_in_the_plugin_folder_is_all_it_takes(tmp_path, monkeypatch):
    """One file in hsc_fast/crf/backends/ (here a temporary folder on that package's path)
    registers a seed CRF backend and a training CRF backend; both become config choices."""
    import hsc_fast.crf.backends as plugins
    (tmp_path / "identity_crf.py").write_text(
        "from hsc_fast.crf import register_backend\n"
        "from hsc_fast.crf.train import register_train_backend\n"
        "register_backend('identity', lambda images, unaries, params: [-u for u in unaries], batched=True)\n"
        "register_train_backend('identity', lambda images, labels, **params: labels, batched=True)\n")
    monkeypatch.setattr(plugins, "__path__", [*plugins.__path__, str(tmp_path)])
    try:
        assert "identity_crf" in plugins.discover()
        cfg = load_config("seam", ["seeds.crf.backend=identity", "loss.crf.backend=identity"])
        assert (cfg.seeds.crf.backend, cfg.loss.crf.backend) == ("identity", "identity")
        probs = np.full((2, 3, 4), 0.5, np.float32)
        probs[1, 0, 0] = 0.9
        out = crf_batch([np.zeros((3, 4, 3), np.uint8)], [probs], backend="identity", return_labels=True)[0]
        assert out[0, 0] == 1 and out.sum() == 1       # argmax of the probabilities it was given
    finally:
        CRF_BACKENDS._entries.pop("identity", None)
        TRAIN_CRF_BACKENDS._entries.pop("identity", None)
        import sys
        sys.modules.pop("hsc_fast.crf.backends.identity_crf", None)
