"""What every command line of hsc_fast.cli shares: the flags, the exit statuses, argument parsing.

Exit statuses (one policy for every command; each parser's --help ends with its part of it):
  0   done
  1   a failure during the work (or an unexpected error: Python's own status for a traceback)
  2   bad input, config or arguments, found before any work was done or any output written
      (argparse's usage errors use 2 as well)
  75  a peer rank was lost (distributed training commands; `--resume auto` continues the run)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional
import argparse
import os

from hsc_fast import distributed as D
from hsc_fast.engine.loop import RankLostError
from hsc_fast.errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_RANK_LOST = D.EXIT_RANK_LOST

# The one help text of each shared flag: a user reads the same words in every command's --help.
SET_HELP = "override a config key, repeatable, e.g. --set loss.tau=0.2 --set data.batch_size=8"
LIST_KEYS_HELP = "print every config key with type, default and help, then exit"
PROGRESS_HELP = "no progress bars (logs and metrics files are still written)"
LOCAL_RANK_HELP = "set by the deepspeed launcher (also read from $LOCAL_RANK)"
DS_CONFIG_HELP = ("DeepSpeed engine JSON: ZeRO stage, bf16, gradient accumulation, clipping "
                  "(sets train.ds_config; batch sizes come from the config)")


# ------------------------------------------------------------------------------------ exit codes
def exit_codes_epilog(failed: str = "a failure during the work", rank_lost: bool = False) -> str:
    """The exit-status table of one command (the module docstring's policy). `failed` says what
    status 1 means for it; `rank_lost`: it trains across ranks, so a lost peer can end it with 75."""
    lines = ["exit status:",
             f"  {EXIT_OK}   done",
             f"  {EXIT_FAILED}   {failed} (or an unexpected error)",
             f"  {EXIT_BAD_INPUT}   bad input, config or arguments, found before any work (also usage errors)"]
    if rank_lost:
        lines.append(f"  {EXIT_RANK_LOST}  a peer rank was lost (--resume auto continues the run)")
    return "\n".join(lines)


def with_exit_codes(epilog: Optional[str] = None, **kwargs) -> str:
    """`epilog` (if any) followed by the exit-status table; kwargs go to exit_codes_epilog."""
    table = exit_codes_epilog(**kwargs)
    return f"{epilog.rstrip()}\n{table}" if epilog else table


def exit_if_rank_lost(e: Exception) -> None:
    """A lost peer (RankLostError) ends the process with EXIT_RANK_LOST; anything else returns."""
    import sys
    if isinstance(e, RankLostError):
        print(f"[rank {D.get_rank()}] {e}", file=sys.stderr, flush=True)
        # Leave at once: the process group and loader workers may be wedged on the dead peer.
        os._exit(EXIT_RANK_LOST)


# ------------------------------------------------------------------------------------ shared flags
def add_config_args(p: argparse.ArgumentParser, default: Optional[str], help_: str, *,
                    set_note: str = "", list_keys: bool = False) -> None:
    """--config (default and help are the command's own), --set KEY=VALUE (repeatable) and, for
    the commands parsed by parse_stage_args, --list-keys."""
    p.add_argument("--config", default=default, help=help_)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"{SET_HELP}{'; ' + set_note if set_note else ''}")
    if list_keys:
        p.add_argument("--list-keys", action="store_true", help=LIST_KEYS_HELP)


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    """--no-progress (dest no_progress)."""
    p.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)


def add_launcher_args(p: argparse.ArgumentParser, *, deepspeed: bool = False, local_rank_default=-1) -> None:
    """--local_rank / --local-rank (the deepspeed launcher passes it) and, with `deepspeed`,
    --deepspeed_config and the ignored --deepspeed flag of DeepSpeed's own command line."""
    if deepspeed:
        p.add_argument("--deepspeed_config", default=None, help=DS_CONFIG_HELP)
        p.add_argument("--deepspeed", action="store_true", help="accepted and ignored (DeepSpeed's own flag)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=local_rank_default, help=LOCAL_RANK_HELP)


# ---------------------------------------------------------------------------------- pre-flight
def check_voc_folder(source: str) -> None:
    """A local folder given as data must be a VOC root (find_voc_root's rule: JPEGImages/ in it or
    in VOC2012/ below it); DataError naming the folder otherwise. Shard sources are not touched."""
    from hsc_fast.data import find_voc_root, is_shard_source
    if source and not is_shard_source(source) and Path(source).is_dir():
        find_voc_root(source)


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
    exit_if_rank_lost(e)
    if isinstance(e, ConfigError):
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
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
    add_progress_flag(p)
    add_launcher_args(p)
