#!/usr/bin/env bash
# One-shot check of the Triton kernels on a GPU machine (< 8 minutes):
#   1. the cuda-marked tests of tests/test_kernels.py (compiled kernels at the real shapes),
#   2. benchmarks/bench_psc.py (eager / torch.compile / triton, fp32 + bf16, fwd + fwd+bwd).
# Results and logs land in $OUT (default benchmarks/results/gpu-check): env.txt, tests.log,
# bench.log and psc-<device>-<date>.{json,csv,md}. Copy the latter into benchmarks/results/.
#
# The GPU machine has Python 3.12, torch 2.11, triton 3.6 and pytest but no hsc-fast install:
# the repo root goes on PYTHONPATH; wheels carried in an ignored .whl/ folder are installed first.
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
# Compiled kernels, not the interpreter (tests/conftest.py only sets a default of 1).
export TRITON_INTERPRET=0

{
    date -u
    git rev-parse HEAD 2>/dev/null || echo "git sha: unknown"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
echo "== cuda kernel tests"
timeout 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider -o addopts="" tests/test_kernels.py \
    2>&1 | tee "$OUT/tests.log" || status=1

echo "== benchmark"
# The compile baselines run last and stop being started after --budget-s; the hard timeout
# leaves the incrementally written JSON of whatever finished.
timeout 330 "$PY" benchmarks/bench_psc.py --out-dir "$OUT" --rep-ms 50 --budget-s 200 "$@" \
    2>&1 | tee "$OUT/bench.log" || status=1

ls -l "$OUT"
exit $status
