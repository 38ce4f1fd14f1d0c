"""Train the HSC CAM network.

Run as `launch/train_cam.py`; the work itself lives below cli/."""
from __future__ import annotations

from typing import Optional
import json

from hsc_fast import distributed as D
from hsc_fast.cli.common import parse_stage_args, stage_exit_status
from hsc_fast.config import RunConfig
from hsc_fast.engine.deepspeed import build_ds_config
from hsc_fast.engine.cam_trainer import check_geometry
from hsc_fast.engine.session import train
from hsc_fast.errors import ConfigError


# ----------------------------------------------------------------------------------------------
# Command line (launch/train_cam.py is a thin wrapper around main())
# ----------------------------------------------------------------------------------------------
CLI_EPILOG = """\
launch modes:
  python launch/train_cam.py --config configs/demo.yaml --run-dir runs/x          (1 process)
  deepspeed --num_gpus 2 --master_port 29500 launch/train_cam.py --config ...   (1 node)
  torchrun --standalone --nproc_per_node 2 launch/train_cam.py --config ...
  CPU: export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu (gloo backend is picked automatically)
every config key (python launch/train_cam.py --list-keys) can be set with --set key=value.
exit status: 0 done, 1 training error, 2 bad config/arguments, 75 a peer rank was lost."""


def build_arg_parser():
    import argparse
    p = argparse.ArgumentParser(
        prog="train_cam.py", description="Train the CAM network of HSC (or a baseline) with DeepSpeed.",
        epilog=CLI_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="hsc_eps_official",
                   help="YAML config or preset name from configs/ (default: hsc_eps_official)")
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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, repeatable, e.g. --set loss.tau=0.2 --set data.batch_size=8")
    p.add_argument("--list-keys", action="store_true", help="print every config key with type, default and help")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs and metrics.csv still written)")
    # DeepSpeed's own arguments (the launcher passes --local_rank; --deepspeed is accepted and ignored)
    p.add_argument("--deepspeed_config", default=None,
                   help="DeepSpeed engine JSON: ZeRO stage, bf16, gradient accumulation, clipping "
                        "(sets train.ds_config; batch sizes come from data.batch_size)")
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="set by the deepspeed launcher (also read from $LOCAL_RANK)")
    return p


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


def main(argv: Optional[list] = None) -> int:
    from hsc_fast.errors import HscError
    args = parse_stage_args(build_arg_parser(), argv)
    if args is None:
        return 0
    try:
        cfg = config_from_args(args)
        build_ds_config(cfg, 1)  # fail on a bad DeepSpeed JSON before any process group work
    except ConfigError as e:
        return stage_exit_status(e, "config error", 2)
    try:
        summary = train(cfg, args.run_dir, resume=args.resume, local_rank=args.local_rank,
                        progress=not args.no_progress)
    except HscError as e:
        return stage_exit_status(e, "training error", 1)
    if D.get_rank() == 0:
        print(json.dumps(summary))
    return 0
