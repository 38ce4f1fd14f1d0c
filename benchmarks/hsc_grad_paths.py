"""Which parameters each loss term of a method reaches, and how far one SGD step moves them.

For a few training batches of a config (default: the ablation's demo budget, full HSC on SEAM),
every loss term's gradient is taken separately with respect to each part of the CAM network
(backbone, CAM head, PCM, PSC / RSC projectors); the table gives the gradient norm and the norm of
the plain SGD step it causes with the config's learning-rate groups (lr x group multiplier x
optim.backbone_lr_mult, no momentum). It answers "through which path can this term change the
CAMs?" (issue 26, deliverable 6). Median over the batches.

    python benchmarks/hsc_grad_paths.py --data runs/abl_lite0/shards/index.json \\
        --weights runs/abl_lite0/variants/hsc_seam/cam/final/model.pt --batches 6 --out grad_paths.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hsc_fast.config import load_config  # noqa: E402
from hsc_fast.data import build_train_loader, make_view2  # noqa: E402
from hsc_fast.losses import method_losses  # noqa: E402
from hsc_fast.losses.prototypes import PrototypeBanks  # noqa: E402
from hsc_fast.models import build_cam_model  # noqa: E402
from hsc_fast.models.cam_net import cam_channels  # noqa: E402

PARTS = ("backbone", "cam_head", "pcm", "psc_proj", "rsc_proj")


def part_of(name: str) -> str:
    return name.split(".")[0]


def step_sizes(model, cfg) -> dict:
    """name -> lr of its optimiser group (the config's groups, backbone multiplier included)."""
    from hsc_fast.engine.optim import build_optimizer
    opt = build_optimizer(model, cfg.optim)
    by_id = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {n: by_id.get(id(p), 0.0) for n, p in model.named_parameters()}


def term_paths(model, terms: dict, lrs: dict) -> dict:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {}
    for term, value in terms.items():
        if term == "total" or not value.requires_grad:
            continue
        grads = torch.autograd.grad(value, [p for _, p in params], retain_graph=True, allow_unused=True)
        grad_sq, step_sq = dict.fromkeys(PARTS, 0.0), dict.fromkeys(PARTS, 0.0)
        for (n, _), g in zip(params, grads):
            if g is not None:
                grad_sq[part_of(n)] += float(g.pow(2).sum())
                step_sq[part_of(n)] += float((lrs[n] * g).pow(2).sum())
        out[term] = {p: {"grad": grad_sq[p] ** 0.5, "step": step_sq[p] ** 0.5} for p in PARTS}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="ablation/demo")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--data", required=True, help="shard index.json")
    ap.add_argument("--weights", default="", help="a trained CAM network (final/model.pt); default: the config's")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_config(args.config, [f"data.train={args.data}", "data.workers=0", *args.set])
    model = build_cam_model(cfg.model)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    model.train()
    lrs = step_sizes(model, cfg)
    banks = PrototypeBanks(seed=cfg.train.seed, rsc_dim=cfg.model.rsc_dim, psc_dim=cfg.model.psc_dim,
                           num_classes=cam_channels(cfg.model)).as_dict()
    loader = build_train_loader(cfg.data, 0, 1, cfg.train.seed, torch.device("cpu"))
    rows = []
    for i, batch in enumerate(loader):
        if i == args.batches:
            break
        batch = dict(batch, img2=make_view2(batch["img"], cfg.data.view2_size))
        out1, out2 = model(batch["img"]), model(batch["img2"])
        terms, _ = method_losses(out1, out2, batch, banks, cfg.loss, img_mean=tuple(cfg.data.mean),
                                 img_std=tuple(cfg.data.std))
        rows.append(term_paths(model, terms, lrs))
    table = {t: {p: {k: statistics.median(r[t][p][k] for r in rows) for k in ("grad", "step")} for p in PARTS}
             for t in rows[0]}
    print(f"config {args.config} {' '.join(args.set)}; {len(rows)} batches; median norms: gradient | SGD step")
    print(f"{'term':>6} " + " ".join(f"{p:>22}" for p in PARTS))
    for t, parts in table.items():
        print(f"{t:>6} " + " ".join(f"{parts[p]['grad']:10.3g} | {parts[p]['step']:9.3g}" for p in PARTS))
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "set": args.set, "batches": len(rows),
                                              "median": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
