"""Networks: the HSC CAM network (ResNet-38 or a small torchvision backbone) and weight I/O.

    from hsc_fast.models import build_cam_model
    model = build_cam_model(cfg.model)          # loads cfg.model.weights (.params / .pth)
    out = model(img)                            # {"cam", "pred", "cam_rv", "pred_rv", "feat_psc", "feat_rsc"}
    opt_groups = model.param_groups(lr, wd)     # official 1x / 2x / 10x / 20x groups
"""
from hsc_fast.models.backbones import BACKBONES, TorchvisionResNet, build_backbone, dilate_layer
from hsc_fast.models.cam_net import (CamNet, LoadReport, PixelCorrelation, build_cam_model, load_pretrained,
                      pcm_cam_input, read_weights)
from hsc_fast.models.mxnet_params import read_mxnet_params, write_mxnet_params
from hsc_fast.models.resnet38 import ResNet38, convert_mxnet_resnet38, mxnet_key_to_torch

__all__ = [
    "BACKBONES", "CamNet", "LoadReport", "PixelCorrelation", "ResNet38", "TorchvisionResNet",
    "build_backbone", "build_cam_model", "convert_mxnet_resnet38", "dilate_layer", "load_pretrained",
    "mxnet_key_to_torch", "pcm_cam_input", "read_mxnet_params", "read_weights", "write_mxnet_params",
]
