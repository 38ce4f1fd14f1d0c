"""The whole pipeline under one launcher (deepspeed / torchrun / python).

Run as `launch/pipeline.py`; the work itself lives below cli/."""
from __future__ import annotations

from pathlib import Path
import argparse
import json
import sys
import time

from hsc_fast.cli.common import add_config_args, add_dataset_args, exit_if_rank_lost, with_exit_codes
from hsc_fast.classes import CLASSES_FILE
from hsc_fast.config import apply_class_set, load_config
from hsc_fast.engine.pipeline import STAGES, dataset_from_args, run_stage, start_context
from hsc_fast.errors import ConfigError, HscError


# ---------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/pipeline.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the whole HSC pipeline (shard, CAM training, seeds, CRF, DeepLab, evaluation, report).",
        epilog=with_exit_codes(
               "examples:\n"
               "  python launch/pipeline.py --demo --run-dir runs/demo\n"
               "  deepspeed --num_gpus 8 launch/pipeline.py --config hsc_eps_official --run-dir runs/hsc \\\n"
               "      --voc-root data/VOC2012 --sbd-root data/SBD --cls-labels data/cls_labels.npy \\\n"
               "      --saliency-root data/SALImages --set model.weights=weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params",
               failed="a stage failed", rank_lost=True))
    p.add_argument("--run-dir", required=True, help="one folder for every stage's outputs")
    p.add_argument("--demo", action="store_true",
                   help="generate the synthetic VOC/SBD set into RUN_DIR/synth and use configs/demo.yaml")
    p.add_argument("--synth-train", type=int, default=300, help="--demo: synthetic training images (30%% SBD-only)")
    p.add_argument("--synth-val", type=int, default=60, help="--demo: synthetic validation images")
    p.add_argument("--synth-size", type=int, default=128, help="--demo: synthetic image size in pixels")
    p.add_argument("--synth-classes", type=int, default=20, metavar="K",
                   help="--demo: foreground classes of the synthetic set (20: VOC's; e.g. 80 for a COCO-sized "
                        "label space); the CAM head, banks, CRF, evaluation and DeepLab follow")
    add_config_args(p, None, "YAML config or preset (default: demo with --demo, else hsc_eps_official)")
    add_dataset_args(p)
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of: {', '.join(STAGES)} (in this order)")
    p.add_argument("--force", action="store_true", help="rerun the selected stages even if complete")
    return p


def selected_stages(text: str, demo: bool, pretrain: bool = False) -> list[str]:
    """The wanted stages in pipeline order; 'synth' only for the demo, 'pretrain' only when enabled."""
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    return [s for s in STAGES if s in wanted and (demo or s != "synth") and (pretrain or s != "pretrain")]


def main(argv=None) -> int:
    """Exit status: see common.exit_codes_epilog (0 done, 1 a stage failed, 2 bad input, 75 lost rank)."""
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    try:
        cfg = load_config(args.config or ("demo" if args.demo else "hsc_eps_official"), args.set)
        from hsc_fast.engine.pretrain import fill_weights
        fill_weights(cfg, run_dir)
        data = dataset_from_args(args, run_dir)
        # data.classes / model.num_classes, recorded in config.yaml; a custom set: by the
        # RUN_DIR/classes.json that start_context writes before any stage reads it
        apply_class_set(cfg, data.classes, run_dir / CLASSES_FILE)
        stages = selected_stages(args.stages, args.demo, cfg.pretrain.enabled)
    except HscError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from hsc_fast import distributed as D
    ctx, info = start_context(cfg, run_dir, data, args,
                              synth={"n_train": args.synth_train, "n_val": args.synth_val, "size": args.synth_size,
                                     "seed": 0, "num_fg": args.synth_classes})
    stage_seconds: dict = {}
    t0 = time.perf_counter()
    try:
        for stage in stages:
            run_stage(ctx, stage, args.force, stage_seconds)
    except HscError as e:
        exit_if_rank_lost(e)  # 75, like train_cam: the supervisor can tell a lost peer from a failure
        print(f"[rank {ctx.rank}] pipeline failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        D.shutdown(info)
    if ctx.rank == 0:
        summary = json.loads(ctx.path("summary.json").read_text()) if ctx.path("summary.json").is_file() else {}
        print(f"[pipeline] finished in {time.perf_counter() - t0:.0f} s; report: {ctx.path('report.md')}")
        for key in [k for k in summary if k.startswith("pretrain_")] + [
                "seed_miou", "seed_best_threshold", "crf_miou", "crf_alpha", "mask_miou", "deeplab_miou",
                "deeplab_crf_miou"]:
            if key in summary:
                print(f"  {key:22s} {summary[key]:.2f}")
    return 0
