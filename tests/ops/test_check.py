"""Self-check and fallback of the fused kernels (hsc_fast.ops.check), tested on a CPU.

HSC_AUTO_TRITON_CPU=1 lets `impl="auto"` pick the Triton kernels for CPU tensors under the
interpreter and HSC_KERNEL_SELFCHECK=1 runs the self-check there, so the same code path that
guards a user's GPU runs here; kernels are "made to fail" by replacing them with wrong or
raising functions.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from hsc_fast import ops
from hsc_fast.crf import lattice as crf_lattice
from hsc_fast.ops import check as kernel_check
from hsc_fast.ops.check import KernelCheckError

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    monkeypatch.setenv("HSC_AUTO_TRITON_CPU", "1")
    monkeypatch.setenv("HSC_KERNEL_SELFCHECK", "1")
    kernel_check.reset()
    crf_lattice._HASH_VERDICTS.clear()
    yield
    kernel_check.reset()
    crf_lattice._HASH_VERDICTS.clear()


def psc_args(m=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    f1, f2 = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)
    y1, y2 = torch.randint(0, 21, (m,), generator=g), torch.randint(0, 21, (m,), generator=g)
    protos = [torch.nn.functional.normalize(torch.randn(21, d, generator=g), dim=1) for _ in range(4)]
    return (f1, f2, y1, y2, *protos)


def test_a_passing_kernel_is_checked_once_and_used(monkeypatch):
    import kernels.psc
    calls = []
    real = kernels.psc.psc_terms_triton
    monkeypatch.setattr(kernels.psc, "psc_terms_triton", lambda *a: (calls.append(1), real(*a))[1])
    args = psc_args()
    out = ops.psc_terms(*args, impl="auto")
    ops.psc_terms(*args, impl="auto")
    report = kernel_check.report()
    assert [(r["op"], r["dtype"], r["dim"], r["ok"]) for r in report] == [("psc_terms", "float32", 16, True)]
    assert report[0]["fwd_error"] < 1e-5 and report[0]["grad_error"] < 1e-4
    assert len(calls) == 1 + 2  # the self-check once, then the two real calls
    torch.testing.assert_close(out, ops.psc_terms(*args, impl="torch"), rtol=1e-5, atol=1e-6)


def test_each_class_count_is_checked_on_its_own(monkeypatch):
    """21 classes (the one-block kernels) and 81 (MS COCO: the chunked kernels) are different
    kernel variants: each gets its own verdict, from a probe with that many classes; a kernel
    wrong only for chunked columns falls back there and keeps serving C = 21."""
    import kernels.psc
    real = kernels.psc.psc_terms_triton
    probed = []

    def wrong_when_chunked(*a):
        probed.append(a[4].shape[0])
        out = real(*a)
        return out * 1.01 if kernels.psc.column_layout(a[4].shape[0]) == "chunked" else out
    monkeypatch.setattr(kernels.psc, "psc_terms_triton", wrong_when_chunked)
    voc = psc_args()
    g = torch.Generator().manual_seed(5)
    coco = (*voc[:2], torch.randint(0, 81, (40,), generator=g), torch.randint(0, 81, (40,), generator=g),
            *[torch.nn.functional.normalize(torch.randn(81, 16, generator=g), dim=1) for _ in range(4)])
    ops.psc_terms(*voc, impl="auto")
    with pytest.warns(RuntimeWarning, match=r"psc_terms.*C=81.*mismatch"):
        out = ops.psc_terms(*coco, impl="auto")
    assert torch.equal(out, ops.psc_terms(*coco, impl="torch"))
    verdicts = {r["case"]: r["ok"] for r in kernel_check.report()}
    assert verdicts == {"C=21": True, "C=81": False}
    assert probed[0] == 21 and 81 in probed  # the C=81 check probed with 81 classes
    before = len(probed)
    ops.psc_terms(*voc, impl="auto")
    assert len(probed) == before + 1  # C = 21 still served by the kernel, no new check


def test_a_wrong_kernel_falls_back_with_one_warning(monkeypatch):
    import kernels.psc
    monkeypatch.setattr(kernels.psc, "psc_terms_triton",
                        lambda *a: ops.psc_terms_reference(*a) * 1.01)  # 1 % off: a miscompile
    args = psc_args()
    with pytest.warns(RuntimeWarning, match=r"psc_terms.*mismatch.*torch reference"):
        out = ops.psc_terms(*args, impl="auto")
    assert torch.equal(out, ops.psc_terms(*args, impl="torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning for the same key
        ops.psc_terms(*args, impl="auto")
    (fallback,) = kernel_check.fallbacks()
    assert fallback.op == "psc_terms" and "forward error" in fallback.error and "torch" in fallback.versions


def test_a_kernel_that_does_not_compile_falls_back_under_auto_and_raises_under_triton(monkeypatch):
    import kernels.roi_pool

    def broken(*a):
        raise RuntimeError("PassManager::run failed (loopResult.hasOneUse())")
    monkeypatch.setattr(kernels.roi_pool, "roi_pool_triton", broken)
    feats = torch.randn(2, 8, 30, requires_grad=True)
    masks = torch.nn.functional.one_hot(torch.randint(0, 2, (2, 30)), 2).permute(0, 2, 1).float()
    with pytest.warns(RuntimeWarning, match="PassManager"):
        out = ops.roi_pool(feats, masks, impl="auto")
    assert torch.equal(out, ops.roi_pool(feats, masks, impl="torch"))
    with pytest.raises(KernelCheckError, match=r"roi_pool.*PassManager.*triton"):
        ops.roi_pool(feats, masks, impl="triton")


def test_a_failure_on_a_real_call_is_recorded_and_served_by_the_reference(monkeypatch):
    """A kernel that passed on the probe but raises at another shape (e.g. a new specialisation)."""
    import kernels.topk_proto
    real = kernels.topk_proto.topk_proto_triton

    def fails_on_big(scores, feats, *rest):
        if scores.shape[1] > 500:
            raise RuntimeError("out of resources: shared memory")
        return real(scores, feats, *rest)
    monkeypatch.setattr(kernels.topk_proto, "topk_proto_triton", fails_on_big)
    scores, feats = torch.rand(3, 600), torch.randn(600, 8)
    out = ops.topk_proto(scores, feats, 16, impl="auto")
    assert torch.equal(out, ops.topk_proto(scores, feats, 16, impl="torch"))
    assert [r.error.startswith("RuntimeError on a training call") for r in kernel_check.fallbacks()] == [True]


def test_no_check_and_no_kernel_for_cpu_tensors_by_default(monkeypatch):
    monkeypatch.delenv("HSC_AUTO_TRITON_CPU")
    ops.psc_terms(*psc_args(), impl="auto")
    assert kernel_check.report() == []


def test_a_training_run_records_the_verdicts_in_env_json(tmp_path, monkeypatch):
    import kernels.psc
    from engine.test_train import tiny_cfg
    from hsc_fast.engine.session import train
    from hsc_fast.data.synth import generate
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(kernels.psc, "psc_terms_triton", lambda *a: ops.psc_terms_reference(*a) + 1.0)
    data = tmp_path / "synth"
    generate(data, 6, 2, 0, 64)
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="psc_terms"):
        train(tiny_cfg(data, train__max_steps=1, loss__impl="auto"), run, progress=False)
    env = json.loads((run / "env.json").read_text())
    verdicts = {r["op"]: r for r in env["kernel_checks"]}
    assert set(verdicts) == {"roi_pool", "topk_proto", "psc_terms"}
    assert verdicts["roi_pool"]["ok"] and verdicts["topk_proto"]["ok"] and not verdicts["psc_terms"]["ok"]
    assert "falls back to its reference" in (run / "logs" / "rank0.log").read_text()


def test_cupy_hash_build_must_prove_itself(monkeypatch):
    """`cupy_available` is False without CuPy, and False (with a recorded, warned failure) when
    CuPy imports but its build does not run -- e.g. a cupy-cuda12x next to a CUDA 13 torch."""
    from kernels import lattice_hash
    device = torch.device("cpu")
    monkeypatch.setattr(lattice_hash, "cupy_sees_a_gpu", lambda: False)
    assert crf_lattice.cupy_available(device) is False
    monkeypatch.setattr(lattice_hash, "cupy_sees_a_gpu", lambda: True)

    def no_nvrtc(_device):
        raise RuntimeError("CUDA_ERROR_FILE_NOT_FOUND: libnvrtc.so.12: cannot open shared object file")
    monkeypatch.setattr(crf_lattice, "_compare_hash_and_sort_builds", no_nvrtc)
    with pytest.warns(RuntimeWarning, match=r"lattice_hash.*libnvrtc.*sort build"):
        assert crf_lattice.cupy_available(device) is False
    assert crf_lattice.cupy_available(device) is False  # cached verdict, no second warning
    assert [r.op for r in kernel_check.fallbacks()] == ["lattice_hash"]
    crf_lattice._HASH_VERDICTS.clear()
    monkeypatch.setattr(crf_lattice, "_compare_hash_and_sort_builds", lambda _device: 0.0)
    assert crf_lattice.cupy_available(device) is True


def test_the_sort_build_handles_a_lattice_without_pixels():
    lattice = crf_lattice.PermutohedralLattice(torch.zeros(0, 5), build="sort")
    assert lattice.n_points == 0 and lattice.filter(torch.zeros(0, 3)).shape == (0, 3)
