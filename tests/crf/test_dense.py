"""hsc_fast.crf.dense: the exact batched 16x16 training CRF against pydensecrf and by construction."""
import numpy as np
import pytest
import torch
from PIL import Image

from hsc_fast.crf import TRAIN, crf_labels, unary_from_label_map
from hsc_fast.crf.dense import dense_crf_labels, normalized_gaussian_kernel, unary_from_labels_torch
from hsc_fast.errors import ConfigError, DataError

TRAIN_KW = dict(iters=10, gauss_sxy=3, gauss_compat=3, bi_sxy=50, bi_srgb=5, bi_compat=10)


def _noisy_real_crops(fixtures_dir, n, seed):
    """16x16 crops of the fixture photos, with colour-clustered labels (2-4 of 21 classes) + 20% noise."""
    rng = np.random.default_rng(seed)
    paths = [fixtures_dir / "crf" / "im1.png", *sorted((fixtures_dir / "voc" / "JPEGImages").glob("*.jpg")),
             *sorted((fixtures_dir / "sbd" / "img").glob("*.jpg"))]
    photos = [np.array(Image.open(p).convert("RGB")) for p in paths]
    images, labels = [], []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(48, min(photo.shape[:2])))
        y, x = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        img = np.array(Image.fromarray(photo[y:y + side, x:x + side]).resize((16, 16), Image.BILINEAR))
        classes = rng.choice(21, int(rng.integers(2, 5)), replace=False)
        centres = img.reshape(-1, 3)[rng.choice(256, len(classes), replace=False)].astype(float)
        nearest = ((img.reshape(-1, 1, 3) - centres[None]) ** 2).sum(-1).argmin(1).reshape(16, 16)
        lab = np.where(rng.random((16, 16)) < 0.2, rng.choice(classes, (16, 16)), classes[nearest])
        images.append(img)
        labels.append(lab)
    return np.stack(images), np.stack(labels)


def _blocky(n, seed):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        classes = rng.choice(21, int(rng.integers(2, 5)), replace=False)
        region = rng.integers(0, len(classes), (4, 4)).repeat(4, 0).repeat(4, 1)
        img = np.clip(rng.integers(0, 256, (len(classes), 3))[region] + rng.normal(0, 10, (16, 16, 3)), 0, 255)
        images.append(img.astype(np.uint8))
        labels.append(np.where(rng.random((16, 16)) < 0.3, rng.choice(classes, (16, 16)), classes[region]))
    return np.stack(images), np.stack(labels)


def _ours(images, labels):
    return dense_crf_labels(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                            torch.from_numpy(labels).long(), n_labels=21, gt_prob=0.7, **TRAIN_KW).numpy()


def _reference(images, labels):
    return np.stack([crf_labels(im, lab, 21, gt_prob=0.7, **TRAIN.kwargs()) for im, lab in zip(images, labels)])


def test_agreement_with_pydensecrf_on_real_crops(fixtures_dir):
    images, labels = _noisy_real_crops(fixtures_dir, 120, seed=0)
    ref = _reference(images, labels)
    agreement = float((_ours(images, labels) == ref).mean())
    print(f"dense 16x16 CRF vs pydensecrf, real crops: {agreement:.4f} pixel agreement")
    assert (ref != labels).mean() > 0.05          # the CRF does change these labels
    assert agreement >= 0.98


def test_agreement_with_pydensecrf_on_synthetic_inputs():
    images, labels = _blocky(100, seed=1)
    rng = np.random.default_rng(2)
    noise_images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    noise_labels = rng.integers(0, 3, (40, 16, 16)) * 7
    for imgs, labs in ((images, labels), (noise_images, noise_labels)):
        agreement = float((_ours(imgs, labs) == _reference(imgs, labs)).mean())
        print(f"dense 16x16 CRF vs pydensecrf, synthetic: {agreement:.4f}")
        assert agreement >= 0.98


def test_batch_equals_single_and_dtype():
    images, labels = _blocky(6, seed=3)
    batched = _ours(images, labels)
    assert batched.dtype == np.int64 and batched.shape == (6, 16, 16)
    for i in range(6):
        assert np.array_equal(batched[i], _ours(images[i:i + 1], labels[i:i + 1])[0])


def test_unary_matches_numpy_reference():
    labels = np.random.default_rng(4).integers(0, 21, (3, 16, 16))
    ours = unary_from_labels_torch(torch.from_numpy(labels), 21, 0.7).numpy()
    for i in range(3):
        assert np.array_equal(ours[i].transpose(2, 0, 1), unary_from_label_map(labels[i], 21, 0.7))


def test_normalised_kernel_by_brute_force():
    rng = np.random.default_rng(5)
    f = rng.normal(size=(2, 7, 3)).astype(np.float32)
    k = normalized_gaussian_kernel(torch.from_numpy(f)).numpy()
    for b in range(2):
        raw = np.array([[np.exp(-0.5 * np.sum((f[b, i] - f[b, j]) ** 2)) for j in range(7)] for i in range(7)])
        norm = 1 / np.sqrt(raw.sum(1))
        np.testing.assert_allclose(k[b], norm[:, None] * raw * norm[None, :], rtol=1e-5)
    np.testing.assert_allclose(k, k.transpose(0, 2, 1), rtol=1e-6)


def test_zero_iterations_return_the_input_labels():
    images, labels = _blocky(4, seed=6)
    out = dense_crf_labels(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels),
                           **{**TRAIN_KW, "iters": 0})
    assert np.array_equal(out.numpy(), labels)


def test_bad_inputs():
    img = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    lab = torch.zeros(2, 16, 16, dtype=torch.long)
    with pytest.raises(DataError, match="uint8"):
        dense_crf_labels(img.float(), lab)
    with pytest.raises(DataError, match="labels"):
        dense_crf_labels(img, lab[:1])
    with pytest.raises(DataError, match=r"\[0, 20\]"):
        dense_crf_labels(img, lab + 255)
    with pytest.raises(ConfigError, match="gt_prob"):
        dense_crf_labels(img, lab, gt_prob=0.0)
    with pytest.raises(ConfigError, match="bi_srgb"):
        dense_crf_labels(img, lab, bi_srgb=0)
    with pytest.raises(DataError, match="too large"):
        dense_crf_labels(torch.zeros(1, 3, 128, 128, dtype=torch.uint8), torch.zeros(1, 128, 128, dtype=torch.long))


@pytest.mark.cuda
def test_cuda_equals_cpu():
    images, labels = _blocky(12, seed=7)
    img_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    cpu = dense_crf_labels(img_t, torch.from_numpy(labels))
    gpu = dense_crf_labels(img_t.cuda(), torch.from_numpy(labels).cuda())
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() == cpu).float().mean() >= 0.999
