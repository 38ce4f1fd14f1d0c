"""The ablation runner's logic: variant -> config switches (paper Table 4 rows), result files,
skipping of completed variants. No training here (the runner reuses the tested pipeline stages)."""
import json

import pytest
import _faultutil as F
import torch

from hsc_fast.engine import ablation as A
from hsc_fast.config import get_key, load_config
from hsc_fast.engine.cam_trainer import check_geometry
from hsc_fast.errors import ConfigError
from hsc_fast.io import write_json
from hsc_fast.engine.pipeline import Context, Dataset


@pytest.fixture(scope="module")
def base_cfg():
    return load_config("ablation/demo")


# Paper Table 4 (SEAM base), read with the text of Sec. 4.3: PSC, CSC, RSC are added on top of
# cross supervision; momentum prototypes (MPL) and the CRF-refined labels complete HSC.
#                      method      PSC    CSC    RSC    CS     MPL    CRF    paper
TABLE4 = {"seam":             ("seam",     0, 0, 0, 0, 0, 0, 55.4),
          "seam_psc":         ("hsc_seam", 1, 0, 0, 1, 0, 0, 59.3),
          "seam_psc_csc":     ("hsc_seam", 1, 1, 0, 1, 0, 0, 60.5),
          "seam_psc_csc_rsc": ("hsc_seam", 1, 1, 1, 1, 0, 0, 62.6),
          "hsc_seam":         ("hsc_seam", 1, 1, 1, 1, 1, 1, 64.3),
          "hsc_seam_paper":   ("hsc_seam", 1, 1, 1, 1, 1, 1, None),   # + loss.formulation=paper
          "eps":              ("eps",      0, 0, 0, 0, 0, 0, 69.2),
          "hsc_eps":          ("hsc_eps",  1, 1, 1, 1, 1, 1, 71.8)}


def test_variants_are_exactly_the_table_rows(base_cfg):
    assert [v.name for v in A.variants()] == list(TABLE4)
    for v in A.variants():
        method, *flags, paper = TABLE4[v.name]
        cfg = A.variant_config(base_cfg, v)
        assert cfg.loss.method == method
        assert [get_key(cfg, A.TOGGLE_KEYS[k]) for k in A.TOGGLES] == [bool(f) for f in flags], v.name
        assert v.paper_seed == paper
        assert cfg.loss.formulation == ("paper" if v.name == "hsc_seam_paper" else "code"), v.name
    paper = A.variant_config(base_cfg, A.variant_by_name()["hsc_seam_paper"])
    assert paper.loss.csc_topk == 4   # k_c per image (eq. 6): the paper's 16 of 16x16 -> 4 of 8x8
    check_geometry(paper)


def test_variants_differ_from_the_shared_config_only_in_the_loss_switches(base_cfg):
    from hsc_fast.config import to_dict
    base = to_dict(base_cfg)
    for v in A.variants():
        d = to_dict(A.variant_config(base_cfg, v))
        for section in base:
            if section != "loss":
                assert d[section] == base[section], (v.name, section)
        changed = {k for k in base["loss"] if base["loss"][k] != d["loss"][k]}
        changed |= {f"crf.{k}" for k in base["loss"]["crf"] if base["loss"]["crf"][k] != d["loss"]["crf"][k]}
        allowed = ({"method", "crf"} | {A.TOGGLE_KEYS[k].removeprefix("loss.") for k in A.TOGGLES} |
                   ({"formulation", "csc_topk"} if v.formulation == "paper" else set()))
        assert changed <= allowed, (v.name, changed)
    digests = {A.config_digest(A.variant_config(base_cfg, v)) for v in A.variants()}
    assert len(digests) == len(A.variants())


def test_a_registered_method_brings_its_ablation_rows():
    """Rows come from the registry: a toy method extending SEAM joins the SEAM group, after the
    rows already there; a row naming an unknown switch is refused with the method named."""
    from hsc_fast.losses.methods import AblationRow, Method, register_method
    from hsc_fast.registry import METHODS
    register_method(Method("toy_seam", "seam + nothing", baseline="seam",
                           ablation=(AblationRow("toy_psc", "toy +PSC", ("use_psc",)),)))
    A.variants.cache_clear()
    try:
        names = [v.name for v in A.variants()]
        assert names == list(TABLE4)[:6] + ["toy_psc"] + list(TABLE4)[6:]
        toy = A.variant_by_name()["toy_psc"]
        assert (toy.method, toy.baseline, toy.use_psc, toy.use_csc) == ("toy_seam", "seam", True, False)
        METHODS._entries["toy_seam"] = Method("toy_seam", "bad", ablation=(AblationRow("bad", "bad", ("use_xyz",)),))
        A.variants.cache_clear()
        with pytest.raises(ConfigError, match=r"method 'toy_seam': ablation row 'bad' names unknown switch\(es\) use_xyz"):
            A.variants()
    finally:
        METHODS._entries.pop("toy_seam")
        A.variants.cache_clear()
    assert [v.name for v in A.variants()] == list(TABLE4)


def test_select_variants_keeps_table_order_and_rejects_unknown():
    assert [v.name for v in A.select_variants("hsc_seam, seam")] == ["seam", "hsc_seam"]
    assert len(A.select_variants("all")) == len(A.variants())
    with pytest.raises(ConfigError, match="nope"):
        A.select_variants("seam,nope")


def _stages(miou, thr, train_s, fg=(None, None)):
    return {"train_cam": {"seconds": train_s}, "cam": {"seconds": 3.0},
            "sweep": {"seconds": 1.0, "outputs": {"best": {"miou": miou, "threshold": thr, "fg_precision": fg[0],
                                                           "fg_recall": fg[1]}}}}


def _fake_results(base_cfg, mious, seed=0):
    out = []
    for name, miou in mious.items():
        v = A.variant_by_name()[name]
        out.append(A.make_result(v, _stages(miou, 0.25, 100.0 + miou, (60.0 + miou, 70.0 - miou)),
                                 A.config_digest(A.variant_config(base_cfg, v)), base_cfg.train.max_steps, seed))
    return out


def test_tables_and_gains_from_fake_results(tmp_path, base_cfg):
    results = _fake_results(base_cfg, {"seam": 40.0, "seam_psc": 41.5, "hsc_seam": 44.25, "eps": 50.0,
                                       "hsc_eps": 49.0})
    rows = A.aggregate(results)
    assert A.gains(rows) == {"seam_psc": 1.5, "hsc_seam": 4.25, "hsc_eps": -1.0}
    assert A.goal_status(rows) == {"target_gain": 3.0, "hsc_seam_gain": 4.25, "reached": True}
    js, md = A.write_outputs(tmp_path, results, {"command": "cmd", "dataset": "synth", "total_seconds": 12.0})
    data = json.loads(js.read_text())
    assert [r["variant"] for r in data["runs"]] == ["seam", "seam_psc", "hsc_seam", "eps", "hsc_eps"]
    assert data["gains"]["hsc_seam"] == 4.25 and data["goal"]["reached"] is True
    lines = [line for line in md.read_text().splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| variant | method | PSC | CSC | RSC | CS | MPL | CRF | seed mIoU | vs baseline | "
                               "fg precision | fg recall |")
    cells = {r.split(" | ")[0][2:]: [c.strip() for c in r.strip("|").split("|")] for r in lines[1:]}
    assert cells["+PSC"] == ["+PSC", "hsc_seam", "x", "", "", "x", "", "", "41.50", "+1.50", "101.5", "28.5", "0.25",
                             "", "142", "59.3"]
    assert cells["SEAM baseline"][8:10] == ["40.00", ""]
    assert cells["full HSC (EPS)"][9] == "-1.00"
    # one seed: a difference but no interval
    assert cells["full HSC (SEAM) − SEAM baseline"][1:6] == ["+4.25", "", "1", "", "needs >= 2 shared seeds"]
    assert "Goal (full HSC >= SEAM + 3 mIoU): reached (+4.25)" in md.read_text()
    failed = A.goal_status(A.aggregate(_fake_results(base_cfg, {"seam": 40.0, "hsc_seam": 42.0})))
    assert failed["reached"] is False


def _root(tmp_path, cfg):
    data = Dataset(voc_root=str(tmp_path / "voc"), name="synthetic test")
    return Context(cfg=cfg, run_dir=tmp_path, data=data, progress=False)


def test_completed_variants_are_skipped_and_stale_ones_refused(tmp_path, base_cfg, monkeypatch):
    import hsc_fast.engine.pipeline as P
    ran_stages, ran_variants = [], []
    monkeypatch.setattr(P, "run_stage", lambda ctx, stage, force, stage_seconds: ran_stages.append(stage))

    def fake_run_variant(root, variant, cfg, digest, force):
        ran_variants.append(variant.name)
        result = A.make_result(variant, _stages(30.0, 0.2, 5.0), digest, cfg.train.max_steps, cfg.train.seed)
        write_json(A.result_path(root.run_dir, variant), result)
        return result

    monkeypatch.setattr(A, "run_variant", fake_run_variant)
    root = _root(tmp_path, base_cfg)
    A.run_ablation(root, base_cfg, A.select_variants("seam,hsc_seam"), log=lambda *_: None)
    assert ran_variants == ["seam", "hsc_seam"] and ran_stages == ["synth", "shard"]
    # second invocation: both complete -> nothing trained; a new variant runs; the table has all three
    results = A.run_ablation(root, base_cfg, A.select_variants("seam,eps,hsc_seam"), log=lambda *_: None)
    assert ran_variants == ["seam", "hsc_seam", "eps"]
    table = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["variant"] for r in table["runs"]] == ["seam", "hsc_seam", "eps"] == [r["variant"] for r in results]
    # --force reruns
    A.run_ablation(root, base_cfg, A.select_variants("seam"), force=True, log=lambda *_: None)
    assert ran_variants[-1] == "seam" and len(ran_variants) == 4
    # a result from another budget is not silently reused
    other = load_config("ablation/demo", ["train.max_steps=7"])
    with pytest.raises(ConfigError, match="another config"):
        A.run_ablation(root, other, A.select_variants("seam"), log=lambda *_: None)


def test_variant_context_links_shared_shards_and_evaluates_the_eval_ids(tmp_path, base_cfg):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text("{}")
    root = _root(tmp_path, base_cfg)
    v = A.variant_by_name()["seam_psc"]
    ctx = A.variant_context(root, v, A.variant_config(base_cfg, v))
    assert ctx.run_dir == tmp_path / "variants" / "seam_psc"
    assert (ctx.run_dir / "shards" / "index.json").read_text() == "{}"
    assert ctx.data.list_path("train") == root.data.list_path("eval")
    assert load_config(str(ctx.run_dir / "config.yaml")).loss.use_psc is True


def test_unfinished_variant_does_not_resume_with_another_config(tmp_path, base_cfg):
    (tmp_path / "shards").mkdir()
    root = _root(tmp_path, base_cfg)
    v = A.variant_by_name()["seam"]
    A.variant_context(root, v, A.variant_config(base_cfg, v))
    A.variant_context(root, v, A.variant_config(base_cfg, v))  # same config: resumes
    longer = load_config("ablation/demo", ["train.max_steps=400"])
    with pytest.raises(ConfigError, match="started with another config"):
        A.variant_context(root, v, A.variant_config(longer, v))


def test_final_loss_averages_the_last_rows(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("step,loss,cls\n1,9,5.0\n2,9,\n3,9,1.0\n4,9,2.0\n")
    assert A.final_loss(csv_path, "cls", last=2) == pytest.approx(1.5)
    assert A.final_loss(csv_path, "cls", last=10) == pytest.approx(8.0 / 3)
    assert A.final_loss(tmp_path / "missing.csv") is None


def test_seeds_run_seed_major_and_the_table_shows_mean_std_and_paired_differences(tmp_path, base_cfg, monkeypatch):
    import hsc_fast.engine.pipeline as P
    monkeypatch.setattr(P, "run_stage", lambda ctx, stage, force, stage_seconds: None)
    ran = []
    by_seed = {"seam": [40.0, 42.0, 44.0], "hsc_seam": [45.0, 45.0, 48.0]}   # seed mIoU per train.seed offset

    def fake_run_variant(root, variant, cfg, digest, force):
        k = cfg.train.seed - base_cfg.train.seed
        ran.append((variant.name, k))
        result = A.make_result(variant, _stages(by_seed[variant.replicate_of or variant.name][k], 0.2, 5.0), digest,
                               cfg.train.max_steps, cfg.train.seed)
        write_json(A.result_path(root.run_dir, variant), result)
        return result

    monkeypatch.setattr(A, "run_variant", fake_run_variant)
    root = _root(tmp_path, base_cfg)
    A.run_ablation(root, base_cfg, A.select_variants("seam,hsc_seam"), seeds=3, log=lambda *_: None)
    # seed-major: after any prefix of the schedule, the finished runs form complete pairs
    assert ran == [("seam", 0), ("hsc_seam", 0), ("seam_s1", 1), ("hsc_seam_s1", 1), ("seam_s2", 2), ("hsc_seam_s2", 2)]
    data = json.loads((tmp_path / "ablation.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    s0 = base_cfg.train.seed
    assert rows["seam"]["per_seed"] == [40.0, 42.0, 44.0] and rows["seam"]["seeds"] == [s0, s0 + 1, s0 + 2]
    assert rows["seam"]["mean"] == pytest.approx(42.0) and rows["seam"]["std"] == pytest.approx(2.0)
    assert rows["hsc_seam"]["mean"] == pytest.approx(46.0)
    assert rows["hsc_seam"]["std"] == pytest.approx(3 ** 0.5)          # sample std of 45, 45, 48
    assert data["gains"] == {"hsc_seam": 4.0} and data["seeds"] == 3
    (pair,) = data["pairs"]
    d = pair["paired_diff"]                                             # differences 5, 3, 4
    assert (pair["variant"], pair["reference"], d["n"], d["mean"]) == ("hsc_seam", "seam", 3, 4.0)
    assert d["ci95"] == pytest.approx([4 - 4.302652730 / 3 ** 0.5, 4 + 4.302652730 / 3 ** 0.5])  # t(0.975, 2) sd 1
    md = (tmp_path / "ablation.md").read_text()
    assert "| 42.00 ± 2.00 (n=3) |" in md and "| 46.00 ± 1.73 (n=3) | +4.00 |" in md
    assert "| full HSC (SEAM) − SEAM baseline | +4.00 | [+1.52, +6.48] | 3 |" in md
    assert "the 95 % CI [+1.52, +6.48] excludes 0 (n = 3 paired seeds)" in md
    # all six runs are complete: a second invocation trains nothing; --seeds 1 reuses seed 0 only
    A.run_ablation(root, base_cfg, A.select_variants("seam,hsc_seam"), seeds=3, log=lambda *_: None)
    A.run_ablation(root, base_cfg, A.select_variants("seam,hsc_seam"), seeds=1, log=lambda *_: None)
    assert len(ran) == 6
    assert json.loads((tmp_path / "ablation.json").read_text())["gains"] == {"hsc_seam": 5.0}
    with pytest.raises(ConfigError, match="--seeds 0"):
        A.run_ablation(root, base_cfg, A.select_variants("seam"), seeds=0, log=lambda *_: None)


def test_per_seed_lists_runs_in_seed_order_whatever_order_they_finished(base_cfg):
    results = [r for seed, miou in ((7, 30.0), (5, 10.0), (6, 20.0))
               for r in _fake_results(base_cfg, {"seam": miou}, seed=seed)]
    (row,) = A.aggregate(results)
    assert row["seeds"] == [5, 6, 7] and row["per_seed"] == [10.0, 20.0, 30.0]
    assert row["fg_precision_per_seed"] == [70.0, 80.0, 90.0] and row["fg_recall"] == pytest.approx(50.0)


def test_paired_t_interval_against_a_hand_computation():
    """Differences 1, 2, 0, 3, 2 (seed 9 only in a: left out): mean 1.6, sd sqrt(1.3), t(0.975, 4) =
    2.776445105 -> half width 1.41571; scipy's ttest_rel p agrees with the interval on 0."""
    from scipy import stats
    a = {0: 31.0, 1: 34.0, 2: 30.0, 3: 38.0, 4: 35.0, 9: 99.0}
    b = {0: 30.0, 1: 32.0, 2: 30.0, 3: 35.0, 4: 33.0}
    d = A.paired_diff(a, b)
    half = 2.776445105 * 1.3 ** 0.5 / 5 ** 0.5
    assert d["n"] == 5 and d["seeds"] == [0, 1, 2, 3, 4]
    assert d["mean"] == pytest.approx(1.6) and d["sd"] == pytest.approx(1.3 ** 0.5)
    assert d["ci95"] == pytest.approx([1.6 - half, 1.6 + half]) and half == pytest.approx(1.41571, abs=1e-5)
    assert d["ci95"][0] > 0 and d["p_value"] < 0.05
    assert d["p_value"] == pytest.approx(stats.ttest_rel([a[s] for s in range(5)], [b[s] for s in range(5)]).pvalue)
    wide = A.paired_diff({0: 1.0, 1: -1.0, 2: 2.0, 3: 0.0, 4: -0.5}, dict.fromkeys(range(5), 0.0))
    assert wide["ci95"][0] < 0 < wide["ci95"][1] and wide["p_value"] > 0.05
    assert A.paired_diff({0: 3.0}, {0: 1.0}) == {"mean": 2.0, "ci95": None, "n": 1, "sd": None, "p_value": None,
                                                 "seeds": [0]}
    assert A.paired_diff({0: 3.0}, {1: 1.0})["n"] == 0


def test_compared_pairs_are_baselines_and_single_added_components():
    rows = A.aggregate([r for v in A.variants() for r in _fake_results(load_config("ablation/demo"), {v.name: 1.0})])
    assert A.compared_pairs(rows) == [
        ("seam_psc", "seam"), ("seam_psc_csc", "seam"), ("seam_psc_csc", "seam_psc"),
        ("seam_psc_csc_rsc", "seam"), ("seam_psc_csc_rsc", "seam_psc_csc"),
        ("hsc_seam", "seam"), ("hsc_seam", "seam_psc_csc_rsc"), ("hsc_seam_paper", "seam"), ("hsc_eps", "eps")]


def test_relative_paths_rewrites_every_absolute_path(tmp_path):
    run = tmp_path / "runs" / "abl"
    got = A.relative_paths({"cmd": f"x --run-dir {run} --set model.weights={tmp_path}/w.pth",
                            "list": [f"({run}/pretrain/s.pth)", "https://example.org/a", "load 1/5/15 min"]}, run)
    assert got == {"cmd": "x --run-dir . --set model.weights=../../w.pth",
                   "list": ["(pretrain/s.pth)", "https://example.org/a", "load 1/5/15 min"]}


def test_another_synthetic_set_size_needs_another_run_dir(tmp_path, base_cfg):
    root = _root(tmp_path, base_cfg)
    write_json(tmp_path / "stages" / "synth.json", {"stage": "synth", "outputs": {"n_train": 300}})
    A.check_synth_size(root)                       # the size it was made with
    root.synth = dict(root.synth, n_train=600)
    with pytest.raises(ConfigError, match="has 300 training images, not 600"):
        A.check_synth_size(root)


# ------------------------------------------------------------------------------ paired seeds


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from hsc_fast.data.synth import generate
    out = tmp_path_factory.mktemp("synth")
    generate(out, 12, 2, 0, 64)
    return out


@pytest.fixture(scope="module")
def group():
    yield from F.single_rank_group(60)


def tiny_sets(synth, seed: int) -> list:
    """A random-init ResNet-18 at 64 px on the 12-image synthetic set (the contrast maps 4x4)."""
    return [f"data.train={synth / 'VOC2012'}", f"data.train_list={synth / 'VOC2012/ImageSets/Segmentation/train_aug.txt'}",
            f"data.sbd_root={synth / 'SBD'}", f"data.cls_labels={synth / 'cls_labels.npy'}",
            "data.batch_size=2", "data.workers=0", "data.crop_size=64", "data.resize_long=[64,80]",
            "data.view2_size=32", "loss.contrast_size=4", "loss.csc_topk=16", "loss.csc_update_topk=4",
            "loss.psc_topk=1", "model.backbone=resnet18", "model.weights=", "model.allow_random_init=true",
            "pretrain.enabled=false", "train.tensorboard=false", f"train.seed={seed}"]


def start_of_training(synth, tmp_path, group, variant: str, seed: int, *extra) -> tuple[list, dict]:
    """The first two batches a variant trains on and its initial weights (all of them)."""
    from hsc_fast.engine.cam_trainer import Trainer
    cfg = A.variant_config(load_config("ablation/demo", tiny_sets(synth, seed) + list(extra)), A.variant_by_name()[variant])
    trainer = Trainer(cfg, tmp_path / f"{variant}_{seed}_{len(extra)}", group)
    stream = trainer.make_stream()
    first = stream.next()
    torch.rand(1000)                  # a loss that draws random numbers does not shift the data
    return [first, stream.next()], {k: v.clone() for k, v in trainer.module.state_dict().items()}


def same_batches(a: list, b: list) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]
                                            for k in x) for x, y in zip(a, b))


def same_weights(a: dict, b: dict, prefixes: tuple) -> bool:
    names = [k for k in a if k.startswith(prefixes)]
    assert names and all(k in b for k in names)
    return all(torch.equal(a[k], b[k]) for k in names)


def test_same_seed_gives_every_variant_the_same_batches_and_initial_weights(synth, tmp_path, group):
    """Paired seeds: SEAM and full HSC at one seed see the same pixels and labels in the same order
    and start from the same backbone, CAM head and PCM (and HSC's projectors are the same whether
    or not SEAM builds them); another seed changes both."""
    seam_batches, seam_w = start_of_training(synth, tmp_path, group, "seam", 3, "model.projectors=false")
    hsc_batches, hsc_w = start_of_training(synth, tmp_path, group, "hsc_seam", 3)
    other_batches, other_w = start_of_training(synth, tmp_path, group, "seam", 4, "model.projectors=false")
    nopcm_batches, nopcm_w = start_of_training(synth, tmp_path, group, "hsc_seam", 3, "model.pcm=false")
    assert {"img", "label"} <= set(seam_batches[0])
    assert same_batches(seam_batches, hsc_batches) and same_batches(seam_batches, nopcm_batches)
    parts = ("backbone.", "cam_head.", "pcm.")
    assert same_weights(seam_w, hsc_w, parts)
    assert same_weights(hsc_w, nopcm_w, ("backbone.", "cam_head.", "psc_proj.", "rsc_proj."))  # no PCM: same projectors
    assert "psc_proj.0.weight" not in seam_w and "pcm.fuse.weight" not in nopcm_w
    assert not torch.equal(seam_batches[0]["img"], other_batches[0]["img"])
    for part in ("backbone.conv1.weight", "cam_head.weight", "pcm.conv4_proj.weight"):
        assert not torch.equal(seam_w[part], other_w[part]), part


# ------------------------------------------------------------------------------ a tiny real run
TINY_RUN = ["--variants", "seam,hsc_seam", "--seeds", "2", "--synth-train", "8", "--no-progress",
            "--set", "model.backbone=resnet18", "--set", "model.weights=", "--set", "model.allow_random_init=true",
            "--set", "pretrain.enabled=false", "--set", "train.max_steps=2", "--set", "optim.poly_steps=2",
            "--set", "train.save_every=2", "--set", "data.crop_size=64", "--set", "data.resize_long=[64,80]",
            "--set", "data.view2_size=32", "--set", "loss.contrast_size=4", "--set", "loss.csc_topk=16",
            "--set", "loss.csc_update_topk=4", "--set", "loss.psc_topk=1"]


def strings_of(value):
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_of(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_of(v)]
    return [value] if isinstance(value, str) else []


@pytest.mark.slow
def test_a_tiny_ablation_run_records_pairs_relative_paths_and_resumes(tmp_path):
    """launch/ablation.py, 2 variants x 2 seeds x 2 steps: per_seed in seed order, the paired CI
    recomputable from per_seed, fg precision / recall present, no absolute path in the JSON, and a
    second invocation trains nothing."""
    import re
    import subprocess
    import sys
    from scipy import stats
    run = tmp_path / "run"
    cmd = [sys.executable, str(F.REPO / "launch" / "ablation.py"), "--run-dir", str(run), *TINY_RUN]
    first = subprocess.run(cmd, cwd=F.REPO, env=F.clean_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    data = json.loads((run / "ablation.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert [r["seed"] for r in data["runs"]] == [0, 0, 1, 1]                       # seed-major
    for r in rows.values():
        assert r["seeds"] == [0, 1] and len(r["per_seed"]) == 2
        assert r["per_seed"] == [x["seed_miou"] for x in sorted(data["runs"], key=lambda x: x["seed"])
                                 if x["replicate_of"] == r["variant"]]
        assert all(0 <= v <= 100 for v in r["fg_precision_per_seed"] + r["fg_recall_per_seed"])
    (pair,) = data["pairs"]
    d = [a - b for a, b in zip(rows["hsc_seam"]["per_seed"], rows["seam"]["per_seed"])]
    half = stats.t.ppf(0.975, 1) * stats.tstd(d) / 2 ** 0.5
    assert pair["paired_diff"]["ci95"] == pytest.approx([sum(d) / 2 - half, sum(d) / 2 + half])
    texts = strings_of(data)
    assert not [s for s in texts if str(tmp_path) in s or re.search(r"(^|[\s=(])/\w", s)]
    assert "--run-dir ." in data["command"]
    again = subprocess.run(cmd, cwd=F.REPO, env=F.clean_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(": complete (seed mIoU") == 4 and "train_cam: running" not in again.stdout
