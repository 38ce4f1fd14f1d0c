"""--classes of hsc_fast.cli.evaluate and make_seeds: COCO labels (21..80) accepted with coco and
refused with voc (naming the file and the value), the run's classes.json found by default."""
import json
from pathlib import Path

import numpy as np
import pytest

from hsc_fast import classes as C
from hsc_fast.cli import evaluate as EV
from hsc_fast.cli import make_seeds as MS
from hsc_fast.data.voc import write_label_png


def _label_maps(rng, shape=(9, 13)):
    """id -> (gt, pred): 'a' within VOC's 0..20, 'b' with predictions 57 and 80, 'c' with every label
    0..80 in its ground truth."""
    a = rng.integers(0, 21, shape).astype(np.uint8)
    b_gt = rng.integers(0, 21, shape).astype(np.uint8)
    b_pred = b_gt.copy()
    b_pred[0, :3] = 57
    b_pred[1, :2] = 80
    c_gt = np.arange(np.prod(shape)).reshape(shape) % 81
    c_gt = c_gt.astype(np.uint8)
    c_gt[-1, -1] = 255
    return {"a": (a, a.copy()), "b": (b_gt, b_pred), "c": (c_gt, np.roll(c_gt, 1, axis=1))}


def _write(maps, gt_dir: Path, pred_dir: Path):
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir(parents=True)
    for key, (g, q) in maps.items():
        write_label_png(gt_dir / f"{key}.png", g, C.COCO)
        write_label_png(pred_dir / f"{key}.png", q, C.COCO)


def _reference_miou(maps):
    """Present-class mIoU (percent) by counting T, P and TP of each of the 81 classes."""
    t, p, tp = (np.zeros(81) for _ in range(3))
    for g, q in maps.values():
        valid = g != 255
        for c in range(81):
            t[c] += np.sum((g == c) & valid)
            p[c] += np.sum((q == c) & valid)
            tp[c] += np.sum((g == c) & (q == c) & valid)
    union = t + p - tp
    return float(np.mean(tp[union > 0] / union[union > 0]) * 100)


ARGS = ["--workers", "0", "--no-progress"]


def test_coco_labels_accepted_with_coco_refused_with_voc(tmp_path, capsys):
    maps = _label_maps(np.random.default_rng(0))
    _write(maps, tmp_path / "gt", tmp_path / "pred")
    base = ["--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred")] + ARGS
    out = tmp_path / "res.json"
    assert EV.main(base + ["--classes", "coco", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data["iou"]) == list(C.COCO.label_names)
    assert data["miou"] == pytest.approx(_reference_miou(maps), rel=1e-13)
    assert data["iou"]["toothbrush"] is not None and data["n_images"] == 3
    assert "toothbrush" in capsys.readouterr().out
    assert EV.main(base + ["--classes", "voc"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "pred" / "b.png") in err and "57" in err and "outside 0..20" in err
    assert EV.main(base) == 2                       # nothing records a set: voc
    assert "b.png" in capsys.readouterr().err
    assert EV.main(base + ["--classes", "cocoa"]) == 2
    assert "--classes: 'cocoa'" in capsys.readouterr().err


def test_default_is_the_classes_json_of_the_run(tmp_path, capsys):
    """Pipeline layout: RUN_DIR/classes.json beside RUN_DIR/<stage>/<folder>."""
    maps = _label_maps(np.random.default_rng(1))
    run = tmp_path / "run"
    _write(maps, tmp_path / "data" / "SegmentationClass", run / "seeds" / "pseudo_labels")
    C.save(run / C.CLASSES_FILE, C.COCO)
    argv = ["--gt", str(tmp_path / "data" / "SegmentationClass"), "--pred", str(run / "seeds" / "pseudo_labels")] + ARGS
    res = EV.run(argv)
    assert len(res["iou"]) == 81 and res["miou"] == pytest.approx(_reference_miou(maps), rel=1e-13)
    assert f"classes: coco (80 classes + background) from {run / C.CLASSES_FILE}" in capsys.readouterr().err
    # the ground-truth tree's own record agrees: fine; one that disagrees: exit 2, asking for --classes
    C.save(tmp_path / "data" / C.CLASSES_FILE, C.COCO)
    assert len(EV.run(argv)["iou"]) == 81
    C.save(tmp_path / "data" / C.CLASSES_FILE, C.synthetic(7))
    assert EV.main(argv) == 2
    err = capsys.readouterr().err
    assert "'coco' (80 classes)" in err and "'synthetic:7' (7 classes)" in err and "pass --classes" in err
    # an explicit --classes wins (a classes.json path works too)
    assert len(EV.run(argv + ["--classes", str(run / C.CLASSES_FILE)])["iou"]) == 81
    # without the run's file the tree's record is used: K = 7 refuses the values 8.. of a.png
    (run / C.CLASSES_FILE).unlink()
    assert EV.main(argv) == 2
    err = capsys.readouterr().err
    assert "SegmentationClass/a.png: label values" in err and "outside 0..7 and 255" in err


def test_odd_class_count_through_the_cli(tmp_path):
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 8, (6, 7)).astype(np.uint8)
    pred = np.where(rng.random(gt.shape) < 0.5, gt, 7).astype(np.uint8)
    for sub, arr in (("gt", gt), ("pred", pred)):
        (tmp_path / sub).mkdir()
        write_label_png(tmp_path / sub / "x.png", arr, C.synthetic(7))
    res = EV.run(["--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"), "--classes", "synthetic:7"] + ARGS)
    assert list(res["iou"]) == ["background"] + [f"synth{c:02d}" for c in range(1, 8)]
    assert np.array(res["confusion"]).shape == (8, 9)


def _seed_args(tmp_path, *extra):
    data = tmp_path / "data"
    (data / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (tmp_path / "ids.txt").write_text("a\n")
    return MS.build_parser().parse_args(["--data", str(data), "--out", str(tmp_path / "run" / "seeds"),
                                         "--list", str(tmp_path / "ids.txt"), "--no-progress", *extra])


def test_make_seeds_classes_default_explicit_and_model_check(tmp_path, capsys):
    job = MS.job_from_args(_seed_args(tmp_path))
    assert job.classes is C.VOC and job.cfg.model.num_classes == 21
    job = MS.job_from_args(_seed_args(tmp_path, "--classes", "coco"))
    assert job.classes is C.COCO and job.cfg.model.num_classes == 81 and job.cfg.data.classes == "coco"
    (tmp_path / "run").mkdir(exist_ok=True)
    C.save(tmp_path / "run" / C.CLASSES_FILE, C.COCO)            # RUN_DIR of --out RUN_DIR/seeds
    assert MS.job_from_args(_seed_args(tmp_path)).classes.names == C.COCO.names
    assert str(tmp_path / "run" / C.CLASSES_FILE) in capsys.readouterr().err
    assert MS.job_from_args(_seed_args(tmp_path, "--classes", "synthetic:7")).cfg.model.num_classes == 8
    (tmp_path / "run" / C.CLASSES_FILE).unlink()                  # no file: the config's data.classes
    assert MS.job_from_args(_seed_args(tmp_path, "--set", "data.classes=synthetic:5")).classes.num_fg == 5
    # a CAM model whose head is not K+1 channels, or a config naming another set: exit 2 before any work
    argv = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run" / "seeds"), "--list",
            str(tmp_path / "ids.txt"), "--stage", "sweep", "--classes", "coco", "--no-progress"]
    assert MS.main(argv + ["--set", "model.num_classes=21"]) == 2
    assert "'model.num_classes': 21" in capsys.readouterr().err
    assert MS.main(argv + ["--set", "data.classes=voc"]) == 2
    assert "'data.classes'" in capsys.readouterr().err
    assert MS.main(argv[:-3] + ["--classes", "bogus"]) == 2
    assert "--classes: 'bogus'" in capsys.readouterr().err


def test_make_seeds_sweep_and_seeds_at_coco_end_to_end(tmp_path, capsys):
    """make_seeds --stage sweep in the pipeline layout (RUN_DIR/classes.json, RUN_DIR/seeds/cam_npy)
    on a VOC-layout tree that records COCO (its classes.json): CAM keys 5..79, labels up to 80."""
    from PIL import Image

    from hsc_fast.data.voc import read_label_png
    from hsc_fast.eval.evaluate import read_cam_file, seeds_from_cams
    from hsc_fast.eval.seeds import save_cam_file
    data, run = tmp_path / "data", tmp_path / "run"
    for d in (data / "JPEGImages", data / "SegmentationClass", run / "seeds" / "cam_npy"):
        d.mkdir(parents=True)
    C.save(run / C.CLASSES_FILE, C.COCO)
    C.save(data / C.CLASSES_FILE, C.COCO)
    rng = np.random.default_rng(4)
    ids = [f"im{i}" for i in range(3)]
    for i, key in enumerate(ids):
        h, w = 14 + i, 18
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(data / "JPEGImages" / f"{key}.jpg")
        keys, cams = np.array([10 * i + 5, 79 - i]), rng.random((2, h, w)).astype(np.float32)
        save_cam_file(run / "seeds" / "cam_npy" / f"{key}.npy", keys, cams)
        gt = np.where(cams.max(0) > 0.4, keys[cams.argmax(0)] + 1, 0).astype(np.uint8)   # the seeds at 0.4
        write_label_png(data / "SegmentationClass" / f"{key}.png", gt, C.COCO)
    (data / "cls_labels.json").write_text(json.dumps({k: [1] for k in ids}))
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    assert MS.main(["--data", str(data), "--out", str(run / "seeds"), "--list", str(tmp_path / "ids.txt"),
                    "--stage", "sweep", "--cls-labels", str(data / "cls_labels.json"), "--workers", "0",
                    "--no-progress", "--set", "seeds.thresholds=0.3:0.5:0.1"]) == 0
    sweep = json.loads((run / "seeds" / "sweep.json").read_text())
    assert len(sweep["iou"]) == 81 and sweep["best"]["threshold"] == 0.4 and sweep["best"]["miou"] == 100.0
    for key in ids:
        keys, cams = read_cam_file(run / "seeds" / "cam_npy" / f"{key}.npy", classes=C.COCO)
        seed = read_label_png(run / "seeds" / "seeds" / f"{key}.png", C.COCO)
        assert np.array_equal(seed, seeds_from_cams(keys, cams, 0.4)) and seed.max() > 20
    assert "toothbrush" in capsys.readouterr().out
