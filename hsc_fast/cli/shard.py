"""VOC 2012 + SBD, or MS COCO / any COCO-format dataset, -> WebDataset shards (hsc-shard).

Run as `python -m hsc_fast.shard` or `hsc-shard`; the work itself lives below cli/."""
from __future__ import annotations

from typing import Optional
from typing import Sequence
import argparse
import sys

from hsc_fast.cli.common import with_exit_codes
from hsc_fast.data.shard import shard_dataset, verify_shards
from hsc_fast.errors import HscError


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    """The hsc-shard command line (the exit-status table ends --help)."""
    p = argparse.ArgumentParser(prog="hsc-shard", description=__doc__.split("\n\n")[0],
                                epilog=with_exit_codes(failed="--verify found a problem"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verify", metavar="DIR", help="verify the shards in DIR instead of writing")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--voc-root", help="VOC folder (holding JPEGImages/, SegmentationClass/, Annotations/)")
    source.add_argument("--coco-root", help="MS COCO or COCO-format folder (holding annotations/instances_<split>.json "
                                            "and <split>/*.jpg); mask: a pixel of one class gets it, of two classes or of "
                                            "crowd only 255; classes: the file's categories (COCO's 80, or any others: "
                                            "names sorted by category id are classes 1..K)")
    p.add_argument("--coco-split", help="with --coco-root: the split, e.g. train2014 or val2014 (also names the shards)")
    p.add_argument("--classes", metavar="SPEC", help="with --coco-root: the class set instead of the file's categories "
                                                     "(voc | coco | synthetic:K | a classes.json); each category maps to "
                                                     "its name's index in it; annotations of a category it lacks are an "
                                                     "error")
    p.add_argument("--sbd-root", help="SBD folder (holding img/, cls/)")
    p.add_argument("--list", help="id list: one id per line, or the SEAM '/JPEGImages/ID.jpg ...' format")
    p.add_argument("--cls-labels", help="image-level labels (cls_labels.npy with IRN int or SEAM str keys, or .json)")
    p.add_argument("--saliency-root", help="saliency maps folder (ID.png), stored as sal.png (VOC and COCO; "
                                           "the EPS methods need them, COCO ships none)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--workers", type=int, default=1, help="processes building shards in parallel")
    p.add_argument("--skip-bad", action="store_true", help="leave bad samples out (listed in index.json) instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


_parser = build_parser  # the old private name


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status: see common.exit_codes_epilog (0 done, 1 --verify found a problem, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.verify:
            report = verify_shards(args.verify)
            for p in report["problems"]:
                print(f"{p['shard']}: {p['key']}: {p['problem']}", file=sys.stderr)
            print(f"{report['directory']}: {report['shards']} shards, {report['samples']} samples, "
                  f"{len(report['problems'])} problem(s)")
            return 0 if report["ok"] else 1
        if args.coco_root or args.coco_split:
            index = _shard_coco(args)
        else:
            index = _shard_voc(args)
        print(f"{args.out}: {len(index['shards'])} shards, {index['count']} samples, {len(index['skipped'])} skipped")
        return 0
    except HscError as e:
        # The writer checks every sample before it publishes anything: a bad one is bad input.
        print(f"error: {e}", file=sys.stderr)
        return 2


def _flag(dest: str) -> str:
    return f"--{dest.replace('_', '-')}"


def _shard_voc(args) -> dict:
    missing = [_flag(n) for n in ("voc_root", "list", "out") if not getattr(args, n)]
    if missing:
        build_parser().error(f"missing {', '.join(missing)} (or use --coco-root, or --verify DIR)")
    if args.classes:
        build_parser().error("--classes: a COCO-format option; a VOC-layout tree takes its classes.json "
                             "(VOC root/classes.json), else VOC")
    return shard_dataset(args.voc_root, args.list, args.out, sbd_root=args.sbd_root, cls_labels=args.cls_labels,
                         saliency_root=args.saliency_root, shard_size=args.shard_size, workers=args.workers,
                         skip_bad=args.skip_bad, progress=not args.quiet)


def _shard_coco(args) -> dict:
    missing = [_flag(n) for n in ("coco_root", "coco_split", "out") if not getattr(args, n)]
    if missing:
        build_parser().error(f"missing {', '.join(missing)} for COCO sharding")
    voc_only = [_flag(n) for n in ("sbd_root", "list", "cls_labels") if getattr(args, n)]
    if voc_only:
        build_parser().error(f"{', '.join(voc_only)}: VOC options, not valid with --coco-root")
    from hsc_fast.classes import resolve
    from hsc_fast.data.coco import shard_coco  # pycocotools only when COCO is sharded
    classes = resolve(args.classes, where="--classes") if args.classes else None
    return shard_coco(args.coco_root, args.coco_split, args.out, shard_size=args.shard_size, workers=args.workers,
                      skip_bad=args.skip_bad, progress=not args.quiet, saliency_root=args.saliency_root,
                      classes=classes)


if __name__ == "__main__":
    sys.exit(main())
