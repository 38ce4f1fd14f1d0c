"""PSA / AffinityNet refinement of seeds into Masks (the stage between the CRF and DeepLab).

Run as `launch/refine.py`; the work lives in hsc_fast.engine.refine."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from hsc_fast import distributed as D
from hsc_fast.cli.common import (add_config_args, add_launcher_args, add_progress_flag, check_voc_folder,
                                 parse_stage_args, stage_exit_status, with_exit_codes)
from hsc_fast.errors import ConfigError

CLI_EPILOG = """\
inputs: the CAM files of make_seeds (--cams RUN/seeds/cam_npy), the CAM training run (--cam-run RUN/cam,
whose backbone initialises AffinityNet) and the images (--images: a VOC root or a shard index.json).
outputs (RUN_DIR): aff_labels/{id}.png (PSA's confident fg / bg / 255 labels), affinity/ (the AffinityNet
run: config.yaml, metrics.csv, checkpoints/, final/model.pt), masks/{id}.png (random-walk Masks: DeepLab's
--labels), mask_eval.json with --gt. Each step skips what is done; training resumes from its checkpoints.
example:
  python launch/refine.py --run-dir runs/demo/refine --cams runs/demo/seeds/cam_npy --cam-run runs/demo/cam \\
      --images runs/demo/shards/index.json --train-list runs/demo/synth/VOC2012/ImageSets/Segmentation/train_aug.txt \\
      --gt runs/demo/synth/VOC2012/SegmentationClass --config demo --set refine.method=psa"""


def build_parser():
    """The refine command line (see CLI_EPILOG and the exit-status table in --help)."""
    import argparse
    p = argparse.ArgumentParser(prog="refine.py", description="Seeds -> Masks with PSA's AffinityNet and random walk.",
                                epilog=with_exit_codes(CLI_EPILOG, failed="a step failed", rank_lost=True),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, "hsc_eps_official", "YAML config or preset (refine.* and model.backbone are read)",
                    list_keys=True)
    p.add_argument("--run-dir", default="", help="output folder (required unless --list-keys)")
    p.add_argument("--cams", default="", help="folder of CAM files {id}.npy/.npz written by make_seeds")
    p.add_argument("--cam-run", default="", help="the CAM training run (final/model.pt or checkpoints/)")
    p.add_argument("--images", default="", help="VOC root or shard index.json")
    p.add_argument("--sbd-root", default="", help="SBD root for ids without a VOC JPEG (folder images)")
    p.add_argument("--train-list", default="", help="ids to refine and to train AffinityNet on")
    p.add_argument("--gt", default="", help="ground-truth PNGs: evaluate the Masks (optional)")
    p.add_argument("--eval-list", default="", help="ids evaluated with --gt (default: the train list)")
    add_progress_flag(p)
    add_launcher_args(p)
    return p


def _check_args(args) -> None:
    for flag, value in (("--cams", args.cams), ("--cam-run", args.cam_run), ("--images", args.images),
                        ("--train-list", args.train_list)):
        if not value:
            raise ConfigError(f"{flag}: required")
        if flag != "--images" and not Path(value).exists():
            raise ConfigError(f"{flag} {value}: does not exist")
    check_voc_folder(args.images)
    if args.gt and not Path(args.gt).is_dir():
        raise ConfigError(f"--gt {args.gt}: not a folder of ground-truth PNGs")


def main(argv: Optional[list] = None) -> int:
    """Exit status: see common.exit_codes_epilog (0 done, 1 a step failed, 2 bad input, 75 lost rank)."""
    from hsc_fast.config import load_config
    from hsc_fast.data.voc import read_id_list
    from hsc_fast.engine import refine as R
    from hsc_fast.errors import HscError
    args = parse_stage_args(build_parser(), argv)
    if args is None:
        return 0
    try:
        sets = list(args.set) + ([f"data.sbd_root={args.sbd_root}"] if args.sbd_root else [])
        cfg = load_config(args.config, sets)
        R.check_refine_config(cfg)
        _check_args(args)
        from hsc_fast.data import resolve_run_classes
        classes = resolve_run_classes(cfg, args.images)  # the images' class set (shard index / classes.json)
        ids = read_id_list(args.train_list)
        eval_ids = read_id_list(args.eval_list) if args.eval_list else ids
    except HscError as e:
        return stage_exit_status(e, "error", 2)
    info = None
    run = Path(args.run_dir)
    summary: dict = {}
    try:
        info = D.init_distributed(cfg.train.dist_timeout_s, local_rank_arg=args.local_rank)
        progress = not args.no_progress
        R.make_affinity_labels(cfg, args.images, args.cams, run / R.AFF_LABELS, ids, progress=progress)
        summary["affinity"] = R.train_affinity(cfg, run / R.AFFINITY, images=args.images, labels_dir=run / R.AFF_LABELS,
                                               train_ids=ids, cam_run=args.cam_run, progress=progress)
        model = R.load_affinity_net(cfg, run / R.AFFINITY, info.device)
        R.random_walk_masks(cfg, model, args.images, args.cams, run / R.MASKS, ids, device=info.device,
                            progress=progress)
        if args.gt:
            from hsc_fast.eval.evaluate import evaluate, format_table, write_outputs
            result = evaluate(args.gt, pred_dir=run / R.MASKS, ids=eval_ids, classes=classes)
            if info.is_main:
                print(format_table(result))
                write_outputs(result, run / "mask_eval.json")
            summary["mask_miou"] = result["miou"]
    except HscError as e:
        return stage_exit_status(e, "error", 1)
    finally:
        D.shutdown(info)
    if info.is_main:
        print(json.dumps(summary))
    return 0
