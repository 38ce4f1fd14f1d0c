"""The embedded synthetic VOC-style dataset (hsc-synth).

Run as `python -m hsc_fast.synth` or `hsc-synth`; the work itself lives below cli/."""
from __future__ import annotations

from typing import Optional
from typing import Sequence
import argparse
import sys

from hsc_fast.cli.common import with_exit_codes
from hsc_fast.data.synth import generate
from hsc_fast.errors import ConfigError, DataError


def build_parser() -> argparse.ArgumentParser:
    """The hsc-synth command line (the exit-status table ends --help)."""
    ap = argparse.ArgumentParser(prog="hsc-synth", description=__doc__.split("\n\n")[0],
                                 epilog=with_exit_codes(failed="writing the dataset failed"),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created; files are overwritten)")
    ap.add_argument("--n-train", type=int, required=True, help="train_aug images")
    ap.add_argument("--n-val", type=int, required=True, help="val images")
    ap.add_argument("--seed", type=int, default=0, help="generation seed")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--sbd-fraction", type=float, default=0.3, help="share of train ids stored only in SBD/")
    ap.add_argument("--classes", type=int, default=20, metavar="K",
                    help="foreground classes (20: VOC's names and formats; another K, e.g. 80 like COCO, "
                         "writes VOC2012/classes.json, which sharding and training then read)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status: see common.exit_codes_epilog (0 written, 2 bad sizes or counts)."""
    args = build_parser().parse_args(argv)
    try:
        s = generate(args.out, args.n_train, args.n_val, args.seed, args.size, args.sbd_fraction, args.classes)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s['images']} images to {args.out}: train_aug {s['train_aug']} "
          f"(VOC masks {s['train_voc']}, SBD only {s['sbd']}), val {s['val']}; "
          f"{s['seconds']:.1f} s, {s['images_per_s']:.0f} images/s")
    print("images per class: " + ", ".join(f"{k} {v}" for k, v in s["class_counts"].items()))
    print("scenes: " + ", ".join(f"{k} {v}" for k, v in s["scene_counts"].items()))
    return 0

if __name__ == "__main__":
    sys.exit(main())
