"""mIoU of predicted label PNGs against VOC ground truth (hsc-evaluate).

Run as `python -m hsc_fast.cli.evaluate`; the work itself lives below cli/."""
from __future__ import annotations

from typing import Optional
from typing import Sequence
import argparse
import os
import sys

from hsc_fast.cli.common import add_progress_flag, with_exit_codes
from hsc_fast.data.voc import read_id_list
from hsc_fast.eval.evaluate import AVERAGES, _dist_rank_world, evaluate, format_table, write_outputs

AVERAGE_HELP = (
    "mIoU rule. present (default): the mean IoU over the classes that occur in the ground truth or the "
    "prediction. all: the authors' rule (SEAM / PSA / HSC evaluation.py): the mean over all 21 classes, "
    "a class in neither counting 0. Equal when every class occurs (all of VOC train or val); on a short "
    "list 'all' is lower (an image with 3 classes: 3/21 of 'present').")


def build_parser() -> argparse.ArgumentParser:
    """The hsc-evaluate command line (the exit-status table ends --help)."""
    p = argparse.ArgumentParser(prog="python -m hsc_fast.cli.evaluate", description=__doc__.split("\n\n")[0],
                                epilog=with_exit_codes(failed="the evaluation failed"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt", required=True, help="ground-truth label PNGs (palette or index)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pred", help="predicted label PNGs ({id}.png)")
    src.add_argument("--cam", help="CAM files ({id}.npy or {id}.npz): background-threshold sweep")
    p.add_argument("--thresholds", default="0.00:0.60:0.01", help="sweep A:B:STEP, B excluded (default %(default)s)")
    p.add_argument("--list", help="id list (default: <gt>/../ImageSets/Segmentation/train.txt, else all GT PNGs)")
    p.add_argument("--json", help="write the result here (and the sweep curve as the same name .png)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes (default %(default)s)")
    p.add_argument("--allow-missing", action="store_true",
                   help="missing prediction = all background; missing ground truth = id skipped (both counts "
                        "are printed beside the mIoU and kept in the JSON); exit 2 when no id has both "
                        "a ground truth and a prediction")
    p.add_argument("--average", default="present", choices=AVERAGES, help=AVERAGE_HELP)
    add_progress_flag(p)
    return p


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse, evaluate, print the table (rank 0) and return the result dict."""
    args = build_parser().parse_args(argv)
    ids = read_id_list(args.list) if args.list else None
    result = evaluate(args.gt, pred_dir=args.pred, cam_dir=args.cam, ids=ids, thresholds=args.thresholds,
                      allow_missing=args.allow_missing, workers=args.workers, progress=not args.no_progress,
                      average=args.average)
    if _dist_rank_world()[0] == 0:
        print(format_table(result))
        if args.json:
            write_outputs(result, args.json)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: exit 0 when evaluated, 2 on bad input (named in the message), 1 when the
    evaluation found nothing to evaluate after reading the files (they changed since the pre-check)."""
    from hsc_fast.errors import HscError
    from hsc_fast.eval.evaluate import NothingEvaluatedError
    try:
        run(argv)
    except NothingEvaluatedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if e.before_work else 1
    except HscError as e:
        # Every HscError here is bad input (a missing or malformed file), met before any output is written.
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
