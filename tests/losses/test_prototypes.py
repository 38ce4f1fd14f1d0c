"""PrototypeBanks buffers, and cross-rank HSC losses: 2 gloo ranks == 1 process with the
concatenated batch (values, banks, DeepSpeed-averaged gradients)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hsc_fast.config import LossConfig
from hsc_fast.losses import csc_loss, normalize_cam, psc_loss, pseudo_labels, rsc_loss
from hsc_fast.ops import LossInputError
from hsc_fast.losses.prototypes import BANK_NAMES, DistContext, PrototypeBanks


VOC_BANK_SHAPES = {"rsc1": (2, 256), "rsc2": (2, 256), "csc1": (21, 256), "csc2": (21, 256),
                   "psc1": (21, 128), "psc2": (21, 128)}


def test_banks_are_seeded_buffers_saved_in_state_dict():
    a, b, c = PrototypeBanks(seed=4), PrototypeBanks(seed=4), PrototypeBanks(seed=5)
    assert set(a.state_dict()) == set(BANK_NAMES)
    for name, shape in VOC_BANK_SHAPES.items():
        assert tuple(getattr(a, name).shape) == shape
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.csc1, a.csc1)


def test_banks_follow_the_class_count():
    coco = PrototypeBanks(seed=4, num_classes=81)
    assert tuple(coco.csc1.shape) == (81, 256) and tuple(coco.psc2.shape) == (81, 128)
    assert tuple(coco.rsc1.shape) == (2, 256)


def test_update_copies_and_validates():
    banks = PrototypeBanks(seed=0)
    new = torch.ones(21, 128)
    banks.update_({"psc2": new})
    assert torch.equal(banks.psc2, new)
    new.zero_()  # the buffer is a copy
    assert banks.psc2.sum() == 21 * 128
    with pytest.raises(LossInputError, match="psc1"):
        banks.update_({"psc1": torch.zeros(20, 128)})
    with pytest.raises(LossInputError, match="unknown bank"):
        banks.update_({"other": torch.zeros(1)})


# ------------------------------------------------------------------------------------------
# 2 ranks vs 1 process
# ------------------------------------------------------------------------------------------
SPLIT = (3, 1)       # unequal per-rank batches on purpose
HW, D_RSC, D_PSC = 8, 16, 8


def _step_inputs(step, ties):
    """Full-batch inputs of one step; each rank takes its slice. `ties`: CAMs quantised to a few
    levels and PSC's official constant background channel, so tied scores straddle every top-k
    cut (the global pixel index must break them as one process does)."""
    g = torch.Generator().manual_seed(100 + step)
    n = sum(SPLIT)
    label = torch.zeros(n, 20)
    for i in range(n):
        label[i, (3 * i + step) % 20] = 1
    cams = []
    for _ in range(2):
        cam = normalize_cam(torch.randn(n, 21, HW, HW, generator=g) * 3)
        cam[:, 20] = 0.05 + 0.1 * torch.rand(n, HW, HW, generator=g)
        if ties:
            cam = (cam * 4).round() / 4
            cam[:, 20] = 0.1
        cams.append(cam)
    ys = [pseudo_labels(c, label) for c in cams]
    base = {k: torch.randn(n, d, HW, HW, generator=g) for k, d in
            (("r1", D_RSC), ("r2", D_RSC), ("p1", D_PSC), ("p2", D_PSC))}
    return label, cams, ys, base


def _run_losses(label, cams, ys, base, scale, banks, cfg, ctx):
    """Features = base * scale (scale plays a shared network parameter)."""
    f = {k: v * scale[k] for k, v in base.items()}
    f["p1"], f["p2"] = f["p1"].relu(), f["p2"].relu()
    r, nr1, nr2 = rsc_loss(f["r1"], f["r2"], ys[0], ys[1], banks["rsc1"], banks["rsc2"], cfg, dist_ctx=ctx)
    c, nc1, nc2 = csc_loss(f["r1"], cams[0], f["r2"], cams[1], label, banks["csc1"], banks["csc2"], cfg,
                           dist_ctx=ctx)
    p, np1, np2 = psc_loss(cams[0], f["p1"], cams[1], f["p2"], ys[0], ys[1], banks["psc1"], banks["psc2"],
                           cfg, dist_ctx=ctx)
    new = dict(rsc1=nr1, rsc2=nr2, csc1=nc1, csc2=nc2, psc1=np1, psc2=np2)
    return torch.stack([r, c, p]), new


def _worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = DistContext()
        cfg = LossConfig.official(impl="torch", csc_topk=96, csc_update_topk=16, psc_topk=16)
        g = torch.Generator().manual_seed(7)
        banks0 = {"rsc1": torch.randn(2, D_RSC, generator=g), "rsc2": torch.randn(2, D_RSC, generator=g),
                  "csc1": torch.randn(21, D_RSC, generator=g), "csc2": torch.randn(21, D_RSC, generator=g),
                  "psc1": torch.randn(21, D_PSC, generator=g), "psc2": torch.randn(21, D_PSC, generator=g)}
        lo, hi = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
        for step, ties in ((0, False), (1, False), (0, True), (1, True)):
            if step == 0:
                banks_dist, banks_single = dict(banks0), dict(banks0)
            label, cams, ys, base = _step_inputs(step, ties)
            scale_single = {k: torch.linspace(0.5, 1.5, v.shape[1]).reshape(-1, 1, 1).requires_grad_(True)
                            for k, v in base.items()}
            scale_dist = {k: v.detach().clone().requires_grad_(True) for k, v in scale_single.items()}
            # one process, whole batch
            loss_s, banks_single = _run_losses(label, cams, ys, base, scale_single, banks_single, cfg, None)
            loss_s.sum().backward()
            # this rank's slice, with the cross-rank context
            part = lambda t: t[lo:hi]  # noqa: E731
            loss_d, banks_dist = _run_losses(part(label), [part(c) for c in cams], [part(y) for y in ys],
                                             {k: part(v) for k, v in base.items()}, scale_dist, banks_dist,
                                             cfg, ctx)
            loss_d.sum().backward()
            torch.testing.assert_close(loss_d, loss_s, atol=1e-5, rtol=1e-5)
            for name in banks_single:
                torch.testing.assert_close(banks_dist[name], banks_single[name], atol=1e-5, rtol=1e-5)
            for name in scale_single:  # DeepSpeed: mean of the per-rank gradients
                grad = scale_dist[name].grad.clone()
                dist.all_reduce(grad)
                torch.testing.assert_close(grad / world, scale_single[name].grad, atol=1e-5, rtol=1e-4)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_whole_batch():
    from hsc_fast.distributed import free_port
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
