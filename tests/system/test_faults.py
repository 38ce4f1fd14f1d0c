"""Reliability promises of a training run (docs: results/reliability.md): a killed rank, a kill while a
checkpoint is written, corrupt data and bad configuration. (Non-finite losses, a killed rank's
peers exiting and a clean resume are tested in test_train.py / test_train_dist.py.)

The multi-process tests run real trainings (`launch/train_cam.py`, 2 ranks over gloo) of a tiny
ResNet-18 HSC-SEAM model on synthetic shards, in deterministic mode, and compare final weights
bit for bit with an uninterrupted run.
"""
import json
import multiprocessing
import os
import random
import shutil
import signal
import tarfile
import time
from pathlib import Path

import pytest
import torch

import _faultutil as F
from hsc_fast import checkpoint as C
from hsc_fast.config import load_config
from hsc_fast.data import build_train_loader
from hsc_fast.data import samples as S
from hsc_fast.engine.cam_trainer import DataStream
from hsc_fast.cli.train_cam import main
from hsc_fast.engine.runlog import read_metrics
from hsc_fast.cli.shard import main as shard_main
from hsc_fast.data.shard import verify_shards, write_tar

KILL_DEADLINE_S = 60  # every process of a run with a dead rank must be gone by then


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return F.cached("shards", lambda: F.make_shards(tmp_path_factory.mktemp("synth")))


@pytest.fixture(scope="module")
def config(shards, tmp_path_factory):
    return F.cached("config", lambda: F.write_config(tmp_path_factory.mktemp("cfg") / "tiny.yaml", shards))


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """An uninterrupted 2-rank run: the weights every interrupted + resumed run must reproduce."""
    return F.reference_run(tmp_path_factory, config)


def _fault_seed() -> int:
    """HSC_FAULT_SEED reproduces a failure; otherwise each run draws a new kill point."""
    return int(os.environ.get("HSC_FAULT_SEED") or int.from_bytes(os.urandom(4), "little"))


# ------------------------------------------------------------------------------ kill and resume
@pytest.mark.slow
def test_sigkill_of_one_rank_ends_every_rank_and_resume_auto_reproduces_the_run(config, reference, tmp_path):
    seed = _fault_seed()
    rng = random.Random(seed)
    victim, kill_at = rng.randrange(2), rng.randint(1, 5)
    why = f"(HSC_FAULT_SEED={seed}: SIGKILL rank {victim} after step {kill_at})"
    run = tmp_path / "run"
    procs = F.launch_ranks(config, run, 2)
    try:
        F.wait_for_step(run, kill_at, procs, timeout=150)
        os.kill(procs[victim].pid, signal.SIGKILL)
        t0 = time.monotonic()
        codes = F.wait_all(procs, KILL_DEADLINE_S)
        elapsed = time.monotonic() - t0
    finally:
        F.kill_all(procs)
    survivor = 1 - victim
    assert codes[victim] == -signal.SIGKILL, why
    assert codes[survivor] not in (0, None), f"survivor exit {codes[survivor]} after {elapsed:.0f} s {why}"
    assert elapsed < KILL_DEADLINE_S, why
    text = F.output_of(run, survivor)
    assert f"rank {victim} lost" in text, f"{why}\n{text[-3000:]}"

    codes = F.run_ranks(config, run, 2, ["--resume", "auto"])
    assert codes == [0, 0], f"{why}\n{F.output_of(run, 0)[-3000:]}"
    F.assert_same_weights(F.final_weights(run), reference)
    steps = [int(r["step"]) for r in read_metrics(run / "metrics.csv")]
    assert steps == list(range(1, 7)), f"metrics.csv rows after resume: {steps} {why}"


# ------------------------------------------------------------------ kill during checkpoint write
def _save_and_die(run_dir: str, target: str) -> None:
    """Child process: write checkpoint 4 with a writer that is SIGKILLed half-way through `target`."""
    os.environ.update(HSC_TRAP_STEP="4", HSC_TRAP_FILE=target, RANK="0")
    exec(compile(F.TRAP_SOURCE.split("from hsc_fast.cli.train_cam import main")[0], "trap", "exec"), {})
    _save(run_dir, 4)
    os._exit(0)


def _weights(step: int) -> torch.Tensor:
    return torch.randn(64, 64, generator=torch.Generator().manual_seed(step))


def _save(run_dir, step: int) -> None:
    shared = {"model": {"w": _weights(step)}, "state": {"step": step}}
    C.save_checkpoint(run_dir, step, 0, 1, {"rng": C.capture_rng()}, shared, keep_last=5)


@pytest.mark.parametrize("target", ["rank0.pt", "state.pt", "meta.json", "COMPLETE"])
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, target):
    _save(tmp_path, 2)
    child = multiprocessing.get_context("fork").Process(target=_save_and_die, args=(str(tmp_path), target))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL  # the trap fired: the process died inside the write
    folder = C.step_dir(tmp_path, 4)
    assert any(p.name.startswith(f".{target}.tmp") for p in folder.iterdir())  # a half-written file is there
    assert not (folder / target).exists()
    assert not C.is_complete(folder)
    picked = C.resolve_resume("auto", tmp_path)
    assert picked == C.step_dir(tmp_path, 2)
    assert torch.equal(C.load_shared(picked)["model"]["w"], _weights(2))
    C.load_rank(picked, 0, 1)
    # The next attempt at step 4 completes despite the debris and becomes the resume point.
    _save(tmp_path, 4)
    assert C.resolve_resume("auto", tmp_path) == folder
    assert C.load_shared(folder)["state"]["step"] == 4


@pytest.mark.slow
def test_rank_killed_while_writing_state_then_resume_auto_reproduces_the_run(config, reference, tmp_path):
    run = tmp_path / "run"
    trap = {"HSC_TRAP_STEP": 4, "HSC_TRAP_FILE": "state.pt", "HSC_TRAP_RANK": 0}
    procs = F.launch_ranks(config, run, 2, env_extra=trap, entry=F.trap_entry())
    try:
        codes = F.wait_all(procs, 150)
    finally:
        F.kill_all(procs)
    assert codes[0] == -signal.SIGKILL, F.output_of(run, 0)[-3000:]
    assert codes[1] not in (0, None) and "rank 0 lost" in F.output_of(run, 1), F.output_of(run, 1)[-3000:]
    half = C.step_dir(run, 4)
    assert not C.is_complete(half) and any(p.name.startswith(".state.pt.tmp") for p in half.iterdir())
    assert C.resolve_resume("auto", run) == C.step_dir(run, 2)

    codes = F.run_ranks(config, run, 2, ["--resume", "auto"])
    assert codes == [0, 0], F.output_of(run, 0)[-3000:]
    assert f"resumed from {C.step_dir(run, 2)}" in (run / "logs" / "rank0.log").read_text()
    F.assert_same_weights(F.final_weights(run), reference)


# ----------------------------------------------------------------------------------- corrupt data
def _corrupt(shards: Path) -> dict:
    """One fault per shard (bad JPEG / PNG / JSON member, truncated tar), a listed shard deleted,
    an unlisted shard added. Returns {shard file: key} of the faults."""
    index = json.loads((shards / "index.json").read_text())
    files = [e["file"] for e in index["shards"]]

    def rewrite(file, change):
        with tarfile.open(shards / file) as tf:
            samples = {}
            for info in tf:
                key, _, ext = info.name.partition(".")
                samples.setdefault(key, {S.KEY: key})[ext] = tf.extractfile(info).read()
        victim = list(samples)[1]
        samples[victim].update(change)
        write_tar(shards / file, list(samples.values()))
        return victim

    faults = {files[0]: rewrite(files[0], {S.IMAGE: b"\xff\xd8\xff\xe0 not a jpeg"}),
              files[1]: rewrite(files[1], {S.SALIENCY: b"\x89PNG\r\n\x1a\n broken"}),
              files[2]: rewrite(files[2], {S.LABELS: b"[3, 1"})}
    data = (shards / files[3]).read_bytes()
    (shards / files[3]).write_bytes(data[: len(data) // 2 + 100])
    faults[files[3]] = None  # the key is where the tar breaks
    (shards / files[4]).unlink()
    faults[files[4]] = index["shards"][4]["ids"][0]
    shutil.copy(shards / files[2], shards / "stray-000000.tar")
    faults["stray-000000.tar"] = None
    return faults


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    shards = F.make_shards(tmp_path_factory.mktemp("bad"), n_train=20, shard_size=4, saliency=True)
    return shards, _corrupt(shards)


def test_verify_reports_every_fault_with_its_shard_and_key(bad_shards, capsys):
    shards, faults = bad_shards
    problems = verify_shards(shards)["problems"]
    for file, key in faults.items():
        mine = [p for p in problems if p["shard"] == file]
        assert mine, f"{file}: not reported ({problems})"
        if key is not None:
            assert any(p["key"] == key for p in mine), f"{file}: key {key} not named: {mine}"
        else:
            assert any(p["key"] for p in mine), mine
    assert shard_main(["--verify", str(shards)]) == 1
    err = capsys.readouterr().err
    assert all(file in err for file in faults)


@pytest.mark.slow
def test_training_skips_and_counts_bad_samples_and_continues(bad_shards, tmp_path):
    shards, _ = bad_shards
    cfg = F.write_config(tmp_path / "c.yaml", shards, train={"max_steps": 8, "save_every": 8})
    run = tmp_path / "run"
    codes = F.run_ranks(cfg, run, 1)
    assert codes == [0], F.output_of(run, 0)[-3000:]
    rows = read_metrics(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    counted = [int(r["skipped_samples"]) for r in rows]
    assert counted == sorted(counted)  # cumulative
    # Reference count: the same loader (same seed, rank, config), read for 8 batches by itself.
    stream = DataStream(build_train_loader(load_config(str(cfg)).data, 0, 1, seed=0))
    for _ in range(8):
        stream.next()
    assert counted[-1] == stream.skipped() > 0
    assert "bad sample(s) skipped" in (run / "logs" / "rank0.log").read_text()


# ---------------------------------------------------------------------------- bad configuration
def _main(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_missing_data_path_fails_before_any_work(config, tmp_path, capsys):
    run = tmp_path / "run"
    for value in (tmp_path / "nowhere" / "index.json", tmp_path / "nowhere", tmp_path / "x-{000000..000003}.tar"):
        code, err = _main(capsys, "--config", str(config), "--run-dir", str(run), "--data", str(value))
        assert code == 2 and "data.train" in err and str(value) in err, err
    folder = tmp_path / "voc"
    (folder / "JPEGImages").mkdir(parents=True)
    code, err = _main(capsys, "--config", str(config), "--run-dir", str(run), "--data", str(folder),
                      "--set", f"data.train_list={tmp_path / 'no_list.txt'}")
    assert code == 2 and "data.train_list" in err and "no_list.txt" in err, err
    assert not run.exists()  # no run folder, process group, model or log was made


def test_missing_weights_file_fails_before_any_work(config, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _main(capsys, "--config", str(config), "--run-dir", str(run),
                      "--set", f"model.weights={tmp_path / 'imagenet.pth'}")
    assert code == 2 and "model.weights" in err and "imagenet.pth" in err, err
    assert not run.exists()


def test_resume_with_another_world_size_fails_before_any_work(config, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _save(run, 2)  # a complete checkpoint written by 1 rank
    meta = C.step_dir(run, 2) / "meta.json"
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), world_size=4)))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so that what the run sets is undone afterwards
        monkeypatch.delenv(k)
    code, err = _main(capsys, "--config", str(config), "--run-dir", str(run), "--resume", "auto")
    assert code == 2 and "world size" in err and "4" in err and str(C.step_dir(run, 2)) in err, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # no log, no metrics, nothing
