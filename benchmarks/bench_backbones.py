"""Side-by-side CPU cost of the CAM network's training step per backbone (the demo geometry).

    OMP_NUM_THREADS=1 python benchmarks/bench_backbones.py [--rounds 12] [--backbones timm:efficientnet_lite0,...]

One process builds every backbone's CamNet as configs/demo.yaml does (frozen stem and BN, the
demo's projector widths) and times forward + backward of both views (batch 4 at 128 px and 64 px)
with a loss touching every output, the backbones taking turns round after round (ABAB...), so
load from other processes falls on all of them alike. The losses and CRF cost the same for every
backbone (same map sizes and widths) and are left out. Prints the median and the inter-quartile
range of seconds per step, and the ratio of medians to the first backbone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hsc_fast.config import load_config  # noqa: E402
from hsc_fast.models import build_cam_model  # noqa: E402

DEFAULT = "timm:efficientnet_lite0,timm:efficientnet_lite2,resnet18"


def build(backbone: str):
    overrides = [f"model.backbone={backbone}"]
    overrides += ([f"model.weights=imagenet:{backbone[5:]}"] if backbone.startswith("timm:efficientnet_lite")
                  else ["model.weights=", "model.allow_random_init=true"])
    cfg = load_config("demo", overrides)
    return build_cam_model(cfg.model).train(), cfg


def one_step(model, views) -> float:
    t0 = time.perf_counter()
    loss = 0.0
    for x in views:
        out = model(x)
        loss = loss + sum(v.float().square().mean() for v in out.values())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--backbones", default=DEFAULT)
    args = p.parse_args()
    torch.manual_seed(0)
    names = args.backbones.split(",")
    models = {n: build(n)[0] for n in names}
    cfg = build(names[0])[1]
    b, c, v2 = cfg.data.batch_size, cfg.data.crop_size, cfg.data.view2_size
    views = (torch.randn(b, 3, c, c), torch.randn(b, 3, v2, v2))
    times = {n: [] for n in names}
    for r in range(args.rounds + 2):
        for n in names:
            t = one_step(models[n], views)
            if r >= 2:  # two warm-up rounds
                times[n].append(t)
    base = statistics.median(times[names[0]])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.rounds} rounds, "
          f"batch {b} x ({c} px + {v2} px)")
    for n in names:
        q = statistics.quantiles(times[n], n=4)
        med = statistics.median(times[n])
        params = sum(p.numel() for p in models[n].parameters())
        print(f"{n:28s} median {med:.3f} s/step  IQR [{q[0]:.3f}, {q[2]:.3f}]  x{med / base:.2f}  "
              f"{params / 1e6:.2f} M params")


if __name__ == "__main__":
    main()
