"""Data stages with several processes: loader workers, parallel shard writers, a resumed run."""
import json

import pytest
import torch

import _faultutil as F
from data.test_data import cfg_for, synth  # noqa: F401 - synth is a fixture
from data.test_shard import SBD_ID, real_labels, run, tree  # noqa: F401 - real_labels, tree are fixtures
from data.test_untrusted import _evil_file
from hsc_fast import checkpoint as C
from hsc_fast.data import build_eval_dataset, build_train_loader
from hsc_fast.errors import DataError


# ----------------------------------------------------------------- the same with real processes
@pytest.mark.slow
def test_real_workers_split_eval_and_equal_train_counts(synth):
    seen = []
    for rank in range(2):
        stream = build_eval_dataset(synth["one"], rank=rank, world_size=2)  # 1 shard < 4 slots
        seen += [item[0] for item in stream.loader(num_workers=2)]
    assert sorted(seen) == sorted(synth["ids"])
    cfg = cfg_for(synth["shards"], workers=2)
    lengths = [sum(1 for _ in build_train_loader(cfg, rank, 2, seed=0, epoch_samples=7)) for rank in range(2)]
    assert lengths == [4, 4]


@pytest.mark.slow
def test_real_workers_resume_exactly(synth):
    cfg = cfg_for(synth["shards"], workers=2)
    full = list(build_train_loader(cfg, 0, 1, seed=4))
    for k in (1, 2, 3):
        tail = list(build_train_loader(cfg, 0, 1, seed=4, skip_batches=k))
        assert [b["key"] for b in tail] == [b["key"] for b in full[k:]]
        assert all(torch.equal(x["img"], y["img"]) for x, y in zip(tail, full[k:]))


@pytest.mark.slow
def test_parallel_workers_write_the_same_bytes_and_fail_cleanly(tree):
    out1, _ = run(tree, "w1", shard_size=1, workers=1)
    out2, _ = run(tree, "w2", shard_size=1, workers=2)
    assert {p.name: p.read_bytes() for p in out1.iterdir()} == {p.name: p.read_bytes() for p in out2.iterdir()}
    before = {p.name: p.read_bytes() for p in out2.iterdir()}
    (tree["sbd"] / "img" / f"{SBD_ID}.jpg").write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(DataError, match=SBD_ID):
        run(tree, "w2", shard_size=1, workers=2)
    assert {p.name: p.read_bytes() for p in out2.iterdir()} == before  # the earlier shards stay as they were


@pytest.mark.slow
def test_resume_from_a_tampered_checkpoint_fails_cleanly_and_runs_nothing(tmp_path):
    shards = F.make_shards(tmp_path / "synth", n_train=8)
    config = F.write_config(tmp_path / "c.yaml", shards)
    run, marker = tmp_path / "run", tmp_path / "pwned"
    d = C.step_dir(run, 2)
    d.mkdir(parents=True)
    _evil_file(d / C.SHARED_FILE, marker, lambda x: {"model": x})
    _evil_file(C.rank_file(d, 0), marker)
    (d / "meta.json").write_text(json.dumps({"step": 2, "world_size": 1, "files": []}))
    (d / C.COMPLETE_MARKER).write_text("2\n")
    codes = F.run_ranks(config, run, 1, ["--resume", "auto"])
    out = F.output_of(run, 0)
    assert codes == [1] and "WeightsError" in out and str(d / C.SHARED_FILE) in out, out[-3000:]
    assert not marker.exists() and not (run / "final").exists()
