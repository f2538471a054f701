#!/usr/bin/env bash
# `make gpu-check`: the one script for the GPU test machine (see ../shared/PLATFORM.md).
#
# That machine has torch, triton, pytest and friends preinstalled and no network, so this runs
# fastbert from the checkout (PYTHONPATH=.) with the machine's own packages: it installs
# nothing. Steps: environment report, the test suite on the GPU (compiled kernels, plus the
# tests marked gpu), then every benchmark. Logs, CSVs and markdown tables go to
# $FASTBERT_RESULTS (default benchmarks/results). Budget: under 8 minutes on an H100.
#
# To bring results back from the device tool, point FASTBERT_RESULTS at a scratch folder and
# pack it into $OUT (only 8 files come back):
#   make gpu-check RESULTS=/tmp/r; tar czf $OUT/results.tgz -C /tmp/r .
set -uo pipefail
cd "$(dirname "$0")/.."
R="${FASTBERT_RESULTS:-benchmarks/results}"
mkdir -p "$R"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
status=0

echo "== environment" | tee "$R/gpu_env.txt"
"$PY" -m fastbert.env 2>&1 | tee -a "$R/gpu_env.txt"
nvidia-smi 2>&1 | head -15 >> "$R/gpu_env.txt"

if ls csrc/*.cu >/dev/null 2>&1 && [ "${FASTBERT_SKIP_CSRC:-0}" != 1 ]; then
  echo "== building csrc/ against this machine's torch" | tee "$R/gpu_build.log"
  FASTBERT_BUILD_CUDA=1 timeout 300 "$PY" setup.py build_ext --inplace >> "$R/gpu_build.log" 2>&1 \
    || { echo "csrc build FAILED (see gpu_build.log)"; status=1; }
fi

echo "== tests on the GPU"
# the AOT compile test needs no GPU and runs in CI; skip it here to save device time
timeout 200 "$PY" -m pytest tests -q -m "not aot" -p no:cacheprovider \
  --junitxml="$R/gpu_tests.xml" 2>&1 | tee "$R/gpu_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== benchmarks"
FASTBERT_RESULTS="$R" timeout 300 "$PY" -m benchmarks.run_all 2>&1 | tee "$R/gpu_bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== gpu-check finished with status $status; results in $R"
exit $status
