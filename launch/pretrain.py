"""SynthNet pretraining: a torchvision ResNet trained as a classifier of single-object synthetic
images, the local stand-in for ImageNet weights on the synthetic set (see hsc_fast/engine/pretrain.py).

    python launch/pretrain.py --out weights/synthnet_resnet18.pth
    torchrun --standalone --nproc_per_node 2 launch/pretrain.py --out weights/synthnet_resnet18.pth
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hsc_fast.cli.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
