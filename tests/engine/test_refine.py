"""The refine stage (engine/refine.py): affinity labels -> AffinityNet -> random-walk Masks, on
a tiny synthetic set with CAM-like maps made from its masks (no CAM training here)."""
import dataclasses

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from hsc_fast import distributed as D
from hsc_fast.config import load_config
from hsc_fast.errors import ConfigError


@pytest.fixture(scope="module")
def group():
    info = D.init_distributed(60)
    yield info
    D.shutdown(info)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic VOC tree, CAM files from its masks (blurred, peak 1) and a CAM run's weights."""
    from hsc_fast.data.synth import generate
    from hsc_fast.data.voc import read_id_list, read_label_png
    from hsc_fast.eval.seeds import cam_path, save_cam_file
    from hsc_fast.models import build_cam_model
    out = tmp_path_factory.mktemp("refine")
    generate(out, n_train=8, n_val=2, seed=5, size=64)
    voc = out / "VOC2012"
    ids = read_id_list(voc / "ImageSets" / "Segmentation" / "train.txt")
    cams = out / "cam_npy"
    cams.mkdir()
    for key in ids:
        gt = read_label_png(voc / "SegmentationClass" / f"{key}.png")
        classes = [c for c in np.unique(gt) if 0 < c < 255]
        maps = [gaussian_filter((gt == c).astype(np.float32), 4.0) for c in classes]
        maps = [m / max(m.max(), 1e-6) for m in maps]
        save_cam_file(cam_path(cams, key), np.array([c - 1 for c in classes]),
                      np.stack(maps) if maps else np.zeros((0,) + gt.shape, np.float32))
    cfg = load_config("demo", [f"data.train={out}", f"data.sbd_root={out / 'SBD'}", "data.workers=0",
                               "model.backbone=resnet18", "model.weights=", "model.allow_random_init=true",
                               "train.tensorboard=false",
                               "train.deterministic=true", "refine.method=psa", "refine.batch_size=2",
                               "refine.crop_size=72", "refine.max_steps=6", "refine.save_every=3",
                               "refine.feat_dim=16", "refine.lr=0.01", "refine.logt=4"])
    cam_run = out / "cam"
    (cam_run / "final").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_cam_model(cfg.model, load_weights=False).state_dict(), cam_run / "final" / "model.pt")
    return {"root": out, "voc": voc, "ids": ids, "cams": cams, "cam_run": cam_run, "cfg": cfg}


def _stored_label(cfg, folder, key):
    """The stride-1 affinity label of either storage (scores: PSA's rule on the stored maps)."""
    from hsc_fast.data.voc import read_label_png
    from hsc_fast.engine.affinity_data import load_affinity_scores
    from hsc_fast.eval.affinity_labels import affinity_label_from_scores
    if cfg.refine.label_pooling == "vote":
        return read_label_png(folder / f"{key}.png")
    return affinity_label_from_scores(*load_affinity_scores(folder / f"{key}.npz"))


@pytest.mark.parametrize("pooling", ["scores", "vote"])
def test_refine_end_to_end_writes_labels_trains_and_walks(tiny, group, tmp_path, pooling):
    from hsc_fast.data.voc import read_label_png
    from hsc_fast.engine import refine as R
    from hsc_fast.engine.runlog import read_metrics
    from hsc_fast.eval.evaluate import evaluate
    cfg, ids, data = tiny["cfg"], tiny["ids"], str(tiny["root"])
    cfg = dataclasses.replace(cfg, refine=dataclasses.replace(cfg.refine, label_pooling=pooling))
    run = tmp_path / "refine"
    assert R.make_affinity_labels(cfg, data, tiny["cams"], run / R.AFF_LABELS, ids) == len(ids)
    for key in ids:   # PSA's labels: VOC ids of the image's classes, bg, 255; never a class it lacks
        label = _stored_label(cfg, run / R.AFF_LABELS, key)
        gt = read_label_png(tiny["voc"] / "SegmentationClass" / f"{key}.png")
        assert set(np.unique(label)) <= set(np.unique(gt)) | {0, 255}
    assert R.make_affinity_labels(cfg, data, tiny["cams"], run / R.AFF_LABELS, ids) == 0     # resumable
    summary = R.train_affinity(cfg, run / R.AFFINITY, images=data, labels_dir=run / R.AFF_LABELS, train_ids=ids,
                               cam_run=tiny["cam_run"], progress=False)
    assert summary["step"] == 6
    rows = read_metrics(run / R.AFFINITY / "metrics.csv")
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 7)]
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("loss", "bg", "fg", "neg"))
    assert all(float(r["loss"]) > 0 for r in rows)          # PSA's pair subset of the crop is not empty
    model = R.load_affinity_net(cfg, run / R.AFFINITY, torch.device("cpu"))
    assert R.random_walk_masks(cfg, model, data, tiny["cams"], run / R.MASKS, ids, device="cpu") == len(ids)
    result = evaluate(tiny["voc"] / "SegmentationClass", pred_dir=run / R.MASKS, ids=ids)
    assert result["n_images"] == len(ids) and 0 < result["miou"] <= 100
    # the AffinityNet was initialised from the CAM run's backbone, exactly
    from hsc_fast.models.affinity import build_affinity_net
    cam_state = R.cam_backbone_state(tiny["cam_run"])
    net = build_affinity_net("resnet18", weights_state_dict=cam_state, feat_dim=16)
    key = next(k for k in cam_state if k.startswith("backbone.") and k.endswith("conv1.weight"))
    assert torch.equal(dict(net.named_parameters())[key], cam_state[key])


def test_walk_of_uniform_affinities_keeps_the_cams_argmax(tiny):
    """Zero features -> every affinity 1: the walk only averages, so a CAM that dominates the
    whole image keeps every pixel."""
    from hsc_fast.engine.refine import walk_one

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(1, 4, -(-x.shape[2] // 8), -(-x.shape[3] // 8))

    image = np.zeros((37, 45, 3), np.uint8)
    cams = np.full((2, 37, 45), 0.2, np.float32)
    cams[1] = 0.9
    label = walk_one(Zero(), image, np.array([3, 11]), cams, tiny["cfg"], "cpu")
    assert label.shape == (37, 45) and (label == 12).all()
    assert (walk_one(Zero(), image, np.array([], np.int64), cams[:0], tiny["cfg"], "cpu") == 0).all()


def test_refine_config_is_checked_before_work():
    from hsc_fast.engine.refine import check_refine_config
    for overrides, key in ((["refine.alpha_low=40", "refine.alpha_high=32"], "alpha_low"), (["refine.radius=0"], "radius"),
                           (["refine.scale_range=[1.5,0.5]"], "scale_range"), (["refine.alpha_high=autoo"], "alpha_high")):
        with pytest.raises(ConfigError, match=key):
            check_refine_config(load_config("demo", overrides))
    with pytest.raises(ConfigError, match="'refine.method': 'affinity' is not one of none, psa"):
        load_config("demo", ["refine.method=affinity"])
    assert dataclasses.asdict(load_config("hsc_eps_official").refine)["method"] == "none"


def test_auto_affinity_alphas_keep_psas_ratio_to_the_seed_crf(tmp_path):
    from hsc_fast.engine.refine import affinity_alphas, seed_crf_alpha
    cfg = load_config("demo")
    assert affinity_alphas(cfg, 7.0) == (4.0, 32.0)                        # PSA's pair for the authors' 7
    assert affinity_alphas(cfg, 2.0) == pytest.approx((8 / 7, 64 / 7))
    assert affinity_alphas(load_config("demo", ["refine.alpha_low=3", "refine.alpha_high=20"]), 2.0) == (3.0, 20.0)
    assert seed_crf_alpha(cfg, tmp_path) == 7.0                              # auto, nothing swept yet
    assert seed_crf_alpha(load_config("seam"), tmp_path) == 7.0
    (tmp_path / "crf_params.json").write_text('{"alpha": 2.5}')
    assert seed_crf_alpha(cfg, tmp_path) == 2.5
    with pytest.raises(ConfigError, match="resolve to"):
        affinity_alphas(load_config("demo", ["refine.alpha_low=20"]), 2.0)


def test_auto_walk_background_keeps_psas_ratio():
    from hsc_fast.engine.refine import walk_bg_alpha
    assert walk_bg_alpha(load_config("demo"), 7.0) == 16.0
    assert walk_bg_alpha(load_config("demo"), 2.0) == pytest.approx(32 / 7)
    assert walk_bg_alpha(load_config("demo", ["refine.bg_alpha=9"]), 2.0) == 9.0
    with pytest.raises(ConfigError, match="refine.bg_alpha"):
        from hsc_fast.engine.refine import check_refine_config
        check_refine_config(load_config("demo", ["refine.bg_alpha=-1"]))
