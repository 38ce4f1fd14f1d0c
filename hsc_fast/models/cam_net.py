"""The CAM network of HSC: backbone + CAM head + SEAM's PCM + the two contrast projectors.

forward(img) -> {
  "cam":      (N, C, h, w)  raw CAM, 1x1 conv without bias, background LAST channel,
  "pred":     (N, C)        its global average (class scores),
  "cam_rv":   (N, C, h, w)  PCM-refined CAM (when built), "pred_rv" its global average,
  "feat_psc": (N, 128, h, w) PSC projector (1x1 conv, no bias, ReLU),
  "feat_rsc": (N, 256, h, w) RSC/CSC projector,
}  with h, w = ceil(H/8), ceil(W/8) (448 -> 56, 128 -> 16).

Official behaviour reproduced (network/resnet38_eps_seam_hsc.py of HSC_WSSS):
- PCM: conv4 -> 64 and conv5 -> 128 (1x1, ReLU, on DETACHED features), concatenated after the
  image resized to the map size (3 channels first) -> 1x1 conv 195 -> 192; affinity = ReLU of the
  cosine similarity between positions, each column divided by its sum (+1e-5); cam_rv = cam' @ aff,
  where cam' is the detached CAM, ReLU'd and max-normalised per class, with the background channel
  set to 1 - max fg and every fg value below the per-pixel max fg set to 0.
- RSC/CSC projector "official": 3x3 conv 4096->256 (bias), BN, ReLU, 1x1 conv 256->256 (bias);
  "paper": two 1x1 conv-ReLU blocks 4096->256->256.
- All BatchNorm layers stay in eval mode with frozen affine (`frozen_bn`), the projector's too;
  conv1a and stage b2 are never trained (`freeze_stem`).
- Learning-rate groups (`param_groups`): backbone weights 1x (wd), backbone biases 2x (no wd),
  new-layer weights 10x (wd), new-layer biases 20x (no wd). The authors list the projector
  Sequential among the new layers, but their membership test only looks at single convs, so its
  convs train at 1x/2x: reproduced by `proj_lr_quirk` (default on, off gives 10x/20x).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from hsc_fast.config import ModelConfig, cam_channels
from hsc_fast.errors import ConfigError, WeightsError
from hsc_fast.models.backbones import build_backbone
from hsc_fast.models.mxnet_params import read_mxnet_params
from hsc_fast.models.state_files import read_torch_file
from hsc_fast.models.timm_backbone import resolve_weights

PCM_CONV4_DIM, PCM_CONV5_DIM, PCM_OUT_DIM = 64, 128, 192
RSC_PROJ_KINDS = ("official", "paper")
# The parts whose random init can draw from a stream of its own (`init_seeds`), in a fixed order:
# with one seed per part, a part's initial weights never depend on which other parts exist.
INIT_PARTS = ("backbone", "cam_head", "pcm", "psc_proj", "rsc_proj")
# The authors' flat parameter names of the heads -> ours (their checkpoints load as they are).
OFFICIAL_HEAD_ALIASES = {
    "fc8.": "cam_head.", "f8_3.": "pcm.conv4_proj.", "f8_4.": "pcm.conv5_proj.", "f9.": "pcm.fuse.",
    "proj_fc.": "psc_proj.0.", "extra_F.": "rsc_proj.",
}
LR_GROUPS = (  # name, lr multiplier, weight decay applies
    ("backbone_weight", 1.0, True), ("backbone_bias", 2.0, False),
    ("new_weight", 10.0, True), ("new_bias", 20.0, False),
)


def lr_group_dicts(members: Mapping[str, list], lr: float, weight_decay: float,
                   backbone_lr_mult: float = 1.0) -> list[dict]:
    """SGD groups for the LR_GROUPS names (``members``: name -> parameters), empty ones left out.
    The two backbone groups are scaled by ``backbone_lr_mult``; a ``quirk_<kind>`` member list (the
    projector of proj_lr_quirk, split off when the backbone is scaled) follows its backbone group at
    the unscaled 1x / 2x. Each dict: params, lr (= lr * lr_mult), lr_mult, name, weight_decay."""
    groups = []
    for name, mult, decay in LR_GROUPS:
        where, kind = name.split("_")
        wd = weight_decay if decay else 0.0
        scale = backbone_lr_mult if where == "backbone" else 1.0
        groups.append({"params": members.get(name, []), "lr": lr * mult * scale, "lr_mult": mult * scale,
                       "name": name, "weight_decay": wd})
        if where == "backbone":
            groups.append({"params": members.get(f"quirk_{kind}", []), "lr": lr * mult, "lr_mult": mult,
                           "name": f"quirk_{kind}", "weight_decay": wd})
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------------------------------------
# PCM
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def pcm_cam_input(cam: torch.Tensor) -> torch.Tensor:
    """The detached, normalised CAM that PCM propagates (background = last channel).

    ReLU; per image and class divide by (spatial max + 1e-5) after subtracting 1e-5 (ReLU'd);
    bg = 1 - max over fg; fg values below the per-pixel max fg become 0.
    """
    cam = F.relu(cam.detach())
    peak = cam.flatten(2).amax(dim=2)[..., None, None] + 1e-5
    norm = F.relu(cam - 1e-5) / peak
    fg = norm[:, :-1]
    fg_max = fg.amax(dim=1, keepdim=True)
    fg = torch.where(fg < fg_max, torch.zeros_like(fg), fg)
    return torch.cat([fg, 1.0 - fg_max], dim=1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class PixelCorrelation(nn.Module):
    """SEAM's pixel correlation module: refines a CAM with a learned, column-normalised affinity.

    The affinity and the propagation run in (at least) float32 even under bf16: each column sums
    thousands of small products, which bf16 would round away. The result takes the CAM's dtype.
    """

    def __init__(self, conv4_channels: int, conv5_channels: int, img_channels: int = 3):
        super().__init__()
        self.conv4_proj = nn.Conv2d(conv4_channels, PCM_CONV4_DIM, 1, bias=False)
        self.conv5_proj = nn.Conv2d(conv5_channels, PCM_CONV5_DIM, 1, bias=False)
        self.fuse = nn.Conv2d(img_channels + PCM_CONV4_DIM + PCM_CONV5_DIM, PCM_OUT_DIM, 1, bias=False)
        nn.init.kaiming_normal_(self.conv4_proj.weight)
        nn.init.kaiming_normal_(self.conv5_proj.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)

    def affinity(self, img: torch.Tensor, conv4: torch.Tensor, conv5: torch.Tensor) -> torch.Tensor:
        """(N, hw, hw): aff[:, i, j] = relu(cos(f_i, f_j)) / sum_i relu(cos(f_i, f_j)) (+1e-5)."""
        n, _, h, w = conv4.shape
        small = F.interpolate(img, (h, w), mode="bilinear", align_corners=True)
        f = torch.cat([small, F.relu(self.conv4_proj(conv4.detach())),
                       F.relu(self.conv5_proj(conv5.detach()))], dim=1)
        f = _at_least_fp32(self.fuse(f).flatten(2))
        with torch.autocast(f.device.type, enabled=False):
            f = f / (f.norm(dim=1, keepdim=True) + 1e-5)
            aff = F.relu(f.transpose(1, 2) @ f)
            return aff / (aff.sum(dim=1, keepdim=True) + 1e-5)

    def forward(self, cam: torch.Tensor, img: torch.Tensor, conv4: torch.Tensor,
                conv5: torch.Tensor) -> torch.Tensor:
        n, c, h, w = cam.shape
        aff = self.affinity(img, conv4, conv5)
        with torch.autocast(aff.device.type, enabled=False):
            cam_rv = _at_least_fp32(pcm_cam_input(cam).flatten(2)) @ aff
        return cam_rv.view(n, c, h, w).to(cam.dtype)


# ------------------------------------------------------------------------------------------------
# Projectors
# ------------------------------------------------------------------------------------------------
def make_psc_projector(c_in: int, dim: int) -> nn.Sequential:
    proj = nn.Sequential(nn.Conv2d(c_in, dim, 1, bias=False), nn.ReLU(inplace=True))
    nn.init.xavier_uniform_(proj[0].weight)
    return proj


def make_rsc_projector(c_in: int, dim: int, kind: str) -> nn.Sequential:
    if kind == "official":
        return nn.Sequential(nn.Conv2d(c_in, dim, 3, padding=1), nn.BatchNorm2d(dim),
                             nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 1))
    if kind == "paper":
        return nn.Sequential(nn.Conv2d(c_in, dim, 1), nn.ReLU(inplace=True),
                             nn.Conv2d(dim, dim, 1), nn.ReLU(inplace=True))
    raise ConfigError(f"config key 'model.rsc_proj': {kind!r} is not one of {', '.join(RSC_PROJ_KINDS)}")


@contextmanager
def init_stream(init_seeds: Optional[Mapping[str, int]], part: str):
    """Modules built inside draw their random init from ``init_seeds[part]``; the global RNG is
    left as it was (None: the global RNG, as torch does)."""
    if init_seeds is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seeds[part]))
        yield


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------
class CamNet(nn.Module):
    """Backbone + heads; see the module docstring for the outputs and the official behaviour."""

    def __init__(self, backbone: nn.Module, num_classes: int = 21, pcm: bool = True,
                 projectors: bool = True, rsc_proj: str = "official", rsc_dim: int = 256,
                 psc_dim: int = 128, frozen_bn: bool = True, freeze_stem: bool = True,
                 proj_lr_quirk: bool = True, init_seeds: Optional[Mapping[str, int]] = None):
        super().__init__()
        ch = backbone.out_channels
        self.backbone = backbone
        with init_stream(init_seeds, "cam_head"):
            self.cam_head = nn.Conv2d(ch["conv6"], num_classes, 1, bias=False)
            nn.init.xavier_uniform_(self.cam_head.weight)
        with init_stream(init_seeds, "pcm"):
            self.pcm = PixelCorrelation(ch["conv4"], ch["conv5"]) if pcm else None
        with init_stream(init_seeds, "psc_proj"):
            self.psc_proj = make_psc_projector(ch["conv6"], psc_dim) if projectors else None
        with init_stream(init_seeds, "rsc_proj"):
            self.rsc_proj = make_rsc_projector(ch["conv6"], rsc_dim, rsc_proj) if projectors else None
        self.frozen_bn = frozen_bn
        self.freeze_stem = freeze_stem
        self.proj_lr_quirk = proj_lr_quirk
        self.pretrained_report: Optional[LoadReport] = None
        self._freeze()

    # -- forward ----------------------------------------------------------------------------
    def forward(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(img)
        x = feats["conv6"]
        cam = self.cam_head(x)
        out = {"cam": cam, "pred": cam.mean(dim=(2, 3))}
        if self.pcm is not None:
            cam_rv = self.pcm(cam, img, feats["conv4"], feats["conv5"])
            out.update(cam_rv=cam_rv, pred_rv=cam_rv.mean(dim=(2, 3)))
        if self.psc_proj is not None:
            out.update(feat_psc=self.psc_proj(x), feat_rsc=self.rsc_proj(x))
        return out

    def forward_cam(self, img: torch.Tensor) -> torch.Tensor:
        """Raw CAM only (inference): no PCM, no projectors."""
        return self.cam_head(self.backbone(img)["conv6"])

    # -- frozen parts -----------------------------------------------------------------------
    def _frozen_params(self):
        if self.freeze_stem:
            for m in self.backbone.frozen_modules():
                yield from m.parameters()
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    yield from m.parameters()

    def _freeze(self) -> None:
        for p in self._frozen_params():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "CamNet":
        """Like nn.Module.train, but frozen BatchNorms stay in eval mode (running stats untouched)."""
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        self._freeze()
        return self

    # -- optimisation -----------------------------------------------------------------------
    def _is_new(self, name: str) -> bool:
        if name.startswith("backbone."):
            return False
        return not (self.proj_lr_quirk and name.startswith("rsc_proj."))

    def param_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0) -> list[dict]:
        """The official SGD groups over the trainable parameters (lr_group_dicts).

        ``backbone_lr_mult`` != 1 scales the backbone's own parameters only: under proj_lr_quirk the
        RSC/CSC projector (new, at 1x/2x) then gets groups of its own (``quirk_weight``/``quirk_bias``).
        """
        members = {}
        for pname, p in self.named_parameters():
            if not p.requires_grad:
                continue
            kind = "bias" if pname.endswith("bias") else "weight"
            if self._is_new(pname):
                where = "new"
            elif backbone_lr_mult != 1.0 and not pname.startswith("backbone."):
                where = "quirk"
            else:
                where = "backbone"
            members.setdefault(f"{where}_{kind}", []).append(p)
        return lr_group_dicts(members, lr, weight_decay, backbone_lr_mult)

    # -- weights ----------------------------------------------------------------------------
    def load_pretrained(self, path) -> "LoadReport":
        return load_pretrained(self, path)


# ------------------------------------------------------------------------------------------------
# Loading weights
# ------------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What load_pretrained did. `missing_new`: model keys the file lacks that are allowed to
    (the new heads; BN batch counters); `ignored`: file keys deliberately not used."""
    path: str
    loaded: list = field(default_factory=list)
    missing_new: list = field(default_factory=list)
    ignored: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.path}: loaded {len(self.loaded)} tensors; new (not in file): "
                f"{len(self.missing_new)}; ignored file keys: {', '.join(self.ignored) or 'none'}")


def _format_keys(keys: list, limit: int = 25) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _model_key(model: CamNet, key: str) -> str:
    """A file key (ours, the authors' flat names, or backbone-relative) -> our state-dict key."""
    top = key.split(".")[0]
    if top in dict(model.named_children()):
        return key
    for theirs, ours in OFFICIAL_HEAD_ALIASES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return "backbone." + key


def read_weights(model: CamNet, path) -> tuple[dict, dict, list, list]:
    """File -> (state dict in our key space, {our key: file key}, ignored file keys, unknown file keys).

    `path` may be a short name (imagenet:efficientnet_lite0, timm_backbone.IMAGENET_WHEELS)."""
    path = Path(resolve_weights(str(path)))
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist")
    backbone = model.backbone
    if path.suffix == ".params":
        if not getattr(backbone, "supports_mxnet", False):
            raise WeightsError(f"weights file '{path}': MXNet .params hold the ResNet-38 weights, but the "
                               f"backbone is {type(backbone).__name__}; give a torchvision-format .pth")
        converted, origin, ignored, unknown = backbone.convert_mxnet(read_mxnet_params(path))
        state = {"backbone." + k: v for k, v in converted.items()}
        return state, {"backbone." + k: v for k, v in origin.items()}, ignored, unknown
    if path.suffix not in (".pth", ".pt"):
        raise WeightsError(f"weights file '{path}': unknown format (expected .params, .pth or .pt)")
    state, origin, ignored, rest = {}, {}, [], {}
    for key, value in read_torch_file(path).items():
        if backbone.is_unused_pretrained_key(key):
            ignored.append(key)
        elif (ours := _model_key(model, key)).startswith("backbone.") and hasattr(backbone, "convert_pretrained"):
            rest[ours[len("backbone."):]] = value
        else:
            state[ours], origin[ours] = value, key
    if rest:  # a backbone with its own file formats (timm: by name, or efficientnet_pytorch by order)
        converted, names, skipped = backbone.convert_pretrained(rest, path)
        state.update({"backbone." + k: v for k, v in converted.items()})
        origin.update({"backbone." + k: names[k] for k in converted})
        ignored += skipped
    return state, origin, ignored, []


def _named(key: str, origin: dict) -> str:
    """'file key (-> our key)' when the names differ, so messages show what the file holds."""
    theirs = origin.get(key, key)
    return key if theirs == key else f"{theirs} (-> {key})"


def load_pretrained(model: CamNet, path) -> LoadReport:
    """Load ImageNet (or full) weights into `model`; raise WeightsError listing every problem.

    Every backbone tensor must be in the file with the right shape and the file may hold nothing
    the model lacks (bar the ImageNet classifier); the new heads may be absent.
    """
    state, origin, ignored, unknown = read_weights(model, path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    missing_required = [k for k in missing if k.startswith("backbone.")]
    unexpected = unknown + [_named(k, origin) for k in state if k not in own]
    mismatched = [f"{_named(k, origin)}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    problems = []
    if missing_required:
        problems.append(f"missing backbone keys [{_format_keys(missing_required)}]")
    if unexpected:
        problems.append(f"unexpected keys [{_format_keys(unexpected)}]")
    if mismatched:
        problems.append(f"shape mismatches [{_format_keys(mismatched)}]")
    if problems:
        raise WeightsError(f"weights file '{path}' does not fit the {type(model.backbone).__name__} "
                           f"CAM network: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    report = LoadReport(str(path), loaded=sorted(state), missing_new=[k for k in missing
                        if k not in missing_required], ignored=ignored)
    model.pretrained_report = report
    return report


def build_cam_model(model_cfg: ModelConfig, load_weights: bool = True,
                    init_seeds: Optional[Mapping[str, int]] = None) -> CamNet:
    """ModelConfig -> CamNet, with `model_cfg.weights` loaded when load_weights; ``init_seeds``
    (one seed per INIT_PARTS name) gives each part's random init a stream of its own.

    With load_weights and no weights file, `model.allow_random_init` must be set (guards against
    training from random init by mistake); pass load_weights=False to load a checkpoint yourself.
    """
    num_classes = cam_channels(model_cfg)
    if num_classes < 2:
        raise ConfigError(f"config key 'model.num_classes': need >= 2 (fg + bg), got {model_cfg.num_classes}")
    with init_stream(init_seeds, "backbone"):
        backbone = build_backbone(model_cfg.backbone, model_cfg.width_div, model_cfg.output_stride)
    model = CamNet(backbone, num_classes=num_classes,
                   pcm=model_cfg.pcm, projectors=model_cfg.projectors, rsc_proj=model_cfg.rsc_proj,
                   rsc_dim=model_cfg.rsc_dim, psc_dim=model_cfg.psc_dim, frozen_bn=model_cfg.frozen_bn,
                   freeze_stem=model_cfg.freeze_stem, proj_lr_quirk=model_cfg.proj_lr_quirk, init_seeds=init_seeds)
    if load_weights:
        if model_cfg.weights:
            model.load_pretrained(model_cfg.weights)
        elif not model_cfg.allow_random_init:
            raise ConfigError("config key 'model.weights' is empty: give the ImageNet weights "
                              "(.params / .pth) or set model.allow_random_init=true")
    if model_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
