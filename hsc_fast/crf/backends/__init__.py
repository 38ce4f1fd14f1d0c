"""Plug-in CRF backends: every module in this folder is imported when a CRF registry is first read.

A module here calls ``hsc_fast.crf.register_backend(name, fn, batched=...)`` (seeds and DeepLab
test CRF: ``seeds.crf.backend``, ``deeplab.crf.backend``) and/or
``hsc_fast.crf.train.register_train_backend(name, fn, batched=...)`` (``loss.crf.backend``), so
adding a backend is its file and its test; the config's choices, ``--help``, the generated config
reference and ``benchmarks/bench_crf.py`` read the registries. The built-in backends are
registered by ``hsc_fast.crf`` (pydensecrf, gpu) and ``hsc_fast.crf.train`` (lattice, dense,
pydensecrf). Keep module-level imports light: pydensecrf pool workers import this package too.
"""
from __future__ import annotations

import importlib
import pkgutil

import hsc_fast.crf  # noqa: F401 - the built-in seed / test backends


def discover() -> list[str]:
    """Import every module of this package (again harmless); returns their names."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


discover()
