"""Train and evaluate DeepLab (the last stage).

Run as `launch/train_deeplab.py`; the work itself lives below cli/."""
from __future__ import annotations

from typing import Optional
import json

from hsc_fast import distributed as D
from hsc_fast.cli.common import (add_config_args, add_launcher_args, add_progress_flag, check_voc_folder,
                                 parse_stage_args, stage_exit_status, with_exit_codes)
from hsc_fast.config import RunConfig
from hsc_fast.engine.deeplab_trainer import check_deeplab_config, deeplab_ds_config, evaluate_deeplab, train_deeplab
from hsc_fast.errors import ConfigError


# ---------------------------------------------------------------------------------------- CLI
CLI_EPILOG = """\
launch modes:
  python launch/train_deeplab.py --config configs/deeplab_demo.yaml --run-dir runs/dl ...   (1 process)
  deepspeed --num_gpus 8 launch/train_deeplab.py --config deeplab --run-dir runs/dl ...
  torchrun --standalone --nproc_per_node 2 launch/train_deeplab.py ...
  CPU: export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu (gloo is picked automatically)
inputs: --images is a VOC root (JPEGImages/, then --sbd-root img/) or a shard index.json;
--labels a folder of {id}.png pseudo-labels (or VOC SegmentationClass for a ground-truth run).
outputs: RUN_DIR/{config.yaml, env.json, metrics.csv, tb/, logs/, checkpoints/, final/model.pt,
pred/, pred_crf/, eval.json, eval_crf.json}."""


def build_parser():
    """The train_deeplab command line (see CLI_EPILOG and the exit-status table in --help)."""
    import argparse
    p = argparse.ArgumentParser(prog="train_deeplab.py", description="Train and evaluate DeepLab (the last HSC stage).",
                                epilog=with_exit_codes(CLI_EPILOG, failed="training or evaluation failed",
                                                       rank_lost=True),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, "deeplab", "YAML config or preset name (default: deeplab)", list_keys=True)
    p.add_argument("--run-dir", default="", help="run folder (required unless --list-keys)")
    p.add_argument("--images", default=None,
                   help="VOC root or shard index.json (default: data.train of the config)")
    p.add_argument("--sbd-root", default=None, help="SBD root for images missing in VOC (sets data.sbd_root)")
    p.add_argument("--labels", default="", help="training label PNGs {id}.png (pseudo-labels or ground truth)")
    p.add_argument("--train-list", default="",
                   help="training ids (default: ImageSets/Segmentation/train_aug.txt of a VOC root)")
    p.add_argument("--eval-list", default="", help="evaluation ids (default: ImageSets/Segmentation/val.txt)")
    p.add_argument("--gt", default="", help="ground-truth PNGs for evaluation (default: VOC SegmentationClass)")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate --checkpoint or the run dir")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--checkpoint", default=None, help="weights to evaluate: model.pt, checkpoints/step_N or a run dir")
    crf = p.add_mutually_exclusive_group()
    crf.add_argument("--crf", dest="crf", action="store_true", default=None, help="also the test-time CRF")
    crf.add_argument("--no-crf", dest="crf", action="store_false", help="no test-time CRF")
    p.add_argument("--max-steps", type=int, default=None, help="sets deeplab.max_steps")
    p.add_argument("--resume", default="auto", help="'auto' (default), 'none', a run dir or a checkpoint folder")
    p.add_argument("--seed", type=int, default=None, help="sets train.seed")
    p.add_argument("--deterministic", action="store_true", help="sets train.deterministic")
    add_progress_flag(p)
    add_launcher_args(p, deepspeed=True)
    return p


build_arg_parser = build_parser  # the name before 0.2, kept for callers outside the package


def config_from_args(args) -> RunConfig:
    from hsc_fast.config import load_config
    overrides = list(args.set)
    for flag, key in ((args.images, "data.train"), (args.sbd_root, "data.sbd_root"),
                      (args.max_steps, "deeplab.max_steps"), (args.seed, "train.seed"),
                      (args.deepspeed_config, "train.ds_config")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.deterministic:
        overrides.append("train.deterministic=true")
    cfg = load_config(args.config, overrides)
    check_deeplab_config(cfg)
    return cfg


def _voc_list(images: str, name: str, flag: str) -> list[str]:
    from hsc_fast.data import find_voc_root, is_shard_source
    from hsc_fast.data.voc import read_id_list
    if is_shard_source(images):
        raise ConfigError(f"{flag}: required when --images is a shard source")
    path = find_voc_root(images) / "ImageSets" / "Segmentation" / name
    if not path.is_file():
        raise ConfigError(f"{flag}: not given and {path} does not exist")
    return read_id_list(path)


def _ids(path: str, images: str, default_name: str, flag: str) -> list[str]:
    from hsc_fast.data.voc import read_id_list
    return read_id_list(path) if path else _voc_list(images, default_name, flag)


def _default_gt(images: str) -> str:
    from hsc_fast.data import find_voc_root, is_shard_source
    if is_shard_source(images):
        raise ConfigError("--gt: required when --images is a shard source")
    return str(find_voc_root(images) / "SegmentationClass")


def main(argv: Optional[list] = None) -> int:
    """Exit status: see common.exit_codes_epilog (0 done, 1 a failure, 2 bad input, 75 lost rank)."""
    from hsc_fast.errors import HscError
    parser = build_parser()
    args = parse_stage_args(parser, argv)
    if args is None:
        return 0
    if args.eval_only and args.no_eval:
        parser.error("--eval-only and --no-eval exclude each other")
    try:
        cfg = config_from_args(args)
        images = cfg.data.train
        if not images:
            raise ConfigError("--images (or data.train): a VOC root or a shard index.json is required")
        check_voc_folder(images)  # a folder without JPEGImages/ is bad input (2), not a failed run
        if not args.eval_only and not args.labels:
            raise ConfigError("--labels: the folder of training label PNGs is required (unless --eval-only)")
        train_ids = [] if args.eval_only else _ids(args.train_list, images, "train_aug.txt", "--train-list")
        eval_ids = [] if args.no_eval else _ids(args.eval_list, images, "val.txt", "--eval-list")
        gt_dir = "" if args.no_eval else (args.gt or _default_gt(images))
        crf = cfg.deeplab.crf.enabled if args.crf is None else args.crf
        deeplab_ds_config(cfg, 1)  # a bad DeepSpeed JSON fails before any process group work
    except HscError as e:
        return stage_exit_status(e, "error", 2)
    info = None
    summary: dict = {}
    try:
        info = D.init_distributed(cfg.train.dist_timeout_s, local_rank_arg=args.local_rank)
        if not args.eval_only:
            summary["train"] = train_deeplab(cfg, args.run_dir, images=images, labels_dir=args.labels,
                                             train_ids=train_ids, resume=args.resume, progress=not args.no_progress)
        if not args.no_eval:
            res = evaluate_deeplab(cfg, args.run_dir, images=images, gt_dir=gt_dir, eval_ids=eval_ids,
                                   checkpoint=args.checkpoint, crf=crf, progress=not args.no_progress)
            summary["miou"] = res["plain"]["miou"]
            if res["crf"] is not None:
                summary["miou_crf"] = res["crf"]["miou"]
    except HscError as e:
        return stage_exit_status(e, "error", 1)
    finally:
        D.shutdown(info)
    if info.rank == 0:
        print(json.dumps(summary))
    return 0
