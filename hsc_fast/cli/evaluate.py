"""mIoU of predicted label PNGs against ground truth (VOC, COCO or any class set) (hsc-evaluate).

Run as `python -m hsc_fast.evaluate` or `hsc-evaluate`; the work itself lives below cli/."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional
from typing import Sequence
import argparse
import os
import sys

from hsc_fast.classes import CLASSES_FILE, VOC, ClassSet
from hsc_fast.cli.common import add_progress_flag, with_exit_codes
from hsc_fast.data.voc import read_id_list
from hsc_fast.eval.evaluate import AVERAGES, _dist_rank_world, evaluate, format_table, write_outputs

AVERAGE_HELP = (
    "mIoU rule. present (default): the mean IoU over the classes that occur in the ground truth or the "
    "prediction. all: the authors' rule (SEAM / PSA / HSC evaluation.py): the mean over all K+1 classes "
    "(21 for VOC, 81 for COCO), a class in neither counting 0. Equal when every class occurs (all of VOC "
    "train or val); on a short list 'all' is lower (a VOC image with 3 classes: 3/21 of 'present').")
CLASSES_SPECS = "voc | coco | synthetic:K | a classes.json file"
CLASSES_HELP = (
    f"class set: {CLASSES_SPECS}. It bounds the label values (0..K and 255; others are an error naming "
    "the file and value), the CAM keys (0..K-1) and the per-class table. Default: the classes.json of "
    "the run the inputs belong to (RUN_DIR/classes.json for --pred/--cam RUN_DIR/<stage>/<folder>, as "
    "the pipeline lays them out), else the one at the root of the --gt tree (<gt>/../classes.json), "
    "else voc")


# ------------------------------------------------------------- --classes (shared with make_seeds)

def _recorded_classes(path: Path) -> Optional[ClassSet]:
    """The class set a file records: a classes.json, or the 'classes' key of a shard index.json
    (None for an index without it or a missing file)."""
    from hsc_fast.classes import from_index, load
    if not path.is_file():
        return None
    if path.name == CLASSES_FILE:
        return load(path)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None   # the data reader reports a broken index with its own message
    return from_index(index, str(path)) if isinstance(index, dict) and "classes" in index else None


def resolve_classes_arg(spec: Optional[str], candidates: Sequence[Path],
                        flag: str = "--classes") -> tuple[ClassSet, Optional[Path]]:
    """``--classes`` -> (class set, the file it came from or None).

    ``spec`` given: hsc_fast.classes.resolve (DataError naming ``flag`` if it is none of
    voc | coco | synthetic:K | a classes.json). Else the set recorded by the first existing file of
    ``candidates`` (classes.json files or shard index.json files with a 'classes' key); when several
    record different sets, ConfigError (pass --classes); when none does, VOC."""
    from hsc_fast.classes import resolve
    from hsc_fast.errors import ConfigError
    if spec is not None:
        return resolve(spec, where=flag), None
    found = []
    for path in candidates:
        cs = _recorded_classes(Path(path))
        if cs is not None:
            found.append((Path(path), cs))
    if not found:
        return VOC, None
    first_path, first = found[0]
    for path, cs in found[1:]:
        if cs.names != first.names:
            raise ConfigError(f"{flag}: {first_path} records class set {first.name!r} ({first.num_fg} classes) but "
                              f"{path} records {cs.name!r} ({cs.num_fg} classes); pass {flag} {CLASSES_SPECS}")
    return first, first_path


def classes_note(classes: ClassSet, source: Optional[Path]) -> str:
    return f"classes: {classes.name} ({classes.num_fg} classes + background) from {source}"


def _evaluate_candidates(args) -> list[Path]:
    """Where --classes looks by default: RUN_DIR of --pred/--cam RUN_DIR/<stage>/<folder>, then the
    root of the --gt tree."""
    pred = Path(args.pred or args.cam).resolve()
    return [pred.parent.parent / CLASSES_FILE, Path(args.gt).resolve().parent / CLASSES_FILE]


def build_parser() -> argparse.ArgumentParser:
    """The hsc-evaluate command line (the exit-status table ends --help)."""
    p = argparse.ArgumentParser(prog="hsc-evaluate", description=__doc__.split("\n\n")[0],
                                epilog=with_exit_codes(failed="the evaluation failed"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt", required=True, help="ground-truth label PNGs (palette or index)")
    p.add_argument("--classes", metavar="SPEC", help=CLASSES_HELP)
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
    classes, source = resolve_classes_arg(args.classes, _evaluate_candidates(args))
    is_main = _dist_rank_world()[0] == 0
    if source is not None and is_main:
        print(classes_note(classes, source), file=sys.stderr)
    ids = read_id_list(args.list) if args.list else None
    result = evaluate(args.gt, pred_dir=args.pred, cam_dir=args.cam, ids=ids, thresholds=args.thresholds,
                      allow_missing=args.allow_missing, workers=args.workers, progress=not args.no_progress,
                      average=args.average, classes=classes)
    if is_main:
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
