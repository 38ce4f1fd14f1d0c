"""The whole official training step: `engine.Trainer.train_step` against a straightforward
re-derivation of the authors' step (../shared/notes/hsc-reference.md), for 3 steps.

The re-derivation takes the network's outputs (a second copy of the same CamNet, same weights,
same dropout draws) and does the rest the authors' way, written out plainly: classification,
SEAM's adaptive min-pooling / ER / ECR (with its bg-first one-hot helper on bg-last CAMs), the
EPS saliency loss, the normalised 16x16 CAMs, pseudo-labels, the CRF image computed with the
authors' constants and **pydensecrf on every image in turn** (their crf_inference_label), RSC /
CSC / PSC with their in-place banks (tests/losses/test_losses.py's loop versions), and the
PolyOptimizer update: SGD with the weight-decay value 5e-4 in the momentum slot, lr groups
1x / 2x (no decay) / 10x / 20x (no decay) by conv membership in the authors' from-scratch list
(the RSC projector Sequential is listed, its convs are not: 1x / 2x), poly power 0.9 over 13,215
steps. The trainer runs the official preset as it is (loss.crf.backend lattice): terms, all six
banks, momentum buffers and weights must agree to fp32 round-off, every step starting both sides
from the trainer's state. Measured (this CPU): terms 3.1e-6, banks 6.8e-8, weights 6.1e-5,
updates 8.1e-5, momentum buffers 6.1e-5 (relative to each tensor's scale; the RSC projector's
gradient carries the largest round-off). With loss.crf.backend=dense the test fails at step 2.
"""
import math

import numpy as np
import pytest
import _faultutil as FU
import torch
import torch.nn.functional as F
from PIL import Image

from hsc_fast.config import load_config
from hsc_fast.losses.cam import crf_images
from hsc_fast.data.voc import read_label_png, read_sbd_mat
from losses.test_losses import official_csc, official_norm_cam, official_psc, official_rsc

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STEPS, BATCH, SIZE1, SIZE2 = 3, 4, 192, 128
WEIGHT_DECAY, BASE_LR, POLY_POWER, POLY_STEPS = 5e-4, 0.01, 0.9, 13215
# The authors' from-scratch layers (fc8, proj_fc, f8_3, f8_4, f9, extra_F) by our module names;
# extra_F (our rsc_proj) is a Sequential, so the membership test never matches its convs.
FROM_SCRATCH = ("cam_head", "psc_proj.0", "pcm.conv4_proj", "pcm.conv5_proj", "pcm.fuse", "rsc_proj")


# ------------------------------------------------------------------------------------------
# The CRF image: a pinned known input
# ------------------------------------------------------------------------------------------
def grey_ramp_normalised() -> torch.Tensor:
    """(1,3,16,16): every grey level 0..255 on each channel, normalised in float32."""
    v = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    return (v / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_crf_image_of_a_grey_ramp_is_pinned():
    out = crf_images(grey_ramp_normalised(), (16, 16), MEAN, STD)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 16, 16)
    levels = torch.arange(256).reshape(16, 16)
    # Levels that come back one grey level low (x * std255 + mean255 lands just below the
    # integer and astype(uint8) truncates), with the authors' float32(0.229 * 255)... constants.
    one_low = {0: [1, 6, 8, 21, 27, 33, 34, 39, 40, 45, 46, 47, 51, 52, 53, 58, 59, 61, 62],
               1: [233, 244, 246, 248, 250, 252, 254],      # float32(0.224) * 255 would add 18 more
               2: [20, 23, 26, 29, 237, 243]}
    for c, low in one_low.items():
        want = levels - torch.isin(levels, torch.tensor(low)).long()
        assert torch.equal(out[0, c].long(), want), c


def authors_crf_images(img2: torch.Tensor) -> list[np.ndarray]:
    """The authors' CRF input: view 2 resized to 16x16 on the CPU, x * std255 + mean255 with the
    constants multiplied in Python, astype(uint8) -> one (16,16,3) array per image."""
    n = img2.shape[0]
    std255 = torch.tensor([0.229 * 255, 0.224 * 255, 0.225 * 255]).reshape(1, 3, 1, 1).expand(n, 3, 1, 1)
    mean255 = torch.tensor([0.485 * 255, 0.456 * 255, 0.406 * 255]).reshape(1, 3, 1, 1).expand(n, 3, 1, 1)
    small = F.interpolate(img2.detach().cpu(), size=(16, 16), mode="bilinear", align_corners=True)
    pixels = small * std255 + mean255
    return [pixels[i].permute(1, 2, 0).numpy().astype(np.uint8) for i in range(n)]


def test_crf_images_equal_the_authors_on_a_resized_view():
    g = torch.Generator().manual_seed(0)
    unit = torch.rand(3, 3, 128, 128, generator=g)                      # RGB in [0, 1]
    img2 = (unit - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    ours = crf_images(img2, (16, 16), MEAN, STD)
    theirs = torch.from_numpy(np.stack(authors_crf_images(img2))).permute(0, 3, 1, 2)
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------------------------------
# The authors' step, written out
# ------------------------------------------------------------------------------------------
def authors_pydensecrf(img_hwc: np.ndarray, labels_hw: np.ndarray) -> np.ndarray:
    """crf_inference_label: gt_prob 0.7, 21 labels, Gaussian 3/3, bilateral 50/5/10, 10 iterations."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    h, w = labels_hw.shape
    crf = dcrf.DenseCRF2D(w, h, 21)
    crf.setUnaryEnergy(unary_from_labels(labels_hw.astype(np.uint8), 21, gt_prob=0.7, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(img_hwc)), compat=10)
    q = np.array(crf.inference(10)).reshape(21, h, w)
    return q.argmax(0)


def min_pooling(x: torch.Tensor) -> torch.Tensor:
    """SEAM's adaptive min-pooling: mean of the ReLU'd lowest quarter of the per-pixel channel max."""
    n, _, h, w = x.shape
    k = h * w // 4
    lowest = torch.topk(x.max(dim=1)[0].reshape(n, -1), k=k, dim=-1, largest=False)[0]
    return F.relu(lowest).sum() / (k * n)


def seam_max_norm(p: torch.Tensor) -> torch.Tensor:
    p = F.relu(p)
    hi = p.flatten(2).max(-1)[0][..., None, None]
    lo = p.flatten(2).min(-1)[0][..., None, None]
    return F.relu(p - lo - 1e-5) / (hi - lo + 1e-5)


def seam_onehot_bg_first(x: torch.Tensor) -> torch.Tensor:
    """SEAM's helper: keep channel 0, zero the non-maximal values of channels 1..20 (bg-first)."""
    x = x.clone()
    rest = x[:, 1:]
    rest[rest != rest.max(dim=1, keepdim=True)[0]] = 0
    return x


def seam_er_ecr(cam1, cam2, rv1, rv2, lab21):
    hw = cam2.shape[-2:]
    c1 = F.interpolate(seam_max_norm(cam1), size=hw, mode="bilinear", align_corners=True) * lab21
    c2 = seam_max_norm(cam2) * lab21
    er = (c1[:, :20] - c2[:, :20]).abs().mean()
    t1, t2 = c1.detach().clone(), c2.detach().clone()
    t1[:, 20] = 1 - t1[:, :20].max(dim=1)[0]
    t2[:, 20] = 1 - t2[:, :20].max(dim=1)[0]
    r1 = F.interpolate(seam_max_norm(rv1), size=hw, mode="bilinear", align_corners=True) * lab21
    r2 = seam_max_norm(rv2) * lab21
    n, k = cam2.shape[0], int(21 * hw[0] * hw[1] * 0.2)
    ecr1 = torch.topk((seam_onehot_bg_first(t2) - r1).abs().reshape(n, -1), k=k, dim=-1)[0].mean()
    ecr2 = torch.topk((seam_onehot_bg_first(t1) - r2).abs().reshape(n, -1), k=k, dim=-1)[0].mean()
    return er, ecr1 + ecr2


def eps_saliency(cam, sal, label, tau=0.5, alpha=0.5):
    """EPS: classes whose rounded CAM overlaps the rounded saliency by > tau are foreground, the
    other present classes join the background; MSE of the predicted saliency map."""
    n, _, h, w = cam.shape
    sal = F.interpolate(sal, size=(h, w))                       # nearest
    probs = F.softmax(cam, dim=1)
    fg_map = torch.zeros(n, 1, h, w)
    bg_map = probs[:, 20:21].clone()
    for i in range(n):
        for c in range(20):
            if label[i, c] == 0:
                continue
            hard = torch.round(probs[i, c].detach())
            overlap = (hard * torch.round(sal[i, 0])).sum() / (hard + 1e-4).sum()
            if overlap > tau:
                fg_map[i, 0] = fg_map[i, 0] + probs[i, c]
            else:
                bg_map[i, 0] = bg_map[i, 0] + probs[i, c]
    predicted = fg_map * alpha + (1 - bg_map) * (1 - alpha)
    return F.mse_loss(predicted, sal)


def authors_losses(model, batch, banks, crf_log):
    """All terms of one step; updates `banks` in place as the authors' globals."""
    img, sal, label = batch["img"], batch["sal"], batch["label"]
    img2 = F.interpolate(img, size=(SIZE2, SIZE2), mode="bilinear", align_corners=True)
    sal2 = F.interpolate(sal, size=(SIZE2, SIZE2), mode="bilinear", align_corners=True)
    o1, o2 = model(img), model(img2)
    cam1, rv1, cam2, rv2 = o1["cam"], o1["cam_rv"], o2["cam"], o2["cam_rv"]
    lab21 = torch.cat([label, torch.ones(label.shape[0], 1)], dim=1)[:, :, None, None]
    terms = {}
    terms["cls"] = ((F.multilabel_soft_margin_loss(cam1.mean((2, 3))[:, :20], label) +
                     F.multilabel_soft_margin_loss(cam2.mean((2, 3))[:, :20], label)) / 2 +
                    (min_pooling((rv1 * lab21)[:, :20]) + min_pooling((rv2 * lab21)[:, :20])) / 2)
    terms["sal"] = ((eps_saliency(cam1, sal, label) + eps_saliency(cam2, sal2, label)) / 2 +
                    (eps_saliency(rv1, sal, label) + eps_saliency(rv2, sal2, label)) / 2)
    terms["er"], terms["ecr"] = seam_er_ecr(cam1, cam2, rv1, rv2, lab21)
    # HSC at 16x16: view-1 maps resized, view 2 native
    down = lambda x: F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=True)  # noqa: E731
    norm1, norm2 = official_norm_cam(down(rv1).detach()), official_norm_cam(rv2.detach())
    psc1, rsc1, psc2, rsc2 = down(o1["feat_psc"]), down(o1["feat_rsc"]), o2["feat_psc"], o2["feat_rsc"]
    with torch.no_grad():
        y1 = F.softmax(norm1 * lab21, dim=1).argmax(1)
        y2 = F.softmax(norm2 * lab21, dim=1).argmax(1)
        rgb = authors_crf_images(img2)
        y1c = torch.from_numpy(np.stack([authors_pydensecrf(rgb[i], y1[i].numpy()) for i in range(len(rgb))]))
        y2c = torch.from_numpy(np.stack([authors_pydensecrf(rgb[i], y2[i].numpy()) for i in range(len(rgb))]))
    crf_log.append(int((y1c != y1).sum() + (y2c != y2).sum()))
    terms["rsc"] = official_rsc(rsc1, rsc2, y1c, y2c, banks["rsc1"], banks["rsc2"])
    terms["csc"] = official_csc(rsc1, norm1, rsc2, norm2, label, banks["csc1"], banks["csc2"]).reshape(())
    terms["psc"] = official_psc(norm1, psc1, norm2, psc2, y1c, y2c, banks["psc1"], banks["psc2"])
    terms["total"] = sum(terms.values())
    return terms


def authors_param_groups(model) -> list[tuple[str, torch.nn.Parameter, float, float]]:
    """(name, parameter, lr multiplier, weight decay) for every trainable conv weight and bias."""
    rows = []
    for mod_name, m in model.named_modules():
        if not isinstance(m, torch.nn.Conv2d):
            continue
        new = mod_name in FROM_SCRATCH
        for kind, p in (("weight", m.weight), ("bias", m.bias)):
            if p is None or not p.requires_grad:
                continue
            mult = (10.0 if new else 1.0) * (2.0 if kind == "bias" else 1.0)
            rows.append((f"{mod_name}.{kind}", p, mult, 0.0 if kind == "bias" else WEIGHT_DECAY))
    return rows


@torch.no_grad()
def authors_sgd_update(groups, momentum_buffers: dict, step_index: int) -> None:
    """PolyOptimizer.step: lr = initial * (1 - step / 13215) ** 0.9; SGD(params, lr, 5e-4) puts
    5e-4 in the MOMENTUM slot; each group's weight decay is added to the gradient."""
    factor = (1 - step_index / POLY_STEPS) ** POLY_POWER
    for name, p, mult, wd in groups:
        d_p = p.grad + wd * p
        if name in momentum_buffers:
            momentum_buffers[name] = WEIGHT_DECAY * momentum_buffers[name] + d_p
        else:
            momentum_buffers[name] = d_p.clone()
        p -= BASE_LR * mult * factor * momentum_buffers[name]
        p.grad = None


# ------------------------------------------------------------------------------------------
# Inputs: real fixture photos, cropped differently every step
# ------------------------------------------------------------------------------------------
def _photos(fixtures_dir):
    voc = fixtures_dir / "voc"
    out = []
    for key in ("2007_000032", "2007_000033"):
        out.append((np.array(Image.open(voc / "JPEGImages" / f"{key}.jpg").convert("RGB")),
                    read_label_png(voc / "SegmentationClass" / f"{key}.png")))
    out.append((np.array(Image.open(fixtures_dir / "sbd" / "img" / "2008_000051.jpg").convert("RGB")),
                read_sbd_mat(fixtures_dir / "sbd" / "cls" / "2008_000051.mat")))
    rgb = np.array(Image.open(fixtures_dir / "crf" / "im1.png").convert("RGB"))
    yy, xx = np.mgrid[: rgb.shape[0], : rgb.shape[1]]
    blob = ((yy - rgb.shape[0] / 2) / (rgb.shape[0] / 3)) ** 2 + ((xx - rgb.shape[1] / 2) / (rgb.shape[1] / 3)) ** 2 < 1
    out.append((rgb, np.where(blob, 8, 0).astype(np.uint8)))     # made-up label: a 'cat' blob
    return out


def make_batch(photos, step: int) -> dict:
    """View-1 crops (192 px), their image labels and a smooth synthetic saliency map."""
    rng = np.random.default_rng(step)
    imgs, sals, labels = [], [], []
    for rgb, gt in photos:
        scale = SIZE1 * rng.uniform(1.05, 1.4) / min(rgb.shape[:2])
        size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
        big = np.array(Image.fromarray(rgb).resize(size, Image.BILINEAR))
        mask = np.array(Image.fromarray(gt).resize(size, Image.NEAREST))
        y, x = rng.integers(0, size[1] - SIZE1 + 1), rng.integers(0, size[0] - SIZE1 + 1)
        big, mask = big[y:y + SIZE1, x:x + SIZE1], mask[y:y + SIZE1, x:x + SIZE1]
        if step % 2:
            big, mask = big[:, ::-1], mask[:, ::-1]
        classes = [c for c in np.unique(mask) if c not in (0, 255)] or [int(np.unique(gt)[-1])]
        label = torch.zeros(20)
        label[[int(c) - 1 for c in classes]] = 1
        fg = torch.from_numpy(((mask != 0) & (mask != 255)).astype(np.float32))[None, None]
        sals.append(F.avg_pool2d(fg, 9, stride=1, padding=4, count_include_pad=False)[0])
        v = torch.from_numpy(np.ascontiguousarray(big)).permute(2, 0, 1).float()
        imgs.append((v / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))
        labels.append(label)
    return {"img": torch.stack(imgs), "sal": torch.stack(sals), "label": torch.stack(labels)}


# ------------------------------------------------------------------------------------------
# The comparison
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def group():
    yield from FU.single_rank_group(60)


def rel_error(ours: torch.Tensor, want: torch.Tensor) -> float:
    """max |ours - want| / max |want|: fp32 round-off in another summation order gives ~1e-7..1e-5;
    the RSC sim-min term's 1 / (1 - cos) amplifies it in the projector's gradient to ~1e-4."""
    return float((ours.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU reference comparison (fp32 round-off tolerances)")
def test_official_train_step_reproduces_the_authors_step(fixtures_dir, group, tmp_path):
    from hsc_fast.engine.cam_trainer import Trainer
    from hsc_fast.models import build_cam_model

    cfg = load_config("hsc_eps_official", [
        "model.weights=", "model.allow_random_init=true", "model.width_div=8",
        f"data.batch_size={BATCH}", f"data.crop_size={SIZE1}", f"data.view2_size={SIZE2}", "train.tensorboard=false"])
    assert cfg.loss.crf.backend == "lattice" and cfg.optim.official_momentum_quirk
    trainer = Trainer(cfg, tmp_path, group)
    ref = build_cam_model(cfg.model, load_weights=False)
    ref.load_state_dict(trainer.module.state_dict())
    ref.train()
    groups = authors_param_groups(ref)
    ours_trainable = {n for n, p in trainer.module.named_parameters() if p.requires_grad}
    assert {n for n, *_ in groups} == ours_trainable            # the same parameters are trained
    params = dict(trainer.module.named_parameters())
    crf_changed, worst = [], {}
    photos = _photos(fixtures_dir)
    for step in range(STEPS):
        # Each step starts both sides from the trainer's state (weights, banks, momentum buffers):
        # free-running, the RSC term's 1 / (1 - cos) gradient amplifies fp32 round-off (1e-4 in
        # the projector update of step 1 becomes 1e-3 in RSC at step 2 and ~1e-2 at step 3).
        ref.load_state_dict(trainer.module.state_dict())
        banks = {k: v.clone() for k, v in trainer.banks.as_dict().items()}
        buffers = {name: trainer.optimizer.state[params[name]]["momentum_buffer"].clone()
                   for name, *_ in groups if params[name] in trainer.optimizer.state}
        batch = make_batch(photos, step)
        before = {name: p.detach().clone() for name, p, *_ in groups}
        rng = torch.get_rng_state()                               # same dropout draws for both
        result = trainer.train_step([batch])
        torch.set_rng_state(rng)
        want = authors_losses(ref, batch, banks, crf_changed)
        want["total"].backward()
        authors_sgd_update(groups, buffers, step)

        assert not result.nonfinite
        assert set(result.terms) == set(want), step
        errors = {"term": max(rel_error(torch.tensor(result.terms[k]), v.detach()) for k, v in want.items()),
                  "bank": max(rel_error(v, banks[k]) for k, v in trainer.banks.as_dict().items())}
        for name, p, *_ in groups:
            ours = params[name].detach()
            errors[f"weight {name}"] = rel_error(ours, p.detach())
            errors[f"update {name}"] = rel_error(before[name] - ours, before[name] - p.detach())
            errors[f"momentum {name}"] = rel_error(trainer.optimizer.state[params[name]]["momentum_buffer"],
                                                   buffers[name])
        for key, limit in (("term", 2e-5), ("bank", 1e-5), ("weight", 2e-4), ("update", 5e-4), ("momentum", 5e-4)):
            name, err = max(((k, v) for k, v in errors.items() if k.split()[0] == key), key=lambda kv: kv[1])
            worst[key] = max(worst.get(key, 0.0), err)
            assert err <= limit, f"step {step + 1}: {name} differs by {err:.3g} (relative to its scale)"
    lrs = sorted({round(g["lr"] / (BASE_LR * (1 - STEPS / POLY_STEPS) ** POLY_POWER), 6)
                  for g in trainer.optimizer.param_groups})
    assert lrs == [1.0, 2.0, 10.0]            # 20x (new-layer biases) is empty: the new convs have no bias
    assert math.isclose(trainer.optimizer.param_groups[0]["momentum"], WEIGHT_DECAY)
    print(f"official step x{STEPS}: pydensecrf changed {crf_changed} of {2 * BATCH * 256} labels per step; "
          f"max relative differences {', '.join(f'{k} {v:.2g}' for k, v in worst.items())}")
    assert sum(crf_changed) > 0                                   # the CRF mattered in this run
