#!/usr/bin/env bash
# One-shot check of a GPU machine (< 9 minutes), everything under $OUT (default
# benchmarks/results/gpu-check):
#   1. env.txt       date, commit, nvidia-smi, versions
#   2. doctor.json   python -m hsc_fast.cli.doctor: versions, every kernel vs its reference (compiled),
#                    AOT compile for the local arch, CRF builds vs pydensecrf, 2-step training, bench
#   3. tests.log     the cuda-marked tests (compiled kernels at the real shapes, GPU CRF)
#   4. psc-*.{json,csv,md}, crf-*  benchmarks/bench_psc.py and bench_crf.py
# Copy the results into benchmarks/results/ with the device name in the file names.
#
# The GPU machine may lack an hsc-fast install: the repo root goes on PYTHONPATH; wheels carried
# in an ignored .whl/ folder (deepspeed, webdataset, pydensecrf2) are installed first.
# Usage (repo root): bash benchmarks/gpu_check.sh [extra bench_psc.py args]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Compiled kernels, not the interpreter.
export TRITON_INTERPRET=0
export HSC_AOT_CACHE="$OUT/aot-cache"

{
    date -u
    git rev-parse HEAD 2>/dev/null || echo "git sha: unknown"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
echo "== doctor"
timeout 200 "$PY" -m hsc_fast.cli.doctor --json "$OUT/doctor.json" 2>&1 | tee "$OUT/doctor.log" || status=1

echo "== cuda tests"
timeout 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider -o addopts="" \
    tests/kernels/test_kernels.py tests/crf/test_lattice.py tests/crf/test_dense.py 2>&1 | tee "$OUT/tests.log" || status=1

echo "== benchmarks"
# The compile baselines run last and stop being started after --budget-s; the hard timeout
# leaves the incrementally written JSON of whatever finished.
timeout 150 "$PY" benchmarks/bench_psc.py --out-dir "$OUT" --rep-ms 50 --budget-s 90 "$@" \
    2>&1 | tee "$OUT/bench.log" || status=1
timeout 90 "$PY" benchmarks/bench_crf.py --quick --out "$OUT/crf-gpu" 2>&1 | tee "$OUT/bench_crf.log" || status=1

rm -rf "$OUT/aot-cache"
ls -l "$OUT"
exit $status
