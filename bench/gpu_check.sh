#!/usr/bin/env bash
# One call on the GPU machine: GPU kernel tests (pytest -m gpu), then the kernel benchmark; logs in $OUT.
# The tests compile their own kernels while the benchmark pre-compiles its ~700 in parallel processes;
# timing starts only after both are done (TEST_TIMEOUT seconds at most for the tests, default 1800).
# Usage: bash bench/gpu_check.sh [bench args, e.g. --quick, or --targets --dims 128,512 --small-sweep]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# PYTEST_ARGS: e.g. "-n 6" (pytest-xdist: the tests mostly compile; the summary of differing codes is then
# per worker and not printed)
( timeout "${TEST_TIMEOUT:-1800}" python3 -m pytest -m gpu tests/kernels/test_triton_ops.py tests/kernels/test_gluon.py -q -p no:cacheprovider \
    ${PYTEST_ARGS:-} \
    > "$OUT/pytest_gpu.log" 2>&1;
  echo "pytest exit: $?" >> "$OUT/pytest_gpu.log" ) &
TESTS=$!
python3 -m bench.bench_kernels --out "$OUT" --compile-only "$@" 2>&1 | tee "$OUT/compile.log"
wait $TESTS
tail -5 "$OUT/pytest_gpu.log"
python3 -m bench.bench_kernels --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_stdout.log"
