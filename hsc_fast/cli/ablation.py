"""HSC ablation on the synthetic set (paper Table 4 rows + the EPS pair).

Run as `launch/ablation.py`; the work itself lives below cli/."""
from __future__ import annotations

from pathlib import Path
import argparse
import sys

from hsc_fast.cli.common import add_config_args, add_dataset_args, exit_if_rank_lost, with_exit_codes
from hsc_fast.config import load_config
from hsc_fast.engine.ablation import run_ablation, select_variants, variants
from hsc_fast.errors import ConfigError, HscError


# ---------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The ablation command line (variants, examples and the exit-status table end --help)."""
    p = argparse.ArgumentParser(
        prog="launch/ablation.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="HSC ablation (paper Table 4 rows + the EPS pair) at one budget over paired seeds: seed mIoU "
                    "per variant, paired differences with their CI (RUN_DIR/ablation.json, ablation.md).",
        epilog=with_exit_codes(
               "variants: " + ", ".join(f"{v.name} ({v.title})" for v in variants()) + "\n"
               "examples:\n"
               "  python launch/ablation.py --run-dir runs/ablation\n"
               "  python launch/ablation.py --run-dir runs/abl600 --set train.max_steps=600 --set optim.poly_steps=600\n"
               "  python launch/ablation.py --run-dir runs/ablation --variants seam,hsc_seam\n"
               "  python launch/ablation.py --run-dir runs/abl3 --variants seam,hsc_seam --seeds 3 --synth-train 600\n"
               "  python launch/ablation.py --run-dir runs/abl5 --variants seam,seam_psc,seam_psc_csc,hsc_seam --seeds 5",
               failed="a variant failed", rank_lost=True))
    p.add_argument("--run-dir", required=True, help="shared data + one folder per variant + ablation.json/.md")
    add_config_args(p, "ablation/demo", "shared YAML config or preset (default: configs/ablation/demo.yaml)",
                    set_note="applied to every variant")
    p.add_argument("--variants", default="all", help="comma-separated subset (default: all)")
    p.add_argument("--force", action="store_true", help="delete and rerun the selected variants")
    p.add_argument("--seeds", type=int, default=1,
                   help="paired seeds: train each variant at train.seed, +1, ..., +N-1, seed-major (every variant at "
                        "one seed before the next seed); the table shows mean ± std and the paired differences "
                        "with their 95%% CI (default 1; >= 5 to resolve ~1 mIoU)")
    p.add_argument("--synth-train", type=int, default=None, metavar="N",
                   help="training images of the synthetic set (default: the pipeline's 300; a new --run-dir per size)")
    add_dataset_args(p, val=False)  # --voc-root etc.: a real VOC2012 instead of the synthetic set
    return p


def main(argv=None) -> int:
    """Exit status: see common.exit_codes_epilog (0 done, 1 a variant failed, 2 bad input, 75 lost rank)."""
    from hsc_fast.engine.pipeline import dataset_from_args, start_context
    from hsc_fast.engine.pretrain import fill_weights
    args = build_parser().parse_args(argv)
    args.demo, args.val_list = not args.voc_root, ""
    run_dir = Path(args.run_dir).resolve()
    try:
        base_cfg = load_config(args.config, args.set)
        fill_weights(base_cfg, run_dir)  # every variant starts from the one shared SynthNet file
        variants = select_variants(args.variants)
        data = dataset_from_args(args, run_dir)
        if args.seeds < 1:
            raise ConfigError(f"--seeds {args.seeds}: expected at least 1")
        if args.synth_train is not None and (args.synth_train < 2 or args.voc_root):
            raise ConfigError(f"--synth-train {args.synth_train}: expected >= 2, and only for the synthetic set")
    except HscError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from hsc_fast import distributed as D
    root, info = start_context(base_cfg, run_dir, data, args)
    if args.synth_train is not None:
        root.synth = dict(root.synth, n_train=args.synth_train)
    command = " ".join(["python launch/ablation.py"] + list(argv if argv is not None else sys.argv[1:]))
    try:
        run_ablation(root, base_cfg, variants, force=args.force, command=command, seeds=args.seeds,
                     log=print if root.rank == 0 else (lambda *_: None))
    except HscError as e:
        exit_if_rank_lost(e)  # 75, like train_cam: the supervisor can tell a lost peer from a failure
        print(f"[rank {root.rank}] ablation failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        D.shutdown(info)
    if root.rank == 0:
        print((run_dir / "ablation.md").read_text())
    return 0
