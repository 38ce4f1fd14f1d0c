"""VOC 2012 + SBD -> WebDataset shards (hsc-shard).

Run as `python -m hsc_fast.cli.shard`; the work itself lives below cli/."""
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
    p.add_argument("--voc-root", help="VOC folder (holding JPEGImages/, SegmentationClass/, Annotations/)")
    p.add_argument("--sbd-root", help="SBD folder (holding img/, cls/)")
    p.add_argument("--list", help="id list: one id per line, or the SEAM '/JPEGImages/ID.jpg ...' format")
    p.add_argument("--cls-labels", help="image-level labels (cls_labels.npy with IRN int or SEAM str keys, or .json)")
    p.add_argument("--saliency-root", help="saliency maps folder (ID.png), stored as sal.png")
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
        missing = [f"--{n.replace('_', '-')}" for n in ("voc_root", "list", "out") if not getattr(args, n)]
        if missing:
            build_parser().error(f"missing {', '.join(missing)} (or use --verify DIR)")
        index = shard_dataset(args.voc_root, args.list, args.out, sbd_root=args.sbd_root, cls_labels=args.cls_labels,
                              saliency_root=args.saliency_root, shard_size=args.shard_size, workers=args.workers,
                              skip_bad=args.skip_bad, progress=not args.quiet)
        print(f"{args.out}: {len(index['shards'])} shards, {index['count']} samples, {len(index['skipped'])} skipped")
        return 0
    except HscError as e:
        # The writer checks every sample before it publishes anything: a bad one is bad input.
        print(f"error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
