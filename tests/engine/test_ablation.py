"""The ablation runner's logic: variant -> config switches (paper Table 4 rows), result files,
skipping of completed variants. No training here (the runner reuses the tested pipeline stages)."""
import json

import pytest

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


def _stages(miou, thr, train_s):
    return {"train_cam": {"seconds": train_s}, "cam": {"seconds": 3.0},
            "sweep": {"seconds": 1.0, "outputs": {"best": {"miou": miou, "threshold": thr}}}}


def _fake_results(base_cfg, mious):
    out = []
    for name, miou in mious.items():
        v = A.variant_by_name()[name]
        out.append(A.make_result(v, _stages(miou, 0.25, 100.0 + miou), A.config_digest(A.variant_config(base_cfg, v)),
                                 base_cfg.train.max_steps))
    return out


def test_tables_and_gains_from_fake_results(tmp_path, base_cfg):
    results = _fake_results(base_cfg, {"seam": 40.0, "seam_psc": 41.5, "hsc_seam": 44.25, "eps": 50.0,
                                       "hsc_eps": 49.0})
    assert A.gains(results) == {"seam_psc": 1.5, "hsc_seam": 4.25, "hsc_eps": -1.0}
    assert A.goal_status(results) == {"target_gain": 3.0, "hsc_seam_gain": 4.25, "reached": True}
    js, md = A.write_outputs(tmp_path, results, {"command": "cmd", "dataset": "synth", "total_seconds": 12.0})
    data = json.loads(js.read_text())
    assert [r["variant"] for r in data["variants"]] == ["seam", "seam_psc", "hsc_seam", "eps", "hsc_eps"]
    assert data["gains"]["hsc_seam"] == 4.25 and data["goal"]["reached"] is True
    rows = [line for line in md.read_text().splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant | method | PSC | CSC | RSC | CS | MPL | CRF | seed mIoU")
    cells = {r.split(" | ")[0][2:]: [c.strip() for c in r.strip("|").split("|")] for r in rows[1:]}
    assert cells["+PSC"] == ["+PSC", "hsc_seam", "x", "", "", "x", "", "", "41.50", "+1.50", "0.25", "", "142", "59.3"]
    assert cells["SEAM baseline"][8:10] == ["40.00", ""]
    assert cells["full HSC (EPS)"][9] == "-1.00"
    assert "Goal (full HSC >= SEAM + 3 mIoU): reached (+4.25)" in md.read_text()
    failed = A.goal_status(_fake_results(base_cfg, {"seam": 40.0, "hsc_seam": 42.0}))
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
        result = A.make_result(variant, _stages(30.0, 0.2, 5.0), digest, cfg.train.max_steps)
        write_json(A.result_path(root.run_dir, variant), result)
        return result

    monkeypatch.setattr(A, "run_variant", fake_run_variant)
    root = _root(tmp_path, base_cfg)
    A.run_ablation(root, base_cfg, A.select_variants("seam,hsc_seam"), log=lambda *_: None)
    assert ran_variants == ["seam", "hsc_seam"] and ran_stages == ["synth", "shard"]  # ImageNet weights: no pretrain
    # second invocation: both complete -> nothing trained; a new variant runs; the table has all three
    results = A.run_ablation(root, base_cfg, A.select_variants("seam,eps,hsc_seam"), log=lambda *_: None)
    assert ran_variants == ["seam", "hsc_seam", "eps"]
    table = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["variant"] for r in table["variants"]] == ["seam", "hsc_seam", "eps"] == [r["variant"] for r in results]
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


def test_seeds_train_each_row_n_times_and_the_table_shows_mean_and_std(tmp_path, base_cfg, monkeypatch):
    import hsc_fast.engine.pipeline as P
    monkeypatch.setattr(P, "run_stage", lambda ctx, stage, force, stage_seconds: None)
    ran = []
    by_seed = {"seam": [40.0, 42.0, 44.0], "hsc_seam": [45.0, 45.0, 48.0]}   # seed mIoU per train.seed offset

    def fake_run_variant(root, variant, cfg, digest, force):
        k = cfg.train.seed - base_cfg.train.seed
        ran.append((variant.name, k))
        result = A.make_result(variant, _stages(by_seed[variant.replicate_of or variant.name][k], 0.2, 5.0), digest,
                               cfg.train.max_steps)
        write_json(A.result_path(root.run_dir, variant), result)
        return result

    monkeypatch.setattr(A, "run_variant", fake_run_variant)
    root = _root(tmp_path, base_cfg)
    A.run_ablation(root, base_cfg, A.select_variants("seam,hsc_seam"), seeds=3, log=lambda *_: None)
    assert ran == [("seam", 0), ("seam_s1", 1), ("seam_s2", 2), ("hsc_seam", 0), ("hsc_seam_s1", 1), ("hsc_seam_s2", 2)]
    data = json.loads((tmp_path / "ablation.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["seam"]["seed_miou"] == pytest.approx(42.0) and rows["seam"]["seed_miou_std"] == pytest.approx(2.0)
    assert rows["hsc_seam"]["seed_miou"] == pytest.approx(46.0)
    assert rows["hsc_seam"]["seed_miou_std"] == pytest.approx(3 ** 0.5)          # sample std of 45, 45, 48
    assert data["gains"] == {"hsc_seam": 4.0} and data["seeds"] == 3
    md = (tmp_path / "ablation.md").read_text()
    assert "| 42.00 ± 2.00 (n=3) |" in md and "| 46.00 ± 1.73 (n=3) | +4.00 |" in md
    # all six runs are complete: a second invocation trains nothing; --seeds 1 reuses seed 0 only
    A.run_ablation(root, base_cfg, A.select_variants("seam,hsc_seam"), seeds=3, log=lambda *_: None)
    A.run_ablation(root, base_cfg, A.select_variants("seam,hsc_seam"), seeds=1, log=lambda *_: None)
    assert len(ran) == 6
    assert json.loads((tmp_path / "ablation.json").read_text())["gains"] == {"hsc_seam": 5.0}
    with pytest.raises(ConfigError, match="--seeds 0"):
        A.run_ablation(root, base_cfg, A.select_variants("seam"), seeds=0, log=lambda *_: None)


def test_another_synthetic_set_size_needs_another_run_dir(tmp_path, base_cfg):
    root = _root(tmp_path, base_cfg)
    write_json(tmp_path / "stages" / "synth.json", {"stage": "synth", "outputs": {"n_train": 300}})
    A.check_synth_size(root)                       # the size it was made with
    root.synth = dict(root.synth, n_train=600)
    with pytest.raises(ConfigError, match="has 300 training images, not 600"):
        A.check_synth_size(root)
