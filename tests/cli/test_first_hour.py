"""What a new user meets in the first hour: make_seeds on a shard index without --list, evaluate
with every prediction missing, and the evaluator's two mIoU averaging rules (computed by hand)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hsc_fast.cli import evaluate as EV
from hsc_fast.cli import make_seeds as MS
from hsc_fast.data import ShardSet
from hsc_fast.data.voc import read_id_list, write_label_png
from hsc_fast.errors import ConfigError
from hsc_fast.eval import evaluate as E
from hsc_fast.eval.seeds import save_cam_file


# ------------------------------------------------------------------ make_seeds on a shard index
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from hsc_fast.data.shard import shard_dataset
    from hsc_fast.data.synth import generate
    root = tmp_path_factory.mktemp("synth")
    generate(root, 6, 2, 0, 64)
    voc = root / "VOC2012"
    out = root / "shards"
    shard_dataset(voc, voc / "ImageSets/Segmentation/train_aug.txt", out, sbd_root=root / "SBD",
                  cls_labels=root / "cls_labels.npy", shard_size=4, workers=1, progress=False)
    return out


def _seed_args(*argv):
    return MS.build_parser().parse_args(["--out", "unused", *argv])


@pytest.mark.parametrize("as_folder", [False, True])
def test_make_seeds_takes_the_ids_of_the_shard_index_without_list(shards, as_folder):
    data = str(shards if as_folder else shards / "index.json")
    args = _seed_args("--data", data, "--config", "demo")
    ids = MS._id_list(args, MS._config_from_args(args))
    index = json.loads((shards / "index.json").read_text())
    want = [i for entry in index["shards"] for i in entry["ids"]]
    listed = read_id_list(shards.parent / "VOC2012/ImageSets/Segmentation/train_aug.txt")
    assert len(index["shards"]) == 2 and sorted(want) == sorted(listed)
    assert ids == want == [i for shard in ShardSet(data).ids for i in shard]
    job = MS.job_from_args(args)
    MS.check_job(job)                      # the pre-flight accepts the shard source too
    assert job.ids == want


def test_make_seeds_explicit_list_still_wins_over_the_shard_index(shards, tmp_path):
    lst = tmp_path / "two.txt"
    first = ShardSet(str(shards / "index.json")).ids[0][:2]
    lst.write_text("\n".join(first) + "\n")
    args = _seed_args("--data", str(shards / "index.json"), "--list", str(lst), "--config", "demo")
    assert MS._id_list(args, MS._config_from_args(args)) == first


def test_make_seeds_shard_urls_without_index_ask_for_a_list(shards, tmp_path):
    import shutil
    lone = tmp_path / "lone"
    lone.mkdir()
    tar = next(shards.glob("*.tar"))
    shutil.copy(tar, lone / tar.name)
    args = _seed_args("--data", str(lone / tar.name), "--config", "demo")
    with pytest.raises(ConfigError, match="give --list"):
        MS._id_list(args, MS._config_from_args(args))


# ----------------------------------------------------------- evaluate with missing predictions
@pytest.fixture()
def tiny_eval(tmp_path):
    """Three 2x2 ground truths; predictions are written per test."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    for k in ("a", "b", "c"):
        write_label_png(gt / f"{k}.png", np.array([[0, 0], [1, 1]], np.uint8))
    return gt, pred


def test_all_predictions_missing_is_exit_2_before_any_work(tiny_eval, tmp_path, capsys):
    gt, pred = tiny_eval
    out = tmp_path / "out.json"
    status = EV.main(["--gt", str(gt), "--pred", str(pred), "--allow-missing", "--json", str(out),
                      "--no-progress", "--workers", "0"])
    err = capsys.readouterr()
    assert status == 2
    assert "mIoU" not in err.out and not out.exists()
    assert "nothing to evaluate" in err.err and "3 predictions missing" in err.err


def test_predictions_only_for_ids_without_ground_truth_is_exit_2(tiny_eval, tmp_path, capsys):
    gt, pred = tiny_eval
    write_label_png(pred / "zzz.png", np.zeros((2, 2), np.uint8))      # no ground truth for it
    lst = tmp_path / "ids.txt"
    lst.write_text("a\nzzz\n")
    assert EV.main(["--gt", str(gt), "--pred", str(pred), "--list", str(lst), "--allow-missing",
                    "--no-progress", "--workers", "0"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_nothing_evaluated_found_after_the_work_is_exit_1(tiny_eval, tmp_path, monkeypatch, capsys):
    """The pre-check passed but no id turned out evaluable (files changed in between): exit 1."""
    gt, pred = tiny_eval
    write_label_png(pred / "zzz.png", np.zeros((2, 2), np.uint8))
    lst = tmp_path / "ids.txt"
    lst.write_text("a\nzzz\n")
    monkeypatch.setattr(E, "_check_something_to_evaluate", lambda job, ids: None)
    assert EV.main(["--gt", str(gt), "--pred", str(pred), "--list", str(lst), "--allow-missing",
                    "--no-progress", "--workers", "0"]) == 1
    assert "none of the 2 ids has both" in capsys.readouterr().err


def test_missing_count_is_printed_beside_every_miou_and_kept_in_the_json(tiny_eval, tmp_path, capsys):
    gt, pred = tiny_eval
    write_label_png(pred / "a.png", np.array([[0, 0], [1, 1]], np.uint8))
    out = tmp_path / "out.json"
    assert EV.main(["--gt", str(gt), "--pred", str(pred), "--allow-missing", "--json", str(out),
                    "--no-progress", "--workers", "0"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("mIoU"))
    assert "(3 images, 2 missing predictions counted as background)" in line
    saved = json.loads(out.read_text())
    assert saved["n_missing_pred"] == 2 and saved["n_images"] == 3
    # bg: TP 6, T 6, P 10 -> 6/10; aeroplane: TP 2, T 6, P 2 -> 2/6
    assert saved["miou"] == pytest.approx((0.6 + 1 / 3) / 2 * 100, abs=1e-12)


def test_sweep_best_line_and_json_carry_the_missing_count(tiny_eval, tmp_path, capsys):
    gt, _ = tiny_eval
    cams = tmp_path / "cams"
    cams.mkdir()
    save_cam_file(cams / "a.npy", np.array([0]), np.array([[[0.1, 0.2], [0.9, 0.8]]], np.float32))
    out = tmp_path / "sweep.json"
    assert EV.main(["--gt", str(gt), "--cam", str(cams), "--allow-missing", "--thresholds", "0.0:0.6:0.3",
                    "--json", str(out), "--no-progress", "--workers", "0"]) == 0
    text = capsys.readouterr().out
    best = next(x for x in text.splitlines() if x.startswith("best background threshold"))
    assert "2 missing predictions counted as background" in best
    saved = json.loads(out.read_text())
    assert saved["n_missing_pred"] == 2 and saved["best"]["n_missing_pred"] == 2


def test_nothing_missing_says_zero(tiny_eval, capsys):
    gt, pred = tiny_eval
    for k in ("a", "b", "c"):
        write_label_png(pred / f"{k}.png", np.array([[0, 0], [1, 1]], np.uint8))
    assert EV.main(["--gt", str(gt), "--pred", str(pred), "--no-progress", "--workers", "0"]) == 0
    assert "(3 images, 0 missing predictions counted as background)" in capsys.readouterr().out


# ------------------------------------------------------------------------- --average present|all
def test_average_rules_by_hand(tmp_path, capsys):
    """One 2x3 image, ground truth {0, 1}, prediction {0, 1, 3}:
         background: T 3, P 2, TP 2 -> IoU 2/3
         aeroplane:  T 3, P 3, TP 2 -> IoU 2/4 = 1/2
         bird:       T 0, P 1, TP 0 -> IoU 0 (predicted, never in the ground truth)
         the other 18 classes: in neither.
       present: (2/3 + 1/2 + 0) / 3 = 7/18 = 38.888...%
       all (the authors' evaluation.py): sum_c TP_c / (T_c + P_c - TP_c + 1e-10) / 21
            = (2/(3+1e-10) + 2/(4+1e-10) + 0/(1+1e-10) + 18 * 0/1e-10) / 21 ~= 7/126 = 5.5555...%"""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    write_label_png(gt / "x.png", np.array([[0, 0, 0], [1, 1, 1]], np.uint8))
    write_label_png(pred / "x.png", np.array([[0, 0, 1], [1, 1, 3]], np.uint8))
    present = 100 * (2 / 3 + 1 / 2 + 0) / 3
    authors = 100 * (2 / (3 + 1e-10) + 2 / (4 + 1e-10) + 0 / (1 + 1e-10) + 18 * (0 / 1e-10)) / 21
    assert present == pytest.approx(700 / 18, rel=1e-15) and authors == pytest.approx(700 / 126, rel=1e-9)

    base = ["--gt", str(gt), "--pred", str(pred), "--no-progress", "--workers", "0"]
    out_p, out_a = tmp_path / "p.json", tmp_path / "a.json"
    assert EV.main(base + ["--json", str(out_p)]) == 0                       # the default: present
    assert EV.main(base + ["--average", "all", "--json", str(out_a)]) == 0
    p, a = json.loads(out_p.read_text()), json.loads(out_a.read_text())
    assert p["average"] == "present" and a["average"] == "all"
    assert p["miou"] == pytest.approx(present, rel=1e-12)
    assert a["miou"] == pytest.approx(authors, rel=1e-12)
    assert a["miou"] != pytest.approx(p["miou"], rel=0.5)    # a 7x difference on this list
    assert p["iou"] == a["iou"]                                # per-class IoU is the same under both rules
    assert "average over all 21 classes" in capsys.readouterr().out


def test_average_all_equals_the_authors_loop_on_random_labels():
    """The authors' evaluation.py loop (T, P, TP per class, +1e-10, mean of 21) on random labels,
    with 255 in both ground truth and prediction, against the confusion-matrix implementation."""
    rng = np.random.default_rng(3)
    gts = [rng.choice(np.array([0, 2, 5, 255], np.uint8), size=(7, 9)) for _ in range(4)]
    preds = [rng.choice(np.array([0, 2, 3, 255], np.uint8), size=(7, 9)) for _ in range(4)]
    tp, t, p = np.zeros(21), np.zeros(21), np.zeros(21)
    for g, q in zip(gts, preds):
        cal = g < 255
        mask = (q == g) * cal
        for i in range(21):
            p[i] += np.sum((q == i) * cal)
            t[i] += np.sum((g == i) * cal)
            tp[i] += np.sum((g == i) * mask)
    authors = np.mean(tp / (t + p - tp + 1e-10))
    conf = sum(E.confusion_matrix(g, q) for g, q in zip(gts, preds))
    assert float(E.miou_from_confusion(conf, "all")) == pytest.approx(authors, rel=1e-14)
    present = np.mean((tp / np.maximum(t + p - tp, 1))[(t + p - tp) > 0])
    assert float(E.miou_from_confusion(conf)) == pytest.approx(present, rel=1e-14)
    assert present > 4 * authors               # 5 classes occur: 21 / 5 apart


def test_unknown_average_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        EV.build_parser().parse_args(["--gt", "g", "--pred", "p", "--average", "mean"])
    assert e.value.code == 2
    with pytest.raises(ConfigError, match="average"):
        E.evaluate(tmp_path, pred_dir=tmp_path, ids=["x"], average="mean")
