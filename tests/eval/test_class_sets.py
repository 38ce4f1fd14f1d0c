"""Evaluation, seeds and the seed CRF at other class counts than VOC's: COCO (80 + background) and
an odd synthetic set (7 + background), each against a plain numpy computation written out here."""
import numpy as np
import pytest
import torch

from hsc_fast.classes import COCO, VOC, synthetic
from hsc_fast.crf import CrfParams, crf_inference
from hsc_fast.data.voc import read_label_png, write_label_png
from hsc_fast.errors import ConfigError, DataError
from hsc_fast.eval.evaluate import (confusion_matrix, confusion_shape, evaluate, iou_from_confusion,
                                    miou_from_confusion, read_cam_file, seeds_from_cams, sweep_confusions)
from hsc_fast.eval.seeds import (PseudoLabelParams, Sample, alpha_confusions, crf_input, crf_label, label_from_crf,
                                 multiscale_cam, save_cam_file, write_labels)


def reference_confusion(pairs, n_fg):
    """(K+1) x (K+2) by counting every (gt class, prediction) cell with boolean masks."""
    conf = np.zeros((n_fg + 1, n_fg + 2), np.int64)
    for gt, pred in pairs:
        for r in range(n_fg + 1):
            row = gt == r
            for c in range(n_fg + 1):
                conf[r, c] += np.count_nonzero(row & (pred == c))
            conf[r, n_fg + 1] += np.count_nonzero(row & (pred == 255))
    return conf


def reference_mious(pairs, n_fg):
    """(present, all) mIoU as the authors' evaluation.py counts it: T, P, TP per class over valid pixels."""
    t, p, tp = (np.zeros(n_fg + 1) for _ in range(3))
    for gt, pred in pairs:
        valid = gt != 255
        for c in range(n_fg + 1):
            t[c] += np.count_nonzero((gt == c) & valid)
            p[c] += np.count_nonzero((pred == c) & valid)
            tp[c] += np.count_nonzero((gt == c) & (pred == c) & valid)
    union = t + p - tp
    present = union > 0
    return float(np.mean(tp[present] / union[present])), float(np.mean(tp / (union + 1e-10))), int(present.sum())


def random_pairs(rng, n_fg, n=3, shape=(23, 31), absent=()):
    """Label maps over 0..K minus `absent`, with ground-truth 255s and predicted 255s."""
    values = np.array([v for v in range(n_fg + 1) if v not in absent], np.uint8)
    pairs = []
    for _ in range(n):
        gt = rng.choice(values, size=shape)
        pred = np.where(rng.random(shape) < 0.3, gt, rng.choice(values, size=shape)).astype(np.uint8)
        gt[rng.random(shape) < 0.08] = 255
        pred[rng.random(shape) < 0.05] = 255
        pairs.append((gt, pred))
    return pairs


@pytest.mark.parametrize("classes", [COCO, synthetic(7)], ids=["coco", "K7"])
def test_confusion_and_miou_match_plain_counting(classes):
    k = classes.num_fg
    rng = np.random.default_rng(k)
    absent = {3, k} | ({17, 40, 66} if k > 7 else set())        # some classes nowhere: present != all
    pairs = random_pairs(rng, k, absent=absent)
    conf = sum(confusion_matrix(g, q, classes=classes) for g, q in pairs)
    assert conf.shape == confusion_shape(classes) == (k + 1, k + 2)
    assert np.array_equal(conf, reference_confusion(pairs, k))
    present, all_, n_present = reference_mious(pairs, k)
    assert float(miou_from_confusion(conf)) == pytest.approx(present, rel=1e-13)
    assert float(miou_from_confusion(conf, "all")) == pytest.approx(all_, rel=1e-13)
    assert n_present == k + 1 - len(absent) and all_ < present
    iou, mask = iou_from_confusion(conf)
    assert iou.shape == (k + 1,) and sorted(np.flatnonzero(~mask)) == sorted(absent)


def test_labels_beyond_the_set_are_refused_not_miscounted():
    gt = np.zeros((2, 3), np.uint8)
    pred = np.array([[0, 7, 255], [8, 1, 2]], np.uint8)      # 8 does not exist for K = 7
    with pytest.raises(DataError, match=r"\[8\]"):
        confusion_matrix(gt, pred, classes=synthetic(7))
    with pytest.raises(DataError, match=r"\[21\]"):
        confusion_matrix(gt + 21, gt)                         # VOC by default
    assert confusion_matrix(gt, pred, classes=COCO)[0].tolist()[:9] == [1, 1, 1, 0, 0, 0, 0, 1, 1]


def test_evaluate_folders_at_81_labels(tmp_path):
    rng = np.random.default_rng(0)
    pairs = random_pairs(rng, 80, n=3, absent={5})
    ids = ["a", "b", "c"]
    for sub in ("gt", "pred"):
        (tmp_path / sub).mkdir()
    for key, (g, q) in zip(ids, pairs):
        write_label_png(tmp_path / "gt" / f"{key}.png", g, COCO)
        write_label_png(tmp_path / "pred" / f"{key}.png", q, COCO)
    ref = reference_confusion(pairs, 80)
    pooled = evaluate(tmp_path / "gt", pred_dir=tmp_path / "pred", ids=ids * 6, workers=2, classes=COCO)
    assert np.array_equal(np.array(pooled["confusion"]), 6 * ref)   # 2 chunks: the job (and its set) pickled
    res = evaluate(tmp_path / "gt", pred_dir=tmp_path / "pred", ids=ids, workers=0, classes=COCO)
    assert np.array_equal(np.array(res["confusion"]), ref)
    assert list(res["iou"]) == list(COCO.label_names) and res["iou"][COCO.label_names[5]] is None
    assert res["miou"] == pytest.approx(reference_mious(pairs, 80)[0] * 100, rel=1e-13)
    allres = evaluate(tmp_path / "gt", pred_dir=tmp_path / "pred", ids=ids, average="all", classes=COCO)
    assert allres["miou"] == pytest.approx(reference_mious(pairs, 80)[1] * 100, rel=1e-13)
    with pytest.raises(DataError, match=r"gt/a\.png: label values \[[^\]]*\b21\b"):   # the same PNGs as VOC
        evaluate(tmp_path / "gt", pred_dir=tmp_path / "pred", ids=ids)


def _cams_on_levels(rng, n, shape, levels):
    """CAM values drawn from the thresholds themselves (ties with the threshold and between classes)."""
    return levels[rng.integers(0, len(levels), (n,) + shape)].astype(np.float32)


def test_sweep_confusions_at_80_classes_equal_each_threshold_separately():
    rng = np.random.default_rng(3)
    ths = np.round(np.arange(0, 0.6, 0.05), 6).astype(np.float32)
    levels = np.concatenate([ths, [0.0, 0.8, 1.0]]).astype(np.float32)
    keys = np.array([0, 19, 20, 41, 79])                      # beyond VOC's 0..19
    cams = _cams_on_levels(rng, len(keys), (19, 27), levels)
    gt = rng.integers(0, 81, (19, 27)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.1] = 255
    swept = sweep_confusions(gt, keys, cams, ths, classes=COCO)
    assert swept.shape == (len(ths), 81, 82)
    for j, t in enumerate(ths):
        stack = np.concatenate([np.full((1,) + cams.shape[1:], t, np.float32), cams])
        pred = np.concatenate([[0], keys + 1])[stack.argmax(0)].astype(np.uint8)   # ties -> the background
        assert np.array_equal(pred, seeds_from_cams(keys, cams, t))
        assert np.array_equal(swept[j], confusion_matrix(gt, pred, classes=COCO)), t
    with pytest.raises(DataError, match=r"keys \[0, 19, 20, 41, 79\]; expected class indices 0\.\.19"):
        sweep_confusions(gt % 21, keys, cams, ths)            # VOC: keys 20..79 do not exist


def test_cam_files_keys_follow_the_class_set(tmp_path):
    cams = np.random.default_rng(1).random((2, 4, 5)).astype(np.float32)
    for fmt in ("npy", "npz"):
        save_cam_file(tmp_path / f"x.{fmt}", np.array([79, 23]), cams)
        keys, back = read_cam_file(tmp_path / f"x.{fmt}", classes=COCO)
        assert keys.tolist() == [23, 79] and np.array_equal(back, cams[::-1])
        with pytest.raises(DataError, match="79"):
            read_cam_file(tmp_path / f"x.{fmt}")
        with pytest.raises(DataError, match=r"0\.\.6"):
            read_cam_file(tmp_path / f"x.{fmt}", classes=synthetic(7))


def _coco_case(seed=0, shape=(21, 29)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    keys = np.array([3, 41, 79])                               # 3 present classes of 80
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    blobs = [np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0) for cy, cx in ((5, 6), (14, 20), (10, 12))]
    cams = np.clip(np.stack(blobs) + 0.05 * rng.random((3,) + shape), 0, 1).astype(np.float32)
    return image, keys, cams


def test_seed_crf_at_80_classes_runs_on_the_present_channels_only():
    image, keys, cams = _coco_case()
    params = PseudoLabelParams(alpha=4.0, crf=CrfParams(iters=3))
    probs = crf_input(keys, cams, params.alpha)
    assert probs.shape == (4,) + cams.shape[1:]                 # background + the 3 present, not 81
    # by hand: [(1 - max)^alpha, cams] through the CRF, channel j -> label of class keys[j-1]
    by_hand = np.concatenate([(1.0 - cams.max(0, keepdims=True)) ** 4.0, cams]).astype(np.float32)
    q = crf_inference(image, by_hand, **params.crf.kwargs())
    expect = np.array([0, 4, 42, 80], np.uint8)[q.argmax(0)]
    got = crf_label(image, keys, cams, params)
    assert np.array_equal(got, expect)
    assert set(np.unique(got)) <= {0, 4, 42, 80} and {42, 80} <= set(np.unique(got))
    with pytest.raises(DataError, match="4 CRF channels for 2 classes"):
        label_from_crf(keys[:2], q)


def test_write_labels_and_alpha_sweep_at_80_classes(tmp_path):
    image, keys, cams = _coco_case(seed=1)
    (tmp_path / "cams").mkdir()
    save_cam_file(tmp_path / "cams" / "im1.npz", keys, cams)
    sample = Sample("im1", image, np.zeros(80, np.float32))
    params = PseudoLabelParams(alpha=4.0, crf=CrfParams(iters=2))
    assert write_labels([sample], tmp_path / "cams", tmp_path / "out", threshold=0.3, crf=params, overlays=1,
                        classes=COCO) == 1
    seed = read_label_png(tmp_path / "out" / "seeds" / "im1.png", COCO)
    assert np.array_equal(seed, seeds_from_cams(keys, cams, 0.3)) and seed.max() == 80
    pseudo = read_label_png(tmp_path / "out" / "pseudo_labels" / "im1.png", COCO)
    assert np.array_equal(pseudo, crf_label(image, keys, cams, params))
    assert (tmp_path / "out" / "overlays" / "im1.jpg").is_file()
    with pytest.raises(DataError, match=r"im1\.npz: CAM key 41; expected class indices 0\.\.19"):   # VOC default
        write_labels([sample], tmp_path / "cams", tmp_path / "out2", threshold=0.3)
    gt = seed.copy()
    gt[0] = 255
    conf = alpha_confusions([(image, keys, cams, gt)], [2.0, 8.0], params, classes=COCO)
    assert conf.shape == (2, 81, 82)
    for i, alpha in enumerate((2.0, 8.0)):
        p = PseudoLabelParams(alpha=alpha, crf=params.crf)
        assert np.array_equal(conf[i], confusion_matrix(gt, crf_label(image, keys, cams, p), classes=COCO))


class _Head(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, channels, 1, bias=False)

    def forward_cam(self, x):
        return self.conv(x)


def test_multiscale_cam_takes_k_from_the_labels():
    torch.manual_seed(0)
    image = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    label = np.zeros(80, np.float32)
    label[[2, 79]] = 1
    cams = multiscale_cam(_Head(81).eval(), image, label, scales=(1.0,), flip=False)
    assert cams.shape == (80, 12, 16)
    assert torch.count_nonzero(cams.amax(dim=(1, 2))).item() == 2 and cams[79].max() > 0.99
    with pytest.raises(ConfigError, match="21 output channels"):
        multiscale_cam(_Head(VOC.num_classes).eval(), image, label, scales=(1.0,), flip=False)


def test_overlay_colours_cover_coco_labels():
    from hsc_fast.classes import PALETTE
    from hsc_fast.eval.visualize import colorize_label
    label = np.array([[0, 21, 80, 255]], np.uint8)
    assert np.array_equal(colorize_label(label), PALETTE[[0, 21, 80, 255]][None])
    # the bit map by hand: 80 = 0b1_010_000 -> G gets 64 (2nd triple), R gets 32 (3rd triple);
    # 21 = 0b10_101 -> R and B get 128 (1st triple), G gets 64 (2nd triple)
    assert colorize_label(np.array([[80, 21]])).tolist() == [[[32, 64, 0], [128, 64, 128]]]
    with pytest.raises(DataError):
        colorize_label(np.array([[256]]))


def test_report_has_one_row_per_coco_label_and_names_the_set(tmp_path):
    import json

    from hsc_fast.classes import save
    from hsc_fast.eval.report import write_report
    save(tmp_path / "classes.json", COCO)
    iou = {name: (50.0 if i % 2 else None) for i, name in enumerate(COCO.label_names)}
    (tmp_path / "crf_eval.json").write_text(json.dumps({"miou": 50.0, "iou": iou}))
    (tmp_path / "summary.json").write_text(json.dumps({"crf_eval": "crf_eval.json", "crf_miou": 50.0}))
    md, page = write_report(tmp_path)
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.count("|") == 3]
    names = [r.split("|")[1].strip() for r in rows]
    assert names[names.index("class") + 1:][:81] == list(COCO.label_names)
    assert "| toothbrush | - |" in text and "| hair drier | 50.00 |" in text
    assert "Classes: coco (80 foreground classes + background)" in text
    assert "Classes: coco" in page.read_text()
