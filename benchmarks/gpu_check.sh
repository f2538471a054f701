#!/usr/bin/env bash
# `make gpu-check`: the one script for the GPU test machine (see ../shared/PLATFORM.md).
#
# That machine has torch, triton, pytest (with pytest-xdist and pytest-timeout) and friends
# preinstalled and no network, so this runs fastbert from the checkout (PYTHONPATH=.) with the
# machine's own packages: it installs nothing. Steps, most important first:
#   1. environment report (card, driver, versions) and, if csrc/ has kernels, their build;
#   2. the tests marked `gpu` (fp16/bf16 at real sizes: what closes the kernel issues);
#   3. (phase "tests", not in the default since 2026-11-28) every other test, on CUDA tensors
#      and compiled kernels (the CPU suite runs them in the Triton interpreter): ~1440 tests,
#      more than its 25% share of a one-call budget, and what it took went from the benches;
#      run it in a call of its own (FASTBERT_GPU_PHASES=tests) when device time is left;
#   4. the benchmarks, one process each, attention / cross-entropy / embedding / LSTM (LayerNorm
#      when FASTBERT_BENCHES names it), sharing what is left of the budget (each writes its
#      CSV + markdown after every case and stops starting cases at its share's end), after a
#      compile-ahead warm-up of them in parallel processes (FASTBERT_WARM_SECS, default 60, at
#      most 25% of the benches' time, 0 for none; FASTBERT_WARM_PROCS processes split over the
#      scripts, default the cores up to 12): see the bench phase;
#   5. the issues' speed targets judged from those CSVs (benchmarks/targets.py -> targets.md,
#      also in the summary).
# Logs, CSVs and markdown tables go to $FASTBERT_RESULTS (default benchmarks/results).
#
# Time: the whole script keeps to $FASTBERT_GPU_BUDGET seconds (default 480) so that it fits
# one device call (10 minutes at most) with room for the machine's start; each phase gets a
# share and a hard `timeout`. The device lends 15 minutes a task, start included: run this
# once, read the summary, fix, rerun only what failed.
#
# With the device tool, $OUT is set: the results are packed into $OUT/gpu_check_results.tgz
# after every phase (so a call cut off at its limit still brings back what was done), with
# the summary $OUT/gpu_check_summary.txt beside it:
#   make gpu-check RESULTS=/tmp/r
# (run `make bench-wheels` here first and carry .bench_wheels: the peers the machine lacks,
# Liger-Kernel, are then timed too)
# Elsewhere, PYTHON=/path/to/python picks the interpreter (default python3).
# For a rerun of part of it: FASTBERT_GPU_PHASES picks phases (default "gpu-tests bench";
# "tests" adds the rest of the suite, "profile" adds benchmarks/profile_overhead.py's per-call
# host / GPU / kernel times), FASTBERT_PYTEST_ARGS adds pytest arguments (e.g. "-k attention";
# split on spaces, so a -k expression must be one word), FASTBERT_BENCHES
# picks benchmarks with weights, in priority order (default "attention:3 cross_entropy:2
# embedding:1 lstm:3": the scripts whose cases the issues' targets judge; add layer_norm:1
# for its table). FASTBERT_TEST_JOBS sets the pytest workers (default 12).
# Every phase and bench is killed by the budget's end (a device call cut at its limit loses
# what was not packed; the results are also packed every 30 s while the benches run): set
# FASTBERT_GPU_BUDGET to the device time left minus the machine's start and ~60 s.
# The settings are checked first (an unknown phase, a bad bench weight or name: refused, the
# reason in the summary). The profile phase gets FASTBERT_PROFILE_SECS (default 90) kept from
# the benches. Without a CUDA device the script refuses to run (the benches would time their
# CPU quick mode and report "ok"): FASTBERT_GPU_CHECK_CPU=1 rehearses it on a CPU anyway. A
# bench's summary line counts its rows that could not be timed; none timed is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
R="${FASTBERT_RESULTS:-benchmarks/results}"
mkdir -p "$R"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the default paths are what is measured: no interpreter, no backend or LSTM mode forced by the
# environment (the benches time the opt-in modes themselves, under their own names)
unset TRITON_INTERPRET FASTBERT_BACKEND FASTBERT_LSTM_COOP FASTBERT_LSTM_CUDA_GRAPH
# one Triton cache for every process of the run (the warm-up fills it for the timed benches):
# Inductor points an unset TRITON_CACHE_DIR at its own directory inside a process that runs
# torch.compile, and Triton reads the variable at every compile, so a kernel's cache would
# depend on whether a torch.compile call came first in that process (review s20 A)
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TRITON_HOME:-$HOME}/.triton/cache}"
PY="${PYTHON:-python3}"
BUDGET="${FASTBERT_GPU_BUDGET:-480}"
PHASES="${FASTBERT_GPU_PHASES:-gpu-tests bench}"
JOBS="${FASTBERT_TEST_JOBS:-12}"
START=$(date +%s)
SUMMARY="$R/gpu_check_summary.txt"
status=0

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }
say() { echo "$*" | tee -a "$SUMMARY"; }
pack() {
  if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    # a temporary name of this shell's own (the background packer runs this too)
    local part="$OUT/.gpu_check_results.tgz.$BASHPID" rc
    # a file appended to while it is read (the bench log) makes tar exit 1: still a good
    # archive of what was there
    tar czf "$part" --warning=no-file-changed -C "$R" . 2>/dev/null; rc=$?
    if [ "$rc" -le 1 ]; then mv "$part" "$OUT/gpu_check_results.tgz"; else rm -f "$part"; fi
    cp "$SUMMARY" "$OUT/.summary.$BASHPID" && mv "$OUT/.summary.$BASHPID" "$OUT/gpu_check_summary.txt"
  fi
}
phase_on() { case " $PHASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if ! "$PY" -c "import torch, triton" 2>/dev/null; then
  echo "$PY cannot import torch and triton; set PYTHON=/path/to/python (the GPU machine's own)" >&2
  exit 2
fi
: > "$SUMMARY"
say "== gpu-check $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${BUDGET}s, phases: $PHASES"

# the settings, checked before anything costly runs (a typo found after the tests would cost the
# whole call's bench time): refused with the reason in the summary, packed
refuse() { say "gpu-check refused: $*"; pack; exit 2; }
# numbers are whole seconds / weights, read as decimal (bash takes a leading 0 for octal)
case "$BUDGET" in ''|*[!0-9]*) refuse "FASTBERT_GPU_BUDGET must be a number of seconds, got '$BUDGET'" ;; esac
BUDGET=$((10#$BUDGET))
PROFILE_SECS="${FASTBERT_PROFILE_SECS:-90}"
case "$PROFILE_SECS" in ''|*[!0-9]*)
  refuse "FASTBERT_PROFILE_SECS must be a number of seconds, got '$PROFILE_SECS'" ;; esac
read -r -a phase_list <<< "$PHASES"
PHASES="${phase_list[*]}"  # one space between names, whatever separated them (phase_on)
for p in $PHASES; do
  case "$p" in gpu-tests|tests|bench|profile) ;;
    *) refuse "unknown phase '$p' in FASTBERT_GPU_PHASES (gpu-tests, tests, bench, profile)" ;;
  esac
done
[ -n "${PHASES// /}" ] || refuse "FASTBERT_GPU_PHASES names no phase"
# the opt-in profile phase runs after the benches: its time is kept from them
if phase_on profile; then PROFILE_SECS=$((10#$PROFILE_SECS)); else PROFILE_SECS=0; fi
# the compile-ahead warm-up before the timed benches (0 s: none) and its processes
WARM_SECS="${FASTBERT_WARM_SECS:-60}"
WARM_PROCS="${FASTBERT_WARM_PROCS:-$(min "$(nproc 2>/dev/null || echo 4)" 12)}"
case "$WARM_SECS" in ''|*[!0-9]*)
  refuse "FASTBERT_WARM_SECS must be a number of seconds, got '$WARM_SECS'" ;; esac
case "$WARM_PROCS" in ''|*[!0-9]*)
  refuse "FASTBERT_WARM_PROCS must be a number of processes, got '$WARM_PROCS'" ;; esac
WARM_SECS=$((10#$WARM_SECS)); WARM_PROCS=$((10#$WARM_PROCS))
[ "$WARM_PROCS" -ge 1 ] && [ "$WARM_PROCS" -le 64 ] \
  || refuse "FASTBERT_WARM_PROCS must be in [1, 64], got '$WARM_PROCS'"
# name:weight; a script's share is its weight's part of the time left (of the weights still
# to run), so time one script leaves unused goes to the next
read -r -a benches <<< "${FASTBERT_BENCHES:-attention:3 cross_entropy:2 embedding:1 lstm:3}"
for i in "${!benches[@]}"; do  # a name without a weight weighs 1
  case "${benches[$i]}" in *:*) ;; *) benches[$i]="${benches[$i]}:1" ;; esac
  name=${benches[$i]%%:*}; w=${benches[$i]##*:}
  case "$w" in ''|*[!0-9]*) refuse "FASTBERT_BENCHES: weight of '${benches[$i]}' must be >= 1" ;; esac
  w=$((10#$w))
  [ "$w" -ge 1 ] || refuse "FASTBERT_BENCHES: weight of '${benches[$i]}' must be >= 1"
  benches[$i]="$name:$w"
  [ -f "benchmarks/bench_$name.py" ] || refuse "FASTBERT_BENCHES: no benchmarks/bench_$name.py"
done
if phase_on bench && [ "${#benches[@]}" = 0 ]; then refuse "FASTBERT_BENCHES names no benchmark"; fi
# a run for the GPU machine: without a CUDA device the benches would time their CPU quick mode
# and the gpu tests skip, all "ok" (FASTBERT_GPU_CHECK_CPU=1 rehearses the script on a CPU)
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    && [ "${FASTBERT_GPU_CHECK_CPU:-0}" != 1 ]; then
  refuse "torch sees no CUDA device (nothing here would be measured on a GPU); FASTBERT_GPU_CHECK_CPU=1 runs it anyway"
fi

echo "== environment" | tee "$R/gpu_env.txt"
"$PY" -m fastbert.env 2>&1 | tee -a "$R/gpu_env.txt"
nvidia-smi 2>&1 | head -15 >> "$R/gpu_env.txt"
# an EXCLUSIVE_PROCESS GPU takes one process at a time (the warm-up's and the xdist workers'
# others would fail to start)
echo "compute mode: $(nvidia-smi --query-gpu=compute_mode --format=csv,noheader 2>/dev/null \
  || echo unknown)" >> "$R/gpu_env.txt"
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch, triton
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"card: {card}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {triton.__version__}")
EOF
# the card's slug in the result file names (<bench>_<slug>.csv): this run's files, the only
# ones the targets are judged from
SLUG=$("$PY" -c "import torch; from benchmarks._harness import card_slug, device_info; print(card_slug(device_info(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))))" 2>/dev/null | tail -1)

if ls csrc/*.cu >/dev/null 2>&1 && [ "${FASTBERT_SKIP_CSRC:-0}" != 1 ]; then
  echo "== building csrc/ against this machine's torch" | tee "$R/gpu_build.log"
  if FASTBERT_BUILD_CUDA=1 timeout "$(min 300 "$(left)")" "$PY" setup.py build_ext --inplace \
      >> "$R/gpu_build.log" 2>&1; then
    say "csrc build: ok"
  else
    say "csrc build: FAILED (see gpu_build.log)"; status=1
  fi
fi
pack

HAVE_XDIST=0
"$PY" -c "import xdist, pytest_timeout" 2>/dev/null && HAVE_XDIST=1

# run_tests NAME MARKEXPR SECONDS: the tests selected by MARKEXPR within SECONDS, verbose (one
# line per test, so a run cut off still says what passed), failures summarized at the end.
run_tests() {
  local name="$1" expr="$2" secs="$3" log="$R/gpu_$1.log" rc
  if [ "$secs" -lt 30 ]; then
    say "$name: not run (no time left in the budget)"; status=1; return
  fi
  echo "== $name (-m \"$expr\", ${secs}s)"
  if [ "$HAVE_XDIST" = 1 ]; then
    # every kernel specialization is JIT-compiled on first use and compiles are single-
    # threaded: spread the tests (not files: one file can hold most of the compiles) over
    # the cores; pytest-timeout bounds any single test
    timeout --kill-after=10 "$secs" "$PY" -m pytest tests -m "$expr" -n "$JOBS" -v -rfE \
      --timeout "$(min 150 "$secs")" -p no:cacheprovider ${FASTBERT_PYTEST_ARGS:-} > "$log" 2>&1
  else
    timeout --kill-after=10 "$secs" "$PY" -m pytest tests -m "$expr" -v -rfE \
      -p no:cacheprovider ${FASTBERT_PYTEST_ARGS:-} > "$log" 2>&1
  fi
  rc=$?
  local passed failed
  passed=$(grep -c " PASSED" "$log")
  failed=$(grep -c -E " (FAILED|ERROR)( |$)" "$log")
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    say "$name: TIMED OUT after ${secs}s ($passed passed, $failed failed/errors so far; see gpu_$name.log)"
    status=1
  else
    say "$name: exit $rc: $(grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$log" | tail -1)"
    [ "$rc" = 0 ] || [ "$rc" = 5 ] || status=1
  fi
  grep -E "^(FAILED|ERROR) " "$log" | head -40 | tee -a "$SUMMARY"
  pack
}

# with the benches, the tests get at most 55% of the budget between them, the benchmarks the
# rest; the gpu tests (133, some of them ~20 compiles each) at most 40%: what they leave goes
# to the benchmarks
if phase_on gpu-tests; then
  run_tests tests_gpu "gpu and not aot" "$(min $((BUDGET * 40 / 100)) "$(left)")"
fi
if phase_on tests; then
  # alone (no bench phase) the rest of the suite may take what is left, but for the packing
  if phase_on bench; then
    rest_secs=$(min $((BUDGET * 55 / 100 - ($(date +%s) - START))) "$(left)")
  else
    rest_secs=$(( $(left) > 40 ? $(left) - 10 : $(left) ))
  fi
  run_tests tests_rest "not gpu and not aot" "$rest_secs"
fi

if phase_on bench; then
  echo "== benchmarks"
  # peers the machine lacks, carried in as wheels (`make bench-wheels` on a machine with a
  # network fills .bench_wheels/; the device call carries it): installed without their
  # dependencies into a directory of this run's, seen by the benches only (Liger-Kernel, #4's
  # masked_lm_loss comparison (d))
  if ls .bench_wheels/*.whl >/dev/null 2>&1; then
    BENCH_SITE=$(mktemp -d)
    if "$PY" -m pip install --quiet --no-deps --no-index --target "$BENCH_SITE" \
        .bench_wheels/*.whl > "$R/gpu_bench_wheels.log" 2>&1; then
      export PYTHONPATH="$PYTHONPATH:$BENCH_SITE"
      say "bench wheels: $(cd .bench_wheels && ls *.whl | tr '\n' ' ')"
    else
      say "bench wheels: install FAILED (see gpu_bench_wheels.log)"
    fi
  else
    say "bench wheels: none (.bench_wheels/ absent: peers not installed here are not timed)"
  fi
  # the targets are judged from this run's files only: every earlier result file of this card
  # (a committed run's, or a bench not rerun now) is moved aside first
  if [ -n "$SLUG" ]; then
    for f in "$R"/*_"$SLUG".csv "$R"/*_"$SLUG".md "$R"/attention_tuned_"$SLUG".txt; do
      if [ -e "$f" ]; then mv "$f" "$f.prev"; fi
    done
  fi
  # compile ahead: every first call of a kernel specialization JIT-compiles it, single-
  # threaded (0.2-0.5 s a kernel on the 2-core dev box, AOT), and a torch.compile baseline
  # compiles a graph per shape: inside the timed scripts these compiles ran one after another
  # out of their shares (run 3's embedding script, with a torch.compile baseline, timed 1 of
  # its 3 cases; how much of a share went to compiling was not recorded: the rows' first_s
  # column now says). Before them, each script runs in a few parallel processes (--warm I/N:
  # a shard of its cases' calls of the impls that compile, each called once, untimed, nothing
  # written) that fill the on-disk Triton and Inductor caches the timed processes then load
  # from. At most FASTBERT_WARM_SECS (default 60; 0: no warm-up) and 25% of what the benches
  # have left; FASTBERT_WARM_PROCS processes split over the scripts, at least one each
  # (default: the cores, up to 12); Inductor's compile workers 2 a process. Best effort: a
  # warm-up failure changes nothing (the timed run reports it).
  : > "$R/gpu_warm.log"; rm -f "$R"/gpu_warm_*.log
  wsecs=$(min "$WARM_SECS" $(( ($(left) - PROFILE_SECS) * 25 / 100 )))
  warmable=()
  for entry in "${benches[@]}"; do
    name=${entry%%:*}
    # the scripts on the harness's command line (main_for takes --warm), each once
    case " ${warmable[*]} " in *" $name "*) continue ;; esac
    grep -q "main_for(" "benchmarks/bench_$name.py" && warmable+=("$name")
  done
  if [ "$wsecs" -ge 20 ] && [ "${#warmable[@]}" -gt 0 ]; then
    per=$(( WARM_PROCS / ${#warmable[@]} )); [ "$per" -ge 1 ] || per=1
    wstart=$(date +%s)
    pids=()
    for name in "${warmable[@]}"; do
      for ((i = 0; i < per; i++)); do
        FASTBERT_BENCH_DEADLINE=$(( wstart + wsecs - 10 )) \
          TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-2}" \
          timeout --kill-after=5 "$wsecs" "$PY" -m "benchmarks.bench_$name" --warm "$i/$per" \
          > "$R/gpu_warm_$name.$i.log" 2>&1 &
        pids+=($!)
      done
    done
    wait "${pids[@]}" 2>/dev/null
    cat "$R"/gpu_warm_*.log >> "$R/gpu_warm.log" 2>/dev/null; rm -f "$R"/gpu_warm_*.log
    # Inductor's runtime tuning picks (*.best_config) were made while the other warm-up
    # processes shared the GPU: dropped, so the timed torch.compile baselines tune alone (their
    # compiled kernels stay cached)
    find "${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_$(id -un 2>/dev/null)}" \
      -name '*.best_config' -delete 2>/dev/null
    # each shard's last line (benchmarks/_harness.py WARM_LINE):
    # "<bench> warm-up shard I/N: ran=A failed=B not_reached=C skipped=D secs=S"
    totals=$(grep -h " warm-up shard " "$R/gpu_warm.log" | awk -v all=$(( per * ${#warmable[@]} )) '
        { n++; for (i = 1; i <= NF; i++) if ($i ~ /^(ran|failed|not_reached)=/) {
            split($i, kv, "="); t[kv[1]] += kv[2] } }
        END { printf "%d of %d processes reported: %d calls, %d failed, %d not reached",
              n, all, t["ran"], t["failed"], t["not_reached"] }')
    say "bench warm-up: $(( $(date +%s) - wstart ))s, $per process(es) a script (${warmable[*]}): $totals"
  else
    say "bench warm-up: not run (${wsecs}s of the budget for it, 20 needed; warmable scripts: ${warmable[*]:-none})"
  fi
  # one process per script, one after another (timings must not share the GPU); each stops
  # starting cases at its share's end ($FASTBERT_BENCH_DEADLINE) and is killed 30 s after it
  : > "$R/gpu_bench.log"
  # name:weight; a script's share is its weight's part of the time left (of the weights
  # still to run), so time one script leaves unused goes to the next
  # (benches: FASTBERT_BENCHES, checked at the start)
  wleft=0
  for entry in "${benches[@]}"; do wleft=$((wleft + ${entry##*:})); done
  # while the benches run, pack every 30 s: a device call cut at its limit still brings back
  # the rows written so far (the harness writes after every timed impl)
  # (its sleep runs in the background and is killed with it: an orphaned sleep would hold
  # the caller's output pipe open; the EXIT trap stops it however this script ends)
  ( trap 'kill $s 2>/dev/null; exit 0' TERM
    while :; do sleep 30 & s=$!; wait $s; pack; done ) >/dev/null 2>&1 &
  packer=$!
  trap 'kill $packer 2>/dev/null' EXIT
  for entry in "${benches[@]}"; do
    name=${entry%%:*}; w=${entry##*:}
    share=$(( ($(left) - PROFILE_SECS) * w / wleft )); wleft=$((wleft - w))
    if [ "$share" -lt 20 ]; then
      # skipped: its weight leaves the pool, so the scripts after it (the last, lstm, weighs
      # most) share its time
      say "bench_$name: not run (no time left in the budget)"; status=1; continue
    fi
    echo "--- bench_$name (${share}s)" | tee -a "$R/gpu_bench.log"
    # cases stop starting at the share's end (and 20 s before the budget's), the process is
    # killed 30 s after the share (and 5 s after the budget's end) at the latest
    FASTBERT_RESULTS="$R" \
      FASTBERT_BENCH_DEADLINE=$(min $(( $(date +%s) + share - 15 )) $(( START + BUDGET - 20 - PROFILE_SECS ))) \
      timeout --kill-after=5 "$(min $(( share + 30 )) $(( $(left) - PROFILE_SECS + 5 )))" \
      "$PY" -m "benchmarks.bench_$name" 2>&1 | tee -a "$R/gpu_bench.log"
    rc=${PIPESTATUS[0]}
    # rows that could not be timed (an impl that cannot run, or every one after a CUDA error
    # that poisoned the process): counted from the CSV
    rows=$("$PY" -c "import csv, sys
try:
    r = list(csv.DictReader(open(sys.argv[1])))
except OSError:
    r = []
print(len(r), sum(1 for x in r if x.get('error')))" "$R/${name}_${SLUG}.csv" 2>/dev/null)
    n_rows=${rows% *}; n_err=${rows#* }
    if [ "$rc" != 0 ]; then
      say "bench_$name: FAILED (exit $rc; $n_err of $n_rows rows errored)"; status=1
    elif [ "${n_rows:-0}" = 0 ] || [ "$n_err" = "$n_rows" ]; then
      say "bench_$name: FAILED (no row timed: $n_err of ${n_rows:-0} rows errored)"; status=1
    else
      say "bench_$name: ok ($n_err of $n_rows rows errored)"
    fi
    grep -h "^Time budget\|^Incomplete" "$R/${name}_${SLUG}.md" 2>/dev/null | cut -c1-200 | tee -a "$SUMMARY"
    pack
  done
  kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null; trap - EXIT
fi

# the profile phase's all-threads timelines (whole case names of benchmarks/profile_overhead.py):
# fastbert's host-bound fwd+bwd calls, and eager / SDPA ones beside them for the same handoffs
TIMELINE_CASES="layer_norm+res fwd+bwd 8192x768,eager layer_norm+res fwd+bwd 8192x768"
TIMELINE_CASES+=",attention fwd+bwd 256x128x12x64,sdpa fwd+bwd 256x128x12x64 (default backend)"
TIMELINE_CASES+=",embedding_layer_norm fwd+bwd 32x128,cross_entropy fwd+bwd 4096x30522"
TIMELINE_CASES+=",masked_lm_loss fwd+bwd 32x128 V=30522"
if phase_on profile; then
  # opt-in (FASTBERT_GPU_PHASES="... profile"): per-call host / wall / GPU time and the
  # kernels of each call (benchmarks/profile_overhead.py), in what is left of the budget; a
  # cProfile of the host-bound cases (H200 run 3 left ~0.9 ms of their host time unexplained)
  secs=$(left)
  if [ "$secs" -ge 30 ]; then
    echo "== profile (${secs}s)" | tee -a "$SUMMARY"
    timeout --kill-after=5 "$secs" "$PY" -m benchmarks.profile_overhead --iters 30 \
      --cprofile-k "layer_norm+res fwd+bwd,attention fwd+bwd 256,embedding_layer_norm,V=30522" \
      --timeline-k "$TIMELINE_CASES" \
      --out "$R/overhead.txt" 2>&1 | tee -a "$R/gpu_profile.log"
    say "profile: exit ${PIPESTATUS[0]} (overhead.txt)"
  else
    say "profile: not run (no time left in the budget)"; status=1
  fi
  pack
fi

if phase_on bench; then
  # each issue's speed targets, judged from the CSVs just written (same run, same card)
  echo "== targets" | tee -a "$SUMMARY"
  "$PY" -m benchmarks.targets "$R" ${SLUG:+--card "$SLUG"} --out "$R/targets.md" 2>&1 \
    | tee -a "$SUMMARY"
fi

say "== gpu-check finished with status $status after $(( $(date +%s) - START ))s; results in $R"
pack
[ -n "${OUT:-}" ] && [ -d "$OUT" ] && echo "packed $R into $OUT/gpu_check_results.tgz"
exit $status
