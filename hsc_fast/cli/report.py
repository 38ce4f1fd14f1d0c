"""(Re)build report.md / report.html of a pipeline run directory.

Run as `python -m hsc_fast.report` or `hsc-report`; the work itself lives below cli/."""
from __future__ import annotations

from pathlib import Path
import argparse
import sys

from hsc_fast.cli.common import with_exit_codes
from hsc_fast.eval.report import write_report


def build_parser() -> argparse.ArgumentParser:
    """The report command line (the exit-status table ends --help)."""
    p = argparse.ArgumentParser(prog="hsc-report", description="(Re)build report.md and report.html of a pipeline run directory.",
                                epilog=with_exit_codes(failed="the report could not be written"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run directory written by launch/pipeline.py")
    return p


def main(argv=None) -> int:
    """Exit status: see common.exit_codes_epilog (0 written, 1 a failure, 2 no such run directory)."""
    args = build_parser().parse_args(argv)
    if not Path(args.run_dir).is_dir():  # checked first: write_report would fail on its temp file
        print(f"error: {args.run_dir}: not a folder (expected a run directory of launch/pipeline.py)",
              file=sys.stderr)
        return 2
    md, page = write_report(args.run_dir)
    print(f"wrote {md} and {page}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
