"""PSA / AffinityNet random walk (Ahn & Kwak, CVPR 2018): pair offsets, affinities, propagation.

Facts reproduced from the authors' code (jiwoon-ahn/psa):

* Pairs (tool/pyutils.py ``get_indices_of_pairs``, voc12/data.py ``ExtractAffinityLabelInRadius``):
  the HALF-PLANE offset set ``(0, 1..r-1)`` then, for ``dy = 1..r-1``, ``dx = -(r-1)..r-1`` with
  ``dx^2 + dy^2 < r^2`` (strict), in that order: 34 offsets for r = 5 at stride 8. Each unordered
  pair {p, p+o} appears once; the opposite direction comes from symmetry. The authors only keep
  pairs whose FIRST pixel p lies in rows [0, H-r+1) and columns [r-1, W-r+1) (the "cropped from"
  region), so p+o is always in the image: ``psa_crop=True`` reproduces that subset
  (``refine.pairs: psa_crop``); the default keeps every pair whose both ends are in the image
  (``refine.pairs: all``), which is NOT PSA's computation: +17 % pairs on a 56x56 grid, +75 % on
  19x19, and a different transition matrix and walk. The banded walk equals the dense matrix
  powers for whichever pair set the affinities hold (0 = no pair).
* Affinity (network/resnet38_aff.py ``forward``): a_{p,p+o} = exp(-mean_c |f_p - f_{p+o}|).
* Walk (infer_aff.py): A = dense symmetric matrix with A_pq = A_qp = a_pq on the pairs and
  A_pp = 1 (the self-loop), raised elementwise to beta (8); T = A / column sums (each COLUMN of T
  sums to 1); T is squared logt (8) times, T^(2^logt); cam_rw = cam_vec @ T with cam_vec (C, HW).
  So (v T)_q = sum_p v_p A_pq / sum_p A_pq: every step replaces a pixel by a weighted AVERAGE of
  its neighbourhood. Constants stay constant and values stay within [min, max]; the per-channel
  total is NOT conserved (that would need row-normalisation).
* Inference input (infer_aff.py): CAM with a background channel (1 - max_k fg_k)^alpha, alpha 16;
  zero-padded to a multiple of 8 and average-pooled 8x8 (``downsample_cam``); after the walk
  bilinear upsampling to the padded size, cropped, argmax (``upsample_cam``). The image is padded
  the same way (0 after normalisation) before the network (``refine.walk_pad8``).

Layouts: features (N, C, H, W); affinities (N, K, H, W) with ``affinity[:, k, y, x]`` the pair
((y, x), (y+dy_k, x+dx_k)); invalid pairs hold 0.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from hsc_fast.errors import ConfigError, DataError

PSA_RADIUS = 5
PSA_BETA = 8
PSA_LOGT = 8
PSA_RW_ALPHA = 16
PSA_STRIDE = 8


# ------------------------------------------------------------------------------------------------
# Offsets and validity
# ------------------------------------------------------------------------------------------------
def _check_radius(radius) -> int:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ConfigError(f"affinity radius: expected an integer >= 1, got {radius!r}")
    return radius


@functools.lru_cache(maxsize=None)
def _offsets(radius: int) -> tuple[tuple[int, int], ...]:
    r = radius
    out = [(0, dx) for dx in range(1, r)]
    out += [(dy, dx) for dy in range(1, r) for dx in range(-r + 1, r) if dx * dx + dy * dy < r * r]
    return tuple(out)


def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """PSA's half-plane offsets (dy, dx) within ``radius`` (distance < radius), in PSA's order.

    radius 1 -> [] (no pairs), 2 -> 4 (the 8-neighbourhood halved), 5 -> 34. The full symmetric
    neighbourhood is these offsets and their negatives.
    """
    return list(_offsets(_check_radius(radius)))


def radius_for_pairs(k: int) -> int:
    """The radius whose offset set has ``k`` offsets (the inverse of len(pair_offsets(r)))."""
    for r in range(1, 65):
        n = len(_offsets(r))
        if n == k:
            return r
        if n > k:
            break
    raise DataError(f"affinity: {k} pair channels is not len(pair_offsets(r)) for any radius "
                    "(expected 0, 4, 12, 22, 34, ... for radius 1, 2, 3, 4, 5); pass radius=")


def pair_validity(height: int, width: int, radius: int, *, psa_crop: bool = False,
                  device=None) -> torch.Tensor:
    """(K, H, W) bool: pair k at (y, x) has both ends in the image (and, with ``psa_crop``, its
    first end in PSA's cropped region rows [0, H-r+1), columns [r-1, W-r+1))."""
    offs = pair_offsets(radius)
    ys = torch.arange(height, device=device).view(1, -1, 1)
    xs = torch.arange(width, device=device).view(1, 1, -1)
    if not offs:
        return torch.zeros((0, height, width), dtype=torch.bool, device=device)
    dy = torch.tensor([o[0] for o in offs], device=device).view(-1, 1, 1)
    dx = torch.tensor([o[1] for o in offs], device=device).view(-1, 1, 1)
    ty, tx = ys + dy, xs + dx
    valid = (ty >= 0) & (ty < height) & (tx >= 0) & (tx < width)
    if psa_crop:
        rf = radius - 1
        valid = valid & (ys < height - rf) & (xs >= rf) & (xs < width - rf)
    return valid


def shift_to_pair_end(x: torch.Tensor, offset: tuple[int, int], fill: float = 0.0) -> torch.Tensor:
    """y[..., i, j] = x[..., i+dy, j+dx] (``fill`` outside the image): the value at each pair's
    second end."""
    dy, dx = offset
    h, w = x.shape[-2:]
    pad = (max(-dx, 0), max(dx, 0), max(-dy, 0), max(dy, 0))  # left, right, top, bottom
    xp = F.pad(x, pad, value=fill) if any(pad) else x
    top, left = max(dy, 0), max(dx, 0)
    return xp[..., top:top + h, left:left + w]


def _check_4d(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise DataError(f"{name}: expected a (N, C, H, W) tensor, got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    return x


# ------------------------------------------------------------------------------------------------
# Affinities
# ------------------------------------------------------------------------------------------------
def pairwise_affinity(feat: torch.Tensor, radius: int = PSA_RADIUS, *, psa_crop: bool = False) -> torch.Tensor:
    """(N, C, H, W) features -> (N, K, H, W): a[:, k, y, x] = exp(-mean_c |f(y,x) - f(y+dy_k, x+dx_k)|).

    Pairs that leave the image (or PSA's cropped region with ``psa_crop``) are 0 (see
    ``pair_validity``). Differentiable; one offset at a time so memory stays O(N*C*H*W).
    """
    _check_4d(feat, "pairwise_affinity feat")
    n, _, h, w = feat.shape
    offs = pair_offsets(radius)
    if not offs:
        return feat.new_zeros((n, 0, h, w))
    valid = pair_validity(h, w, radius, psa_crop=psa_crop, device=feat.device)
    affs = [torch.exp(-(feat - shift_to_pair_end(feat, o)).abs().mean(dim=1)) for o in offs]
    aff = torch.stack(affs, dim=1)
    return torch.where(valid.unsqueeze(0), aff, torch.zeros_like(aff))


# ------------------------------------------------------------------------------------------------
# Random walk
# ------------------------------------------------------------------------------------------------
def _walk_inputs(cam, affinity, radius, beta, logt):
    _check_4d(cam, "random_walk cam")
    _check_4d(affinity, "random_walk affinity")
    if cam.shape[0] != affinity.shape[0] or cam.shape[-2:] != affinity.shape[-2:]:
        raise DataError(f"random_walk: cam {tuple(cam.shape)} and affinity {tuple(affinity.shape)} "
                        "must share N, H and W")
    if isinstance(logt, bool) or not isinstance(logt, int) or logt < 0:
        raise ConfigError(f"random_walk logt: expected an integer >= 0, got {logt!r}")
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ConfigError(f"random_walk beta: expected a number > 0, got {beta!r}")
    radius = radius_for_pairs(affinity.shape[1]) if radius is None else _check_radius(radius)
    if len(pair_offsets(radius)) != affinity.shape[1]:
        raise DataError(f"random_walk: radius {radius} has {len(pair_offsets(radius))} offsets, "
                        f"affinity has {affinity.shape[1]} channels")
    dtype = torch.promote_types(cam.dtype, torch.float32)
    h, w = cam.shape[-2:]
    valid = pair_validity(h, w, radius, device=cam.device)
    # the clamp keeps a ** beta real and the mask makes out-of-image pairs exactly 0
    a = torch.where(valid, affinity.to(dtype).clamp(min=0.0), torch.zeros((), dtype=dtype, device=cam.device))
    return cam.to(dtype), a ** beta, pair_offsets(radius)


def banded_transition(weights: torch.Tensor, offsets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Column-normalised banded transition of the symmetric matrix A (A_pp = 1, A_{p,p+o} = w_o(p)).

    weights (N, K, H, W) = a^beta. Returns (self (N,1,H,W), fwd (N,K,H,W), rev (N,K,H,W)) with, for
    the target pixel q: self = 1/D_q, fwd[k] = A_{q+o_k, q}/D_q = w_k(q)/D_q,
    rev[k] = A_{q-o_k, q}/D_q = w_k(q-o_k)/D_q, and D_q = 1 + sum_k w_k(q) + sum_k w_k(q-o_k).
    """
    rev = torch.stack([shift_to_pair_end(weights[:, k], (-dy, -dx)) for k, (dy, dx) in enumerate(offsets)], 1) \
        if offsets else torch.zeros_like(weights)
    degree = 1.0 + weights.sum(dim=1, keepdim=True) + rev.sum(dim=1, keepdim=True)
    return 1.0 / degree, weights / degree, rev / degree


def random_walk_step(v: torch.Tensor, self_w, fwd, rev, offsets) -> torch.Tensor:
    """One step v <- v T: (vT)_q = self_q v_q + sum_k fwd_k(q) v_{q+o_k} + rev_k(q) v_{q-o_k}."""
    out = v * self_w
    for k, (dy, dx) in enumerate(offsets):
        out = out + fwd[:, k:k + 1] * shift_to_pair_end(v, (dy, dx)) \
            + rev[:, k:k + 1] * shift_to_pair_end(v, (-dy, -dx))
    return out


def random_walk(cam: torch.Tensor, affinity: torch.Tensor, *, beta: float = PSA_BETA, logt: int = PSA_LOGT,
                radius: int | None = None) -> torch.Tensor:
    """PSA's propagation cam_rw = cam T^(2^logt), without the HW x HW matrix.

    cam (N, C, H, W) >= 0 (any channels, e.g. bg + 20 fg), affinity (N, K, H, W) over
    ``pair_offsets(radius)`` (radius inferred from K when not given). T is the column-normalised
    symmetric matrix of a^beta with unit self-loops (module docstring); the walk applies it
    t = 2^logt times as banded shifts, batched over N and C, in at least float32, on any device.
    """
    v, weights, offsets = _walk_inputs(cam, affinity, radius, beta, logt)
    self_w, fwd, rev = banded_transition(weights, offsets)
    for _ in range(2 ** logt):
        v = random_walk_step(v, self_w, fwd, rev, offsets)
    return v


def dense_affinity_matrix(affinity: torch.Tensor, offsets, beta: float) -> torch.Tensor:
    """(N, K, H, W) pair affinities -> (N, HW, HW) symmetric A^beta with A_pp = 1 (PSA's to_dense)."""
    n, _, h, w = affinity.shape
    hw = h * w
    mat = torch.zeros((n, hw, hw), dtype=affinity.dtype, device=affinity.device)
    ys, xs = torch.meshgrid(torch.arange(h, device=affinity.device), torch.arange(w, device=affinity.device),
                            indexing="ij")
    for k, (dy, dx) in enumerate(offsets):
        ty, tx = ys + dy, xs + dx
        inside = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
        p = (ys * w + xs)[inside]
        q = (ty * w + tx)[inside]
        vals = affinity[:, k][:, inside] ** beta
        mat[:, p, q] = vals
        mat[:, q, p] = vals
    idx = torch.arange(hw, device=affinity.device)
    mat[:, idx, idx] = 1.0
    return mat


def random_walk_dense(cam: torch.Tensor, affinity: torch.Tensor, *, beta: float = PSA_BETA, logt: int = PSA_LOGT,
                      radius: int | None = None) -> torch.Tensor:
    """Reference for ``random_walk`` as infer_aff.py computes it, for small inputs: dense A^beta,
    T = A / A.sum(0), squared logt times, cam_vec @ T. O((HW)^2) memory."""
    v, weights, offsets = _walk_inputs(cam, affinity, radius, 1.0, logt)  # beta applied below
    n, c, h, w = v.shape
    mat = dense_affinity_matrix(weights, offsets, beta)
    trans = mat / mat.sum(dim=1, keepdim=True)
    for _ in range(logt):
        trans = trans @ trans
    return (v.reshape(n, c, h * w) @ trans).reshape(n, c, h, w)


# ------------------------------------------------------------------------------------------------
# PSA's inference around the walk
# ------------------------------------------------------------------------------------------------
def add_background(cams_fg: torch.Tensor, alpha: float = PSA_RW_ALPHA) -> torch.Tensor:
    """(N, K, H, W) fg scores in [0, 1] -> (N, K+1, H, W) with channel 0 = (1 - max_k fg_k)^alpha
    (infer_aff.py; bg FIRST like hsc_fast.crf.cam_to_crf_probs). K = 0 gives bg = 1."""
    _check_4d(cams_fg, "add_background cams_fg")
    top = cams_fg.amax(dim=1, keepdim=True) if cams_fg.shape[1] else cams_fg.new_zeros((cams_fg.shape[0], 1,
                                                                                          *cams_fg.shape[2:]))
    return torch.cat([(1.0 - top).clamp(min=0.0) ** alpha, cams_fg], dim=1)


def downsample_cam(cam: torch.Tensor, stride: int = PSA_STRIDE) -> torch.Tensor:
    """Zero-pad (bottom/right) to a multiple of ``stride``, then stride x stride mean pooling:
    (N, C, H, W) -> (N, C, ceil(H/s), ceil(W/s)), as infer_aff.py (np.pad + F.avg_pool2d)."""
    _check_4d(cam, "downsample_cam cam")
    h, w = cam.shape[-2:]
    ph, pw = -h % stride, -w % stride
    return F.avg_pool2d(F.pad(cam, (0, pw, 0, ph)), stride, stride)


def upsample_cam(cam_rw: torch.Tensor, size: tuple[int, int], stride: int = PSA_STRIDE) -> torch.Tensor:
    """Bilinear (align_corners=False) to the PADDED size (h*s, w*s), then cropped to ``size``
    (infer_aff.py's nn.Upsample + [:H, :W])."""
    _check_4d(cam_rw, "upsample_cam cam_rw")
    h, w = cam_rw.shape[-2:]
    up = F.interpolate(cam_rw, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    return up[..., :size[0], :size[1]]


def random_walk_cams(cams_fg: torch.Tensor, affinity: torch.Tensor, *, alpha: float = PSA_RW_ALPHA,
                     beta: float = PSA_BETA, logt: int = PSA_LOGT, stride: int = PSA_STRIDE) -> torch.Tensor:
    """infer_aff.py end to end on image-resolution fg CAMs (N, K, H, W) and feature-resolution
    affinities (N, K', ceil(H/s), ceil(W/s)) -> (N, K+1, H, W) walked scores, bg first; the
    argmax over channels is the label (0 = bg, k+1 = the k-th given class)."""
    size = tuple(cams_fg.shape[-2:])
    small = downsample_cam(add_background(cams_fg, alpha), stride)
    if small.shape[-2:] != affinity.shape[-2:]:
        raise DataError(f"random_walk_cams: CAMs {size} pool to {tuple(small.shape[-2:])} at stride {stride}, "
                        f"but the affinities are {tuple(affinity.shape[-2:])}")
    return upsample_cam(random_walk(small, affinity, beta=beta, logt=logt), size, stride)
