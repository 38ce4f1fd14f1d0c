"""Evaluator: confusion/IoU against hand counts on the real VOC fixture masks, the one-pass sweep
against per-threshold evaluation, CAM file formats, errors, CLI outputs."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from hsc_fast.errors import DataError
from hsc_fast.eval.evaluate import (confusion_matrix, evaluate, foreground_precision_recall, parse_thresholds,
                                    read_cam_file, seeds_from_cams)
from hsc_fast.cli.evaluate import run as main
from hsc_fast.eval.seeds import save_cam_file
from hsc_fast.data.voc import read_label_png, write_label_png

IDS = ["2007_000032", "2007_000033"]


@pytest.fixture()
def gt_dir(fixtures_dir, tmp_path):
    """A copy of the real masks (no ImageSets beside it -> the default list is every PNG)."""
    d = tmp_path / "gt"
    d.mkdir()
    for i in IDS:
        shutil.copy(fixtures_dir / "voc" / "SegmentationClass" / f"{i}.png", d / f"{i}.png")
    return d


def _gts(gt_dir):
    return {i: read_label_png(gt_dir / f"{i}.png") for i in IDS}


def _write_preds(tmp_path, preds):
    d = tmp_path / "pred"
    d.mkdir(exist_ok=True)
    for i, p in preds.items():
        write_label_png(d / f"{i}.png", p)
    return d


def reference_ious(gts, preds):
    """Straightforward per-class counting (the official eval.py formula), independent of bincount."""
    tp = np.zeros(21)
    t = np.zeros(21)
    p = np.zeros(21)
    for k in gts:
        g, q = gts[k], preds[k]
        cal = g != 255
        for c in range(21):
            t[c] += np.sum((g == c) & cal)
            p[c] += np.sum((q == c) & cal)
            tp[c] += np.sum((g == c) & (q == c) & cal)
    union = t + p - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    return iou * 100, float(np.nanmean(iou[present]) * 100)


def test_identity_is_100_on_present_classes(gt_dir, tmp_path):
    gts = _gts(gt_dir)
    res = evaluate(gt_dir, pred_dir=_write_preds(tmp_path, gts))
    assert res["miou"] == pytest.approx(100.0)
    assert res["n_images"] == 2
    present = {"background", "aeroplane", "person"}
    for name, v in res["iou"].items():
        assert (v == pytest.approx(100.0)) if name in present else v is None, name


def test_relabelled_class_by_hand(gt_dir, tmp_path):
    gt = _gts(gt_dir)["2007_000033"]           # {0, 1 aeroplane, 255}
    pred = gt.copy()
    pred[gt == 1] = 3                           # every aeroplane pixel called bird
    res = evaluate(gt_dir, pred_dir=_write_preds(tmp_path, {"2007_000033": pred}), ids=["2007_000033"])
    # background exact (255 ignored), aeroplane TP 0, bird all FP: (100 + 0 + 0) / 3
    assert res["iou"]["background"] == pytest.approx(100.0)
    assert res["iou"]["aeroplane"] == 0.0 and res["iou"]["bird"] == 0.0
    assert res["miou"] == pytest.approx(100.0 / 3)
    conf = np.array(res["confusion"])
    assert conf[1, 3] == np.sum(gt == 1) and conf[1, 1] == 0 and conf[0, 0] == np.sum(gt == 0)


def test_missing_class_in_prediction_by_hand(gt_dir, tmp_path):
    gt = _gts(gt_dir)["2007_000032"]           # {0, 1, 15, 255}
    pred = gt.copy()
    pred[gt == 15] = 0                          # person predicted as background
    res = evaluate(gt_dir, pred_dir=_write_preds(tmp_path, {"2007_000032": pred}), ids=["2007_000032"])
    n0, n15 = np.sum(gt == 0), np.sum(gt == 15)
    assert res["iou"]["person"] == 0.0
    assert res["iou"]["aeroplane"] == pytest.approx(100.0)
    assert res["iou"]["background"] == pytest.approx(100.0 * n0 / (n0 + n15))
    assert res["miou"] == pytest.approx((100.0 * n0 / (n0 + n15) + 100.0 + 0.0) / 3)


def test_shifted_masks_match_reference(gt_dir, tmp_path):
    gts = _gts(gt_dir)
    preds = {}
    for k, g in gts.items():
        p = np.roll(g, shift=(7, -11), axis=(0, 1))
        p[p == 255] = 0                         # the boundary is not a predicted class
        preds[k] = p
    res = evaluate(gt_dir, pred_dir=_write_preds(tmp_path, preds))
    ref_iou, ref_miou = reference_ious(gts, preds)
    assert res["miou"] == pytest.approx(ref_miou, abs=1e-9)
    assert 50 < res["miou"] < 100               # a shift hurts but does not destroy
    for c, (name, v) in enumerate(res["iou"].items()):
        assert (v is None) == np.isnan(ref_iou[c])
        if v is not None:
            assert v == pytest.approx(ref_iou[c], abs=1e-9)


def test_random_predictions_match_reference_and_workers(gt_dir, tmp_path):
    rng = np.random.default_rng(0)
    gts = _gts(gt_dir)
    preds = {k: rng.choice(np.array([0, 1, 2, 15], np.uint8), size=g.shape, p=[.6, .2, .1, .1]) for k, g in gts.items()}
    d = _write_preds(tmp_path, preds)
    res = evaluate(gt_dir, pred_dir=d, workers=0)
    _, ref_miou = reference_ious(gts, preds)
    assert res["miou"] == pytest.approx(ref_miou, abs=1e-9)
    assert res["iou"]["bicycle"] == 0.0          # predicted, never in the ground truth -> counted, 0
    par = evaluate(gt_dir, pred_dir=d, workers=2, ids=IDS * 20)  # several chunks in a process pool
    assert np.array_equal(np.array(par["confusion"]), 20 * np.array(res["confusion"]))


def test_predicted_255_counts_as_miss(gt_dir, tmp_path):
    gt = _gts(gt_dir)["2007_000033"]
    pred = gt.copy()
    pred[gt == 1] = 255
    pred[gt == 255] = 0
    res = evaluate(gt_dir, pred_dir=_write_preds(tmp_path, {"2007_000033": pred}), ids=["2007_000033"])
    assert res["iou"]["aeroplane"] == 0.0 and res["iou"]["background"] == pytest.approx(100.0)


def _random_cams(rng, shape, keys, levels):
    """Smooth-ish CAMs whose values sit exactly on threshold values (to exercise ties)."""
    h, w = shape
    small = rng.random((len(keys), 6, 8))
    up = np.kron(small, np.ones((h // 6 + 1, w // 8 + 1)))[:, :h, :w]
    return levels[np.minimum((up * len(levels)).astype(int), len(levels) - 1)].astype(np.float32)


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_sweep_equals_per_threshold_evaluation(gt_dir, tmp_path, fmt):
    rng = np.random.default_rng(1)
    ths = parse_thresholds("0.00:0.60:0.05")
    assert len(ths) == 12 and ths[-1] == np.float32(0.55)
    cam_dir = tmp_path / "cams"
    cam_dir.mkdir()
    gts = _gts(gt_dir)
    stored = {}
    for k, g in gts.items():
        keys = np.array([0, 14, 6]) if k == IDS[0] else np.array([0])
        cams = _random_cams(rng, g.shape, keys, np.concatenate([ths, [0.7, 1.0]]))
        save_cam_file(cam_dir / f"{k}.{fmt}", keys, cams)
        stored[k] = (np.sort(keys), cams[np.argsort(keys)])
    res = evaluate(gt_dir, cam_dir=cam_dir, thresholds="0.00:0.60:0.05")
    assert [c["threshold"] for c in res["curve"]] == pytest.approx(ths.tolist())
    for t, point in zip(ths, res["curve"]):
        preds = {}
        for k, (keys, cams) in stored.items():
            # the plain definition: argmax over [t, cams] (np.argmax takes the first max -> bg on ties)
            stack = np.concatenate([np.full((1,) + cams.shape[1:], t, np.float32), cams])
            preds[k] = np.concatenate([[0], keys + 1])[stack.argmax(0)].astype(np.uint8)
        single = evaluate(gt_dir, pred_dir=_write_preds(tmp_path, preds))
        assert point["miou"] == pytest.approx(single["miou"], abs=1e-9), t
    best = max(res["curve"], key=lambda c: c["miou"])
    assert res["best"]["miou"] == best["miou"] and res["miou"] == pytest.approx(best["miou"])
    # foreground precision / recall of the seeds at the best threshold, counted by hand
    t = np.float32(res["best"]["threshold"])
    tp = pred_fg = gt_fg = 0
    for k, (keys, cams) in stored.items():
        stack = np.concatenate([np.full((1,) + cams.shape[1:], t, np.float32), cams])
        seed = np.concatenate([[0], keys + 1])[stack.argmax(0)]
        valid = gts[k] != 255
        tp += np.sum(valid & (gts[k] > 0) & (seed > 0))
        pred_fg += np.sum(valid & (seed > 0))
        gt_fg += np.sum(valid & (gts[k] > 0))
    assert res["best"]["fg_precision"] == pytest.approx(100 * tp / pred_fg, abs=1e-9)
    assert res["best"]["fg_recall"] == pytest.approx(100 * tp / gt_fg, abs=1e-9)
    assert 0 < tp < min(pred_fg, gt_fg)                  # neither ratio is trivially 0 or 100


def test_foreground_precision_recall_by_hand():
    """fg = any class but 0: a wrong fg class still counts as fg; void predictions are not fg; gt 255 ignored."""
    gt = np.array([[0, 0, 0, 1], [1, 1, 2, 2], [2, 255, 0, 3]], np.uint8)
    pred = np.array([[0, 1, 5, 1], [0, 2, 2, 255], [2, 7, 0, 0]], np.uint8)
    # predicted fg (gt not 255): (0,1) (0,2) (0,3) (1,1) (1,2) (2,0) = 6; gt fg: (0,3) (1,0..3) (2,0) (2,3) = 7;
    # both: (0,3) (1,1) (1,2) (2,0) = 4
    precision, recall = foreground_precision_recall(confusion_matrix(gt, pred))
    assert precision == pytest.approx(100 * 4 / 6) and recall == pytest.approx(100 * 4 / 7)
    assert foreground_precision_recall(confusion_matrix(gt * 0, pred * 0)) == (None, None)


def test_cam_file_round_trip_and_seeds(tmp_path):
    keys = np.array([3, 11])
    cams = np.random.default_rng(2).random((2, 5, 7)).astype(np.float32)
    for name, fp16 in (("a.npy", False), ("b.npz", False), ("c.npy", True)):
        save_cam_file(tmp_path / name, keys, cams, fp16=fp16)
        k, c = read_cam_file(tmp_path / name)
        assert k.tolist() == [3, 11] and c.dtype == np.float32
        assert np.allclose(c, cams, atol=1e-3 if fp16 else 0)
    # the .npy is the SEAM dict other tools read with np.load(allow_pickle=True)
    d = np.load(tmp_path / "a.npy", allow_pickle=True).item()
    assert sorted(d) == [3, 11] and np.array_equal(d[11], cams[1])
    seeds = seeds_from_cams(keys, cams, 0.5)
    expect = np.where(cams.max(0) > 0.5, np.where(cams[0] >= cams[1], 4, 12), 0)
    assert np.array_equal(seeds, expect)


def test_cam_file_refuses_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    arr = np.empty((), dtype=object)
    arr[()] = {0: Evil()}
    with open(tmp_path / "x.npy", "wb") as f:
        np.lib.format.write_array(f, arr, allow_pickle=True)
    with pytest.raises(DataError):
        read_cam_file(tmp_path / "x.npy")
    np.save(tmp_path / "y.npy", {25: np.zeros((2, 2), np.float32)}, allow_pickle=True)
    with pytest.raises(DataError, match="25"):
        read_cam_file(tmp_path / "y.npy")
    assert pickle  # silence linters


def test_missing_and_size_errors(gt_dir, tmp_path):
    gts = _gts(gt_dir)
    d = _write_preds(tmp_path, {IDS[0]: gts[IDS[0]]})
    with pytest.raises(DataError, match=IDS[1]):
        evaluate(gt_dir, pred_dir=d)
    res = evaluate(gt_dir, pred_dir=d, allow_missing=True)
    assert res["n_missing_pred"] == 1 and res["n_images"] == 2
    conf = np.array(res["confusion"])
    g1 = gts[IDS[1]]
    assert conf[1, 0] == np.sum(g1 == 1)        # the missing image counted as all background
    with pytest.raises(DataError, match="nonexistent_id"):
        evaluate(gt_dir, pred_dir=d, ids=[IDS[0], "nonexistent_id"])
    res = evaluate(gt_dir, pred_dir=d, ids=[IDS[0], "nonexistent_id"], allow_missing=True)
    assert res["n_missing_gt"] == 1 and res["n_images"] == 1 and res["miou"] == pytest.approx(100.0)
    write_label_png(d / f"{IDS[1]}.png", gts[IDS[1]][:-1])
    with pytest.raises(DataError, match=IDS[1]):
        evaluate(gt_dir, pred_dir=d)


def test_cli_writes_json_table_and_curve(gt_dir, tmp_path, capsys):
    cam_dir = tmp_path / "cams"
    cam_dir.mkdir()
    rng = np.random.default_rng(3)
    for k, g in _gts(gt_dir).items():
        save_cam_file(cam_dir / f"{k}.npy", np.array([0]), rng.random((1,) + g.shape).astype(np.float32))
    out = tmp_path / "res" / "sweep.json"
    res = main(["--gt", str(gt_dir), "--cam", str(cam_dir), "--json", str(out), "--workers", "0", "--no-progress"])
    data = json.loads(out.read_text())
    assert set(data) >= {"miou", "iou", "n_images", "curve", "best"} and "confusion" not in data
    assert len(data["curve"]) == 60 and data["curve"][22]["threshold"] == pytest.approx(0.22)
    assert data["best"] == res["best"] and len(data["iou"]) == 21
    with Image.open(out.with_suffix(".png")) as im:
        assert im.size == (640, 400)
    assert "aeroplane" in capsys.readouterr().out


def test_count_below_and_max_argmax_match_numpy():
    from hsc_fast.eval.evaluate import count_below, max_argmax
    rng = np.random.default_rng(4)
    for spec in ("0.00:0.60:0.01", "0.05:0.95:0.05", "0.1:0.3:0.1"):
        ths = parse_thresholds(spec)
        values = np.concatenate([rng.random(5000), ths, np.nextafter(ths, 2), np.nextafter(ths, -2),
                                 [-1.0, 0.0, 1.0, 5.0]]).astype(np.float32)
        assert np.array_equal(count_below(ths, values), np.searchsorted(ths, values, side="left")), spec
    uneven = np.array([0.0, 0.1, 0.15, 0.5], np.float32)      # not a grid: the binary search path
    v = rng.random(100).astype(np.float32)
    assert np.array_equal(count_below(uneven, v), np.searchsorted(uneven, v))
    cams = rng.integers(0, 3, (4, 1000)).astype(np.float32)   # many ties
    top, arg = max_argmax(cams)
    assert np.array_equal(top, cams.max(0)) and np.array_equal(arg, cams.argmax(0))
