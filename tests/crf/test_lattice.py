"""hsc_fast.crf.lattice: agreement with pydensecrf, lattice properties, batching, CUDA build."""
import numpy as np
import pytest
import torch
from PIL import Image

from hsc_fast.crf import DEEPLAB_TEST, INFERENCE, crf_batch, crf_inference, unary_from_probs
from hsc_fast.crf.lattice import (PermutohedralLattice, batched_crf_features, crf_features, cupy_available,
                                  lattice_crf_batch, lattice_crf_labels, lattice_crf_tensor, normalized_filter)
from hsc_fast.errors import DataError
from test_crf import smooth_probs


def _load(path):
    return np.ascontiguousarray(np.array(Image.open(path).convert("RGB")))


def _agreement(a, b):
    return float((a.argmax(0) == b.argmax(0)).mean())


def _blocky_image(h, w, seed, n_regions=4):
    """Piecewise-constant colour regions plus noise: edges the bilateral kernel must respect."""
    rng = np.random.default_rng(seed)
    region = rng.integers(0, n_regions, size=(h // 8 + 1, w // 8 + 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
    colours = rng.integers(0, 256, size=(n_regions, 3))
    return np.clip(colours[region] + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("preset", [INFERENCE, DEEPLAB_TEST], ids=["inference", "deeplab_test"])
def test_matches_pydensecrf_on_real_image(fixtures_dir, preset):
    img = _load(fixtures_dir / "crf" / "im1.png")
    probs = smooth_probs(*img.shape[:2], 4, seed=0)
    ref = crf_inference(img, probs, **preset.kwargs())
    ours = crf_inference(img, probs, backend="gpu", **preset.kwargs())
    assert _agreement(ours, ref) >= 0.99
    assert np.abs(ours - ref).max() < 1e-3            # same algorithm: only summation order differs
    assert _agreement(ref, probs) < 0.95              # the CRF changed the labelling substantially


def test_matches_pydensecrf_voc_size_21_labels(fixtures_dir):
    img = _load(fixtures_dir / "voc" / "JPEGImages" / "2007_000033.jpg")      # 500x366
    probs = smooth_probs(*img.shape[:2], 21, seed=1)
    ref = crf_inference(img, probs, **INFERENCE.kwargs())
    ours = crf_inference(img, probs, backend="gpu", **INFERENCE.kwargs())
    assert _agreement(ours, ref) >= 0.99
    assert np.abs(ours - ref).max() < 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pydensecrf_on_synthetic_images(seed):
    img = _blocky_image(56, 72, seed)
    probs = smooth_probs(56, 72, 3 + seed, seed=seed, cell=10, sharpness=1.5)
    for preset in (INFERENCE, DEEPLAB_TEST):
        ref = crf_inference(img, probs, **preset.kwargs())
        ours = crf_inference(img, probs, backend="gpu", **preset.kwargs())
        assert _agreement(ours, ref) >= 0.99
        assert np.abs(ours - ref).max() < 1e-3


@pytest.fixture(scope="module")
def bilateral_lattice(fixtures_dir):
    img = torch.from_numpy(_load(fixtures_dir / "crf" / "im1.png")[:96, :128].copy())
    return PermutohedralLattice(crf_features(img, 80, 13))


def test_filter_is_nearly_symmetric_and_exactly_adjoint_to_reverse(bilateral_lattice):
    torch.manual_seed(0)
    n = bilateral_lattice.weights.shape[0]
    a, b = torch.rand(n, 3, dtype=torch.float64).float(), torch.rand(n, 3).float()
    a_kb = (a * bilateral_lattice.filter(b)).double().sum(0)
    ka_b = (bilateral_lattice.filter(a) * b).double().sum(0)
    kra_b = (bilateral_lattice.filter(a, reverse=True) * b).double().sum(0)
    assert torch.allclose(a_kb, kra_b, rtol=1e-5)          # exact transpose
    assert torch.allclose(a_kb, ka_b, rtol=1e-3)           # blurs nearly commute on a dense lattice


def test_filter_of_constant_is_constant_after_normalisation(bilateral_lattice):
    n = bilateral_lattice.weights.shape[0]
    ones = torch.ones(n, 1)
    mass = bilateral_lattice.filter(ones)
    assert (mass > 0).all()
    torch.testing.assert_close(bilateral_lattice.filter(3.5 * ones) / mass, torch.full_like(mass, 3.5))
    # a constant field on a regular grid: the position-only lattice is (nearly) translation invariant
    grid = PermutohedralLattice(crf_features(torch.zeros(64, 64, 3, dtype=torch.uint8), 3, None))
    interior = grid.filter(torch.ones(64 * 64, 1)).reshape(64, 64)[12:-12, 12:-12]
    assert float(interior.max() / interior.min()) < 1.01
    # normalised message of a constant Q stays (nearly) constant in the interior
    msg = normalized_filter(grid)(torch.ones(64 * 64, 2)).reshape(64, 64, 2)[12:-12, 12:-12]
    assert float(msg.max() / msg.min()) < 1.02


@pytest.mark.parametrize("d", [2, 5])
def test_lattice_approximates_the_gaussian(d):
    torch.manual_seed(d)
    f = torch.rand(300, d) * 4
    lattice_k = PermutohedralLattice(f).filter(torch.eye(300))
    exact = torch.exp(-0.5 * torch.cdist(f, f) ** 2)
    corr = torch.corrcoef(torch.stack([lattice_k.flatten(), exact.flatten()]))[0, 1]
    assert lattice_k.min() >= 0
    assert corr > 0.95


def test_images_in_a_batch_do_not_interact():
    img_a, img_b = _blocky_image(24, 32, 0), _blocky_image(24, 32, 1)
    feats = torch.cat([crf_features(torch.from_numpy(i), 80, 13) for i in (img_a, img_b)])
    ids = torch.arange(2).repeat_interleave(24 * 32)
    lattice = PermutohedralLattice(feats, ids)
    values = torch.zeros(feats.shape[0], 1)
    values[: 24 * 32] = 1.0
    out = lattice.filter(values)
    assert (out[24 * 32:] == 0).all() and (out[: 24 * 32] > 0).all()


def test_batch_equals_single_images_mixed_sizes_and_labels():
    images = [_blocky_image(40, 48, 0), _blocky_image(32, 56, 1), _blocky_image(40, 48, 2)]
    probs = [smooth_probs(*im.shape[:2], c, seed=k, cell=10) for k, (im, c) in enumerate(zip(images, (3, 5, 2)))]
    unaries = [unary_from_probs(p) for p in probs]
    batched = lattice_crf_batch(images, unaries, **INFERENCE.kwargs())
    for im, u, out in zip(images, unaries, batched):
        single = lattice_crf_batch([im], [u], **INFERENCE.kwargs())[0]
        assert out.shape == u.shape
        np.testing.assert_allclose(out, single, atol=1e-6)
    via_crf = crf_batch(images, probs, backend="gpu", gpu_batch=2, **INFERENCE.kwargs())
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(via_crf, batched))
    stacked = lattice_crf_tensor(torch.from_numpy(np.stack([images[0], images[2]])).permute(0, 3, 1, 2),
                                 torch.from_numpy(np.stack([unaries[0], unaries[2][[0, 1, 1]]])),
                                 **INFERENCE.kwargs())
    np.testing.assert_allclose(stacked[0].numpy(), batched[0], atol=1e-6)


def test_bad_inputs():
    with pytest.raises(DataError, match="features"):
        PermutohedralLattice(torch.zeros(5))
    with pytest.raises(DataError, match="does not match"):
        lattice_crf_batch([np.zeros((4, 5, 3), np.uint8)], [np.zeros((2, 5, 4), np.float32)], **INFERENCE.kwargs())
    with pytest.raises(DataError, match="B, 3, H, W"):
        lattice_crf_tensor(torch.zeros(1, 4, 5, 3, dtype=torch.uint8), torch.zeros(1, 2, 4, 5), **INFERENCE.kwargs())


@pytest.mark.cuda
def test_cuda_matches_cpu_path(fixtures_dir):
    img = _load(fixtures_dir / "crf" / "im1.png")
    unary = unary_from_probs(smooth_probs(*img.shape[:2], 5, seed=4))
    cpu = lattice_crf_batch([img], [unary], device="cpu", **DEEPLAB_TEST.kwargs())[0]
    gpu = lattice_crf_batch([img], [unary], device="cuda", **DEEPLAB_TEST.kwargs())[0]
    assert _agreement(gpu, cpu) >= 0.999
    assert np.abs(gpu - cpu).max() < 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy (the gpu extra)")
def test_cuda_hash_build_equals_sort_build(fixtures_dir):
    img = torch.from_numpy(_load(fixtures_dir / "voc" / "JPEGImages" / "2007_000032.jpg")).cuda()
    for sxy, srgb in ((80, 13), (1, None), (67, 3)):
        feats = torch.cat([crf_features(img, sxy, srgb), crf_features(img.flip(0), sxy, srgb)])
        ids = torch.arange(2, device="cuda").repeat_interleave(img.shape[0] * img.shape[1])
        hashed = PermutohedralLattice(feats, ids, build="hash")
        sorted_ = PermutohedralLattice(feats, ids, build="sort")
        assert hashed.n_points == sorted_.n_points
        values = torch.rand(feats.shape[0], 7, device="cuda")
        torch.testing.assert_close(hashed.filter(values), sorted_.filter(values), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# The batched training CRF (loss.crf.backend: lattice) against pydensecrf
# --------------------------------------------------------------------------------------------
TRAIN_KW = dict(iters=10, gauss_sxy=3, gauss_compat=3, bi_sxy=50, bi_srgb=5, bi_compat=10)


def _pydensecrf_train_labels(images, labels):
    """The authors' crf_inference_label per image, with pydensecrf's own unary_from_labels."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    out = []
    for img, lab in zip(images, labels):
        h, w = lab.shape
        crf = dcrf.DenseCRF2D(w, h, 21)
        crf.setUnaryEnergy(unary_from_labels(lab.astype(np.uint8), 21, gt_prob=0.7, zero_unsure=False))
        crf.addPairwiseGaussian(sxy=3, compat=3)
        crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(img), compat=10)
        out.append(np.array(crf.inference(10)).reshape(21, h, w).argmax(0))
    return np.stack(out)


def _batched(images, labels, **kw):
    return lattice_crf_labels(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2),
                              torch.from_numpy(labels).long(), n_labels=21, gt_prob=0.7, **{**TRAIN_KW, **kw}).numpy()


def _random_train_inputs(n, seed):
    """16x16 inputs of several kinds: blocky colour regions with noisy labels, uniform noise,
    a few quantised colours, near-constant images, labels with 1-21 classes."""
    from test_dense import _blocky

    rng = np.random.default_rng(seed)
    parts = [_blocky(n // 4, seed)]
    noise = rng.integers(0, 256, (n // 4, 16, 16, 3), dtype=np.uint8)
    parts.append((noise, rng.choice(rng.choice(21, 3, replace=False), (n // 4, 16, 16))))
    quant = (rng.integers(0, 4, (n // 4, 16, 16, 3)) * 85).astype(np.uint8)
    parts.append((quant, np.where(quant[..., 0] > 100, 20, rng.integers(0, 21, (n // 4, 16, 16)))))
    flat = np.clip(rng.integers(60, 200, (n // 4, 1, 1, 3)) + rng.normal(0, 2, (n // 4, 16, 16, 3)), 0, 255)
    parts.append((flat.astype(np.uint8), rng.integers(0, 21, (n // 4, 16, 16))))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_training_crf_gives_pydensecrf_labels_on_random_inputs():
    images, labels = _random_train_inputs(240, seed=21)
    ref = _pydensecrf_train_labels(images, labels)
    ours = _batched(images, labels)
    assert (ref != labels).mean() > 0.05                     # the CRF really changes these labels
    assert int((ours != ref).sum()) == 0, f"{int((ours != ref).sum())} of {ref.size} pixels differ"


def test_training_crf_gives_pydensecrf_labels_on_real_photo_crops(fixtures_dir):
    from test_dense import _noisy_real_crops

    images, labels = _noisy_real_crops(fixtures_dir, 240, seed=22)
    ref = _pydensecrf_train_labels(images, labels)
    ours = _batched(images, labels)
    assert (ref != labels).mean() > 0.05
    assert int((ours != ref).sum()) == 0, f"{int((ours != ref).sum())} of {ref.size} pixels differ"


def test_batched_features_equal_per_image_features_and_batch_equals_single_images():
    images, labels = _random_train_inputs(8, seed=23)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    for sxy, srgb in ((3, None), (50, 5)):
        per_image = torch.cat([crf_features(torch.from_numpy(im), sxy, srgb) for im in images])
        assert torch.equal(batched_crf_features(batch, sxy, srgb), per_image)
    together = _batched(images, labels)
    for i in range(len(images)):
        assert np.array_equal(together[i], _batched(images[i:i + 1], labels[i:i + 1])[0])
    assert together.dtype == np.int64
    assert np.array_equal(_batched(images, labels, iters=0), labels)   # zero iterations: the argmax of the unary
    empty = lattice_crf_labels(torch.zeros(0, 3, 16, 16, dtype=torch.uint8), torch.zeros(0, 16, 16, dtype=torch.long))
    assert empty.shape == (0, 16, 16)


def test_training_crf_backends_and_their_config_key():
    from hsc_fast.config import load_config
    from hsc_fast.crf.train import TRAIN_CRF_BACKENDS, train_crf_fn
    from hsc_fast.errors import ConfigError

    for preset in ("hsc_eps_official", "hsc_paper", "demo", "configs/ablation/demo.yaml"):
        assert load_config(preset).loss.crf.backend == "lattice", preset
    with pytest.raises(ConfigError, match="loss.crf.backend"):
        load_config("hsc_eps_official", ["loss.crf.backend=exact"])
    with pytest.raises(ConfigError, match="loss.crf.backend"):
        train_crf_fn("exact")
    images, labels = _random_train_inputs(12, seed=24)
    img_t, lab_t = torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels)
    kw = dict(n_labels=21, gt_prob=0.7, **TRAIN_KW)
    ref = _pydensecrf_train_labels(images, labels)
    outs = {b: train_crf_fn(b)(img_t, lab_t, **kw) for b in TRAIN_CRF_BACKENDS}
    assert np.array_equal(outs["pydensecrf"].numpy(), ref) and np.array_equal(outs["lattice"].numpy(), ref)
    assert all(o.dtype == torch.int64 and o.shape == lab_t.shape for o in outs.values())
    # bf16 autocast (the engine's, here on CPU) must not reach the filters
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for b in ("lattice", "dense"):
            assert torch.equal(train_crf_fn(b)(img_t, lab_t, **kw), outs[b]), b


def test_training_crf_bad_inputs():
    img = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    lab = torch.zeros(2, 16, 16, dtype=torch.long)
    with pytest.raises(DataError, match="uint8"):
        lattice_crf_labels(img.float(), lab)
    with pytest.raises(DataError, match="labels"):
        lattice_crf_labels(img, lab[:1])
    with pytest.raises(DataError, match=r"\[0, 20\]"):
        lattice_crf_labels(img, lab + 21)


@pytest.mark.cuda
def test_training_crf_on_cuda_equals_cpu():
    images, labels = _random_train_inputs(24, seed=25)
    cpu = _batched(images, labels)
    gpu = lattice_crf_labels(torch.from_numpy(images).permute(0, 3, 1, 2).cuda(), torch.from_numpy(labels).cuda(),
                             n_labels=21, gt_prob=0.7, **TRAIN_KW)
    assert gpu.device.type == "cuda"
    assert np.array_equal(gpu.cpu().numpy(), cpu)
