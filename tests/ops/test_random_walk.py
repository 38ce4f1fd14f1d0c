"""PSA random walk: offsets, affinities, banded walk == dense matrix powers, averaging property."""
import numpy as np
import pytest
import torch

from hsc_fast.errors import ConfigError, DataError
from hsc_fast.ops.random_walk import (add_background, downsample_cam, pair_offsets, pair_validity,
                                      pairwise_affinity, radius_for_pairs, random_walk, random_walk_cams,
                                      random_walk_dense, upsample_cam)


def psa_indices_of_pairs(radius, h, w):
    """tool/pyutils.get_indices_of_pairs of the authors, re-derived from its description."""
    rf = radius - 1
    full = np.arange(h * w).reshape(h, w)
    frm = full[:h - rf, rf:w - rf].reshape(-1)
    to = [full[dy:dy + h - rf, rf + dx:rf + dx + w - 2 * rf].reshape(-1) for dy, dx in pair_offsets(radius)]
    return frm, np.stack(to)


def test_offsets_are_psas_half_plane_set():
    offs = pair_offsets(5)
    assert len(offs) == 34
    assert offs[:4] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert offs[4] == (1, -4) and offs[-1] == (4, 2)
    assert all(dy * dy + dx * dx < 25 for dy, dx in offs)
    assert not any((-dy, -dx) in offs for dy, dx in offs)          # half plane: no pair twice
    full = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dy * dy + dx * dx < 25}
    assert set(offs) | {(-dy, -dx) for dy, dx in offs} == full       # symmetric closure = disc
    assert [len(pair_offsets(r)) for r in (1, 2, 3, 4)] == [0, 4, 12, 22]
    assert radius_for_pairs(34) == 5 and radius_for_pairs(0) == 1
    with pytest.raises(DataError, match="pair channels"):
        radius_for_pairs(5)
    with pytest.raises(ConfigError, match="radius"):
        pair_offsets(0)


def test_psa_crop_validity_matches_the_authors_index_lists():
    h, w, r = 9, 13, 5
    valid = pair_validity(h, w, r, psa_crop=True)
    frm, to = psa_indices_of_pairs(r, h, w)
    ours = set()
    for k, (dy, dx) in enumerate(pair_offsets(r)):
        for y, x in zip(*np.nonzero(valid[k].numpy())):
            ours.add((k, y * w + x, (y + dy) * w + x + dx))
    theirs = {(k, int(f), int(t)) for k in range(len(to)) for f, t in zip(frm, to[k])}
    assert ours == theirs
    assert pair_validity(h, w, r).sum() > valid.sum()                # the default keeps border pairs too


def test_pairwise_affinity_formula_and_invalid_pairs():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 6, 5, 7, generator=g)
    aff = pairwise_affinity(feat, 3)
    assert aff.shape == (2, 12, 5, 7)
    valid = pair_validity(5, 7, 3)
    for k, (dy, dx) in enumerate(pair_offsets(3)):
        for y in range(5):
            for x in range(7):
                if valid[k, y, x]:
                    want = torch.exp(-(feat[:, :, y, x] - feat[:, :, y + dy, x + dx]).abs().mean(1))
                    torch.testing.assert_close(aff[:, k, y, x], want)
                else:
                    assert (aff[:, k, y, x] == 0).all()
    assert (aff[:, valid] > 0).all() and (aff <= 1).all()


def _random_case(n, c, h, w, radius, seed):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(n, 4, h, w, generator=g, dtype=torch.float64)
    cam = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    return cam, pairwise_affinity(feat, radius)


@pytest.mark.parametrize("n, c, h, w, radius, logt", [
    (2, 3, 7, 5, 1, 3), (2, 3, 5, 9, 2, 4), (1, 21, 9, 7, 3, 8), (2, 21, 6, 11, 4, 5), (2, 3, 11, 9, 5, 8),
    (1, 3, 3, 4, 5, 6),   # smaller than the radius: most pairs leave the image
])
def test_banded_walk_equals_dense_matrix_powers(n, c, h, w, radius, logt):
    """In float64 the two agree to round-off (1e-10). In float32 both drift ~5e-5 relative from the
    float64 result over 256 steps (PSA's own float32 matrix powers as much as the banded walk),
    so the float32 check uses 3e-4."""
    cam, aff = _random_case(n, c, h, w, radius, seed=h * w + radius)
    dense = random_walk_dense(cam, aff, beta=8, logt=logt)
    torch.testing.assert_close(random_walk(cam, aff, beta=8, logt=logt), dense, rtol=1e-10, atol=1e-12)
    banded = random_walk(cam.float(), aff.float(), beta=8, logt=logt)
    assert banded.dtype == torch.float32 and banded.shape == cam.shape
    torch.testing.assert_close(banded.double(), dense, rtol=3e-4, atol=1e-6)


def test_psa_cropped_affinities_walk_the_same_both_ways():
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(1, 4, 10, 12, generator=g, dtype=torch.float64)
    aff = pairwise_affinity(feat, 5, psa_crop=True)
    cam = torch.rand(1, 21, 10, 12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(random_walk(cam, aff, logt=5), random_walk_dense(cam, aff, logt=5))


def test_transition_columns_sum_to_one_so_the_walk_averages():
    """PSA divides by COLUMN sums: T^t's columns sum to 1, a constant CAM stays constant and the
    walked values stay within the input range; the per-channel total is not conserved."""
    cam, aff = _random_case(2, 3, 7, 8, 4, seed=11)
    ones = torch.ones_like(cam)
    torch.testing.assert_close(random_walk(ones, aff, logt=6), ones)
    out = random_walk(cam, aff, logt=6)
    lo, hi = cam.amin(dim=(2, 3), keepdim=True), cam.amax(dim=(2, 3), keepdim=True)
    assert (out >= lo - 1e-9).all() and (out <= hi + 1e-9).all()
    # the dense transition itself: columns sum to 1
    n, c, h, w = cam.shape
    eye = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    cols = random_walk_dense(eye, aff[:1].expand(h * w, -1, -1, -1), logt=2)   # row p of T^4, one image
    torch.testing.assert_close(cols.view(h * w, h * w).sum(0), torch.ones(h * w, dtype=torch.float64))


def test_walk_does_not_cross_a_zero_affinity_boundary():
    h, w = 6, 10
    feat = torch.zeros(1, 1, h, w)
    feat[..., :, 5:] = 1e4                       # exp(-1e4) == 0: no edge crosses column 4|5
    aff = pairwise_affinity(feat, 3)
    assert aff.amin() == 0 and aff.amax() == 1
    cam = torch.zeros(1, 2, h, w)
    cam[0, 0, 2, 1] = 1.0                        # a source on the left for channel 0
    cam[0, 1, 3, 8] = 1.0                        # and on the right for channel 1
    out = random_walk(cam, aff, beta=8, logt=6)
    assert (out[0, 0, :, 5:] == 0).all() and (out[0, 0, :, :5] > 0).all()
    assert (out[0, 1, :, :5] == 0).all() and (out[0, 1, :, 5:] > 0).all()
    # within a region of unit affinities the walk mixes towards a flat map
    left = out[0, 0, :, :5]
    assert (left.max() - left.min()) / left.mean() < 0.05


def test_inference_helpers_follow_infer_aff():
    fg = torch.tensor([[[[0.0, 0.5], [1.0, 0.2]]]])
    bg = add_background(fg, alpha=2)
    torch.testing.assert_close(bg[0, 0], torch.tensor([[1.0, 0.25], [0.0, 0.64]]))
    assert add_background(fg[:, :0], 16).shape == (1, 1, 2, 2)
    x = torch.arange(1 * 1 * 9 * 10, dtype=torch.float32).view(1, 1, 9, 10)
    small = downsample_cam(x, 8)
    assert small.shape == (1, 1, 2, 2)
    assert small[0, 0, 1, 1] == x[0, 0, 8:, 8:].sum() / 64       # zero padding counts in the mean
    assert upsample_cam(small, (9, 10), 8).shape == (1, 1, 9, 10)
    g = torch.Generator().manual_seed(0)
    cams = torch.rand(2, 3, 17, 20, generator=g)
    aff = pairwise_affinity(torch.randn(2, 4, 3, 3, generator=g), 2)
    out = random_walk_cams(cams, aff, logt=3)
    assert out.shape == (2, 4, 17, 20)
    with pytest.raises(DataError, match="pool to"):
        random_walk_cams(cams, aff[..., :2], logt=3)


def test_shape_errors_name_what_was_expected():
    cam, aff = _random_case(1, 3, 5, 5, 3, seed=0)
    with pytest.raises(DataError, match="share N, H and W"):
        random_walk(cam[..., :4], aff)
    with pytest.raises(DataError, match="radius 2 has 4 offsets"):
        random_walk(cam, aff, radius=2)
    with pytest.raises(ConfigError, match="logt"):
        random_walk(cam, aff, logt=-1)


@pytest.mark.cuda
def test_banded_walk_on_cuda_matches_cpu():
    cam, aff = _random_case(2, 21, 16, 20, 5, seed=5)
    cpu = random_walk(cam.float(), aff.float())
    gpu = random_walk(cam.float().cuda(), aff.float().cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-6)
