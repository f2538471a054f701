#!/usr/bin/env bash
# `make gpu-check`: the one script for the GPU test machine (see ../shared/PLATFORM.md).
#
# That machine has torch, triton, pytest and friends preinstalled and no network, so this runs
# fastbert from the checkout (PYTHONPATH=.) with the machine's own packages: it installs
# nothing. Steps: environment report, the test suite on the GPU (compiled kernels, plus the
# tests marked gpu), then every benchmark. Logs, CSVs and markdown tables go to
# $FASTBERT_RESULTS (default benchmarks/results). Budget: under 8 minutes on an H100.
#
# With the device tool, $OUT is set: the results are also packed into
# $OUT/gpu_check_results.tgz (only 8 files come back from $OUT):
#   make gpu-check RESULTS=/tmp/r
# Elsewhere, PYTHON=/path/to/python picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
R="${FASTBERT_RESULTS:-benchmarks/results}"
mkdir -p "$R"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
status=0
if ! "$PY" -c "import torch, triton" 2>/dev/null; then
  echo "$PY cannot import torch and triton; set PYTHON=/path/to/python (the GPU machine's own)" >&2
  exit 2
fi

echo "== environment" | tee "$R/gpu_env.txt"
"$PY" -m fastbert.env 2>&1 | tee -a "$R/gpu_env.txt"
nvidia-smi 2>&1 | head -15 >> "$R/gpu_env.txt"

if ls csrc/*.cu >/dev/null 2>&1 && [ "${FASTBERT_SKIP_CSRC:-0}" != 1 ]; then
  echo "== building csrc/ against this machine's torch" | tee "$R/gpu_build.log"
  FASTBERT_BUILD_CUDA=1 timeout 300 "$PY" setup.py build_ext --inplace >> "$R/gpu_build.log" 2>&1 \
    || { echo "csrc build FAILED (see gpu_build.log)"; status=1; }
fi

echo "== tests on the GPU"
# One pytest process per test file, several at a time: on the GPU every kernel specialization
# is JIT-compiled on first use, and compiles are single-threaded, so the 16 cores pay off.
# The AOT compile tests need no GPU and run in CI; they are skipped here.
rm -rf "$R/.tests" && mkdir -p "$R/.tests"
ls tests/test_*.py tests/*/test_*.py | xargs -P "${FASTBERT_TEST_JOBS:-8}" -I{} sh -c '
  f="$1"; n=$(echo "$f" | tr / _)
  { echo "=== $f"; timeout 240 "$2" -m pytest "$f" -q -m "not aot" -p no:cacheprovider; } \
    > "$3/.tests/$n.log" 2>&1
  echo "$? $f" >> "$3/.tests/status"' _ {} "$PY" "$R"
cat "$R"/.tests/*.log > "$R/gpu_tests.log"
sort -k2 "$R/.tests/status" | tee "$R/gpu_tests_status.txt"
grep -h -E "(passed|failed|error|no tests ran).* in [0-9.]+s" "$R"/.tests/*.log || true
awk '$1 != 0 && $1 != 5 {bad=1} END {exit bad}' "$R/.tests/status" || status=1
rm -rf "$R/.tests"

echo "== benchmarks"
# one process per script, one after another (timings must not share the GPU), each with its
# own time limit so that one slow or stuck benchmark cannot take the others' time
: > "$R/gpu_bench.log"
for f in benchmarks/bench_*.py; do
  name=$(basename "$f" .py)
  echo "--- $name" | tee -a "$R/gpu_bench.log"
  FASTBERT_RESULTS="$R" timeout "${FASTBERT_BENCH_TIMEOUT:-150}" "$PY" -m "benchmarks.$name" 2>&1 \
    | tee -a "$R/gpu_bench.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "--- $name FAILED (exit $rc)" | tee -a "$R/gpu_bench.log"; status=1; }
done

echo "== gpu-check finished with status $status; results in $R"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  # the device tool brings back at most 8 files from $OUT: one archive plus the summaries
  tar czf "$OUT/gpu_check_results.tgz" -C "$R" . && cp "$R/gpu_tests_status.txt" "$OUT/"
  echo "packed $R into $OUT/gpu_check_results.tgz"
fi
exit $status
