"""Ablation of HSC's parts on one dataset at one budget (paper Table 4, plus the EPS pair).

`python launch/ablation.py --run-dir runs/ablation` (= `make ablation`) generates the synthetic
VOC/SBD set and its shards ONCE, then for every variant trains the CAM network with the same
config, budget and seed (only the loss switches differ), infers CAMs for the evaluation ids (the
ids with VOC masks: ImageSets/Segmentation/train.txt), sweeps the background threshold and keeps
the best seed mIoU (and the seeds' foreground precision / recall there). Results:
RUN_DIR/ablation.json and RUN_DIR/ablation.md.

Paired seeds (`--seeds N`: train.seed, +1, ..., +N-1). At one seed every variant trains on the
same batches (the loader draws order and augmentation from generators keyed by (seed, epoch,
rank, worker), never from the global RNG a loss may draw from) and starts from the same weights
(each network part draws its init from its own stream: cam_trainer.part_init_seeds). The runs go
seed-major (every variant at seed 0, then every variant at seed 1, ...), so a partial run already
holds complete pairs; a variant's seed-to-seed spread then cancels in the paired differences
(`paired_diff`: mean and 95 % paired-t interval of variant - reference over the shared seeds).

The stage logic is the pipeline's (`hsc_fast.engine.pipeline.run_stage` with `stage_synth`,
`stage_shard`, `stage_train_cam`, `stage_cam`, `stage_sweep`); each variant is a pipeline
`Context` rooted at RUN_DIR/variants/<name>, whose `shards` entry links to the shared shards and
whose "train" id list is the evaluation list, so `stage_cam` infers the evaluated ids only.
Stage markers make every variant resumable; a variant with a result.json is skipped.

Table 4 rows. The paper's text (Sec. 4.3) fixes what its garbled check-mark table means: PSC,
CSC and RSC are added "based on cross supervision" (55.4 -> 59.3 -> 60.5 -> 62.6); removing
cross supervision gives 60.7; momentum prototypes then give 63.5 and the CRF-refined
pseudo-labels 64.2 / 64.3. Our `loss.crf.enabled` refines the labels of PSC and RSC together
(CSC reads CAM scores, no labels), so the paper's CRF-dagger and CRF columns are one switch and
its last two rows are our `hsc_seam`. The row "full HSC (SEAM), paper formulation" is `hsc_seam`
with `loss.formulation: paper` (the paper's equations instead of the authors' code; docs:
reference/formulations.md); it has no published number.

The rows are read from the method registry: every method declares its own (``Method.ablation``,
``AblationRow`` in hsc_fast/losses/methods/: the Table 4 rows live in methods/hsc.py), so a new
method's file brings its ablation rows with it.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from hsc_fast.config import RunConfig, apply_overrides, from_dict, load_config, save_config, to_dict, validate
from hsc_fast.errors import ConfigError, HscError

TOGGLES = ("use_psc", "use_csc", "use_rsc", "cross_supervision", "momentum_prototypes", "train_crf")
TOGGLE_KEYS = {k: f"loss.{k}" for k in TOGGLES} | {"train_crf": "loss.crf.enabled"}  # switch -> config key
TOGGLE_NAMES = {"use_psc": "PSC", "use_csc": "CSC", "use_rsc": "RSC", "cross_supervision": "CS",
                "momentum_prototypes": "MPL", "train_crf": "CRF"}


@dataclass(frozen=True)
class Variant:
    """One ablation row: a loss method and the HSC switches (TOGGLES; TOGGLE_KEYS gives their config keys)."""
    name: str
    title: str
    method: str
    baseline: str                      # the variant this row is compared with
    use_psc: bool = False
    use_csc: bool = False
    use_rsc: bool = False
    cross_supervision: bool = False
    momentum_prototypes: bool = False
    train_crf: bool = False
    paper_seed: Optional[float] = None  # published VOC train seed mIoU of this row
    formulation: str = "code"           # loss.formulation: the authors' code or the paper's equations
    extra: tuple = ()                   # further `--set` strings of this row
    replicate_of: str = ""              # the row this is a further seed of ('' = the row itself)

    def toggles(self) -> dict:
        return {k: getattr(self, k) for k in TOGGLES}

    def overrides(self) -> list[str]:
        """`--set` strings that turn the shared config into this variant."""
        return ([f"loss.method={self.method}"] + [f"{TOGGLE_KEYS[k]}={str(v).lower()}" for k, v in self.toggles().items()] +
                [f"loss.formulation={self.formulation}"] + list(self.extra))


def _variant(method, row) -> Variant:
    """A registered method's AblationRow as a Variant (the switches it names on, the others off)."""
    unknown = sorted(set(row.switches) - set(TOGGLES))
    if unknown:
        raise ConfigError(f"method {method.name!r}: ablation row {row.name!r} names unknown switch(es) "
                          f"{', '.join(unknown)} (known: {', '.join(TOGGLES)})")
    return Variant(row.name, row.title, method.name, method.baseline or method.name, paper_seed=row.paper_seed,
                   formulation=row.formulation, extra=tuple(row.extra), **{k: True for k in row.switches})


@functools.lru_cache(maxsize=None)
def variants() -> tuple:
    """Every ablation row the registered methods declare (``Method.ablation``), grouped by the
    baseline they are compared with (groups in order of first mention; a group's own baseline
    row first, then the rows of the methods extending it, in registration order)."""
    from hsc_fast.losses.methods import get_method
    from hsc_fast.registry import METHODS
    groups: dict[str, list] = {}
    for name in METHODS:
        method = get_method(name)
        for row in method.ablation:
            groups.setdefault(method.baseline or method.name, []).append((method.name, _variant(method, row)))
    rows = [v for base, group in groups.items() for _, v in sorted(group, key=lambda mv: mv[0] != base)]
    names = [v.name for v in rows]
    if len(set(names)) != len(names):
        raise ConfigError(f"ablation rows: a name is declared twice ({', '.join(names)})")
    return tuple(rows)


def variant_by_name() -> dict:
    return {v.name: v for v in variants()}


GOAL_MIOU_GAIN = 3.0  # issue #9: full HSC >= SEAM baseline + 3 seed mIoU


def select_variants(text: str) -> list[Variant]:
    """'seam,hsc_seam' -> those variants in table order; '' or 'all' -> every variant."""
    if text.strip() in ("", "all"):
        return list(variants())
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    known = variant_by_name()
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise ConfigError(f"--variants: unknown variant(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [v for v in variants() if v.name in wanted]


def replicate(variant: Variant, k: int, base_seed: int) -> Variant:
    """Replicate k of a row: the same switches trained with train.seed = base_seed + k. k = 0 is
    the row itself (its results stay reusable when --seeds grows)."""
    if k == 0:
        return variant
    return replace(variant, name=f"{variant.name}_s{k}", replicate_of=variant.name,
                   extra=variant.extra + (f"train.seed={base_seed + k}",))


def replicates(variants: Sequence[Variant], seeds: int, base_seed: int) -> list[Variant]:
    """Seed-major: every variant at the first seed, then every variant at the next one, ... (an
    interrupted run holds complete pairs)."""
    return [replicate(v, k, base_seed) for k in range(seeds) for v in variants]


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _sample_std(values: Sequence[float]) -> float:
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def _per_seed(group: Sequence[dict], key: str) -> list:
    return [g.get(key) for g in group]


def aggregate(results: Sequence[dict]) -> list[dict]:
    """One row per ablation row (first-seen order): its runs in seed order as `per_seed` (seed
    mIoU), `seeds`, mean and sample std; the seeds' foreground precision / recall per seed and
    averaged; the other numbers averaged."""
    groups: dict[str, list] = {}
    for r in results:
        groups.setdefault(r.get("replicate_of") or r["variant"], []).append(r)
    rows = []
    for name, group in groups.items():
        group = sorted(group, key=lambda g: g["seed"])
        mious = _per_seed(group, "seed_miou")
        losses = [g["cls_loss_final"] for g in group if g.get("cls_loss_final") is not None]
        fg = {f"{k}_per_seed": _per_seed(group, k) for k in ("fg_precision", "fg_recall", "best_threshold")}
        rows.append({**{k: group[0][k] for k in ("title", "method", "baseline", "toggles", "paper_seed", "steps")},
                     "variant": name, "seeds": _per_seed(group, "seed"), "per_seed": mious, "n": len(group),
                     "mean": _mean(mious), "std": _sample_std(mious), **fg,
                     "fg_precision": _mean([v for v in fg["fg_precision_per_seed"] if v is not None]),
                     "fg_recall": _mean([v for v in fg["fg_recall_per_seed"] if v is not None]),
                     "best_threshold": _mean(fg["best_threshold_per_seed"]),
                     "train_seconds": _mean(_per_seed(group, "train_seconds")),
                     "run_seconds": _mean([g["train_seconds"] + g["cam_seconds"] + g["sweep_seconds"] for g in group]),
                     "cls_loss_final": _mean(losses)})
    return rows


# ------------------------------------------------------------------------------ paired statistics
def paired_diff(a: dict, b: dict) -> dict:
    """Seed mIoU of ``a`` minus ``b`` ({seed: mIoU} each) over the seeds both have: mean, sample
    sd, the 95 % paired-t interval mean +- t(0.975, n-1) sd / sqrt(n), scipy's ttest_rel p
    (two-sided; the interval excludes 0 exactly when p < 0.05). ci95 / p need n >= 2 (and sd > 0 for p)."""
    from scipy import stats
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    out = {"mean": _mean(d), "ci95": None, "n": len(d), "sd": None, "p_value": None, "seeds": seeds}
    if len(d) >= 2:
        sd = _sample_std(d)
        half = float(stats.t.ppf(0.975, len(d) - 1)) * sd / math.sqrt(len(d))
        out.update(sd=sd, ci95=[out["mean"] - half, out["mean"] + half])
        if sd > 0:
            out["p_value"] = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
    return out


def _switched_on(row: dict) -> set:
    return {k for k, on in row["toggles"].items() if on}


def compared_pairs(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """(variant, reference): every row against its baseline, and a row against the row before it
    in its group when that one switches on a strict subset (one added component: +CSC on +PSC, ...)."""
    names = {r["variant"] for r in rows}
    pairs, previous = [], {}
    for r in rows:
        prev = previous.get(r["baseline"])
        if r["variant"] != r["baseline"] and r["baseline"] in names:
            pairs.append((r["variant"], r["baseline"]))
            if prev is not None and prev["variant"] != r["baseline"] and _switched_on(prev) < _switched_on(r):
                pairs.append((r["variant"], prev["variant"]))
        previous[r["baseline"]] = r
    return pairs


def paired_diffs(rows: Sequence[dict]) -> list[dict]:
    by_name = {r["variant"]: dict(zip(r["seeds"], r["per_seed"])) for r in rows}
    return [{"variant": v, "reference": ref, "paired_diff": paired_diff(by_name[v], by_name[ref])}
            for v, ref in compared_pairs(rows)]


def variant_config(base: RunConfig, variant: Variant) -> RunConfig:
    """The shared config with only the variant's loss switches changed (same budget, same seed)."""
    cfg = from_dict(RunConfig, apply_overrides(to_dict(base), variant.overrides()))
    validate(cfg)
    return cfg


def config_digest(cfg: RunConfig) -> str:
    """Fingerprint of what a variant trains with; the data path is filled in by the pipeline."""
    d = to_dict(cfg)
    d["data"] = {k: v for k, v in d["data"].items() if k != "train"}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------- results
def variant_dir(run_dir: Path, variant: Variant) -> Path:
    return Path(run_dir) / "variants" / variant.name


def result_path(run_dir: Path, variant: Variant) -> Path:
    return variant_dir(run_dir, variant) / "result.json"


def load_result(run_dir: Path, variant: Variant, digest: str) -> Optional[dict]:
    """The stored result of a completed variant, None if incomplete; a result trained with another
    config is an error (reusing it would compare variants at different budgets)."""
    path = result_path(run_dir, variant)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HscError(f"{path}: not valid JSON ({e}); delete it or use --force") from e
    if result.get("config_digest") != digest:
        raise ConfigError(f"{path}: variant '{variant.name}' was run with another config "
                          f"(digest {result.get('config_digest')} != {digest}); use --force or another --run-dir")
    if result.get("cls_loss_final") is None:  # results written before this field existed
        result["cls_loss_final"] = final_loss(variant_dir(run_dir, variant) / "cam" / "metrics.csv")
    return result


def final_loss(metrics_csv: Path, column: str = "cls", last: int = 20) -> Optional[float]:
    """Mean of a loss column over the last rows of a training run's metrics.csv (None if absent):
    tells whether the classifier left the label prior at all within the budget."""
    path = Path(metrics_csv)
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        values = [float(r[column]) for r in csv.DictReader(f) if r.get(column) not in (None, "")]
    return sum(values[-last:]) / len(values[-last:]) if values else None


def make_result(variant: Variant, stages: dict, digest: str, max_steps: int, seed: int,
                cls_final: Optional[float] = None) -> dict:
    """One run's row (a variant at one train.seed) from its pipeline stage markers (train_cam, cam, sweep)."""
    best = stages["sweep"]["outputs"]["best"]
    return {"cls_loss_final": cls_final, "variant": variant.name, "title": variant.title, "method": variant.method,
            "baseline": variant.baseline, "toggles": variant.toggles(), "paper_seed": variant.paper_seed,
            "replicate_of": variant.replicate_of or variant.name, "seed": seed,
            "seed_miou": float(best["miou"]), "best_threshold": float(best["threshold"]),
            "fg_precision": best.get("fg_precision"), "fg_recall": best.get("fg_recall"),
            "train_seconds": float(stages["train_cam"]["seconds"]), "cam_seconds": float(stages["cam"]["seconds"]),
            "sweep_seconds": float(stages["sweep"]["seconds"]), "steps": max_steps, "config_digest": digest}


def completed_results(run_dir: Path, base_cfg: RunConfig, fresh: Sequence[dict], seeds: int = 1) -> list[dict]:
    """Every variant measured in RUN_DIR with this config (this invocation's and earlier ones'),
    in table order, so that running subsets one after another builds up one table."""
    by_name = {r["variant"]: r for r in fresh}
    out = []
    for v in replicates(variants(), seeds, base_cfg.train.seed):
        cfg = variant_config(base_cfg, v)
        if v.name not in by_name:
            try:
                by_name[v.name] = load_result(run_dir, v, config_digest(cfg))
            except ConfigError:
                by_name[v.name] = None  # measured with another config: not comparable, left out
        if by_name[v.name] is not None:
            by_name[v.name].setdefault("seed", cfg.train.seed)   # results written before this field existed
            out.append(by_name[v.name])
    return out


def gains(rows: Sequence[dict]) -> dict:
    """Mean seed mIoU of each variant minus its baseline's (aggregate rows; where both were measured)."""
    by_name = {r["variant"]: r for r in rows}
    return {r["variant"]: round(r["mean"] - by_name[r["baseline"]]["mean"], 2)
            for r in rows if r["baseline"] in by_name and r["variant"] != r["baseline"]}


def goal_status(rows: Sequence[dict]) -> dict:
    g = gains(rows)
    out = {"target_gain": GOAL_MIOU_GAIN}
    if "hsc_seam" in g:
        out.update(hsc_seam_gain=g["hsc_seam"], reached=g["hsc_seam"] >= GOAL_MIOU_GAIN)
    return out


def _num(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.3f}"


def _mark(on: bool) -> str:
    return "x" if on else ""


def _miou_cell(r: dict) -> str:
    if r["n"] > 1:
        return f"{r['mean']:.2f} ± {r['std']:.2f} (n={r['n']})"
    return f"{r['mean']:.2f}"


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.1f}"


def _pair_line(pair: dict, titles: dict) -> str:
    d = pair["paired_diff"]
    name = f"{titles[pair['variant']]} − {titles[pair['reference']]}"
    if d["ci95"] is None:
        return f"| {name} | {d['mean']:+.2f} | | {d['n']} | | needs >= 2 shared seeds |" if d["n"] else \
               f"| {name} | | | 0 | | no shared seed |"
    lo, hi = d["ci95"]
    verdict = "excludes 0" if lo > 0 or hi < 0 else "includes 0"
    p = "" if d["p_value"] is None else f"{d['p_value']:.3g}"
    return f"| {name} | {d['mean']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {d['n']} | {p} | {verdict} |"


def ci_sentence(pairs: Sequence[dict], titles: dict) -> str:
    """Says, for each compared pair with an interval, whether its 95 % CI excludes 0."""
    parts = []
    for pair in pairs:
        d = pair["paired_diff"]
        if d["ci95"] is not None:
            lo, hi = d["ci95"]
            verb = "excludes" if lo > 0 or hi < 0 else "does not exclude"
            parts.append(f"{titles[pair['variant']]} − {titles[pair['reference']]}: {d['mean']:+.2f} mIoU, "
                         f"the 95 % CI [{lo:+.2f}, {hi:+.2f}] {verb} 0 (n = {d['n']} paired seeds)")
    return ("; ".join(parts) + ".") if parts else "No pair has two shared seeds yet: no confidence interval."


def markdown_table(rows: Sequence[dict], pairs: Sequence[dict], meta: dict) -> str:
    """ablation.md: one row per variant (table order; mean ± sample std of the seed mIoU over its
    seeds, the seeds' foreground precision / recall), then the paired differences with their CI."""
    g = gains(rows)
    cols = [TOGGLE_NAMES[k] for k in TOGGLES]
    head = (["variant", "method"] + cols + ["seed mIoU", "vs baseline", "fg precision", "fg recall", "best threshold",
                                            "final cls loss", "train s", "paper (VOC train)"])
    lines = [f"# Ablation: {meta.get('dataset', '')}", "",
             f"Command: `{meta.get('command', '')}`  ", f"Budget: {meta.get('budget', '')}  ",
             f"Machine: {meta.get('device', '')}; {meta.get('machine', '')}  ",
             f"Commit: {meta.get('git_commit', '')}  ", f"Total wall time: {meta.get('total_seconds', 0):.0f} s", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        paper = "" if r.get("paper_seed") is None else f"{r['paper_seed']:.1f}"
        gain = f"{g[r['variant']]:+.2f}" if r["variant"] in g else ""
        row = ([r["title"], r["method"]] + [_mark(r["toggles"][k]) for k in TOGGLES] +
               [_miou_cell(r), gain, _pct(r.get("fg_precision")), _pct(r.get("fg_recall")),
                f"{r['best_threshold']:.2f}", _num(r.get("cls_loss_final")), f"{r['train_seconds']:.0f}", paper])
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "seed mIoU: mean ± sample standard deviation over the seeds (train.seed, +1, ...); fg precision / "
                  "recall (%): the seeds' foreground (any non-background class) at the best threshold, averaged "
                  "over the seeds (low precision: over-activation; low recall: under-activation)."]
    titles = {r["variant"]: r["title"] for r in rows}
    if pairs:
        lines += ["", "## Paired differences (same seeds)", "",
                  "| pair | mean diff | 95 % CI (paired t) | n | p (ttest_rel) | CI |", "|---|---|---|---|---|---|"]
        lines += [_pair_line(p, titles) for p in pairs]
        lines += ["", ci_sentence(pairs, titles)]
    goal = goal_status(rows)
    if "hsc_seam_gain" in goal:
        lines += ["", f"Goal (full HSC >= SEAM + {GOAL_MIOU_GAIN:g} mIoU): "
                      f"{'reached' if goal['reached'] else 'NOT reached'} ({goal['hsc_seam_gain']:+.2f})."]
    return "\n".join(lines) + "\n"


_ABS_PATH = re.compile(r"(?<![\w.~:/])/[^\s,;:'\"()\[\]]+")


def relative_paths(value, run_dir: Path):
    """Every absolute path inside the strings of ``value`` rewritten relative to ``run_dir`` (the
    results must not name a folder of the machine that made them)."""
    if isinstance(value, dict):
        return {k: relative_paths(v, run_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(v, run_dir) for v in value]
    if isinstance(value, str):
        return _ABS_PATH.sub(lambda m: os.path.relpath(m.group(0), run_dir), value)
    return value


def write_outputs(run_dir: Path, results: Sequence[dict], meta: dict) -> tuple[Path, Path]:
    """RUN_DIR/ablation.json (schema: docs ablation) and ablation.md; paths relative to RUN_DIR."""
    from hsc_fast.io import write_json
    run_dir = Path(run_dir).resolve()
    js, md = run_dir / "ablation.json", run_dir / "ablation.md"
    rows = aggregate(results)
    pairs = paired_diffs(rows)
    data = relative_paths({"schema": 2, **meta, "goal": goal_status(rows), "gains": gains(rows), "rows": rows,
                           "pairs": pairs, "runs": list(results)}, run_dir)
    write_json(js, data)
    md.write_text(markdown_table(data["rows"], data["pairs"], data))
    return js, md


# ---------------------------------------------------------------------------------- runner
def check_partial_run(vdir: Path, cfg: RunConfig) -> None:
    """An unfinished variant resumes only with the config it started with (its checkpoints and
    CAM files would otherwise mix two budgets)."""
    saved = vdir / "config.yaml"
    if saved.is_file() and config_digest(load_config(str(saved))) != config_digest(cfg):
        raise ConfigError(f"{saved}: variant '{vdir.name}' was started with another config; "
                          "use --force to restart it or another --run-dir")


def variant_context(root, variant: Variant, cfg: RunConfig):
    """A pipeline Context for one variant: own cam/ seeds/ stages/, the shared shards (linked),
    and the evaluation ids as its 'train' list so that stage_cam infers only what is evaluated."""
    from hsc_fast.engine.pipeline import Context
    vdir = variant_dir(root.run_dir, variant)
    data = replace(root.data, train_list=str(root.data.list_path("eval")))
    ctx = Context(cfg=cfg, run_dir=vdir, data=data, rank=root.rank, world=root.world, device=root.device,
                  progress=root.progress, workers=root.workers, wait_timeout_s=root.wait_timeout_s)
    if root.rank == 0:
        check_partial_run(vdir, cfg)
        vdir.mkdir(parents=True, exist_ok=True)
        link = vdir / "shards"
        if not link.exists():
            link.symlink_to(Path("..") / ".." / "shards", target_is_directory=True)
        save_config(cfg, vdir / "config.yaml")
    return ctx


def run_variant(root, variant: Variant, cfg: RunConfig, digest: str, force: bool) -> dict:
    from hsc_fast.engine.pipeline import marker, run_stage, wait_for_marker
    vdir = variant_dir(root.run_dir, variant)
    if force and root.rank == 0 and vdir.exists():
        shutil.rmtree(vdir)
    if root.world > 1:
        from hsc_fast import distributed as D
        D.barrier()
    ctx = variant_context(root, variant, cfg)
    if root.rank != 0:  # rank 0 creates the folder and the shards link
        while not (vdir / "shards").exists():
            time.sleep(0.2)
    stage_seconds: dict = {}
    for stage in ("train_cam", "cam", "sweep"):
        run_stage(ctx, stage, force=False, stage_seconds=stage_seconds)
    if root.rank != 0:
        wait_for_marker(ctx, "sweep")
    stages = {s: json.loads(marker(ctx, s).read_text()) for s in ("train_cam", "cam", "sweep")}
    result = make_result(variant, stages, digest, cfg.train.max_steps, cfg.train.seed,
                         cls_final=final_loss(ctx.path("cam", "metrics.csv")))
    if root.rank == 0:
        from hsc_fast.io import write_json
        write_json(result_path(root.run_dir, variant), result)
    return result


def budget_text(cfg: RunConfig) -> str:
    return (f"{cfg.model.backbone} ({'random init' if not cfg.model.weights else cfg.model.weights}), "
            f"{cfg.train.max_steps} steps x batch {cfg.data.batch_size}, crop {cfg.data.crop_size} px, "
            f"view 2 {cfg.data.view2_size} px, lr {cfg.optim.lr}, seed {cfg.train.seed}, "
            f"CAM scales {cfg.seeds.scales} flip {cfg.seeds.flip}")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_text(device) -> str:
    import torch
    if getattr(device, "type", "cpu") == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(device)} (CPU {cpu_model()})"
    return f"CPU {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def versions() -> dict:
    import numpy
    import scipy
    import torch
    from hsc_fast.engine.runlog import _version
    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "timm": _version("timm"), "hsc_fast": _version("hsc_fast"),
            "platform": platform.platform()}


def machine_text() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return f"{os.cpu_count()} CPU(s), load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)"


def check_synth_size(root) -> None:
    """A run folder holds one synthetic set: another --synth-train size needs another --run-dir."""
    from hsc_fast.engine.pipeline import marker
    done = marker(root, "synth")
    if done.is_file():
        made = json.loads(done.read_text()).get("outputs", {}).get("n_train")
        if made is not None and made != root.synth["n_train"]:
            raise ConfigError(f"{done}: this run folder's synthetic set has {made} training images, not "
                              f"{root.synth['n_train']} (--synth-train): use another --run-dir")


def run_ablation(root, base_cfg: RunConfig, variants: Sequence[Variant], force: bool = False,
                 command: str = "", log=print, seeds: int = 1) -> list[dict]:
    """Shared data once, then every variant, `seeds` times with train.seed, +1, ... (resumable;
    complete runs are skipped)."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected at least 1")
    variants = replicates(variants, seeds, base_cfg.train.seed)
    from hsc_fast.engine.pipeline import run_stage
    t0 = time.perf_counter()
    machine_start = machine_text()
    stage_seconds: dict = {}
    shared = (("synth",) if root.data.name.startswith("synthetic") else ()) + ("shard",)
    check_synth_size(root)
    for stage in shared + (("pretrain",) if base_cfg.pretrain.enabled else ()):
        run_stage(root, stage, force=False, stage_seconds=stage_seconds)
    results = []
    for variant in variants:
        cfg = variant_config(base_cfg, variant)
        digest = config_digest(cfg)
        done = None if force else load_result(root.run_dir, variant, digest)
        if done is not None:
            done.setdefault("seed", cfg.train.seed)   # results written before this field existed
            log(f"[ablation] {variant.name}: complete (seed mIoU {done['seed_miou']:.2f}), skipped")
            results.append(done)
            continue
        log(f"[ablation] {variant.name}: {variant.title} ({', '.join(variant.overrides())})")
        result = run_variant(root, variant, cfg, digest, force)
        log(f"[ablation] {variant.name}: seed mIoU {result['seed_miou']:.2f} at threshold "
            f"{result['best_threshold']:.2f}, training {result['train_seconds']:.0f} s")
        results.append(result)
    results = completed_results(root.run_dir, base_cfg, results, seeds)
    from hsc_fast.engine.runlog import git_sha
    meta = {"command": command, "dataset": root.data.name, "budget": budget_text(base_cfg), "git_commit": git_sha(),
            "seeds": seeds, "seed_list": [base_cfg.train.seed + k for k in range(seeds)],
            "synth": dict(root.synth) if root.data.name.startswith("synthetic") else None,
            "device": device_text(root.device), "versions": versions(),
            "machine": f"start: {machine_start}; end: {machine_text()}",
            "total_seconds": time.perf_counter() - t0,
            "note": "total_seconds covers this invocation only (skipped variants cost nothing)"}
    if root.rank == 0:
        js, md = write_outputs(root.run_dir, results, meta)
        log(f"[ablation] wrote {js} and {md}")
    return results
