"""What every stage's command line shares: stage argument parsing, exit statuses, dataset flags."""
from __future__ import annotations

from typing import Optional
import argparse
import os

from hsc_fast import distributed as D
from hsc_fast.engine.loop import RankLostError
from hsc_fast.errors import ConfigError


def parse_stage_args(parser, argv: Optional[list]):
    """A stage's command line (train_cam, train_deeplab); None once --list-keys printed every
    config key with type, default and help. --run-dir is required otherwise."""
    from hsc_fast.config import describe
    args = parser.parse_args(argv)
    if args.list_keys:
        for key, tp, default, help_ in describe():
            print(f"{key:32s} {tp:6s} {default!r:28s} {help_}")
        return None
    if not args.run_dir:
        parser.error("--run-dir is required")
    return args


def stage_exit_status(e: Exception, label: str, status: int) -> int:
    """Report a stage's failure on stderr and return its exit status: ConfigError -> 2, another
    error -> `status` (printed after `label`); a lost peer (RankLostError) ends the process."""
    import sys
    if isinstance(e, RankLostError):
        print(f"[rank {D.get_rank()}] {e}", file=sys.stderr, flush=True)
        # Leave at once: the process group and loader workers may be wedged on the dead peer.
        os._exit(D.EXIT_RANK_LOST)
    if isinstance(e, ConfigError):
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"{label}: {type(e).__name__}: {e}", file=sys.stderr)
    return status


def add_dataset_args(p: argparse.ArgumentParser, *, val: bool = True) -> None:
    """The data and process flags shared by the pipeline and the ablation runner."""
    p.add_argument("--voc-root", default="", help="VOC2012 folder (JPEGImages, SegmentationClass, Annotations, ImageSets)")
    p.add_argument("--sbd-root", default="", help="SBD folder (img/, cls/) for the train_aug ids without VOC masks")
    p.add_argument("--cls-labels", default="", help="cls_labels.npy (IRN or SEAM keys); default: VOC XML")
    p.add_argument("--saliency-root", default="", help="saliency maps (EPS-based methods)")
    p.add_argument("--train-list", default="", help="training ids (default: VOC_ROOT/ImageSets/Segmentation/train_aug.txt)")
    p.add_argument("--eval-list", default="", help="seed/CRF evaluation ids (default: .../train.txt)")
    if val:
        p.add_argument("--val-list", default="", help="DeepLab evaluation ids (default: .../val.txt)")
    p.add_argument("--workers", type=int, default=2, help="CPU worker processes for sharding, loading, CRF, evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
