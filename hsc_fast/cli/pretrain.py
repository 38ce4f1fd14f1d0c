"""SynthNet pre-training: the local stand-in for ImageNet weights.

Run as `launch/pretrain.py`; the work itself lives below cli/."""
from __future__ import annotations

import argparse
import sys

from hsc_fast.cli.common import add_config_args, add_launcher_args, add_progress_flag, with_exit_codes
from hsc_fast.config import load_config
from hsc_fast.engine.pretrain import PRETRAIN_ARCHS, check_arch, pretrain
from hsc_fast.errors import ConfigError, HscError


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    """The SynthNet pre-training command line (examples and the exit-status table end --help)."""
    p = argparse.ArgumentParser(
        prog="launch/pretrain.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="SynthNet: pretrain a torchvision ResNet as a classifier of single-object synthetic images "
                    "(a local stand-in for ImageNet weights on the synthetic set).",
        epilog=with_exit_codes(
               "examples:\n"
               "  python launch/pretrain.py --out weights/synthnet_resnet18.pth\n"
               "  torchrun --standalone --nproc_per_node 2 launch/pretrain.py --out w.pth --set pretrain.steps=2000",
               failed="pre-training failed"))
    p.add_argument("--out", required=True, help="output .pth (torchvision state dict); a .json summary goes beside it")
    p.add_argument("--arch", default="", help=f"{' | '.join(PRETRAIN_ARCHS)} (default: the config's model.backbone "
                                              "when it is one of these, else resnet18)")
    add_config_args(p, "demo_synthnet", "YAML config or preset whose pretrain section is used (default: demo_synthnet, "
                                         "the SynthNet option of the demo)")
    add_progress_flag(p)
    add_launcher_args(p)
    return p


def main(argv=None) -> int:
    """Exit status: see common.exit_codes_epilog (0 done, 1 pre-training failed, 2 bad input)."""
    from hsc_fast import distributed as D
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        own = cfg.model.backbone if cfg.model.backbone in PRETRAIN_ARCHS else "resnet18"  # e.g. a timm: backbone
        arch = check_arch(args.arch or own)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    info = D.init_distributed(timeout_s=max(cfg.train.dist_timeout_s, 3600), local_rank_arg=args.local_rank,
                              use_deepspeed=False)
    try:
        pretrain(cfg, arch, args.out, rank=info.rank, world=info.world_size, device=info.device,
                 progress=not args.no_progress)
    except HscError as e:  # a failure during the work: 1 with the reason, not a traceback
        print(f"[rank {info.rank}] pre-training failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        D.shutdown(info)
    return 0

if __name__ == "__main__":
    sys.exit(main())
