"""The whole HSC pipeline under one launcher: shard -> (SynthNet pretraining) -> train CAM -> CAMs
-> sweep -> CRF pseudo-labels -> (PSA refinement: Masks) -> DeepLab -> evaluation -> report, in one
run directory.

Every rank of a `deepspeed` / `torchrun` / `python` start runs this module; the process group is
created once here and joined by the stages. Stages talk through files (shards, checkpoints, CAM
files, PNGs), and each one writes `RUN_DIR/stages/<name>.json` (its wall time and outputs) when it
is complete, so a rerun skips finished stages and any stage can be rerun alone (`--stages`,
`--force`). Stages that only rank 0 runs (synthetic data, sharding, report) publish their marker
and the other ranks wait for it on the shared filesystem (no collective can time out meanwhile).

Layout of RUN_DIR:
    synth/            the synthetic VOC/SBD tree (demo only)
    shards/           WebDataset shards of the training list + index.json
    pretrain/         SynthNet backbone weights (pretrain.enabled: an option; the demo uses ImageNet weights)
    cam/              CAM training run (config.yaml, metrics.csv, checkpoints/, final/model.pt)
    seeds/            cam_npy/, sweep.json(+png), seeds/, pseudo_labels/, overlays/, crf_eval.json
    refine/           aff_labels/, affinity/ (AffinityNet run), masks/, mask_eval.json (refine.method psa)
    deeplab/          DeepLab run (checkpoints, final/model.pt, pred/, eval.json)
    stages/*.json     completion markers with wall times
    summary.json, report.md, report.html
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from hsc_fast.classes import VOC, ClassSet, synthetic
from hsc_fast.io import write_json
from hsc_fast.config import RunConfig
from hsc_fast.errors import ConfigError, HscError

STAGES = ("synth", "shard", "pretrain", "train_cam", "cam", "sweep", "crf", "refine", "deeplab", "deeplab_eval",
          "report")
MAIN_ONLY = {"synth", "shard", "report"}


@dataclass
class Dataset:
    """Where the VOC/SBD data lives and which id lists each stage uses."""
    voc_root: str
    sbd_root: str = ""
    cls_labels: str = ""
    saliency_root: str = ""
    train_list: str = ""     # CAM training + pseudo-labels (train_aug)
    eval_list: str = ""      # seed / CRF evaluation (VOC train, 1,464 ids)
    val_list: str = ""       # DeepLab evaluation (VOC val)
    name: str = "VOC2012"
    classes: ClassSet = VOC  # the tree's class set (a classes.json in voc_root; the demo's synthetic:K)

    def list_path(self, which: str) -> Path:
        given = getattr(self, f"{which}_list")
        default = {"train": "train_aug.txt", "eval": "train.txt", "val": "val.txt"}[which]
        return Path(given) if given else Path(self.voc_root) / "ImageSets" / "Segmentation" / default

    @property
    def gt_dir(self) -> Path:
        return Path(self.voc_root) / "SegmentationClass"


@dataclass
class Context:
    cfg: RunConfig
    run_dir: Path
    data: Dataset
    rank: int = 0
    world: int = 1
    device: object = None
    progress: bool = True
    workers: int = 0
    wait_timeout_s: float = 4 * 3600
    synth: dict = field(default_factory=lambda: {"n_train": 300, "n_val": 60, "size": 128, "seed": 0, "num_fg": 20})
    summary: dict = field(default_factory=dict)

    def path(self, *parts) -> Path:
        return self.run_dir.joinpath(*parts)

    def ids(self, which: str) -> list[str]:
        from hsc_fast.data.voc import read_id_list
        return read_id_list(self.data.list_path(which))


# ------------------------------------------------------------------------------ stage markers
def marker(ctx: Context, stage: str) -> Path:
    return ctx.path("stages", f"{stage}.json")


def wait_for_marker(ctx: Context, stage: str) -> None:
    """Non-main ranks: wait until rank 0 finished (or failed) a main-only stage."""
    done, failed = marker(ctx, stage), ctx.path("stages", f"{stage}.failed")
    deadline = time.monotonic() + ctx.wait_timeout_s
    while not done.is_file():
        if failed.is_file():
            raise HscError(f"stage '{stage}' failed on rank 0: {json.loads(failed.read_text())['error']}")
        if time.monotonic() > deadline:
            raise HscError(f"stage '{stage}': rank 0 did not finish within {ctx.wait_timeout_s:.0f} s")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------ stages
def stage_synth(ctx: Context) -> dict:
    from hsc_fast.data.synth import generate
    out = ctx.path("synth")
    info = generate(out, ctx.synth["n_train"], ctx.synth["n_val"], ctx.synth["seed"], ctx.synth["size"],
                    num_fg=ctx.data.classes.num_fg)
    return {"out": str(out), **ctx.synth, "seconds_generate": info.get("seconds")}


def stage_shard(ctx: Context) -> dict:
    from hsc_fast.data.shard import shard_dataset
    d = ctx.data
    index = shard_dataset(d.voc_root, d.list_path("train"), ctx.path("shards"), sbd_root=d.sbd_root or None,
                          cls_labels=d.cls_labels or None, saliency_root=d.saliency_root or None,
                          workers=max(1, ctx.workers), progress=ctx.progress)
    return {"index": shard_index(ctx), "samples": index["count"]}


def shard_index(ctx: Context) -> str:
    return str(ctx.path("shards", "index.json"))


def stage_pretrain(ctx: Context) -> dict:
    """SynthNet for every backbone whose weights point at this run's pretrain/ folder (all ranks)."""
    from hsc_fast.engine.pretrain import archs_to_train, pretrain, weights_path
    trained = {}
    for arch in archs_to_train(ctx.cfg, ctx.run_dir):
        result = pretrain(ctx.cfg, arch, weights_path(ctx.run_dir, arch), rank=ctx.rank, world=ctx.world,
                          device=ctx.device, progress=ctx.progress, log=lambda m: _say(ctx, m))
        trained[arch] = {k: result[k] for k in ("file", "val_top1", "train_seconds", "images_per_s", "precision")}
        ctx.summary[f"pretrain_{arch}_top1"] = result["val_top1"]
    return {"trained": trained}


def stage_train_cam(ctx: Context) -> dict:
    from hsc_fast.engine.session import train
    ctx.cfg.data.train = shard_index(ctx)
    summary = train(ctx.cfg, ctx.path("cam"), resume="auto", progress=ctx.progress)
    return {"final": str(ctx.path("cam", "final", "model.pt")), "summary": summary}


def _seed_job(ctx: Context, ids: list[str], gt: Optional[str] = None):
    from hsc_fast.eval.seeds import SeedJob
    return SeedJob(cfg=ctx.cfg, data=shard_index(ctx), out=str(ctx.path("seeds")), ids=ids, classes=ctx.data.classes,
                   checkpoint=str(ctx.path("cam")), gt=gt, workers=ctx.workers, progress=ctx.progress)


def stage_cam(ctx: Context) -> dict:
    from hsc_fast.eval.seeds import load_cam_model, run_cam_stage
    job = _seed_job(ctx, ctx.ids("train"))
    model = load_cam_model(ctx.cfg.model, job.checkpoint, ctx.device)
    n = run_cam_stage(job, model, ctx.device)
    return {"cam_dir": str(ctx.path("seeds", "cam_npy")), "written_by_rank0": n}


def stage_sweep(ctx: Context) -> dict:
    """Threshold sweep on the evaluation list, then seed PNGs for it at the best threshold."""
    from hsc_fast.eval.seeds import run_label_stage, run_sweep_stage
    job = _seed_job(ctx, ctx.ids("eval"), gt=str(ctx.data.gt_dir))
    result = run_sweep_stage(job)
    job.overlays = 8
    run_label_stage(job, seeds=True, crf=False)
    ctx.summary.update(seed_miou=result["best"]["miou"], seed_best_threshold=result["best"]["threshold"],
                       seed_sweep_range=result["sweep"]["range"], seed_sweep_extensions=result["sweep"]["extensions"],
                       seed_split=f"{ctx.data.name} {ctx.data.list_path('eval').stem} ({result['n_images']} images)")
    return {"sweep": "seeds/sweep.json", "best": result["best"]}


def stage_crf(ctx: Context) -> dict:
    """CRF pseudo-labels for the whole training list; evaluated on the evaluation list."""
    from hsc_fast.eval.evaluate import evaluate, write_outputs
    from hsc_fast.eval.seeds import run_label_stage, sweep_alpha
    job = _seed_job(ctx, ctx.ids("train"))
    job.overlays = 8
    if ctx.cfg.seeds.crf.alpha == "auto":  # the alpha sweep on the evaluation list (it has masks)
        sweep_alpha(job, ctx.data.gt_dir, ctx.ids("eval"))
    run_label_stage(job, seeds=False, crf=True)
    result = evaluate(ctx.data.gt_dir, pred_dir=ctx.path("seeds", "pseudo_labels"), ids=ctx.ids("eval"),
                      workers=ctx.workers, classes=ctx.data.classes)
    alpha = json.loads(ctx.path("seeds", "crf_params.json").read_text())["alpha"]
    result = dict(result, crf_alpha=alpha)
    if ctx.rank == 0:
        write_outputs(result, ctx.path("seeds", "crf_eval.json"))
    ctx.summary.update(crf_miou=result["miou"], crf_alpha=round(alpha, 4),
                       crf_split=f"{ctx.data.name} {ctx.data.list_path('eval').stem} ({result['n_images']} images)")
    return {"pseudo_labels": "seeds/pseudo_labels", "miou": result["miou"]}


def stage_refine(ctx: Context) -> dict:
    """refine.method psa: affinity labels -> AffinityNet -> random-walk Masks (engine.refine),
    evaluated on the evaluation list. refine.method none: nothing (DeepLab takes the CRF labels)."""
    if ctx.cfg.refine.method == "none":
        return {"method": "none"}
    from hsc_fast.engine import refine as R
    from hsc_fast.eval.evaluate import evaluate, write_outputs
    data, cams, train_ids = shard_index(ctx), ctx.path("seeds", "cam_npy"), ctx.ids("train")
    R.make_affinity_labels(ctx.cfg, data, cams, ctx.path("refine", R.AFF_LABELS), train_ids, workers=ctx.workers,
                           progress=ctx.progress)
    aff = R.train_affinity(ctx.cfg, ctx.path("refine", R.AFFINITY), images=data,
                           labels_dir=ctx.path("refine", R.AFF_LABELS), train_ids=train_ids, cam_run=ctx.path("cam"),
                           progress=ctx.progress)
    model = R.load_affinity_net(ctx.cfg, ctx.path("refine", R.AFFINITY), ctx.device)
    R.random_walk_masks(ctx.cfg, model, data, cams, ctx.path("refine", R.MASKS), train_ids, device=ctx.device,
                        progress=ctx.progress)
    result = evaluate(ctx.data.gt_dir, pred_dir=ctx.path("refine", R.MASKS), ids=ctx.ids("eval"), workers=ctx.workers,
                      classes=ctx.data.classes)
    if ctx.rank == 0:
        write_outputs(result, ctx.path("refine", "mask_eval.json"))
    ctx.summary.update(mask_miou=result["miou"], mask_eval="refine/mask_eval.json",
                       mask_split=f"{ctx.data.name} {ctx.data.list_path('eval').stem} ({result['n_images']} images)")
    return {"method": "psa", "masks": "refine/masks", "miou": result["miou"], "affinity": aff}


def deeplab_labels(ctx: Context) -> Path:
    """DeepLab's training labels: the Masks when the refine stage made them, else the CRF labels."""
    return ctx.path("refine", "masks") if ctx.cfg.refine.method != "none" else ctx.path("seeds", "pseudo_labels")


def stage_deeplab(ctx: Context) -> dict:
    from hsc_fast.engine.deeplab_trainer import train_deeplab
    summary = train_deeplab(ctx.cfg, ctx.path("deeplab"), images=shard_index(ctx),
                            labels_dir=str(deeplab_labels(ctx)), train_ids=ctx.ids("train"),
                            resume="auto", progress=ctx.progress)
    return {"final": str(ctx.path("deeplab", "final", "model.pt")), "summary": summary}


def stage_deeplab_eval(ctx: Context) -> dict:
    from hsc_fast.engine.deeplab_trainer import evaluate_deeplab
    results = evaluate_deeplab(ctx.cfg, ctx.path("deeplab"), images=ctx.data.voc_root, gt_dir=str(ctx.data.gt_dir),
                               eval_ids=ctx.ids("val"), crf=ctx.cfg.deeplab.crf.enabled, progress=ctx.progress)
    plain, with_crf = results["plain"], results.get("crf")
    split = f"{ctx.data.name} {ctx.data.list_path('val').stem} ({plain['n_images']} images)"
    ctx.summary.update(deeplab_miou=plain["miou"], deeplab_split=split)
    if with_crf:
        ctx.summary.update(deeplab_crf_miou=with_crf["miou"], deeplab_crf_split=split)
    return {"miou": plain["miou"], "crf_miou": with_crf["miou"] if with_crf else None}


def stage_report(ctx: Context) -> dict:
    from hsc_fast.eval.report import write_report
    md, page = write_report(ctx.run_dir)
    return {"report_md": str(md), "report_html": str(page)}


STAGE_FUNCS: dict[str, Callable[[Context], dict]] = {
    "synth": stage_synth, "shard": stage_shard, "pretrain": stage_pretrain, "train_cam": stage_train_cam, "cam": stage_cam,
    "sweep": stage_sweep, "crf": stage_crf, "refine": stage_refine, "deeplab": stage_deeplab,
    "deeplab_eval": stage_deeplab_eval,
    "report": stage_report,
}


# ---------------------------------------------------------------------------------- summary
def write_summary(ctx: Context, stage_seconds: dict) -> Path:
    """summary.json: headline numbers (percent), the splits they were measured on, stage times."""
    path = ctx.path("summary.json")
    old = json.loads(path.read_text()) if path.is_file() else {}
    summary = {**old, **ctx.summary}
    summary["stage_seconds"] = {**old.get("stage_seconds", {}), **stage_seconds}
    summary.setdefault("seed_eval", "seeds/sweep.json")
    summary.setdefault("crf_eval", "seeds/crf_eval.json")
    summary.setdefault("deeplab_eval", "deeplab/eval.json")
    summary.setdefault("deeplab_crf_eval", "deeplab/eval_crf.json")
    summary.setdefault("curve_png", "seeds/sweep.png")
    summary.setdefault("overlay_dirs", ["seeds/overlays", "cam/images"])
    summary["dataset"] = ctx.data.name
    summary["classes"] = ctx.data.classes.name
    summary["run_dir"] = str(ctx.run_dir)
    write_json(path, summary)
    return path


def run_stage(ctx: Context, stage: str, force: bool, stage_seconds: dict) -> None:
    done = marker(ctx, stage)
    if done.is_file() and not force:
        info = json.loads(done.read_text())
        ctx.summary.update(info.get("summary", {}))
        _say(ctx, f"[pipeline] {stage}: already complete ({done}), skipped")
        return
    if stage in MAIN_ONLY and ctx.rank != 0:
        wait_for_marker(ctx, stage)
        ctx.summary.update(json.loads(done.read_text()).get("summary", {}))
        return
    _say(ctx, f"[pipeline] {stage}: running")
    before = dict(ctx.summary)
    t0 = time.perf_counter()
    try:
        outputs = STAGE_FUNCS[stage](ctx)
    except BaseException as e:
        if ctx.rank == 0:
            write_json(ctx.path("stages", f"{stage}.failed"), {"error": f"{type(e).__name__}: {e}"})
        raise
    seconds = time.perf_counter() - t0
    stage_seconds[stage] = seconds
    added = {k: v for k, v in ctx.summary.items() if before.get(k) != v}
    if ctx.rank == 0:
        ctx.path("stages", f"{stage}.failed").unlink(missing_ok=True)
        write_json(done, {"stage": stage, "seconds": seconds, "outputs": outputs, "summary": added})
        write_summary(ctx, {stage: seconds})
    _say(ctx, f"[pipeline] {stage}: done in {seconds:.1f} s")


def _say(ctx: Context, msg: str) -> None:
    if ctx.rank == 0:
        print(msg, flush=True)


def start_context(cfg: RunConfig, run_dir: Path, data: Dataset, args, **extra):
    """Join/create the process group once (long timeout: ranks legitimately wait for each other's
    share of inference/CRF; training watches its peers with its own heartbeat), build the Context,
    and let rank 0 create the run dir with the resolved config. Returns (ctx, dist info)."""
    from hsc_fast import distributed as D
    from hsc_fast.classes import CLASSES_FILE
    from hsc_fast.classes import save as save_classes
    from hsc_fast.config import save_config
    info = D.init_distributed(timeout_s=max(cfg.train.dist_timeout_s, 3600), local_rank_arg=args.local_rank)
    ctx = Context(cfg=cfg, run_dir=run_dir, data=data, rank=info.rank, world=info.world_size, device=info.device,
                  progress=not args.no_progress, workers=args.workers, **extra)
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        save_classes(run_dir / CLASSES_FILE, data.classes)  # what the later stages and tools read
    return ctx, info


def dataset_from_args(args, run_dir: Path) -> Dataset:
    if args.demo:
        synth = run_dir / "synth"
        classes = synthetic(getattr(args, "synth_classes", VOC.num_fg))
        name = "synthetic VOC" if classes is VOC else f"synthetic, {classes.num_fg} classes"
        return Dataset(voc_root=str(synth / "VOC2012"), sbd_root=str(synth / "SBD"),
                       cls_labels=str(synth / "cls_labels.npy"), saliency_root=str(synth / "SaliencyMaps"),
                       name=f"{name} (hsc_fast.data.synth, seed 0)", classes=classes)
    if not args.voc_root:
        raise ConfigError("--voc-root is required (or --demo for the synthetic set)")
    from hsc_fast.data import source_class_set
    try:
        classes = source_class_set(args.voc_root)
    except HscError as e:
        raise ConfigError(f"--voc-root {args.voc_root}: {e}") from e
    return Dataset(voc_root=args.voc_root, sbd_root=args.sbd_root, cls_labels=args.cls_labels,
                   saliency_root=args.saliency_root, train_list=args.train_list, eval_list=args.eval_list,
                   val_list=args.val_list, classes=classes)
