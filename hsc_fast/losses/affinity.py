"""AffinityNet training targets and loss (PSA, Ahn & Kwak CVPR 2018; train_aff.py, voc12/data.py).

Targets over the pairs of hsc_fast.ops.random_walk.pair_offsets(radius) at feature resolution,
from a label map with bg = ``bg_index`` (0 in VOC-id maps), fg classes, 255 = ignore
(ExtractAffinityLabelInRadius): a pair (p, q) is VALID when both ends are in the image and
neither is 255;
  bg_pos = valid & y_p == y_q == bg,   fg_pos = valid & y_p == y_q != bg,   neg = valid & y_p != y_q.
``psa_crop=True`` keeps only PSA's pairs (first end in rows [0, H-r+1), columns [r-1, W-r+1)):
refine.pairs: psa_crop. The default keeps every in-image pair (+17 % pairs on a 56x56 grid): a
different loss, not the same one.

Loss (train_aff.py), sums over the whole batch (DataParallel gathers every GPU's pairs first;
refine.loss_reduction: batch does the same over ranks, rank = each rank's own means):
  L_bg  = sum_{bg_pos} -log(a + eps) / (|bg_pos| + eps)
  L_fg  = sum_{fg_pos} -log(a + eps) / (|fg_pos| + eps)
  L_neg = sum_{neg} -log(1 + eps - a) / (|neg| + eps)
  L = L_bg / 4 + L_fg / 4 + L_neg / 2,   eps = 1e-5.
An empty set gives 0 (0 / eps), never NaN; a is clamped to [0, 1] so both logs stay >= log(eps).

Label resolution: PSA pools the two CRF SCORE maps 8x8 after the crop and applies its rule
afterwards (refine.label_pooling: scores; hsc_fast.engine.affinity_data). For labels stored as
image-size maps (refine.label_pooling: vote) ``downsample_labels`` takes each 8x8 block's most
frequent label instead (255 votes like a class; ties go to the smaller label, so bg before fg
before 255; pixels past the image edge do not vote): close to, not identical with, PSA's rule.
"""
from __future__ import annotations

import torch

from hsc_fast.classes import IGNORE_INDEX
from hsc_fast.errors import DataError
from hsc_fast.ops.random_walk import pair_offsets, pair_validity, shift_to_pair_end

PSA_LOSS_EPS = 1e-5
PSA_LOSS_WEIGHTS = {"bg": 0.25, "fg": 0.25, "neg": 0.5}


def affinity_targets(label: torch.Tensor, radius: int = 5, *, bg_index: int = 0, ignore_index: int = IGNORE_INDEX,
                     psa_crop: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, H, W) integer labels at feature resolution -> (bg_pos, fg_pos, neg), bool (N, K, H, W),
    pair k at (y, x) joining (y, x) and (y+dy_k, x+dx_k) (module docstring for the rule)."""
    if not isinstance(label, torch.Tensor) or label.dim() != 3 or label.dtype.is_floating_point:
        raise DataError("affinity_targets label: expected a (N, H, W) integer tensor, got "
                        f"{getattr(label, 'dtype', type(label).__name__)} {tuple(getattr(label, 'shape', ()))}")
    lab = label.long()
    h, w = lab.shape[-2:]
    offs = pair_offsets(radius)
    inside = pair_validity(h, w, radius, psa_crop=psa_crop, device=lab.device).unsqueeze(0)
    if not offs:
        empty = torch.zeros((lab.shape[0], 0, h, w), dtype=torch.bool, device=lab.device)
        return empty, empty.clone(), empty.clone()
    to = torch.stack([shift_to_pair_end(lab, o, fill=ignore_index) for o in offs], dim=1)
    frm = lab.unsqueeze(1)
    valid = inside & (frm != ignore_index) & (to != ignore_index)
    same = frm == to
    return valid & same & (frm == bg_index), valid & same & (frm != bg_index), valid & ~same


def _part(terms: torch.Tensor, mask: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    count = mask.sum().to(terms.dtype)
    # where() rather than a product: unselected terms cannot leak NaN into the sum or its gradient
    total = torch.where(mask, terms, torch.zeros_like(terms)).sum()
    return total / (count + eps), count


def global_count_scale(local_counts, global_counts, world_size: int, eps: float = PSA_LOSS_EPS) -> list[float]:
    """count_scale for affinity_loss: W x (local count + eps) / (global count + eps) per part, so the
    mean over W ranks of the scaled rank means is the mean over the whole global batch."""
    return [float(world_size * (lc + eps) / (gc + eps)) for lc, gc in zip(local_counts, global_counts)]


def affinity_loss(affinity: torch.Tensor, targets, *, eps: float = PSA_LOSS_EPS,
                  count_scale=None) -> tuple[torch.Tensor, dict]:
    """PSA's balanced affinity loss -> (total, {"bg", "fg", "neg": the three means,
    "bg_count", "fg_count", "neg_count": pair counts}); see the module docstring.
    ``count_scale`` (three factors, bg / fg / neg) multiplies the means: the trainer's way to turn
    rank-local means into shares of the global-batch mean (refine.loss_reduction: batch)."""
    bg_pos, fg_pos, neg = targets
    if not all(isinstance(m, torch.Tensor) and m.shape == affinity.shape for m in (bg_pos, fg_pos, neg)):
        raise DataError(f"affinity_loss: expected three masks shaped like the affinity {tuple(affinity.shape)}, got "
                        f"{[tuple(getattr(m, 'shape', ())) for m in (bg_pos, fg_pos, neg)]}")
    a = affinity.float().clamp(0.0, 1.0) if affinity.dtype in (torch.float16, torch.bfloat16) \
        else affinity.clamp(0.0, 1.0)
    pos_terms = -torch.log(a + eps)
    neg_terms = -torch.log(1.0 + eps - a)
    parts = {}
    for name, terms, mask in (("bg", pos_terms, bg_pos), ("fg", pos_terms, fg_pos), ("neg", neg_terms, neg)):
        parts[name], parts[f"{name}_count"] = _part(terms, mask.bool(), eps)
    if count_scale is not None:
        for name, factor in zip(("bg", "fg", "neg"), count_scale):
            parts[name] = parts[name] * factor
    total = sum(PSA_LOSS_WEIGHTS[k] * parts[k] for k in PSA_LOSS_WEIGHTS)
    return total, parts


def downsample_labels(label: torch.Tensor, size: tuple[int, int], *, stride: int = 8) -> torch.Tensor:
    """(N, H, W) integer labels 0..255 -> (N, h, w) int64, (h, w) = ``size`` = (ceil(H/s), ceil(W/s)):
    the most frequent label of each s x s block (module docstring)."""
    if not isinstance(label, torch.Tensor) or label.dim() != 3 or label.dtype.is_floating_point:
        raise DataError("downsample_labels label: expected a (N, H, W) integer tensor, got "
                        f"{getattr(label, 'dtype', type(label).__name__)} {tuple(getattr(label, 'shape', ()))}")
    n, h, w = label.shape
    hs, ws = -(-h // stride), -(-w // stride)
    if tuple(size) != (hs, ws):
        raise DataError(f"downsample_labels: a {h}x{w} label at stride {stride} gives {hs}x{ws} blocks, "
                        f"not the requested {tuple(size)}")
    lab = label.long()
    if lab.numel() and (lab.min() < 0 or lab.max() > 255):
        raise DataError(f"downsample_labels: expected labels in 0..255, got [{int(lab.min())}, {int(lab.max())}]")
    ys = torch.arange(h, device=lab.device) // stride
    xs = torch.arange(w, device=lab.device) // stride
    block = (torch.arange(n, device=lab.device).view(n, 1, 1) * hs + ys.view(1, h, 1)) * ws + xs.view(1, 1, w)
    # one histogram of 256 bins per block, then the first (smallest) most frequent label
    counts = torch.bincount((block * 256 + lab).reshape(-1), minlength=n * hs * ws * 256)
    return counts.view(n, hs, ws, 256).argmax(dim=-1)
