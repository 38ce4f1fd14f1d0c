"""Read and write MXNet `.params` files (NDArray lists) without MXNet.

The ResNet-38 ImageNet weights used by PSA/SEAM/EPS/HSC ship as an MXNet NDArray list. That
format changed over MXNet's life; a file holds, all little-endian:

    uint64 list magic 0x112, uint64 reserved (0)
    uint64 n_arrays, then n_arrays NDArray records
    uint64 n_keys (0 or n_arrays), then per key: uint64 length + bytes (e.g. "arg:conv1a_weight")

and each NDArray record is one of

    legacy  : uint32 ndim, ndim x uint32 dims            (ndim 0: an empty "none" array, nothing follows)
              int32 dev_type, int32 dev_id, int32 type_flag, raw data
    V1      : uint32 0xF993FAC8, uint32 ndim, ndim x int64 dims, then as legacy
    V2      : uint32 0xF993FAC9, int32 storage type (0 dense, 1 row_sparse, 2 csr),
              [sparse: storage shape], int32 ndim, ndim x int64 dims (ndim 0: none),
              context, type flag, [sparse: aux types/shapes], raw data [, aux data]
    V3      : uint32 0xF993FACA, as V2 but NumPy shape semantics (ndim -1: none, ndim 0: scalar)

Only dense arrays are supported; a sparse record raises WeightsError. Every truncated or
garbled file raises WeightsError naming the file, the byte offset and what was expected.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from hsc_fast.errors import WeightsError

LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
NDARRAY_V3_MAGIC = 0xF993FACA
STORAGE_NAMES = {-1: "undefined", 0: "default (dense)", 1: "row_sparse", 2: "csr"}
CPU_DEV_TYPE = 1
BFLOAT16_FLAG = 12

# mshadow type flags -> little-endian numpy dtypes (12 = bfloat16 is widened to float32 on read).
TYPE_FLAGS = {
    0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2"), 3: np.dtype("u1"),
    4: np.dtype("<i4"), 5: np.dtype("i1"), 6: np.dtype("<i8"), 7: np.dtype("?"),
    8: np.dtype("<i2"), 9: np.dtype("<u2"), 10: np.dtype("<u4"), 11: np.dtype("<u8"),
    BFLOAT16_FLAG: np.dtype("<u2"),
}
FLAG_OF_DTYPE = {dt.str: flag for flag, dt in TYPE_FLAGS.items() if flag != BFLOAT16_FLAG}

MAX_NDIM = 32             # no real tensor has more; a bigger count means a garbled record
WRITE_VERSIONS = ("v2", "v1", "legacy", "v3")


class _Reader:
    """Sequential little-endian reads over a buffer; every failure names file, offset, expectation."""

    def __init__(self, buf, path: str):
        self.buf = buf
        self.path = path
        self.pos = 0

    def fail(self, what: str, at: Optional[int] = None) -> WeightsError:
        at = self.pos if at is None else at
        return WeightsError(f"MXNet params file '{self.path}': {what} (at byte offset {at}, "
                            f"file size {len(self.buf)})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"file truncated: expected {n} bytes for {what}, "
                            f"only {len(self.buf) - self.pos} left")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size, what))

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def i32(self, what: str) -> int:
        return self.unpack("<i", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)[0]

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def _read_dims(r: _Reader, ndim: int, fmt: str, what: str) -> tuple[int, ...]:
    if ndim > MAX_NDIM:
        raise r.fail(f"{what}: implausible ndim {ndim} (expected <= {MAX_NDIM}); garbled record?", r.pos - 4)
    dims = r.unpack("<" + fmt * ndim, f"{what} ({ndim} dims)") if ndim else ()
    if any(d < 0 for d in dims):
        raise r.fail(f"{what}: negative dimension in shape {dims}")
    return tuple(int(d) for d in dims)


def _read_tshape(r: _Reader, what: str, np_semantics: bool = False) -> Optional[tuple[int, ...]]:
    """A V1+ TShape: int32 ndim + int64 dims. None = 'no shape' (ndim 0, or -1 under NumPy semantics)."""
    start = r.pos
    ndim = r.i32(f"{what} ndim")
    if np_semantics and ndim == -1:
        return None
    if ndim < 0:
        raise r.fail(f"{what}: negative ndim {ndim}", start)
    if ndim == 0 and not np_semantics:
        return None
    return _read_dims(r, ndim, "q", what)


def _read_payload(r: _Reader, shape: tuple[int, ...], index: int) -> np.ndarray:
    """Context, type flag and raw data of a dense array of `shape`."""
    r.unpack("<ii", f"array #{index} context (dev_type, dev_id)")
    flag_at = r.pos
    flag = r.i32(f"array #{index} type flag")
    if flag not in TYPE_FLAGS:
        raise r.fail(f"array #{index}: unknown type flag {flag} (expected one of {sorted(TYPE_FLAGS)})",
                     flag_at)
    dtype = TYPE_FLAGS[flag]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    raw = r.take(count * dtype.itemsize, f"array #{index} data ({count} x {dtype.name}, shape {shape})")
    arr = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
    if flag == BFLOAT16_FLAG:  # bfloat16 is the top half of a float32
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # own the memory, native order


def _read_ndarray(r: _Reader, index: int) -> np.ndarray:
    start = r.pos
    magic = r.u32(f"array #{index} magic or ndim")
    if magic in (NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
        np_sem = magic == NDARRAY_V3_MAGIC
        stype = r.i32(f"array #{index} storage type")
        if stype != 0:
            name = STORAGE_NAMES.get(stype, f"unknown ({stype})")
            raise r.fail(f"array #{index} has storage type {name}: only dense arrays are supported", start)
        shape = _read_tshape(r, f"array #{index} shape", np_semantics=np_sem)
    elif magic == NDARRAY_V1_MAGIC:
        shape = _read_tshape(r, f"array #{index} shape")
    else:  # legacy record: the magic is the ndim, dims are uint32
        shape = _read_dims(r, magic, "I", f"array #{index} legacy shape") if magic else None
    if shape is None:  # an empty ("none") NDArray: nothing else is stored
        return np.empty((0,), dtype=np.float32)
    return _read_payload(r, shape, index)


def _read_keys(r: _Reader, n_arrays: int) -> list[str]:
    at = r.pos
    n_keys = r.u64("key count")
    if n_keys not in (0, n_arrays):
        raise r.fail(f"key count {n_keys} does not match array count {n_arrays}", at)
    keys = []
    for i in range(n_keys):
        length = r.u64(f"key #{i} length")
        try:
            keys.append(bytes(r.take(length, f"key #{i} ({length} bytes)")).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise r.fail(f"key #{i} is not valid UTF-8 ({e})") from e
    return keys or [str(i) for i in range(n_arrays)]


def _parse(buf, path: str) -> dict[str, np.ndarray]:
    r = _Reader(buf, path)
    magic = r.u64("list magic")
    if magic != LIST_MAGIC:
        raise r.fail(f"not an MXNet NDArray list: magic {magic:#x}, expected {LIST_MAGIC:#x}", 0)
    r.u64("reserved header field")
    at = r.pos
    n_arrays = r.u64("array count")
    if n_arrays > r.left // 4:  # each record needs at least 4 bytes: a garbled count
        raise r.fail(f"array count {n_arrays} cannot fit in the {r.left} bytes left", at)
    arrays = [_read_ndarray(r, i) for i in range(n_arrays)]
    keys = _read_keys(r, n_arrays)
    if r.left:
        raise r.fail(f"{r.left} unexpected trailing bytes after the key list")
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise WeightsError(f"MXNet params file '{path}': duplicate keys {dup[:10]}")
    return dict(zip(keys, arrays))


def read_mxnet_params(path) -> dict[str, np.ndarray]:
    """Parse an MXNet `.params` NDArray list -> {key: array} (keys as stored, e.g. 'arg:conv1a_weight').

    A list saved without names gets keys '0', '1', ... (what `mx.nd.load` returns as a list).
    Empty ('none') arrays come back as float32 arrays of shape (0,).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if path.stat().st_size == 0:
                raise WeightsError(f"MXNet params file '{path}': file is empty")
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # no 400 MB read into memory
    except OSError as e:
        raise WeightsError(f"MXNet params file '{path}': cannot read it ({e.strerror or e})") from e
    try:
        return _parse(mm, str(path))
    finally:
        try:
            mm.close()
        except BufferError:  # a traceback still holds a view into it: the GC closes it later
            pass


# ------------------------------------------------------------------------------------------------
# Writing (tests and conversions; MXNet reads every layout back)
# ------------------------------------------------------------------------------------------------
def _type_flag(arr: np.ndarray, key: str) -> int:
    flag = FLAG_OF_DTYPE.get(arr.dtype.newbyteorder("<").str)
    if flag is None:
        raise WeightsError(f"write_mxnet_params: array '{key}' has dtype {arr.dtype}, which MXNet "
                           f"cannot store (supported: {', '.join(np.dtype(d).name for d in FLAG_OF_DTYPE)})")
    return flag


def _encode_ndarray(arr: np.ndarray, key: str, version: str) -> bytes:
    if arr.ndim == 0 and version != "v3":
        raise WeightsError(f"write_mxnet_params: array '{key}' is a 0-d scalar; only version 'v3' "
                           "can store scalars (ndim 0 means 'none' in the older layouts)")
    flag = _type_flag(arr, key)
    if version == "legacy":
        if any(d >= 2 ** 32 for d in arr.shape):
            raise WeightsError(f"write_mxnet_params: array '{key}' shape {arr.shape} overflows uint32")
        head = struct.pack(f"<I{arr.ndim}I", arr.ndim, *arr.shape)
    else:
        shape = struct.pack(f"<i{arr.ndim}q", arr.ndim, *arr.shape)
        if version == "v1":
            head = struct.pack("<I", NDARRAY_V1_MAGIC) + shape
        else:
            magic = NDARRAY_V3_MAGIC if version == "v3" else NDARRAY_V2_MAGIC
            head = struct.pack("<Ii", magic, 0) + shape
    payload = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    return head + struct.pack("<iii", CPU_DEV_TYPE, 0, flag) + payload


def write_mxnet_params(path, arrays: Mapping[str, np.ndarray], version: str = "v2") -> None:
    """Write {key: array} as an MXNet NDArray list in the given record layout.

    version: 'v2' (what MXNet >= 1.0 writes), 'v1' (int64 shapes, no storage type),
    'legacy' (uint32 shapes, the layout of the 2016 ResNet-38 file), 'v3' (NumPy semantics).
    """
    if version not in WRITE_VERSIONS:
        raise WeightsError(f"write_mxnet_params: version {version!r} is not one of {', '.join(WRITE_VERSIONS)}")
    parts = [struct.pack("<QQQ", LIST_MAGIC, 0, len(arrays))]
    for key, arr in arrays.items():
        parts.append(_encode_ndarray(np.asarray(arr), key, version))
    parts.append(struct.pack("<Q", len(arrays)))
    for key in arrays:
        raw = key.encode("utf-8")
        parts.append(struct.pack("<Q", len(raw)) + raw)
    Path(path).write_bytes(b"".join(parts))
