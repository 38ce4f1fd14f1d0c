"""Train the HSC CAM network.

Run as `launch/train_cam.py`; the work itself lives below cli/."""
from __future__ import annotations

from pathlib import Path
from typing import Optional
import json

from hsc_fast import distributed as D
from hsc_fast.cli.common import (add_config_args, add_launcher_args, add_progress_flag, parse_stage_args, stage_exit_status, with_exit_codes)
from hsc_fast.config import RunConfig
from hsc_fast.engine.deepspeed import build_ds_config
from hsc_fast.engine.cam_trainer import check_geometry, check_inputs
from hsc_fast.engine.session import train


# ----------------------------------------------------------------------------------------------
# Command line (launch/train_cam.py is a thin wrapper around main())
# ----------------------------------------------------------------------------------------------
CLI_EPILOG = """\
launch modes:
  python launch/train_cam.py --config configs/demo.yaml --run-dir runs/x          (1 process)
  deepspeed --num_gpus 2 --master_port 29500 launch/train_cam.py --config ...   (1 node)
  torchrun --standalone --nproc_per_node 2 launch/train_cam.py --config ...
  CPU: export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu (gloo backend is picked automatically)
every config key (python launch/train_cam.py --list-keys) can be set with --set key=value."""


def build_parser():
    """The train_cam command line (see CLI_EPILOG and the exit-status table in --help)."""
    import argparse
    p = argparse.ArgumentParser(
        prog="train_cam.py", description="Train the CAM network of HSC (or a baseline) with DeepSpeed.",
        epilog=with_exit_codes(CLI_EPILOG, failed="training failed", rank_lost=True),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, "hsc_eps_official", "YAML config or preset name from configs/ (default: hsc_eps_official)",
                    list_keys=True)
    p.add_argument("--run-dir", required=False, default="",
                   help="run folder: config.yaml, env.json, metrics.csv, tb/, logs/, checkpoints/, final/")
    p.add_argument("--data", default=None,
                   help="training data: shard brace URL, shard index.json or a VOC root (sets data.train)")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (sets train.max_steps)")
    p.add_argument("--save-every", type=int, default=None,
                   help="checkpoint every N steps; one is always written at the end (sets train.save_every)")
    p.add_argument("--resume", default="",
                   help="'auto': newest complete checkpoint of --run-dir (fresh start if none); "
                        "or a run dir / checkpoints/step_N folder")
    p.add_argument("--seed", type=int, default=None, help="base random seed (sets train.seed)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms; on CPU a resumed run is bitwise equal (sets train.deterministic)")
    add_progress_flag(p)
    # DeepSpeed's own arguments (the launcher passes --local_rank; --deepspeed is accepted and ignored)
    add_launcher_args(p, deepspeed=True)
    return p


build_arg_parser = build_parser  # the name before 0.2, kept for callers outside the package


def config_from_args(args) -> RunConfig:
    """Preset -> `--set` overrides -> the dedicated flags (which win). Validates everything."""
    from hsc_fast.config import load_config
    overrides = list(args.set)
    if args.data is not None:
        overrides.append(f"data.train={args.data}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.deterministic:
        overrides.append("train.deterministic=true")
    if args.deepspeed_config is not None:
        overrides.append(f"train.ds_config={args.deepspeed_config}")
    cfg = load_config(args.config, overrides)
    check_geometry(cfg)
    return cfg


def check_train_data(cfg: RunConfig) -> None:
    """Pre-flight of `data.train` before any work: every named file exists (the engine's
    check_inputs), and a local folder opens the way the training loader opens it (JPEGImages/,
    data.train_list, ids, cls_labels, saliency root), so a wrong folder is exit 2, not a failed run."""
    from hsc_fast.data import is_shard_source, open_train_source
    source = cfg.data.train
    check_inputs(cfg)  # a local folder must be a VOC root: named as such, before the list files
    if not is_shard_source(source) and Path(source).is_dir():
        open_train_source(cfg.data)  # the loader's own FolderDataset: no second copy of its rules


def main(argv: Optional[list] = None) -> int:
    """Exit status: see common.exit_codes_epilog (0 done, 1 training failed, 2 bad input, 75 lost rank)."""
    from hsc_fast.errors import HscError
    args = parse_stage_args(build_parser(), argv)
    if args is None:
        return 0
    try:
        cfg = config_from_args(args)
        build_ds_config(cfg, 1)  # fail on a bad DeepSpeed JSON before any process group work
        check_train_data(cfg)
    except HscError as e:
        return stage_exit_status(e, "input error", 2)
    try:
        summary = train(cfg, args.run_dir, resume=args.resume, local_rank=args.local_rank,
                        progress=not args.no_progress)
    except HscError as e:
        return stage_exit_status(e, "training error", 1)
    if D.get_rank() == 0:
        print(json.dumps(summary))
    return 0
