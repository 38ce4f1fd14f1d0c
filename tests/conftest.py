"""Shared test set-up. TRITON_INTERPRET must be set before any kernel module is imported.

Default: the Triton interpreter on a machine without CUDA; compiled kernels where CUDA is
present (so `pytest -m cuda` on a GPU machine tests what users run). Tests marked `interpreter`
run Triton on CPU tensors and are skipped without it; `make test` exports TRITON_INTERPRET=1.
"""
import os

import torch  # noqa: E402 - decides the default below; kernel modules are imported later

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
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
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors (needs TRITON_INTERPRET=1)")
    config.addinivalue_line("markers", "compiled: needs compiled Triton kernels (TRITON_INTERPRET=0 and CUDA)")


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs CUDA")
    skip_interp = pytest.mark.skip(reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1")
    skip_compiled = pytest.mark.skip(reason="needs compiled Triton kernels: run with TRITON_INTERPRET=0 on CUDA")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        elif "interpreter" in item.keywords and "cuda" not in item.keywords and not interpreter_on():
            item.add_marker(skip_interp)
        elif "compiled" in item.keywords and interpreter_on():
            item.add_marker(skip_compiled)
    # Slow (multi-process) tests run last, together.
    items.sort(key=lambda it: 1 if "slow" in it.keywords else 0)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"real-data fixtures not found at {FIXTURES}")
    return FIXTURES


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After tests/kernels/test_aot_compile.py: registers, spills and ptxas seconds per kernel and target."""
    try:
        from test_aot_compile import AOT_KEY
    except ImportError:
        return
    reports = config.stash.get(AOT_KEY, None)
    if not reports:
        return
    rows = {}
    for r in reports:
        key = (r["kernel"], r["target"])
        worst = rows.get(key, dict(n=0, regs=0, spill=0, shared=0, ptxas=0.0, cached=True))
        worst.update(n=worst["n"] + 1, regs=max(worst["regs"], r["registers"]), spill=max(worst["spill"], r["spill_stores"]),
                     shared=max(worst["shared"], r["shared_bytes"]), ptxas=max(worst["ptxas"], r["ptxas_s"]),
                     cached=worst["cached"] and r.get("cached", False))
        rows[key] = worst
    terminalreporter.section("ahead-of-time kernel compile (worst specialisation per kernel and target)")
    terminalreporter.write_line(f"{'kernel':34s} {'target':6s} {'specs':>5s} {'regs':>5s} {'spill B':>8s} "
                                f"{'shared B':>9s} {'ptxas s':>8s}")
    for (kernel, target), w in sorted(rows.items()):
        note = " (cached)" if w["cached"] else ""
        terminalreporter.write_line(f"{kernel:34s} {target:6s} {w['n']:5d} {w['regs']:5d} {w['spill']:8d} "
                                    f"{w['shared']:9d} {w['ptxas']:8.1f}{note}")
