"""Checkpoint files: atomic + complete marker, keep-last-K, resume resolution, weights_only loads, RNG."""
import enum
import random

import numpy as np
import pytest
import torch

from hsc_fast import checkpoint as C
from hsc_fast.errors import WeightsError


def _save(run, step, keep=3, world=1):
    shared = {"model": {"w": torch.full((2,), float(step))}, "state": {"step": step}}
    return C.save_checkpoint(run, step, 0, world, {"rng": C.capture_rng()}, shared, keep)


def test_complete_marker_keep_last_and_auto_resume(tmp_path):
    for step in (1, 2, 3, 4):
        d = _save(tmp_path, step, keep=2)
        assert C.is_complete(d)
    assert [C.step_of(p) for p in C.list_checkpoints(tmp_path)] == [3, 4]  # keep last 2
    # A crash while writing step 5: files but no marker -> never chosen, auto picks step 4.
    crashed = C.step_dir(tmp_path, 5)
    crashed.mkdir()
    (crashed / "state.pt").write_bytes(b"half")
    assert C.resolve_resume("auto", tmp_path) == C.step_dir(tmp_path, 4)
    with pytest.raises(WeightsError, match="incomplete"):
        C.resolve_resume(str(crashed), tmp_path)
    assert C.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == C.step_dir(tmp_path, 4)
    assert C.resolve_resume("", tmp_path) is None
    assert C.resolve_resume("auto", tmp_path / "fresh") is None
    # Re-saving over the crashed folder completes it; stale incomplete older folders are pruned.
    stale = C.step_dir(tmp_path, 4) .with_name("step_00000002")
    stale.mkdir()
    _save(tmp_path, 5, keep=2)
    assert [C.step_of(p) for p in C.list_checkpoints(tmp_path, complete_only=False)] == [4, 5]
    assert torch.equal(C.load_shared(C.find_latest(tmp_path))["model"]["w"], torch.full((2,), 5.0))
    # No temporary files are left behind by the atomic writes.
    assert not [p for p in C.checkpoint_root(tmp_path).rglob(".*tmp*")]


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_loading_refuses_pickled_objects(tmp_path):
    bad = tmp_path / "state.pt"
    torch.save({"x": _Evil()}, bad)
    with pytest.raises(WeightsError, match="weights_only"):
        C.safe_load(bad)
    with pytest.raises(WeightsError, match="does not exist"):
        C.safe_load(tmp_path / "missing.pt")


class _Stage(int, enum.Enum):
    two = 2


def test_to_safe_makes_deepspeed_like_state_loadable(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Frag:
        numel: int
        start: int

    state = {"zero_stage": _Stage.two, "maps": {"w": Frag(3, 0)}, "np": np.float32(1.5),
             "arr": np.arange(3), "groups": {1, 2}}
    path = tmp_path / "x.pt"
    C.atomic_torch_save(C.to_safe(state), path)
    back = C.safe_load(path)
    assert back["zero_stage"] == 2 and type(back["zero_stage"]) is int
    assert back["maps"]["w"] == {"numel": 3, "start": 0}
    assert back["np"] == 1.5 and torch.equal(back["arr"], torch.arange(3))
    with pytest.raises(TypeError, match="safely"):
        C.to_safe({"obj": object()})


def test_rng_capture_restore_reproduces_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    C.atomic_torch_save(C.capture_rng(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    C.restore_rng(C.safe_load(tmp_path / "rng.pt"))
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    assert first == again


def test_world_size_mismatch_names_both_sizes(tmp_path):
    d = C.save_checkpoint(tmp_path, 1, 0, 1, {"rng": {}}, {"model": {}}, 3)
    (d / "meta.json").write_text('{"step": 1, "world_size": 2}')
    with pytest.raises(WeightsError, match="2 ranks, this run has 1"):
        C.load_rank(d, 0, 1)


def test_final_model_is_plain_fp32_state_dict(tmp_path):
    sd = {"a": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor(3)}
    path = C.save_final_model(tmp_path, sd)
    back = torch.load(path, weights_only=True)
    assert back["a"].dtype == torch.float32 and torch.equal(back["a"], torch.ones(2))
    assert back["n"].dtype == torch.int64
