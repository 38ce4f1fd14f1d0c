"""Shared test set-up. TRITON_INTERPRET must be set before any kernel module is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# CI clones the repo next to a copy of shared/ (../shared/fixtures).
FIXTURES = REPO.parent / "shared" / "fixtures"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long test (still runs in CI, in one batch)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped on CPU)")


def pytest_collection_modifyitems(config, items):
    import torch
    skip_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
    # Slow (multi-process) tests run last, together.
    items.sort(key=lambda it: 1 if "slow" in it.keywords else 0)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"real-data fixtures not found at {FIXTURES}")
    return FIXTURES
