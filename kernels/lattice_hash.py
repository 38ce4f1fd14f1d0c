"""Hash-table build of the permutohedral lattice on CUDA (CuPy RawKernels), for hsc_fast.crf.lattice.

`hash_build(codes, deltas)` numbers the lattice vertices of `codes` (N, d+1) int64 and finds each
vertex's blur neighbours (code +- delta per lattice axis): the same result as crf_lattice's sort
build (`torch.unique` + `searchsorted`), from an open-addressing hash table (linear probing,
atomicCAS inserts, load factor <= 1/2). Tensors cross between torch and CuPy through DLPack (no
copies) and the kernels run on torch's current stream.

`CUDA_SOURCE` is compiled by CuPy's NVRTC at first use on the user's machine, and ahead of time for
sm_80 / sm_90 by `kernels.aot.compile_cuda_source` (tests/kernels/test_aot_compile.py), so a source that
no NVRTC accepts is found on a CPU machine. Whether CuPy's build really works on a given machine
(a CuPy built for another CUDA major finds no NVRTC and fails only at compile time) is proven by
`hsc_fast.crf.lattice.cupy_available`, which runs this build once against the sort build.
"""
from __future__ import annotations

import numpy as np
import torch

CUDA_SOURCE = r"""
#define EMPTY_KEY 0xFFFFFFFFFFFFFFFFull

__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33; return x;
}

// Insert every code; slots[i] = the table slot holding codes[i] (linear probing, atomicCAS).
extern "C" __global__ void lattice_insert(const long long* __restrict__ codes, const long long n,
                                          unsigned long long* table, const long long mask,
                                          long long* __restrict__ slots) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned long long key = (unsigned long long)codes[i];
    unsigned long long h = mix64(key) & (unsigned long long)mask;
    while (true) {
        const unsigned long long prev = atomicCAS(&table[h], EMPTY_KEY, key);
        if (prev == EMPTY_KEY || prev == key) { slots[i] = (long long)h; return; }
        h = (h + 1) & (unsigned long long)mask;
    }
}

// out[i] = dense id of queries[i], or `missing` when it is not in the table.
extern "C" __global__ void lattice_lookup(const long long* __restrict__ queries, const long long n,
                                          const unsigned long long* __restrict__ table, const long long mask,
                                          const long long* __restrict__ dense_ids, const long long missing,
                                          long long* __restrict__ out) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned long long key = (unsigned long long)queries[i];
    unsigned long long h = mix64(key) & (unsigned long long)mask;
    while (true) {
        const unsigned long long k = table[h];
        if (k == key) { out[i] = dense_ids[h]; return; }
        if (k == EMPTY_KEY) { out[i] = missing; return; }
        h = (h + 1) & (unsigned long long)mask;
    }
}
"""
KERNEL_NAMES = ("lattice_insert", "lattice_lookup")
THREADS = 256
_MODULE = None


def cupy_sees_a_gpu() -> bool:
    """CuPy imports and reports a CUDA device (this alone does not prove that it can compile)."""
    try:
        import cupy  # noqa: PLC0415 - optional dependency (gpu-cu12 / gpu-cu13 extras)
    except Exception:  # noqa: BLE001 - ImportError, or a CuPy that fails to load its CUDA libraries
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver install must not break the CPU path
        return False


def _kernels():
    global _MODULE
    if _MODULE is None:
        import cupy  # noqa: PLC0415
        module = cupy.RawModule(code=CUDA_SOURCE)
        module.compile()  # NVRTC errors surface here, not at the first launch
        _MODULE = module
    return tuple(_MODULE.get_function(name) for name in KERNEL_NAMES)


def _blocks(n: int) -> tuple:
    return ((n + THREADS - 1) // THREADS,)


def hash_build(codes: torch.Tensor, deltas: list[int]):
    """(dense vertex id per entry of `codes`, neighbours (len(deltas), 2, M+1), M) like the sort
    build; row M of the neighbour table is the "no neighbour" sentinel pointing at itself."""
    flat = codes.reshape(-1).contiguous()
    n = flat.numel()
    if n == 0:  # no pixels: no vertices (and no zero-size launches)
        neighbours = torch.zeros((len(deltas), 2, 1), dtype=torch.long, device=codes.device)
        return torch.empty(codes.shape, dtype=torch.long, device=codes.device), neighbours, 0
    import cupy  # noqa: PLC0415

    insert, lookup = _kernels()
    capacity = 1 << max(10, (2 * n - 1).bit_length())     # load factor <= 1/2
    table = torch.full((capacity,), -1, dtype=torch.long, device=codes.device)   # all bits set = empty
    slots = torch.empty(n, dtype=torch.long, device=codes.device)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(codes.device).cuda_stream)
    with cupy.cuda.Device(codes.device.index or 0), stream:
        insert(_blocks(n), (THREADS,), (cupy.from_dlpack(flat), np.int64(n), cupy.from_dlpack(table),
                                        np.int64(capacity - 1), cupy.from_dlpack(slots)))
    occupied = table != -1
    dense_ids = torch.cumsum(occupied.long(), 0) - 1
    m = int(occupied.sum())
    keys = table[occupied]                               # codes of the vertices, in dense-id order
    queries = torch.stack([torch.stack([keys + delta, keys - delta]) for delta in deltas]).reshape(-1).contiguous()
    found = torch.empty_like(queries)
    with cupy.cuda.Device(codes.device.index or 0), stream:
        lookup(_blocks(queries.numel()), (THREADS,),
               (cupy.from_dlpack(queries), np.int64(queries.numel()), cupy.from_dlpack(table),
                np.int64(capacity - 1), cupy.from_dlpack(dense_ids), np.int64(m), cupy.from_dlpack(found)))
    neighbours = torch.full((len(deltas), 2, m + 1), m, dtype=torch.long, device=codes.device)
    neighbours[:, :, :m] = found.reshape(len(deltas), 2, m)
    return dense_ids[slots].reshape(codes.shape), neighbours, m
