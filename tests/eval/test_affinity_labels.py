"""PSA affinity labels: the low/high-alpha rule, score pooling, and a CRF case with a known outcome."""
import numpy as np
import pytest

from hsc_fast.errors import ConfigError, DataError
from hsc_fast.eval.affinity_labels import (PSA_AFFINITY_CRF, affinity_label_from_scores, affinity_label_map,
                                           downsample_scores)


def test_rule_on_hand_made_scores():
    keys = [4, 11]                              # VOC ids 5 and 12
    # four pixels: low fg(4) & high fg -> 5; low bg -> 255; low fg(11) & high bg -> 0; all ~0 -> 255
    low = np.array([[[0.1, 0.8, 0.1, 0.0]], [[0.7, 0.1, 0.1, 0.0]], [[0.2, 0.1, 0.8, 0.0]]], np.float32)
    high = np.array([[[0.0, 0.1, 0.9, 0.0]], [[0.9, 0.8, 0.0, 0.0]], [[0.1, 0.1, 0.1, 1e-6]]], np.float32)
    assert affinity_label_from_scores(low, high, keys).tolist() == [[5, 255, 0, 255]]
    with pytest.raises(DataError, match="K = 2 keys"):
        affinity_label_from_scores(low[:2], high[:2], keys)


def test_scores_pool_like_block_reduce_with_zero_padding():
    s = np.arange(2 * 10 * 9, dtype=np.float32).reshape(2, 10, 9)
    small = downsample_scores(s, 8)
    assert small.shape == (2, 2, 2)
    assert small[1, 0, 0] == pytest.approx(s[1, :8, :8].mean())
    assert small[0, 1, 1] == pytest.approx(s[0, 8:, 8:].sum() / 64)
    with pytest.raises(ConfigError, match="stride"):
        downsample_scores(s, 0)


def zones_case(size=48, r_in=10, r_out=17):
    """A red disc, a green ring around it, blue outside; CAM 1 / 0.15 / 0. The colours keep the
    bilateral kernel (sxy 80, srgb 13) inside each zone: on a flat image that kernel spans the
    whole picture and the CRF gives every pixel the majority label."""
    yy, xx = np.mgrid[:size, :size]
    d = np.sqrt((yy - size / 2) ** 2 + (xx - size / 2) ** 2)
    img = np.zeros((size, size, 3), np.uint8)
    img[d < r_in] = (220, 40, 40)
    img[(d >= r_in) & (d < r_out)] = (40, 220, 40)
    img[d >= r_out] = (40, 40, 220)
    cam = np.where(d < r_in, 1.0, np.where(d < r_out, 0.15, 0.0)).astype(np.float32)
    return img, cam[None], d


def test_strong_blob_gives_fg_centre_ignore_ring_and_bg_outside():
    """alpha 4: bg score (1-0.15)^4 = 0.52 beats the ring's 0.15, so only the disc is fg;
    alpha 32: (1-0.15)^32 = 0.006 loses to 0.15, so only the outside is bg; the ring is 255."""
    img, cams, d = zones_case()
    label = affinity_label_map(img, cams, [14], backend="pydensecrf")
    assert label.dtype == np.uint8 and label.shape == (48, 48)
    assert (label[d < 8] == 15).all()
    assert (label[(d > 12) & (d < 15)] == 255).all()
    assert (label[d > 19] == 0).all()
    assert set(np.unique(label)) == {0, 15, 255}


def test_psa_stride_pools_the_scores_first():
    img, cams, _ = zones_case()
    small = affinity_label_map(img, cams, [14], stride=8)
    assert small.shape == (6, 6)
    assert small[2:4, 2:4].tolist() == [[15, 15], [15, 15]] and small[0, 0] == 0
    assert PSA_AFFINITY_CRF.iters == 10


def test_input_errors_name_what_was_expected():
    img, cams, _ = zones_case(16, 4, 6)
    with pytest.raises(DataError, match="K = 2 given class keys"):
        affinity_label_map(img, cams, [1, 2])
    with pytest.raises(ConfigError, match="alpha_low < alpha_high"):
        affinity_label_map(img, cams, [1], alpha_low=32, alpha_high=4)
