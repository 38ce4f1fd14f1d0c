"""(Re)build report.md / report.html of a pipeline run directory.

Run as `python -m hsc_fast.cli.report`; the work itself lives below cli/."""
from __future__ import annotations

import argparse

from hsc_fast.eval.report import write_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="(Re)build report.md and report.html of a pipeline run directory.")
    p.add_argument("run_dir", help="run directory written by launch/pipeline.py")
    args = p.parse_args(argv)
    md, page = write_report(args.run_dir)
    print(f"wrote {md} and {page}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
