"""hsc_fast.crf: wrapper == direct pydensecrf calls, pool == serial, presets, seeds layout, input checks."""
import numpy as np
import pytest
from PIL import Image

import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from hsc_fast.crf import (DEEPLAB_TEST, INFERENCE, TRAIN, CrfParams, available_backends, cam_to_crf_probs,
                          crf_batch, crf_imap, crf_inference, crf_labels, unary_from_label_map, unary_from_probs)
from hsc_fast.errors import ConfigError, DataError


def _load(path, max_side=None):
    img = Image.open(path).convert("RGB")
    if max_side:
        img = img.crop((0, 0, min(img.width, max_side), min(img.height, max_side)))
    return np.ascontiguousarray(np.array(img))


def smooth_probs(h, w, n_labels, seed, cell=40, sharpness=3.0):
    """Spatially smooth random class probabilities (C, H, W) float32, like upsampled network scores."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n_labels, h // cell + 2, w // cell + 2)) * sharpness
    ys = np.linspace(0, coarse.shape[1] - 1.001, h)
    xs = np.linspace(0, coarse.shape[2] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[None, :, None], (xs - x0)[None, None, :]
    c = coarse
    logits = ((1 - fy) * (1 - fx) * c[:, y0][:, :, x0] + (1 - fy) * fx * c[:, y0][:, :, x0 + 1]
              + fy * (1 - fx) * c[:, y0 + 1][:, :, x0] + fy * fx * c[:, y0 + 1][:, :, x0 + 1])
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def direct_pydensecrf(img, unary, p: CrfParams):
    """The reference: pydensecrf called the way SEAM/PSA/HSC call it."""
    c, h, w = unary.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(c, -1)))
    d.addPairwiseGaussian(sxy=p.gauss_sxy, compat=p.gauss_compat)
    d.addPairwiseBilateral(sxy=p.bi_sxy, srgb=p.bi_srgb, rgbim=np.copy(img), compat=p.bi_compat)
    return np.array(d.inference(p.iters)).reshape(c, h, w)


@pytest.fixture(scope="module")
def real_images(fixtures_dir):
    return [_load(fixtures_dir / "crf" / "im1.png")] + [
        _load(p) for p in sorted((fixtures_dir / "voc" / "JPEGImages").glob("*.jpg"))]


def test_presets_match_published_recipes():
    assert (INFERENCE.gauss_sxy, INFERENCE.gauss_compat, INFERENCE.bi_sxy, INFERENCE.bi_srgb, INFERENCE.bi_compat,
            INFERENCE.iters) == (3, 3, 80, 13, 10, 8)
    assert (DEEPLAB_TEST.gauss_sxy, DEEPLAB_TEST.gauss_compat, DEEPLAB_TEST.bi_sxy, DEEPLAB_TEST.bi_srgb,
            DEEPLAB_TEST.bi_compat, DEEPLAB_TEST.iters) == (1, 3, 67, 3, 4, 10)
    assert (TRAIN.gauss_sxy, TRAIN.gauss_compat, TRAIN.bi_sxy, TRAIN.bi_srgb, TRAIN.bi_compat, TRAIN.iters) == \
        (3, 3, 50, 5, 10, 10)
    assert set(available_backends()) >= {"pydensecrf", "gpu"}


def test_unaries_equal_pydensecrf_utils():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=(7, 9)).transpose(2, 0, 1).astype(np.float32)
    probs[0, 0, 0] = 0.0                                   # exercises the 1e-5 clip
    assert np.array_equal(unary_from_probs(probs), unary_from_softmax(probs).reshape(probs.shape))
    labels = rng.integers(0, 21, size=(7, 9))
    ours = unary_from_label_map(labels, 21, 0.7)
    ref = unary_from_labels(labels, 21, gt_prob=0.7, zero_unsure=False)
    assert ours.dtype == np.float32 and np.array_equal(ours.reshape(21, -1), ref)


@pytest.mark.parametrize("preset", [INFERENCE, DEEPLAB_TEST], ids=["inference", "deeplab_test"])
def test_crf_inference_equals_direct_pydensecrf(real_images, preset):
    for k, img in enumerate(real_images):
        n_labels = 21 if k == 1 and preset is INFERENCE else 3
        probs = smooth_probs(*img.shape[:2], n_labels, seed=k)
        ours = crf_inference(img, probs, **preset.kwargs())
        ref = direct_pydensecrf(img, unary_from_softmax(probs).reshape(probs.shape), preset)
        assert ours.shape == probs.shape and ours.dtype == np.float32
        assert np.array_equal(ours, ref)
        # the CRF must actually do something on these inputs, else equality proves little
        assert (ours.argmax(0) != probs.argmax(0)).mean() > 0.005


def test_crf_labels_equals_direct_pydensecrf(real_images):
    img = real_images[0][:48, :64].copy()
    rng = np.random.default_rng(3)
    labels = np.where(rng.random((48, 64)) < 0.3, rng.integers(0, 21, (48, 64)),
                      (np.arange(64)[None, :] // 22 + 5).repeat(48, 0))
    ours = crf_labels(img, labels, 21, gt_prob=0.7, **TRAIN.kwargs())
    unary = unary_from_labels(labels, 21, gt_prob=0.7, zero_unsure=False).reshape(21, 48, 64)
    ref = direct_pydensecrf(img, unary, TRAIN).argmax(0)
    assert ours.dtype == np.int64 and np.array_equal(ours, ref)
    probs = crf_labels(img, labels, 21, gt_prob=0.7, return_probs=True, **TRAIN.kwargs())
    assert probs.shape == (21, 48, 64) and np.array_equal(probs.argmax(0), ref)


def test_cam_to_crf_probs_puts_background_first():
    cams = np.array([[[0.2, 1.0]], [[0.5, 0.0]]], dtype=np.float32)      # K=2, H=1, W=2
    out = cam_to_crf_probs(cams, alpha=4)
    assert out.shape == (3, 1, 2)
    np.testing.assert_allclose(out[0], [[0.5 ** 4, 0.0]], rtol=1e-6)
    assert np.array_equal(out[1:], cams)
    assert np.array_equal(cam_to_crf_probs(np.zeros((0, 2, 3), np.float32), 7), np.ones((1, 2, 3), np.float32))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        cam_to_crf_probs(cams * 2, alpha=4)
    with pytest.raises(ConfigError, match="alpha"):
        cam_to_crf_probs(cams, alpha=0)


@pytest.mark.parametrize("bad", [dict(iters=-1), dict(iters=2.5), dict(iters=True), dict(gauss_sxy=0),
                                 dict(bi_srgb=-3), dict(bi_sxy=float("nan")), dict(bi_compat=float("inf"))])
def test_bad_parameters_raise_config_error(bad):
    name = next(iter(bad))
    with pytest.raises(ConfigError, match=name):
        CrfParams(**bad)
    img = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ConfigError, match=name):
        crf_inference(img, np.full((2, 4, 5), 0.5, np.float32), **bad)


def test_bad_inputs_raise_data_error():
    img = np.zeros((4, 5, 3), np.uint8)
    probs = np.full((2, 4, 5), 0.5, np.float32)
    with pytest.raises(DataError, match="uint8"):
        crf_inference(img.astype(np.float32), probs)
    with pytest.raises(DataError, match="uint8"):
        crf_inference(img[:, :, :2], probs)
    with pytest.raises(DataError, match="do not match"):
        crf_inference(img, probs[:, :3])
    with pytest.raises(DataError, match="finite"):
        crf_inference(img, np.where(probs > 0, np.nan, probs))
    with pytest.raises(DataError, match="255"):
        crf_labels(img, np.full((4, 5), 255), 21)
    with pytest.raises(ConfigError, match="gt_prob"):
        crf_labels(img, np.zeros((4, 5), np.int64), 21, gt_prob=1.0)
    with pytest.raises(ConfigError, match="backend"):
        crf_inference(img, probs, backend="nope")
    with pytest.raises(ConfigError, match="workers"):
        crf_batch([img], [probs], workers=0)
    with pytest.raises(ConfigError, match="unknown"):
        crf_batch([img], [probs], sxy=3)
    with pytest.raises(DataError, match="2 images but 1"):
        crf_batch([img, img], [probs])


def _small_batch(real_images):
    crops = [real_images[0][:60, :80], real_images[1][40:100, 100:180], real_images[2][:70, :50],
             real_images[0][100:150, 200:300]]
    crops = [np.ascontiguousarray(c) for c in crops]
    return crops, [smooth_probs(*c.shape[:2], 2 + k, seed=10 + k, cell=12) for k, c in enumerate(crops)]


def test_serial_batch_equals_single_calls(real_images):
    images, probs = _small_batch(real_images)
    serial = crf_batch(images, probs, workers=1, **DEEPLAB_TEST.kwargs())
    for img, pr, out in zip(images, probs, serial):
        assert np.array_equal(out, crf_inference(img, pr, **DEEPLAB_TEST.kwargs()))
    labels = list(crf_imap(zip(images, probs), return_labels=True, **DEEPLAB_TEST.kwargs()))
    assert all(np.array_equal(lab, out.argmax(0)) for lab, out in zip(labels, serial))
