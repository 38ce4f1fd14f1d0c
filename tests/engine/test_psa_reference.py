"""PSA's recipe (refine.* set as configs/hsc_eps_official.yaml) against re-derivations of the authors'
code (jiwoon-ahn/psa: voc12/data.py VOC12AffDataset + ExtractAffinityLabelInRadius, tool/imutils.py
RandomCrop / AvgPool2d, train_aff.py's loss, network/resnet38_aff.py's to_dense, infer_aff.py),
written here from their description, on the real fixture photos: exact label maps."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hsc_fast.config import load_config

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "voc" / "JPEGImages"  # CI: ../shared
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SEARCH = [(0, x) for x in range(1, 5)] + [(y, x) for y in range(1, 5) for x in range(-4, 5) if x * x + y * y < 25]


def photos(scale=0.3):
    from PIL import Image
    if not FIXTURES.is_dir():
        pytest.skip("no fixture photos")
    out = []
    for path in sorted(FIXTURES.glob("*.jpg")):
        img = Image.open(path).convert("RGB")
        out.append(np.array(img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)))
    return out


def smooth_cams(h, w, n, seed):
    """n CAM-like maps in [0, 1]: a few Gaussian bumps each."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    maps = []
    for _ in range(n):
        m = np.zeros((h, w))
        for _ in range(3):
            cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.3) * max(h, w)
            m += np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * s * s))
        maps.append(m / m.max())
    return np.stack(maps).astype(np.float32)


# ------------------------------------------------------------------------- the authors', re-derived
def psa_pairs(h, w):
    """(from (P,), to (34, P)) flat indices of the cropped grid (radius_floor 4)."""
    full = np.arange(h * w).reshape(h, w)
    frm = full[:h - 4, 4:w - 4].reshape(-1)
    to = np.stack([full[dy:dy + h - 4, 4 + dx:4 + dx + w - 8].reshape(-1) for dy, dx in SEARCH])
    return frm, to


def psa_aff_labels(label):
    """ExtractAffinityLabelInRadius on one (h, w) uint8 label -> bg, fg, neg (34, P) float."""
    h, w = label.shape
    frm, to = psa_pairs(h, w)
    lf, lt = label.reshape(-1)[frm][None], label.reshape(-1)[to]
    valid = (lf < 255) & (lt < 255)
    pos = lf == lt
    return ((pos & (lf == 0)).astype(np.float32), (pos & (lf != 0) & valid).astype(np.float32),
            (~pos & valid).astype(np.float32))


def psa_batch_loss(feats, labels):
    """train_aff.py: affinities over the cropped grid, sums and counts over the whole batch."""
    n, c, h, w = feats.shape
    frm, to = psa_pairs(h, w)
    x = feats.reshape(n, c, -1)
    aff = torch.exp(-(x[:, :, torch.from_numpy(to)] - x[:, :, torch.from_numpy(frm)][:, :, None]).abs().mean(1))
    bg, fg, neg = (torch.from_numpy(np.stack(t)) for t in zip(*[psa_aff_labels(lab) for lab in labels]))
    bg_loss = (-bg * torch.log(aff + 1e-5)).sum() / (bg.sum() + 1e-5)
    fg_loss = (-fg * torch.log(aff + 1e-5)).sum() / (fg.sum() + 1e-5)
    neg_loss = (-neg * torch.log(1.0 + 1e-5 - aff)).sum() / (neg.sum() + 1e-5)
    return bg_loss / 4 + fg_loss / 4 + neg_loss / 2


def psa_dense_transition(feat, beta):
    """resnet38_aff.forward(to_dense=True) then infer_aff.py: A^beta / column sums. feat (C, h, w)."""
    c, h, w = feat.shape
    frm, to = psa_pairs(h, w)
    x = feat.reshape(c, -1)
    aff = torch.exp(-(x[:, to] - x[:, frm][:, None]).abs().mean(0)).reshape(-1)
    f_exp = np.broadcast_to(frm, to.shape).reshape(-1)
    mat = torch.zeros(h * w, h * w, dtype=feat.dtype)
    mat[f_exp, to.reshape(-1)] = aff
    mat[to.reshape(-1), f_exp] = aff
    mat[np.arange(h * w), np.arange(h * w)] = 1.0
    mat = mat ** beta
    return mat / mat.sum(0, keepdim=True)


def psa_normalize(img):
    """resnet38d.Normalize: float32 (x / 255 - mean) / std per channel."""
    out = np.empty(img.shape, np.float32)
    for ch in range(3):
        out[..., ch] = (img[..., ch] / 255.0 - MEAN[ch]) / STD[ch]
    return out


def psa_sample(img, low, high, box, flip, crop):
    """VOC12AffDataset.__getitem__ without ColorJitter: concat, RandomCrop (float32 zeros), normalise,
    flip, AvgPool2d(8) (zero-padded block mean), the label rule. -> (CHW image, label)."""
    ct, cl, it, il = box
    stack = np.concatenate([img.astype(np.float32), np.transpose(np.concatenate([low, high]), (1, 2, 0))], -1)
    ch, cw = min(crop, stack.shape[0]), min(crop, stack.shape[1])
    cont = np.zeros((crop, crop, stack.shape[-1]), np.float32)
    cont[ct:ct + ch, cl:cl + cw] = stack[it:it + ch, il:il + cw]
    im, lab = psa_normalize(cont[..., :3]), cont[..., 3:]
    if flip:
        im, lab = np.fliplr(im), np.fliplr(lab)
    pad = -crop % 8
    t = torch.from_numpy(np.ascontiguousarray(np.transpose(lab, (2, 0, 1))))
    pooled = F.avg_pool2d(F.pad(t, (0, pad, 0, pad)), 8).numpy().transpose(1, 2, 0)
    no_score = pooled.max(-1) < 1e-5
    la, ha = np.split(pooled, 2, axis=-1)
    la, ha = la.argmax(-1).astype(np.uint8), ha.argmax(-1).astype(np.uint8)
    label = la.copy()
    label[la == 0] = 255
    label[ha == 0] = 0
    label[no_score] = 255
    return np.ascontiguousarray(np.transpose(im, (2, 0, 1))), label


def psa_masks(model, img, cams, keys, alpha, beta, logt):
    """infer_aff.py on one image: pad to x8 (0 after normalising), dense transition, pooled CAM with
    the (1 - max)^alpha background, matrix powers, bilinear up to the padded size, argmax, crop."""
    h, w = img.shape[:2]
    x = torch.from_numpy(psa_normalize(img)).permute(2, 0, 1)[None]
    ph, pw = -h % 8, -w % 8
    x = F.pad(x, (0, pw, 0, ph))
    with torch.no_grad():
        feat = model(x)[0]
    trans = psa_dense_transition(feat, beta)
    for _ in range(logt):
        trans = trans @ trans
    full = np.zeros((21, h, w), np.float32)
    for k, cam in zip(keys, cams):
        full[k + 1] = cam
    full[0] = (1 - full[1:].max(0)) ** alpha
    full = np.pad(full, ((0, 0), (0, ph), (0, pw)))
    pooled = F.avg_pool2d(torch.from_numpy(full), 8, 8)
    dh, dw = pooled.shape[-2:]
    rw = (pooled.reshape(21, -1) @ trans).reshape(1, 21, dh, dw)
    rw = F.interpolate(rw, size=(h + ph, w + pw), mode="bilinear", align_corners=False)
    return rw.argmax(1)[0].numpy().astype(np.uint8)[:h, :w]


# ------------------------------------------------------------------------------------------ tests
def test_official_presets_set_psas_recipe_and_seams_variant():
    psa, seam = load_config("hsc_eps_official").refine, load_config("hsc_seam").refine
    assert (psa.pairs, psa.label_pooling, psa.crop_pad, psa.walk_pad8, psa.scale_range, psa.color_jitter) == \
        ("psa_crop", "scores", "black", True, [1.0, 1.0], [0.3, 0.3, 0.3, 0.1])
    assert (psa.momentum_quirk, psa.weight_decay, psa.lr, psa.epochs, psa.batch_size, psa.loss_reduction) == \
        (True, 5e-4, 0.1, 8, 8, "batch")
    assert (psa.alpha_low, psa.alpha_high, psa.bg_alpha, psa.beta, psa.logt) == (4, 32, 16, 8, 8)
    assert psa.init == "imagenet" and load_config("demo").refine.init == "cam"
    assert (seam.lr, seam.alpha_low, seam.alpha_high, seam.bg_alpha, seam.beta, seam.logt) == (0.01, 4, 24, 6, 8, 6)
    assert seam.pairs == "psa_crop" and load_config("hsc_coco_eps").refine.alpha_high == 32


def test_step_count_and_optimiser_are_psas():
    from hsc_fast.engine.optim import effective_momentum
    from hsc_fast.engine.refine import affinity_optim_config, affinity_steps
    cfg = load_config("hsc_eps_official")
    assert affinity_steps(cfg, 10582) == 10576          # len(train_aug) // 8 * 8, drop_last
    assert affinity_steps(cfg, 10582, world_size=2) == 10582 // 16 * 8
    opt = affinity_optim_config(cfg, 10576)
    assert effective_momentum(opt) == 5e-4 and opt.weight_decay == 5e-4 and opt.poly_steps == 10576
    assert opt.backbone_lr_mult == 1.0 and affinity_optim_config(load_config(
        "hsc_eps_official", ["refine.backbone_lr_mult=0.01"])).backbone_lr_mult == 0.01  # PSA's is 1.0
    ours = load_config("hsc_eps_official", ["refine.momentum_quirk=false", "refine.epochs=0"])
    assert effective_momentum(affinity_optim_config(ours)) == 0.9 and affinity_steps(ours, 10582) == ours.refine.max_steps


def test_pair_loss_equals_psas_batch_mean_and_every_pair_differs():
    from hsc_fast.losses.affinity import affinity_loss, affinity_targets
    from hsc_fast.ops.random_walk import pairwise_affinity
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 6, 14, 14, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (3, 14, 14), generator=g)
    labels[0, :3] = 255
    labels[1, :, 5:] = 0
    want = psa_batch_loss(feats, labels.numpy().astype(np.uint8))
    ours, _ = affinity_loss(pairwise_affinity(feats, 5, psa_crop=True), affinity_targets(labels, 5, psa_crop=True))
    torch.testing.assert_close(ours, want, rtol=1e-7, atol=0)       # one pair more or less: ~1e-4
    every, _ = affinity_loss(pairwise_affinity(feats, 5), affinity_targets(labels, 5))
    assert abs(float(every - want)) > 1e-3                  # every in-image pair: another loss


def test_batch_reduction_over_ranks_equals_the_whole_batch_mean():
    """Two 'ranks' of two images: mean over ranks of count-scaled rank means = one batch of four."""
    from hsc_fast.losses.affinity import affinity_loss, affinity_targets, global_count_scale
    from hsc_fast.ops.random_walk import pairwise_affinity
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(4, 5, 12, 12, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (4, 12, 12), generator=g)
    labels[:2, 4:] = 0
    whole, _ = affinity_loss(pairwise_affinity(feats, 5, psa_crop=True), affinity_targets(labels, 5, psa_crop=True))
    targets = [affinity_targets(labels[i:i + 2], 5, psa_crop=True) for i in (0, 2)]
    local = [[float(m.sum()) for m in t] for t in targets]
    total = [a + b for a, b in zip(*local)]
    rank_losses = [affinity_loss(pairwise_affinity(feats[i:i + 2], 5, psa_crop=True), t,
                                 count_scale=global_count_scale(lc, total, 2))[0]
                   for i, t, lc in zip((0, 2), targets, local)]
    torch.testing.assert_close(sum(rank_losses) / 2, whole, rtol=1e-9, atol=0)
    plain = sum(affinity_loss(pairwise_affinity(feats[i:i + 2], 5, psa_crop=True), t)[0]
                for i, t in zip((0, 2), targets)) / 2
    assert abs(float(plain - whole)) > 1e-4                 # 'rank': the mean of two rank means


def test_transition_matrix_equals_psas_dense_one():
    from hsc_fast.ops.random_walk import dense_affinity_matrix, pair_offsets, pairwise_affinity
    g = torch.Generator().manual_seed(4)
    feat = torch.randn(1, 8, 11, 13, generator=g)
    want = psa_dense_transition(feat[0], 8)
    for crop, close in ((True, True), (False, False)):
        mat = dense_affinity_matrix(pairwise_affinity(feat, 5, psa_crop=crop), pair_offsets(5), 8)[0]
        trans = mat / mat.sum(0, keepdim=True)
        assert torch.allclose(trans, want, atol=3e-7, rtol=0) == close


@pytest.mark.parametrize("crop", [96, 56])   # the container larger than the photo, then a window of it
def test_training_sample_equals_psas_on_fixture_photos(tmp_path, crop):
    from hsc_fast.engine.affinity_data import AffinityTrainSet, psa_crop_box, save_affinity_scores
    from hsc_fast.eval.affinity_labels import affinity_crf_scores
    imgs = [im[:80, :90] if crop == 96 else im for im in photos(0.25)]
    for i, img in enumerate(imgs):
        cams = smooth_cams(*img.shape[:2], 2, seed=i)
        low, high = (affinity_crf_scores(img, cams, a) for a in (4.0, 32.0))
        save_affinity_scores(tmp_path / f"p{i}.npz", low, high, [i, 14])
        ds = AffinityTrainSet([f"p{i}"] * 6, lambda _k, im=img: im, tmp_path, crop=crop, scale_range=[1, 1],
                              flip=True, color_jitter=[], crop_pad="black", label_pooling="scores", seed=3)
        for j in range(6):
            rng = np.random.default_rng([3, 0, j])     # the sample's draws: the box, then the flip
            box = psa_crop_box(*img.shape[:2], crop, rng)
            want_img, want_label = psa_sample(img, low, high, box, rng.random() < 0.5, crop)
            got = ds[j]
            np.testing.assert_allclose(got["img"].numpy(), want_img, atol=2e-6, rtol=0)
            ids = np.array([0, i + 1, 15], np.uint8)      # PSA's channel index -> our VOC label id
            want = np.where(want_label == 255, 255, ids[np.minimum(want_label, 2)])
            np.testing.assert_array_equal(got["label"].numpy(), want)


def test_masks_equal_psas_on_fixture_photos():
    """Identical weights (a small random AffinityNet), PSA's pairs and padding: the Masks are the
    same label maps; with every in-image pair and no padding they are not."""
    import dataclasses

    from hsc_fast.engine.refine import walk_one
    from hsc_fast.models.affinity import build_affinity_net
    torch.manual_seed(0)
    model = build_affinity_net("resnet18", feat_dim=16).eval()
    cfg = load_config("hsc_eps_official", ["refine.logt=6"])
    ours_cfg = dataclasses.replace(cfg, refine=dataclasses.replace(cfg.refine, pairs="all", walk_pad8=False))
    differs = 0
    for i, img in enumerate(photos(0.3)):
        cams = smooth_cams(*img.shape[:2], 2, seed=10 + i)
        keys = np.array([2, 11])
        want = psa_masks(model, img, cams, keys, 16, 8, 6)
        got = walk_one(model, img, keys, cams, cfg, "cpu", bg_alpha=16.0)
        np.testing.assert_array_equal(got, want)
        differs += int((walk_one(model, img, keys, cams, ours_cfg, "cpu", bg_alpha=16.0) != want).sum())
    assert differs > 0


def test_bad_recipe_values_are_named(tmp_path):
    from hsc_fast.engine.affinity_data import load_affinity_scores
    from hsc_fast.engine.refine import affinity_init_state, check_refine_config
    from hsc_fast.errors import ConfigError, DataError
    with pytest.raises(ConfigError, match="refine.color_jitter"):
        check_refine_config(load_config("hsc_eps_official", ["refine.color_jitter=[0.3,0.3]"]))
    with pytest.raises(ConfigError, match="refine.crop_size.*empty"):    # a 8x8 grid has no PSA pair
        check_refine_config(load_config("hsc_eps_official", ["refine.crop_size=64"]))
    check_refine_config(load_config("hsc_eps_official", ["refine.crop_size=64", "refine.pairs=all"]))
    with pytest.raises(ConfigError, match="refine.pairs"):
        load_config("hsc_eps_official", ["refine.pairs=every"])
    with pytest.raises(ConfigError, match="refine.backbone"):
        affinity_init_state(load_config("hsc_eps_official", ["refine.backbone=resnet18"]), tmp_path)
    bad = tmp_path / "x.npz"
    np.savez(bad, low=np.zeros((2, 4, 4), np.float32), high=np.zeros((3, 4, 4), np.float32), keys=np.array([1]))
    with pytest.raises(DataError, match="x.npz"):
        load_affinity_scores(bad)
