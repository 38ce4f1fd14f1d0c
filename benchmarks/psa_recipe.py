"""Masks of PSA's AffinityNet recipe vs ours (refine.* keys) on demo-size synthetic data, CPU.

A synthetic VOC tree (hsc_fast.data.synth), CAM-like maps made from its masks (blurred, with a
false-positive blob and the peak normalised to 1, so the walk has something to fix), an AffinityNet
trained from a random ResNet-18 CAM backbone for a few hundred steps per recipe, then the random
walk; mIoU of the Masks on the training ids against the ground truth (the CAMs' own argmax with
PSA's background for comparison). Usage:

    PYTHONPATH=. python benchmarks/psa_recipe.py --out /tmp/psa_bench --steps 150 --seeds 0 1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

RECIPES = {
    "psa": dict(pairs="psa_crop", label_pooling="scores", crop_pad="black", walk_pad8=True, scale_range=[1.0, 1.0],
                color_jitter=[0.3, 0.3, 0.3, 0.1], momentum_quirk=True, weight_decay=5e-4, loss_reduction="batch"),
    "ours": dict(pairs="all", label_pooling="vote", crop_pad="normalized_zero", walk_pad8=False,
                 scale_range=[0.75, 1.25], color_jitter=[], momentum_quirk=False, momentum=0.9, weight_decay=1e-4),
}
# one key of PSA's recipe switched to ours
RECIPES["psa+all_pairs"] = {**RECIPES["psa"], "pairs": "all", "walk_pad8": False}
RECIPES["psa+vote"] = {**RECIPES["psa"], "label_pooling": "vote"}
RECIPES["psa+momentum0.9"] = {**RECIPES["psa"], "momentum_quirk": False, "momentum": 0.9, "weight_decay": 1e-4}
RECIPES["psa+rescale_nojitter"] = {**RECIPES["psa"], "scale_range": [0.75, 1.25], "color_jitter": []}


def make_cams(voc: Path, cams: Path, ids, seed: int) -> None:
    from hsc_fast.data.voc import read_label_png
    from hsc_fast.eval.seeds import cam_path, save_cam_file
    rng = np.random.default_rng(seed)
    cams.mkdir(parents=True, exist_ok=True)
    for key in ids:
        gt = read_label_png(voc / "SegmentationClass" / f"{key}.png")
        classes = [c for c in np.unique(gt) if 0 < c < 255]
        maps = []
        for c in classes:
            m = gaussian_filter((gt == c).astype(np.float32), 5.0)
            blob = np.zeros_like(m)       # a false positive the affinities should not follow
            y, x = rng.integers(0, m.shape[0]), rng.integers(0, m.shape[1])
            blob[y, x] = 1.0
            m = m + 0.6 * gaussian_filter(blob, 8.0) / max(gaussian_filter(blob, 8.0).max(), 1e-6)
            maps.append(m / max(m.max(), 1e-6))
        save_cam_file(cam_path(cams, key), np.array([c - 1 for c in classes]),
                      np.stack(maps) if maps else np.zeros((0,) + gt.shape, np.float32))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--recipes", nargs="+", default=["psa", "ours"])
    args = ap.parse_args()
    from hsc_fast import distributed as D
    from hsc_fast.config import load_config
    from hsc_fast.data.synth import generate
    from hsc_fast.data.voc import read_id_list
    from hsc_fast.engine import refine as R
    from hsc_fast.eval.evaluate import evaluate
    from hsc_fast.models import build_cam_model
    out = Path(args.out)
    if not (out / "VOC2012").is_dir():
        generate(out, n_train=args.n_train, n_val=2, seed=5, size=args.size)
    voc = out / "VOC2012"
    ids = read_id_list(voc / "ImageSets" / "Segmentation" / "train.txt")
    make_cams(voc, out / "cam_npy", ids, 0)
    base = load_config("demo", [f"data.train={out}", f"data.sbd_root={out / 'SBD'}", "data.workers=0",
                                "model.weights=", "model.allow_random_init=true", "train.tensorboard=false",
                                "train.deterministic=true", "refine.method=psa", "refine.batch_size=4",
                                "refine.crop_size=112", f"refine.max_steps={args.steps}",
                                f"refine.save_every={args.steps}", "refine.feat_dim=32", "refine.lr=0.05",
                                "refine.logt=6", "refine.alpha_low=1.14", "refine.alpha_high=9.1",
                                "refine.bg_alpha=4.57", "seeds.crf.alpha=2"])
    cam_run = out / "cam"
    (cam_run / "final").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(build_cam_model(base.model, load_weights=False).state_dict(), cam_run / "final" / "model.pt")
    info = D.init_distributed(120)
    rows = []
    for seed in args.seeds:
        for name in args.recipes:
            cfg = dataclasses.replace(base, refine=dataclasses.replace(base.refine, **RECIPES[name]),
                                      train=dataclasses.replace(base.train, seed=seed))
            run = out / f"{name}_s{seed}"
            t0 = time.time()
            R.make_affinity_labels(cfg, str(out), out / "cam_npy", run / R.AFF_LABELS, ids)
            R.train_affinity(cfg, run / R.AFFINITY, images=str(out), labels_dir=run / R.AFF_LABELS, train_ids=ids,
                             cam_run=cam_run, progress=False)
            model = R.load_affinity_net(cfg, run / R.AFFINITY, torch.device("cpu"))
            R.random_walk_masks(cfg, model, str(out), out / "cam_npy", run / R.MASKS, ids, device="cpu")
            miou = evaluate(voc / "SegmentationClass", pred_dir=run / R.MASKS, ids=ids)["miou"]
            rows.append({"recipe": name, "seed": seed, "masks_miou": miou, "seconds": round(time.time() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    D.shutdown(info)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
