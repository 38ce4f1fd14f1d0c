"""Benchmark the fused loss kernels (kernels/psc.py, roi_pool.py, topk_proto.py) against eager
PyTorch and torch.compile of the references in hsc_fast/ops/__init__.py.

    python benchmarks/bench_psc.py [--quick] [--json PATH] [--no-compile] [--cases official,fullres]
                                   [--classes 21,81]

Cases (N images, h x w feature map): official (12, 16x16: what the official recipe contrasts),
fullres (8, 56x56: contrast at feature resolution), large (16, 112x112).
  psc_terms : 2 views of N*h*w pixel embeddings, D=128, C prototypes x 3 sets
  roi_pool  : feats (N, 256, h*w), bg/fg masks (N, 2, h*w)           (RSC; no class count)
  topk_proto: scores (C-1, N*h*w), feats (N*h*w, 256), k=128         (CSC class vectors)
Class counts C (--classes): 21 (PASCAL VOC: 63 PSC logit columns, the one-block kernels) and
81 (MS COCO: 243 columns, the chunked kernels; 80 CSC rows).
Passes: fwd (no autograd graph) and fwd+bwd (gradient to the features); dtypes float32 and
bfloat16 feature inputs (the ops compute in float32 and return float32).

CUDA: triton.testing.do_bench (L2 flushed before each rep), median and p20/p80, peak memory
(torch.cuda.max_memory_allocated after a reset; inputs included, `extra_mem_bytes` = what the
call added), the bytes an ideal fused implementation must move (`bytes_model`: read the inputs
once, write dL/dfeatures once) and `roofline_frac` = bytes_model / time / peak HBM bandwidth.
CPU: eager vs compile wall-clock (few reps), and the Triton kernels in the interpreter on tiny
shapes for correctness only (their times mean nothing).

Writes benchmarks/results/psc-<device>-<date>.{json,csv,md} (or --json PATH and siblings) and
prints the table plus triton-vs-eager / triton-vs-compile speed-ups side by side.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:  # must precede the first import of kernels/: Triton reads it at definition
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from _benchmeta import (collect_meta, default_result_path, markdown_table, peak_bandwidth,  # noqa: E402
                        peak_memory_cuda, time_cpu, time_cuda, write_results)
from hsc_fast import ops  # noqa: E402

CASES = {"official": (12, 16, 16), "fullres": (8, 56, 56), "large": (16, 112, 112)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("fwd", "fwd+bwd")
PSC_DIM, RSC_DIM, TOPK = 128, 256, 128
CLASS_COUNTS = (21, 81)  # VOC, MS COCO (foreground + background)
TABLE_COLUMNS = ("op", "case", "classes", "pass", "dtype", "impl", "ms", "p20", "p80", "peak_mem_bytes",
                 "roofline_frac", "max_rel_err", "note")


# ------------------------------------------------------------------------------------------
# problems: inputs, the call per implementation, and the ideal bytes moved
# ------------------------------------------------------------------------------------------
class Problem:
    """One op at one shape, class count and dtype. `call(impl, feats)` runs the op on the given feature
    tensors (the ones that get gradients); `grad_weight` is the upstream gradient."""

    op: str
    feats: tuple
    grad_weight: torch.Tensor
    per_class = True  # its shapes depend on the class count C

    def call(self, impl, *feats):
        raise NotImplementedError

    def bytes_model(self, pass_name: str) -> int:
        raise NotImplementedError


def _gen(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


class PscProblem(Problem):
    op = "psc_terms"

    def __init__(self, n, h, w, dtype, device, classes=21):
        m, g = n * h * w, _gen(device)
        self.shape, self.classes = [2, m, PSC_DIM], classes
        self.feats = tuple(torch.randn(m, PSC_DIM, generator=g, device=device).relu().to(dtype)
                           for _ in range(2))
        self.labels = [torch.randint(0, classes, (m,), generator=g, device=device) for _ in range(2)]
        protos = [F.normalize(torch.randn(classes, PSC_DIM, generator=g, device=device), dim=1)
                  for _ in range(2)]
        banks = [torch.randn(classes, PSC_DIM, generator=g, device=device) for _ in range(2)]
        self.consts = (*self.labels, *protos, *banks)
        self.grad_weight = torch.full((4,), 0.1, device=device)  # PSC = 0.1 * sum of the terms

    def call(self, impl, f1, f2):
        if callable(impl):  # a compiled reference
            return impl(f1, f2, *self.consts, 0.1)
        return ops.psc_terms(f1, f2, *self.consts, tau=0.1, impl=impl)

    reference = staticmethod(ops.psc_terms_reference)

    def bytes_model(self, pass_name):
        emb = sum(f.numel() * f.element_size() for f in self.feats)
        labels = sum(y.numel() * y.element_size() for y in self.labels)
        return emb + labels + (emb if pass_name == "fwd+bwd" else 0)


class RoiProblem(Problem):
    op = "roi_pool"
    per_class = False  # RSC pools [bg, fg] whatever the class count

    def __init__(self, n, h, w, dtype, device, classes=None):
        g = _gen(device, 1)
        self.shape, self.classes = [n, RSC_DIM, h * w], None
        self.feats = (torch.randn(n, RSC_DIM, h * w, generator=g, device=device).to(dtype),)
        fg = (torch.rand(n, 1, h * w, generator=g, device=device) > 0.7).float()
        self.masks = torch.cat([1 - fg, fg], dim=1)  # [bg, fg] as RSC builds them
        self.grad_weight = torch.randn(n, 2, RSC_DIM, generator=g, device=device)

    def call(self, impl, feats):
        if callable(impl):
            return impl(feats, self.masks, 1e-5, 1e-5)
        return ops.roi_pool(feats, self.masks, impl=impl)

    reference = staticmethod(ops.roi_pool_reference)

    def bytes_model(self, pass_name):
        f = self.feats[0].numel() * self.feats[0].element_size()
        return f + self.masks.numel() * 4 + (f if pass_name == "fwd+bwd" else 0)


class TopkProblem(Problem):
    op = "topk_proto"

    def __init__(self, n, h, w, dtype, device, classes=21):
        m, g = n * h * w, _gen(device, 2)
        rows = classes - 1  # CSC: one class vector per foreground class
        self.shape, self.classes = [rows, m, RSC_DIM], classes
        self.scores = torch.rand(rows, m, generator=g, device=device)
        self.feats = (torch.randn(m, RSC_DIM, generator=g, device=device).to(dtype),)
        self.grad_weight = torch.randn(rows, RSC_DIM, generator=g, device=device)
        self.k = min(TOPK, m)

    def call(self, impl, feats):
        if callable(impl):
            return impl(self.scores, feats, self.k)
        return ops.topk_proto(self.scores, feats, self.k, impl=impl)

    reference = staticmethod(ops.topk_proto_reference)

    def bytes_model(self, pass_name):
        f = self.feats[0]
        gathered = self.scores.shape[0] * self.k * f.shape[1] * f.element_size()
        dense_grad = f.numel() * f.element_size() if pass_name == "fwd+bwd" else 0
        return self.scores.numel() * 4 + gathered + dense_grad


PROBLEMS = {"psc_terms": PscProblem, "roi_pool": RoiProblem, "topk_proto": TopkProblem}


def make_runner(problem: Problem, impl, pass_name: str):
    """A no-argument callable doing one forward (no graph) or one forward + backward."""
    if pass_name == "fwd":
        def run():
            with torch.no_grad():
                return problem.call(impl, *problem.feats)
        return run
    leaves = [f.detach().requires_grad_(True) for f in problem.feats]

    def run_bwd():
        out = problem.call(impl, *leaves)
        return torch.autograd.grad(out, leaves, problem.grad_weight)
    return run_bwd


def max_rel_err(actual, expected) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


_COMPILED: dict = {}


def compiled(problem: Problem):
    """torch.compile of the op's reference, one per op (dynamo re-specialises per shape/dtype)."""
    if problem.op not in _COMPILED:
        _COMPILED[problem.op] = torch.compile(problem.reference, dynamic=False)
    return _COMPILED[problem.op]


# ------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------
def measure(problem, impl_name, pass_name, dtype_name, case, args, peak_bw):
    impl = compiled(problem) if impl_name == "compile" else ("torch" if impl_name == "eager" else "triton")
    device = problem.feats[0].device
    record = dict(op=problem.op, case=case, classes=problem.classes, impl=impl_name, dtype=dtype_name,
                  device=args.device_name, shape=problem.shape, bytes_model=problem.bytes_model(pass_name))
    record["pass"] = pass_name
    run = make_runner(problem, impl, pass_name)
    try:
        first = run()  # compiles (torch.compile / Triton JIT) outside the timing
        if impl_name != "eager":
            ref = make_runner(problem, "torch", pass_name)()
            pairs = [(first, ref)] if pass_name == "fwd" else list(zip(first, ref))
            record["max_rel_err"] = max(max_rel_err(a, e) for a, e in pairs)
        if device.type == "cuda":
            record["ms"], record["p20"], record["p80"] = time_cuda(run, rep_ms=args.rep_ms)
            peak, before = peak_memory_cuda(run)
            record["peak_mem_bytes"], record["extra_mem_bytes"] = peak, peak - before
            if peak_bw:
                record["roofline_frac"] = record["bytes_model"] / (record["ms"] * 1e-3) / peak_bw
        else:
            record["ms"], record["p20"], record["p80"] = time_cpu(run, reps=args.cpu_reps)
    except Exception as exc:  # one broken configuration must not lose the others' numbers
        record["error"] = f"{type(exc).__name__}: {exc}"[:300]
        traceback.print_exc()
    return record


def class_counts_of(op: str, args) -> list:
    """The --classes an op runs at: each for psc_terms / topk_proto, one (unused) for roi_pool."""
    return list(args.classes) if PROBLEMS[op].per_class else list(args.classes[:1])


def interpreter_checks(args):
    """CPU only: the Triton kernels (interpreter) against the references on tiny shapes."""
    records = []
    tiny = (("psc_terms", (1, 8, 8)), ("roi_pool", (2, 5, 7)), ("topk_proto", (1, 6, 10)))
    runs = [(op, shape, classes, dtype_item) for op, shape in tiny for classes in class_counts_of(op, args)
            for dtype_item in DTYPES.items()]
    for op, (n, h, w), classes, (dtype_name, dtype) in runs:
        problem = PROBLEMS[op](n, h, w, dtype, "cpu", classes=classes)
        t0 = time.perf_counter()
        got = make_runner(problem, "triton", "fwd+bwd")()
        secs = time.perf_counter() - t0
        ref = make_runner(problem, "torch", "fwd+bwd")()
        err = max(max_rel_err(a, e) for a, e in zip(got, ref))
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        records.append(dict(op=op, case="tiny", classes=problem.classes, impl="triton-interpret", dtype=dtype_name,
                            device=args.device_name, shape=problem.shape, ms=secs * 1e3,
                            max_rel_err=err, ok=err <= tol,
                            note="interpreter: correctness only (grad of fwd+bwd)",
                            **{"pass": "fwd+bwd"}))
        print(f"interpreter {op:10s} C={problem.classes} {dtype_name}: max rel err of grads {err:.2e} "
              f"({'ok' if err <= tol else 'FAIL'}, tol {tol:g})")
    return records


def plan(args):
    """(case, op, classes, dtype, pass, impl) tuples to run here: first every eager (and, on CUDA, triton)
    measurement, then the torch.compile baselines, which cost a compile each and are the ones
    a --budget-s cut drops."""
    cases = args.cases or (["official", "fullres", "large"] if ON_CUDA else ["official", "fullres"])
    if args.quick and not args.cases:
        cases = ["official", "fullres"] if ON_CUDA else ["official"]
    grid = [(case, op, classes, dtype_name, pass_name) for case in cases for op in PROBLEMS
            for classes in class_counts_of(op, args)
            for dtype_name in DTYPES for pass_name in PASSES]
    for item in grid:
        yield (*item, "eager")
        if ON_CUDA:
            yield (*item, "triton")
    if args.no_compile:
        return
    for case, op, classes, dtype_name, pass_name in grid:
        # CPU: inductor builds C++ (~80 s cold for the first graph): --quick compiles one
        # graph per class count, psc_terms fp32 fwd+bwd, the case the kernels exist for.
        if ON_CUDA or not args.quick or (op, dtype_name, pass_name) == ("psc_terms", "fp32", "fwd+bwd"):
            yield case, op, classes, dtype_name, pass_name, "compile"


def ratio_rows(records):
    """Side-by-side eager / compile / triton medians per (op, case, classes, pass, dtype)."""
    table: dict = {}
    for r in records:
        if "ms" not in r or r["impl"] == "triton-interpret":
            continue
        key = (r["op"], r["case"], r.get("classes"), r["pass"], r["dtype"])
        table.setdefault(key, {})[r["impl"]] = r["ms"]
    rows = []
    for (op, case, classes, pass_name, dtype), ms in table.items():
        row = {"op": op, "case": case, "classes": classes, "pass": pass_name, "dtype": dtype,
               "eager_ms": ms.get("eager"), "compile_ms": ms.get("compile"), "triton_ms": ms.get("triton")}
        if ms.get("triton"):
            row["speedup_vs_eager"] = ms["eager"] / ms["triton"] if ms.get("eager") else None
            row["speedup_vs_compile"] = ms["compile"] / ms["triton"] if ms.get("compile") else None
        elif ms.get("compile") and ms.get("eager"):
            row["compile_speedup_vs_eager"] = ms["eager"] / ms["compile"]
        rows.append(row)
    return rows


def class_counts(text: str) -> list:
    """'21,81' -> [21, 81]; each at least 2 (one foreground class and the background)."""
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 21,81, got {text!r}")
    if not counts or min(counts) < 2:
        raise argparse.ArgumentTypeError(f"each class count must be >= 2 (foreground + background), got {text!r}")
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer cases (CPU: official only; CUDA: official + fullres), shorter timing")
    ap.add_argument("--json", help="output JSON (default benchmarks/results/psc-<device>-<date>.json; "
                                   ".csv and .md are written beside it)")
    ap.add_argument("--cases", type=lambda s: s.split(","), help=f"subset of {','.join(CASES)}")
    ap.add_argument("--classes", type=class_counts, default=list(CLASS_COUNTS),
                    help="class counts C (foreground + background), comma-separated; default 21,81 "
                         "(PASCAL VOC, MS COCO). psc_terms and topk_proto run at each; roi_pool has none")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    ap.add_argument("--rep-ms", type=int, default=None, help="do_bench time per measurement (CUDA)")
    ap.add_argument("--out-dir", help="write psc-<device>-<date>.{json,csv,md} into this folder")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting torch.compile measurements after this many seconds")
    args = ap.parse_args(argv)
    for case in args.cases or []:
        if case not in CASES:
            ap.error(f"--cases: unknown case {case!r} (expected {', '.join(CASES)})")
    args.rep_ms = args.rep_ms or (30 if args.quick else 100)
    args.cpu_reps = 3 if args.quick else 5
    if not ON_CUDA:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    base = default_result_path("psc")
    if args.out_dir:
        base = Path(args.out_dir) / base.name
    if args.json:
        base = Path(args.json).with_suffix("")
    paths = dict(json_path=f"{base}.json", csv_path=f"{base}.csv", md_path=f"{base}.md")
    meta = collect_meta(benchmark="psc", quick=args.quick, cases={c: CASES[c] for c in CASES},
                        classes=args.classes)
    peak_bw = peak_bandwidth() if ON_CUDA else None
    args.device_name = meta["device"]
    device = "cuda" if ON_CUDA else "cpu"
    t_start = time.perf_counter()
    records = [] if ON_CUDA else interpreter_checks(args)
    write_results(records, meta=meta, **paths)
    problems: dict = {}
    for case, op, classes, dtype_name, pass_name, impl in plan(args):
        if impl == "compile" and args.budget_s and time.perf_counter() - t_start > args.budget_s:
            print(f"--budget-s {args.budget_s:g} spent: skipping the remaining compile baselines")
            meta["compile_cut_by_budget"] = True
            break
        key = (case, op, classes, dtype_name)
        if key not in problems:
            problems.clear()  # one problem's inputs resident at a time (large fp32 ~ GBs)
            if ON_CUDA:
                torch.cuda.empty_cache()
            problems[key] = PROBLEMS[op](*CASES[case], DTYPES[dtype_name], device, classes=classes)
        rec = measure(problems[key], impl, pass_name, dtype_name, case, args, peak_bw)
        records.append(rec)
        print(f"{op:10s} {case:8s} C={problems[key].classes or '-'!s:3s} {pass_name:7s} {dtype_name} {impl:8s} "
              + (f"{rec['ms']:9.4f} ms" if "ms" in rec else f"ERROR {rec.get('error')}")
              + (f"  roofline {rec['roofline_frac']:.2%}" if rec.get("roofline_frac") else ""),
              flush=True)
        write_results(records, meta=meta, **paths)  # incremental: a timeout keeps what ran
    ratios = ratio_rows(records)
    ratio_md = markdown_table(ratios)
    write_results(records, meta=meta, md_columns=TABLE_COLUMNS, md_extra=ratio_md, **paths)
    print()
    print(markdown_table(records, TABLE_COLUMNS))
    print()
    print(ratio_md)
    print(f"\nwrote {paths['json_path']} (+ .csv, .md) in {time.perf_counter() - t_start:.0f} s")
    failed = [r for r in records if r.get("ok") is False or "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
