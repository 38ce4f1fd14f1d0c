"""CAM helpers shared by the losses: normalisation, pseudo-labels, resizing, classification.

Layout: CAMs are (N,K+1,h,w) with the background LAST (channel K); image labels are (N,K)
multi-hot, and `label_with_bg` appends the always-present background. K comes from the tensors
(20 for VOC, 80 for COCO: hsc_fast.classes); pseudo-labels use K for the background.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hsc_fast.ops import upcast, LossInputError
from hsc_fast.precision import fp32_losses

CAM_EPS = 1e-5  # the official min-max normalisation epsilon


def label_with_bg(label: torch.Tensor) -> torch.Tensor:
    """(N,K) multi-hot -> (N,K+1,1,1) with a 1 appended for the background."""
    if label.dim() != 2 or label.shape[1] < 1:
        raise LossInputError(f"label: expected (N,K) multi-hot, got {tuple(label.shape)}")
    ones = torch.ones(label.shape[0], 1, dtype=label.dtype, device=label.device)
    return torch.cat([label, ones], dim=1)[:, :, None, None]


def check_cam(name: str, cam: torch.Tensor, label: torch.Tensor | None = None) -> None:
    """(N,K+1,h,w) with K >= 1; with ``label`` (N,K) the class counts must agree."""
    if cam.dim() != 4 or cam.shape[1] < 2:
        raise LossInputError(f"{name}: expected (N,K+1,h,w) with bg last, got {tuple(cam.shape)}")
    if label is not None and (label.dim() != 2 or label.shape[1] != cam.shape[1] - 1):
        raise LossInputError(f"{name}: {cam.shape[1]} channels need (N,{cam.shape[1] - 1}) image labels, "
                             f"got {tuple(label.shape)}")


def normalize_cam(cam: torch.Tensor, bg_threshold: float = 0.10) -> torch.Tensor:
    """Official per-view normalisation (no gradient), float32.

    ReLU; per image and channel, values below min+1e-5 are set to 0 and then
    (x - min - 1e-5) / (max - min + 1e-5) -- so those set to 0 end slightly negative (a constant
    channel becomes -1) exactly as in the authors' code; the last (background) channel = bg_threshold.
    """
    check_cam("cam", cam)
    x = F.relu(upcast(cam.detach()))
    flat = x.flatten(2)
    hi = flat.max(dim=-1).values[..., None, None]
    lo = flat.min(dim=-1).values[..., None, None]
    x = torch.where(x < lo + CAM_EPS, torch.zeros_like(x), x)
    out = (x - lo - CAM_EPS) / (hi - lo + CAM_EPS)
    out[:, -1] = bg_threshold
    return out


def label_scores(cam_norm: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """softmax over the K+1 channels of cam_norm * [label, 1] (absent classes get logit 0)."""
    check_cam("cam_norm", cam_norm, label)
    return F.softmax(cam_norm * label_with_bg(label).to(cam_norm.dtype), dim=1)


def pseudo_labels(cam_norm: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(N,h,w) int64 in 0..K (K = background): argmax of the label-masked softmax (first maximum on ties)."""
    return label_scores(cam_norm, label).argmax(dim=1)


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=True (the official resize); identity when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def contrast_hw(contrast_size: int, view1: torch.Tensor) -> tuple[int, int]:
    """Resolution the HSC losses compare at: contrast_size square (official 16), or for 0 the
    view-1 feature resolution (view 2 is then upsampled to it, so pixels pair up across views)."""
    if contrast_size < 0:
        raise LossInputError(f"loss.contrast_size: must be >= 0, got {contrast_size}")
    if contrast_size == 0:
        return tuple(view1.shape[-2:])
    return (contrast_size, contrast_size)


def resize_to_contrast(x: torch.Tensor, contrast_size: int, view1: torch.Tensor | None = None) -> torch.Tensor:
    """Resize a (N,C,h,w) map to the contrast resolution (see `contrast_hw`)."""
    return resize_to(x, contrast_hw(contrast_size, x if view1 is None else view1))


@fp32_losses
def classification_loss(cam: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Multilabel soft-margin on the global average pool of the K foreground channels."""
    check_cam("cam", cam, label)
    pred = upcast(cam).mean(dim=(2, 3))
    return F.multilabel_soft_margin_loss(pred[:, :-1], upcast(label))


def crf_images(img: torch.Tensor, size: tuple[int, int], mean, std) -> torch.Tensor:
    """The training-CRF image, computed as the authors do: the normalised (N,3,H,W) float32 image
    resized on the CPU (bilinear, align_corners) to `size`, then ``x * std255 + mean255`` in
    float32 with the constants multiplied in Python first (``float32(0.224 * 255)``, not
    ``float32(0.224) * 255``: the green one differs by 1 ulp, enough to move a pixel by one grey
    level), truncated to uint8 like their ``astype(np.uint8)`` (clamped first: out-of-range values
    would wrap there). Returned on `img`'s device. tests/engine/test_official_step.py pins a known input."""
    small = resize_to(upcast(img.detach()).cpu(), size)   # CPU: CUDA's bilinear kernel may round differently
    mean255 = torch.tensor([float(m) * 255 for m in mean], dtype=torch.float32)[None, :, None, None]
    std255 = torch.tensor([float(s) * 255 for s in std], dtype=torch.float32)[None, :, None, None]
    pixels = small.float() * std255 + mean255
    return pixels.clamp(0, 255).floor().to(torch.uint8).to(img.device)
