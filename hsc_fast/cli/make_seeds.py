"""CAM inference, threshold sweep, seeds and CRF pseudo-labels.

Run as `launch/make_seeds.py`; the work itself lives below cli/."""
from __future__ import annotations

from pathlib import Path
from typing import Optional
from typing import Sequence
import argparse
import os
import sys

from hsc_fast.classes import CLASSES_FILE
from hsc_fast.cli.common import (add_config_args, add_launcher_args, add_progress_flag, check_voc_folder,
                                 stage_exit_status, with_exit_codes)
from hsc_fast.config import RunConfig, load_config
from hsc_fast.data import ShardSet, is_shard_source
from hsc_fast.data.voc import read_id_list
from hsc_fast.distributed import init_distributed, shutdown
from hsc_fast.errors import ConfigError, DataError, HscError, WeightsError
from hsc_fast.eval.seeds import N_OVERLAYS, SeedJob, run
from hsc_fast.registry import CRF_BACKENDS

CLASSES_HELP = (
    "class set: voc | coco | synthetic:K | a classes.json file. It bounds the CAM keys, the label PNG values "
    "(0..K and 255) and the sweep/CRF evaluations. Default: the classes.json of the run (RUN_DIR/classes.json "
    "for --out RUN_DIR/seeds, or beside the --checkpoint's RUN_DIR/cam, as the pipeline lays them out), else "
    "what --data records (<data>/classes.json, or the 'classes' of its shard index.json), else the config's "
    "data.classes, else voc. The CAM model gets K+1 channels (model.num_classes)")


def build_parser() -> argparse.ArgumentParser:
    """The make_seeds command line (the exit-status table ends --help)."""
    p = argparse.ArgumentParser(description="CAM inference, threshold sweep, seeds and CRF pseudo-labels.",
                                epilog=with_exit_codes(failed="a stage failed"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, None, "YAML config or preset (default: RUN_DIR/config.yaml beside the checkpoint)")
    p.add_argument("--checkpoint", help="RUN_DIR (uses RUN_DIR/final/model.pt) or a state_dict .pt")
    p.add_argument("--data", required=True, help="VOC root folder (JPEGImages/) or shards/index.json")
    p.add_argument("--classes", metavar="SPEC", help=CLASSES_HELP)
    p.add_argument("--list", help="ids (default: seeds.eval_list, else every id of the shard index for shard "
                                  "data, else <data>/ImageSets/Segmentation/train.txt)")
    p.add_argument("--gt", help="ground-truth PNGs for the sweep/CRF evaluation (default: <data>/SegmentationClass)")
    p.add_argument("--cls-labels", help="image-level labels (.npy/.json) for folder data "
                                        "(default: data.cls_labels, <data>/cls_labels.npy, XML, masks)")
    p.add_argument("--sbd-root", help="SBD folder (img/) for folder data: ids without a VOC JPEG (default: data.sbd_root)")
    p.add_argument("--out", required=True, help="output folder (cam_npy/, seeds/, pseudo_labels/, overlays/)")
    p.add_argument("--stage", default="all", choices=("cam", "sweep", "crf", "all"),
                   help="cam: CAM files; sweep: threshold sweep + seeds; crf: CRF pseudo-labels; all (default)")
    p.add_argument("--scales", help="comma-separated inference scales (default: seeds.scales)")
    p.add_argument("--no-flip", action="store_true", help="no flipped inputs")
    p.add_argument("--fp16", action="store_true", help="store CAMs as float16")
    p.add_argument("--format", default="npy", choices=("npy", "npz"), help="CAM file format (see module doc)")
    p.add_argument("--bg-threshold", type=float, help="seed threshold (default: seeds.bg_threshold, -1 = best of sweep)")
    p.add_argument("--thresholds", help="sweep A:B:STEP (default: seeds.thresholds)")
    p.add_argument("--crf-backend", choices=CRF_BACKENDS.names(),  # registered backends (hsc_fast.crf)
                   help="seed CRF backend (default: seeds.crf.backend)")
    p.add_argument("--uncertain-margin", type=float, default=0.0,
                   help="CRF pixels whose top-2 probabilities differ by less become 255 (default 0: off)")
    p.add_argument("--overlays", type=int, default=N_OVERLAYS, help="inspection pictures written by rank 0")
    p.add_argument("--workers", type=int, default=2, help="loader / evaluation / CRF processes per rank")
    add_launcher_args(p, local_rank_default=None)
    add_progress_flag(p)
    return p


def _config_from_args(args) -> RunConfig:
    cfg_path = args.config
    if cfg_path is None and args.checkpoint:
        ck = Path(args.checkpoint)
        run_dir = ck if ck.is_dir() else ck.parent.parent
        if (run_dir / "config.yaml").is_file():
            cfg_path = str(run_dir / "config.yaml")
    overrides = list(args.set)
    if args.scales:
        overrides.append(f"seeds.scales=[{args.scales}]")
    for flag, key in ((args.fp16 or None, "seeds.fp16"), (args.bg_threshold, "seeds.bg_threshold"),
                      (args.thresholds, "seeds.thresholds"), (args.crf_backend, "seeds.crf.backend")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.no_flip:
        overrides.append("seeds.flip=false")
    return load_config(cfg_path, overrides)


def _id_list(args, cfg: RunConfig) -> list[str]:
    path = args.list or cfg.seeds.eval_list
    if not path and is_shard_source(args.data):
        return shard_ids(args.data)
    if not path:
        default = Path(args.data) / "ImageSets" / "Segmentation" / "train.txt"
        if not default.is_file():
            raise ConfigError(f"no id list: give --list (or seeds.eval_list); {default} does not exist")
        path = default
    return read_id_list(path)


def shard_ids(source: str) -> list[str]:
    """Every id of a shard source, in index order: the ids its index.json lists per shard (the
    loader's own ShardSet reads them). ConfigError when there is no index to read them from."""
    try:
        ids = ShardSet(source).ids
    except DataError as e:
        raise ConfigError(f"--data {source}: {e}") from e
    if ids is None:
        raise ConfigError(f"--data {source}: shards without an index.json listing their ids; give --list")
    flat = [i for shard in ids for i in shard]
    if not flat:
        raise ConfigError(f"--data {source}: the shard index lists no ids; give --list")
    return flat


def _classes_candidates(args) -> list[Path]:
    """Where --classes looks by default: the run of --out (RUN_DIR/seeds), the run of the checkpoint
    (RUN_DIR/cam, RUN_DIR/cam/final/model.pt), then what --data records."""
    out = [Path(args.out).resolve().parent / CLASSES_FILE]
    if args.checkpoint:
        ck = Path(args.checkpoint).resolve()
        cam_run = ck if ck.is_dir() else ck.parent.parent
        out.append(cam_run.parent / CLASSES_FILE)
    data = Path(args.data)
    if data.is_dir():
        out += [data / CLASSES_FILE, data / "index.json"]
    elif str(data).endswith(".json"):
        out.append(data)
    return out


def job_classes(args, cfg: RunConfig):
    """--classes, else a classes.json / shard index found by _classes_candidates, else the config's
    data.classes (RUN_DIR/cam/config.yaml records it), else VOC; then recorded in ``cfg``
    (apply_class_set: model.num_classes = K+1; ConfigError when the config names another set)."""
    from hsc_fast.cli.evaluate import classes_note, resolve_classes_arg
    from hsc_fast.config import apply_class_set, run_class_set
    classes, source = resolve_classes_arg(args.classes, _classes_candidates(args))
    if args.classes is None and source is None and str(cfg.data.classes) != "auto":
        classes, source = run_class_set(cfg), "the config's data.classes"
    if source is not None and os.environ.get("RANK", "0") == "0":   # before init_distributed: the launcher's RANK
        print(classes_note(classes, source), file=sys.stderr)
    apply_class_set(cfg, classes)
    return classes


def job_from_args(args) -> SeedJob:
    cfg = _config_from_args(args)
    classes = job_classes(args, cfg)
    gt, data = args.gt, Path(args.data)
    if gt is None and data.is_dir() and (data / "SegmentationClass").is_dir():
        gt = str(data / "SegmentationClass")
    cls_labels = args.cls_labels or cfg.data.cls_labels or None
    if cls_labels is None and data.is_dir() and (data / "cls_labels.npy").is_file():
        cls_labels = str(data / "cls_labels.npy")
    return SeedJob(cfg=cfg, data=args.data, out=args.out, ids=_id_list(args, cfg), stage=args.stage,
                   checkpoint=args.checkpoint, gt=gt, cls_labels=cls_labels,
                   sbd_root=args.sbd_root or cfg.data.sbd_root or None, fmt=args.format, workers=args.workers, uncertain_margin=args.uncertain_margin,
                   overlays=args.overlays, progress=not args.no_progress, classes=classes)


def check_job(job: SeedJob) -> None:
    """Pre-flight before any work: the data folder is a VOC root and a given checkpoint exists."""
    check_voc_folder(job.data)
    if job.stage in ("cam", "all") and job.checkpoint and not Path(job.checkpoint).exists():
        raise WeightsError(f"--checkpoint {job.checkpoint}: no such file or folder "
                           "(expected RUN_DIR, RUN_DIR/final/model.pt or a .pt file)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status: see common.exit_codes_epilog (0 done, 1 a stage failed, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        job = job_from_args(args)
        check_job(job)
    except HscError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = None
    try:
        # Ranks finish stages at different times (CRF): wait up to an hour at the barriers.
        info = init_distributed(timeout_s=max(job.cfg.train.dist_timeout_s, 3600),
                                local_rank_arg=args.local_rank, use_deepspeed=False)
        run(job, info.device)
    except HscError as e:
        # run() checks its stage arguments (ConfigError, exit 2) before that stage's work.
        return stage_exit_status(e, "error", 1)
    finally:
        shutdown(info)
    return 0
