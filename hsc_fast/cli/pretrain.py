"""SynthNet pre-training: the local stand-in for ImageNet weights.

Run as `launch/pretrain.py`; the work itself lives below cli/."""
from __future__ import annotations

import argparse
import sys

from hsc_fast.config import load_config
from hsc_fast.engine.pretrain import PRETRAIN_ARCHS, check_arch, pretrain
from hsc_fast.errors import ConfigError


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/pretrain.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="SynthNet: pretrain a torchvision ResNet as a classifier of single-object synthetic images "
                    "(a local stand-in for ImageNet weights on the synthetic set).",
        epilog="examples:\n"
               "  python launch/pretrain.py --out weights/synthnet_resnet18.pth\n"
               "  torchrun --standalone --nproc_per_node 2 launch/pretrain.py --out w.pth --set pretrain.steps=2000")
    p.add_argument("--out", required=True, help="output .pth (torchvision state dict); a .json summary goes beside it")
    p.add_argument("--arch", default="", help=f"{' | '.join(PRETRAIN_ARCHS)} (default: the config's model.backbone)")
    p.add_argument("--config", default="demo", help="YAML config or preset whose pretrain section is used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p


def main(argv=None) -> int:
    from hsc_fast import distributed as D
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        arch = check_arch(args.arch or cfg.model.backbone)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    info = D.init_distributed(timeout_s=max(cfg.train.dist_timeout_s, 3600), local_rank_arg=args.local_rank,
                              use_deepspeed=False)
    try:
        pretrain(cfg, arch, args.out, rank=info.rank, world=info.world_size, device=info.device,
                 progress=not args.no_progress)
    finally:
        D.shutdown(info)
    return 0

if __name__ == "__main__":
    sys.exit(main())
