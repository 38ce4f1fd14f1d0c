"""hsc_fast.crf_lattice: agreement with pydensecrf, lattice properties, batching, CUDA build."""
import numpy as np
import pytest
import torch
from PIL import Image

from hsc_fast.crf import DEEPLAB_TEST, INFERENCE, crf_batch, crf_inference, unary_from_probs
from hsc_fast.crf_lattice import (PermutohedralLattice, crf_features, cupy_available, lattice_crf_batch,
                                  lattice_crf_tensor, normalized_filter)
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
