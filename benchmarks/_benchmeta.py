"""Shared benchmark plumbing: run metadata, result paths, timers and JSON/CSV/markdown writers.

Every benchmark in this folder writes `{"meta": collect_meta(), "results": [record, ...]}` with
one flat dict per measurement, so results from different machines and commits can be compared
by joining on their keys. Use from a benchmark script (benchmarks/ is put on sys.path):

    from _benchmeta import collect_meta, default_result_path, write_results
    base = default_result_path("psc")              # benchmarks/results/psc-<device>-<date>
    write_results(records, f"{base}.json", f"{base}.csv", f"{base}.md")
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"

# Peak HBM bandwidth (bytes/s) by marketing name: the roofline denominators.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


# ------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------
def git_sha() -> str | None:
    """HEAD of the checkout, with "-dirty" when tracked files differ from it (None outside git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO, capture_output=True,
                               timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def cpu_name() -> str:
    """The CPU's model name: the package's one reader (the ablation records it too)."""
    from hsc_fast.engine.ablation import cpu_model
    return cpu_model()


def device_name() -> str:
    """The GPU's name when CUDA is usable, else the CPU model."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return cpu_name()


def device_slug(name: str | None = None) -> str:
    """Short file-name form: "h100", "h200", "a100", ... for known GPUs, else "cpu" / a cleaned name."""
    name = name or device_name()
    for known in PEAK_BANDWIDTH:
        if known.lower() in name.lower():
            return known.lower()
    try:
        import torch
        if not torch.cuda.is_available():
            return "cpu"
    except ImportError:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "gpu"


def peak_bandwidth(name: str | None = None) -> float | None:
    """Peak HBM bytes/s of a known GPU (None for CPUs and unknown devices)."""
    name = name or device_name()
    for known, bw in PEAK_BANDWIDTH.items():  # H200 before H100: dict order
        if known.lower() in name.lower():
            return bw
    return None


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "?")
    except Exception:  # not installed, or broken on this platform
        return None


def collect_meta(**extra) -> dict:
    """Machine, library versions, git sha, device and date; `extra` keys are added as given."""
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "device": device_name(),
        "device_slug": device_slug(),
        "cuda": None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        import torch
        meta["cuda"] = torch.version.cuda
        meta["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            meta.update(gpu_count=torch.cuda.device_count(), gpu_memory_bytes=props.total_memory,
                        gpu_sms=props.multi_processor_count,
                        peak_bandwidth_bytes_per_s=peak_bandwidth())
    except ImportError:
        pass
    meta.update(extra)
    return meta


def default_result_path(prefix: str | None = None, date: str | None = None) -> Path:
    """benchmarks/results/[<prefix>-]<device>-<YYYY-MM-DD> (no extension: add .json/.csv/.md)."""
    date = date or _dt.date.today().isoformat()
    stem = f"{device_slug()}-{date}"
    return RESULTS_DIR / (f"{prefix}-{stem}" if prefix else stem)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def quantiles_ms(samples_s: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds of wall-clock samples in seconds."""
    ms = sorted(s * 1e3 for s in samples_s)
    if len(ms) == 1:
        return ms[0], ms[0], ms[0]
    q = statistics.quantiles(ms, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(ms), q[1], q[7]


def time_cpu(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> tuple[float, float, float]:
    """Wall-clock (median, p20, p80) ms of fn() on the CPU, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return quantiles_ms(samples)


def time_cuda(fn: Callable[[], object], rep_ms: int = 100, warmup_ms: int = 25) -> tuple[float, float, float]:
    """(median, p20, p80) ms with triton.testing.do_bench, which flushes L2 before each rep."""
    from triton.testing import do_bench
    med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80)


def peak_memory_cuda(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak bytes allocated during one fn() call, bytes allocated before it): the peak includes
    the inputs already resident, the difference is what the call itself needed."""
    import torch
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated()), int(before)


# ------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------
def _columns(records: Iterable[dict]) -> list[str]:
    cols: list[str] = []
    for r in records:
        cols.extend(k for k in r if k not in cols)
    return cols


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)


def markdown_table(records: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of `records` (all keys, first-seen order, unless `columns`)."""
    cols = list(columns) if columns else _columns(records)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in records]
    return "\n".join(lines)


def write_csv(records: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_columns(records))
        writer.writeheader()
        for r in records:
            writer.writerow({k: _cell(v) if isinstance(v, (list, tuple)) else v for k, v in r.items()})
    return path


def write_results(records, json_path, csv_path=None, md_path=None, meta=None, md_columns=None,
                  md_extra: str = ""):
    """Write {"meta": meta or collect_meta(), "results": records} as JSON, plus the records as CSV
    and a markdown table (`md_extra` is appended below it) when those paths are given.
    Returns the JSON path. Also accepts the short form write_results(json_path, payload_dict),
    which writes the payload as-is (bench_loader uses it)."""
    if isinstance(records, (str, Path)) and isinstance(json_path, dict):
        records, json_path = json_path, records
        payload = dict(records)
        payload.setdefault("meta", meta or collect_meta())
    else:
        records = list(records)
        payload = {"meta": meta or collect_meta(), "results": records}
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    rows = payload.get("results", [])
    if csv_path and rows:
        write_csv(rows, csv_path)
    if md_path and rows:
        md_path = Path(md_path)
        md_path.parent.mkdir(parents=True, exist_ok=True)
        text = markdown_table(rows, md_columns)
        md_path.write_text(text + ("\n\n" + md_extra if md_extra else "") + "\n")
    return json_path
