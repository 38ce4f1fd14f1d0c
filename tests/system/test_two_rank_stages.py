"""Stages on two ranks equal one process: DeepLab CLI, SynthNet pre-training, CAM inference."""
import json
import os
import subprocess
import sys

import pytest

from engine.test_deeplab_train import REPO, synth  # noqa: F401 - synth is a fixture
from engine.test_pretrain import _tiny_overrides
from eval.test_seeds import _two_rank_worker, _voc_tree
from hsc_fast.eval.evaluate import evaluate


# ------------------------------------------------------------------------- two ranks, the CLI
@pytest.mark.slow
def test_two_rank_cli_trains_and_evaluates(synth, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "train_deeplab.py"), "--config", str(REPO / "configs" / "deeplab_demo.yaml"),
           "--run-dir", str(run), "--images", str(synth["root"]), "--sbd-root", str(synth["sbd"]),
           "--labels", str(synth["gt"]), "--train-list", str(synth["voc"] / "ImageSets/Segmentation/train.txt"),
           "--max-steps", "2", "--no-progress", "--no-crf",
           "--set", "deeplab.batch_size=2", "--set", "deeplab.crop_size=48", "--set", "deeplab.test_scales=[1.0]",
           "--set", "train.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt_dir = run / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in ckpt_dir.glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 3
    saved = json.loads((run / "eval.json").read_text())
    assert saved["n_images"] == len(synth["val"])
    assert sorted(p.stem for p in (run / "pred").glob("*.png")) == sorted(synth["val"])


@pytest.mark.slow
def test_two_ranks_train_one_model(tmp_path):
    """2 gloo ranks: each renders its own share, gradients are averaged -> the ranks end identical,
    and the file is complete when every rank returns (the barrier after rank 0's write)."""
    script = tmp_path / "two.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from hsc_fast import distributed as D\nfrom hsc_fast.engine import pretrain as PT\n"
        "from hsc_fast.config import load_config\n"
        "info = D.init_distributed(timeout_s=120, use_deepspeed=False)\n"
        f"cfg = load_config('demo_synthnet', {_tiny_overrides()!r})\n"
        f"out = {str(tmp_path / 'w.pth')!r}\n"
        "model, s = PT.train_classifier(cfg, 'resnet18', rank=info.rank, world=info.world_size, progress=False)\n"
        "mine = torch.cat([v.float().flatten() for v in model.state_dict().values()])\n"
        "other = mine.clone(); dist.broadcast(other, src=0)\n"
        "torch.manual_seed(cfg.pretrain.seed); start = PT.build_classifier('resnet18')  # the initial weights\n"
        "moved = not torch.equal(mine, torch.cat([v.float().flatten() for v in start.state_dict().values()]))\n"
        "s2 = PT.pretrain(cfg, 'resnet18', out, rank=info.rank, world=info.world_size, progress=False, log=lambda *_: None)\n"
        "ok = torch.load(out, map_location='cpu', weights_only=True)['fc.weight'].shape == (20, 512)\n"
        "print('RESULT', info.rank, s['images_seen'], bool(torch.equal(mine, other)), moved, ok, s2['ranks'], s2['file'] == out)\n"
        "D.shutdown(info)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = sorted(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("RESULT"))
    # the data-parallel run: both ranks identical and trained; pretrain() on CPU: rank 0 trains alone
    # with every core (pretrain.ranks=auto -> main) and the waiting rank returns the written summary
    assert lines == [[str(r), str(6 * 8), "True", "True", "True", "main", "True"] for r in (0, 1)]


@pytest.mark.slow
def test_two_ranks_cover_each_id_once(tmp_path):
    import torch.multiprocessing as mp
    ids, _ = _voc_tree(tmp_path / "voc", n=5)
    out = tmp_path / "out"
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "voc"), str(out), ids,
                                     str(tmp_path / "res")), nprocs=2, join=True)
    r = [json.loads((tmp_path / f"res.{k}").read_text()) for k in range(2)]
    assert r[0]["n"] + r[1]["n"] == 5 and not set(r[0]["ids"]) & set(r[1]["ids"])
    assert sorted(r[0]["ids"] + r[1]["ids"]) == sorted(ids)
    assert sorted(p.stem for p in (out / "cam_npy").glob("*.npy")) == sorted(ids)
    # the all-reduced sweep equals a single-process one, on every rank
    single = evaluate(tmp_path / "voc" / "SegmentationClass", cam_dir=out / "cam_npy", ids=ids, thresholds="0.0:0.6:0.1")
    assert r[0]["curve"] == r[1]["curve"] == single["curve"]
