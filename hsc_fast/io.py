"""Atomic file writes: a visible file is always complete (write a temporary sibling, then rename).

Every stage's outputs (checkpoints, JSON markers and results, label PNGs, CAM files, shard
indexes, reports) go through these, so a killed process leaves either the old file or the new one,
plus at most a ``.<name>.tmp<pid>`` sibling that the next write replaces.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional


def temp_sibling(path: Path) -> Path:
    """The temporary name ``path`` is written under: hidden, per process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path, write: Callable[[BinaryIO], None], *, fsync: bool = False) -> Path:
    """Call ``write(file)`` on a temporary sibling of ``path`` opened "wb", then rename it into place.

    ``fsync``: flush to disk before the rename (checkpoints: survives a power cut, not only a kill).
    On an exception the temporary file is removed and the old ``path`` (if any) is untouched.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path, data: bytes, *, fsync: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(data), fsync=fsync)


def atomic_write_text(path, text: str, *, fsync: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), fsync=fsync)


def write_json(path, obj: Any, *, indent: int = 2, default: Optional[Callable] = None, sort_keys: bool = False,
               mkdir: bool = True) -> Path:
    """``obj`` as JSON (with a final newline), atomically; creates the parent folder by default."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default, sort_keys=sort_keys) + "\n")
