"""Every benchmark script runs end to end (CPU quick mode: tiny shapes, reference paths).

This proves the scripts work, not how fast anything is: speed is measured by
``make gpu-check`` on a GPU and recorded under benchmarks/results/.
"""
import importlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from benchmarks.run_all import bench_modules


@pytest.mark.parametrize("name", bench_modules())
def test_bench_script_runs_in_quick_mode(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTBERT_RESULTS", str(tmp_path))
    mod = importlib.import_module(f"benchmarks.{name}")
    mod.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    assert " ms" in out
    written = sorted(p.name for p in tmp_path.iterdir())
    assert any(p.endswith(".csv") for p in written) and any(p.endswith(".md") for p in written)


def _counting_cases(n, calls):
    import torch
    from benchmarks._harness import Case

    def make(i):
        def run():
            calls.append(i)
            return torch.ones(4).sum()
        return run
    return [Case("case", {"i": i}, {"a": make(i), "b": make(i)}) for i in range(n)]


def test_harness_stops_starting_cases_after_the_deadline(tmp_path, monkeypatch):
    import time

    import torch
    from benchmarks import _harness
    monkeypatch.setenv("FASTBERT_RESULTS", str(tmp_path))
    monkeypatch.setenv(_harness.DEADLINE_ENV, str(time.time() - 1))
    calls = []
    rows = _harness.run_cases("demo", _counting_cases(3, calls), torch.device("cpu"),
                              verbose=False)
    assert rows == [] and calls == []
    md = next(tmp_path.glob("demo_*.md")).read_text()
    assert "3 of 3 cases not run" in md and "case i=2" in md


def test_harness_writes_after_every_case_and_frees_spent_cases(tmp_path, monkeypatch):
    import csv

    import torch
    from benchmarks import _harness
    monkeypatch.setenv("FASTBERT_RESULTS", str(tmp_path))
    monkeypatch.delenv(_harness.DEADLINE_ENV, raising=False)
    calls, seen = [], []
    real_write = _harness.write_results

    def spy(bench, rows, *a, **kw):
        seen.append((len(rows), kw.get("note", "")))
        return real_write(bench, rows, *a, **kw)

    monkeypatch.setattr(_harness, "write_results", spy)
    cases = _counting_cases(3, calls)
    rows = _harness.run_cases("demo", cases, torch.device("cpu"), verbose=False)
    # written after every impl (a run killed inside a long case keeps what it timed)
    assert [n for n, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert seen[0][1].startswith("Incomplete: the run stopped inside case 1 of 3")
    assert seen[1][1].startswith("Incomplete: the run stopped after 1 of 3") and seen[-1][1] == ""
    assert sorted(set(calls)) == [0, 1, 2] and len(rows) == 6
    with open(next(tmp_path.glob("demo_*.csv"))) as f:
        assert len(list(csv.DictReader(f))) == 6
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(RuntimeError, match="run already"):    # inputs released
        cases[0].impls["a"]()


def test_harness_deadline_inside_a_case_keeps_the_timed_impls(tmp_path, monkeypatch):
    """The budget running out inside a case: the impls already timed are kept (with their
    speedup against the baseline), the rest reported as not run, no later case started."""
    import csv
    import time

    import torch
    from benchmarks import _harness
    monkeypatch.setenv("FASTBERT_RESULTS", str(tmp_path))
    calls = []
    cases = _counting_cases(2, calls)
    first = cases[0].impls["a"]

    now = time.time()
    clock = [now]
    monkeypatch.setattr(_harness.time, "time", lambda: clock[0])

    def slow_first():  # the deadline passes while the first impl is being timed
        clock[0] = now + 7200
        return first()
    monkeypatch.setenv(_harness.DEADLINE_ENV, str(now + 3600))
    cases[0].impls["a"] = slow_first
    rows = _harness.run_cases("demo", cases, torch.device("cpu"), verbose=False)
    assert [(r["i"], r["impl"], r.get("error", "")) for r in rows] == [
        (0, "a", ""), (0, "b", "not run: time budget")]
    assert sorted(set(calls)) == [0] and rows[0]["speedup_vs_a"] == 1.0
    with open(next(tmp_path.glob("demo_*.csv"))) as f:
        assert len(list(csv.DictReader(f))) == 2


def test_gpu_check_script_parses():
    import pathlib
    import subprocess
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("env, reason", [
    ({"FASTBERT_GPU_PHASES": "benches"}, "unknown phase 'benches'"),
    ({"FASTBERT_BENCHES": "attention:3 lstm:x"}, "weight of 'lstm:x' must be >= 1"),
    ({"FASTBERT_BENCHES": "attention nosuch:2"}, "no benchmarks/bench_nosuch.py"),
    ({}, "torch sees no CUDA device"),
])
def test_gpu_check_refuses_bad_settings_before_running_anything(tmp_path, env, reason):
    """A typo in the settings (or no GPU) is refused at the start, the reason in the packed
    summary: found after the test phases it cost the whole call's bench time (a bad weight), or
    nothing ran and the status was 0 (an unknown phase; a CPU machine timed its quick mode)."""
    import os
    import pathlib
    import subprocess
    import sys

    import torch
    if not env and torch.cuda.is_available():
        pytest.skip("the no-device refusal needs a machine without CUDA")
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    out, res = tmp_path / "out", tmp_path / "res"
    out.mkdir()
    full_env = dict(os.environ, OUT=str(out), FASTBERT_RESULTS=str(res), PYTHON=sys.executable,
                    FASTBERT_GPU_CHECK_CPU="1" if env else "0", **env)
    run = subprocess.run(["bash", str(script)], env=full_env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    summary = (out / "gpu_check_summary.txt").read_text()
    assert "gpu-check refused" in summary and reason in summary
    assert not list(res.glob("gpu_tests_*.log")) and not list(res.glob("*.csv"))


def test_profile_overhead_cases_build_and_the_cheap_ones_run(device):
    """benchmarks/profile_overhead.py (the gpu-check profile phase) builds every case, runs the
    one-launch and autograd floor cases, and the cases gpu_check.sh cProfiles exist."""
    import re
    from pathlib import Path

    from benchmarks import profile_overhead
    cases = profile_overhead.cases(device.type)
    for name in ("torch add (one launch)", "triton launch, 3 args", "fastbert launch, 3 args",
                 "autograd.Function fwd+bwd (one op each)", "torch.empty (8192, 768) bf16"):
        cases[name]()
    # each LSTM case on its own shape (torch.nn.LSTM runs on CPU; the closures once all read
    # the last shape's input, and the smaller shapes raised)
    for shape in ("64x256x64", "64x512x64"):
        cases[f"lstm cudnn fwd+bwd {shape}"]()
    cases["lstm cudnn packed fwd+bwd 64x512x64"]()
    assert "lstm fastbert packed fwd+bwd 64x512x64" in cases
    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh").read_text()
    wanted = re.search(r'--cprofile-k "([^"]+)"', script).group(1).split(",")
    for text in wanted:
        assert any(text in name for name in cases), text
    # --timeline-k takes whole case names, gathered in TIMELINE_CASES
    assert '--timeline-k "$TIMELINE_CASES"' in script
    names = "".join(re.findall(r'^TIMELINE_CASES\+?="([^"]+)"', script, re.M))
    assert names.count(",") >= 5
    for name in names.split(","):
        assert name in cases, name


def test_profile_overhead_timeline_shows_one_call_on_every_thread():
    """The all-threads timeline (gpu-check's profile phase, --timeline-k) of a call: its last
    call only, the Python functions inside it (the backward of a Function, which on CUDA runs
    on the autograd engine's thread and which cProfile misses), each thread's covered time,
    the waits in it (a sleep here; on CUDA the calling thread's run_backward) counted apart."""
    import time

    from benchmarks.profile_overhead import _timeline

    class Slow(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            time.sleep(0.003)
            _wait_and_join(g)
            return g * 2

    def _wait_and_join(g):
        # ~3 ms of work whose names hold "wait" and "join" (str.join, os.path.join): not waits
        end = time.perf_counter() + 0.003
        while time.perf_counter() < end:
            os.path.join("a", ",".join(["b", "c"]))

    x = torch.randn(8, requires_grad=True)
    calls = []

    def fn():
        calls.append(1)
        return torch.autograd.grad(Slow.apply(x).sum(), x)

    text = _timeline(fn, calls=2, depth=12)   # on the CPU the backward runs on this thread, deep
    assert len(calls) == 2
    head, *rest = text.splitlines()
    total = float(head.split("one call: ")[1].split(" us")[0])
    assert 6000 <= total < 1e6, head   # the one call, its sleep and work included
    main = next(ln for ln in rest if ln.startswith("  main: covered"))
    covered = float(main.split("covered ")[1].split(" us")[0])
    waited = float(main.split("waiting ")[1].split(" us")[0])
    # the sleep is the wait; the work beside it (and run_backward's, this thread's) is not
    assert covered <= total + 1 and 2900 <= waited < covered - 2000, text
    assert "overlap" not in main, text
    assert any("waits" in ln and "sleep" in ln for ln in rest), text
    lines = [ln for ln in rest if ln.startswith("  main ")]
    assert any("SlowBackward" in ln for ln in lines), text


def test_profile_overhead_timeline_counts_overlapping_events_once():
    """A thread's covered time is the union of its events' spans within the call, never more
    than the call (the Python tracer's frames and op events need not nest: a forked
    TorchScript task's were counted twice, 198% of the call, when they were summed)."""
    from benchmarks.profile_overhead import _union_us
    assert _union_us([(0, 10), (5, 15), (20, 30), (22, 25)], 0, 100) == 25
    assert _union_us([(-5, 10), (90, 120)], 0, 100) == 20     # clipped to the call
    assert _union_us([(3, 4), (0, 10)], 0, 100) == 10         # in any order
    assert _union_us([], 0, 100) == 0


# gpu_check.sh past its settings check, with a stand-in interpreter (nothing is run or timed)
FAKE_PY = r'''#!/bin/bash
# stands in for the GPU machine's python: answers gpu_check.sh's probes, records the benches
case "$1" in
  -c)
    case "$2" in
      *card_slug*) echo fakecard ;;
      *cuda.is_available*) exit "${FAKE_NO_CUDA:-0}" ;;
      *"import csv"*) exec "$REAL_PY" "$@" ;;
      *xdist*) exit 1 ;;
      *) exit 0 ;;
    esac ;;
  -) cat > /dev/null; echo "card: fake" ;;
  -m)
    case "$2" in
      benchmarks.bench_*)
        name=${2#benchmarks.bench_}
        if [ "${3:-}" = --warm ]; then
          echo "warm $name $4 $(date +%s) $FASTBERT_BENCH_DEADLINE ${TRITON_CACHE_DIR:-unset}" >> "$FAKE_LOG"
          echo "$name warm-up shard $4: ran=3 failed=1 not_reached=2 skipped=0 secs=0"
          exit 0
        fi
        echo "$name $(date +%s) $FASTBERT_BENCH_DEADLINE ${TRITON_CACHE_DIR:-unset}" >> "$FAKE_LOG"
        echo "case,impl,ms,error" > "$FASTBERT_RESULTS/${name}_fakecard.csv"
        for r in ${FAKE_ROWS:-ok}; do
          if [ "$r" = err ]; then echo "c,fastbert,,boom" ; else echo "c,fastbert,1.0,"; fi
        done >> "$FASTBERT_RESULTS/${name}_fakecard.csv" ;;
      benchmarks.profile_overhead) echo "profile $(date +%s)" >> "$FAKE_LOG" ;;
      pytest) echo "1 passed in 0.01s" ;;
      *) echo "fake $2" ;;
    esac ;;
esac
exit 0
'''


def _gpu_check(tmp_path, **env):
    """Runs gpu_check.sh with the fake interpreter (nothing real is run or timed); without the
    compile-ahead warm-up unless FASTBERT_WARM_SECS is given."""
    env.setdefault("FASTBERT_WARM_SECS", "0")
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    out, res, log = tmp_path / "out", tmp_path / "res", tmp_path / "calls.log"
    out.mkdir()
    log.touch()
    full = {name: v for name, v in os.environ.items() if not name.startswith("FASTBERT_")}
    full.update(OUT=str(out), FASTBERT_RESULTS=str(res), PYTHON=str(fake), REAL_PY=sys.executable,
                FAKE_LOG=str(log), **env)
    full = {name: v for name, v in full.items() if v is not None}
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    run = subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True,
                         timeout=60)
    summary = (out / "gpu_check_summary.txt").read_text()
    return run, summary, log.read_text().split("\n")


@pytest.mark.parametrize("env, reason", [
    ({"FASTBERT_GPU_PHASES": "  "}, "FASTBERT_GPU_PHASES names no phase"),
    ({"FASTBERT_WARM_SECS": "1m"}, "FASTBERT_WARM_SECS must be a number of seconds"),
    ({"FASTBERT_WARM_PROCS": "0"}, "FASTBERT_WARM_PROCS must be in [1, 64]"),
    ({"FASTBERT_WARM_PROCS": "65"}, "FASTBERT_WARM_PROCS must be in [1, 64]"),
    ({"FASTBERT_WARM_PROCS": "-2"}, "FASTBERT_WARM_PROCS must be a number of processes"),
    ({"FASTBERT_BENCHES": "attention:0 lstm"}, "weight of 'attention:0' must be >= 1"),
    ({"FASTBERT_BENCHES": "  "}, "FASTBERT_BENCHES names no benchmark"),
    ({"FASTBERT_PROFILE_SECS": "90s"}, "FASTBERT_PROFILE_SECS must be a number of seconds"),
    ({"FASTBERT_BENCHES": "embedding:00"}, "weight of 'embedding:00' must be >= 1"),
])
def test_gpu_check_refuses_blank_phases_and_zero_weights(tmp_path, env, reason):
    run, summary, calls = _gpu_check(tmp_path, FASTBERT_GPU_BUDGET="100", **env)
    assert run.returncode == 2 and "gpu-check refused" in summary and reason in summary
    assert calls == [""]  # no bench ran


def test_gpu_check_refuses_a_cpu_machine_by_default(tmp_path):
    """FASTBERT_GPU_CHECK_CPU unset (the default) on a machine without CUDA: refused."""
    run, summary, calls = _gpu_check(tmp_path, FAKE_NO_CUDA="1", FASTBERT_GPU_PHASES="bench",
                                     FASTBERT_BENCHES="embedding", FASTBERT_GPU_BUDGET="100")
    assert run.returncode == 2 and "torch sees no CUDA device" in summary
    assert calls == [""]


def test_gpu_check_keeps_the_profile_time_from_the_benches(tmp_path):
    """Budget 400 s, profile 300 s kept: two benches of weight 1 share the other ~100 s, so the
    first one's deadline is ~50 - 15 s away (sharing all 400 s put it ~185 s away, and the
    profile phase found no time left)."""
    run, summary, calls = _gpu_check(tmp_path, FASTBERT_GPU_PHASES="bench profile",
                                     FASTBERT_GPU_BUDGET="400", FASTBERT_PROFILE_SECS="300",
                                     FASTBERT_BENCHES="embedding:1 lstm:1")
    assert run.returncode == 0, summary
    benches = [c.split() for c in calls if c and not c.startswith("profile")]
    assert [b[0] for b in benches] == ["embedding", "lstm"]
    name, called, deadline = benches[0][:3]
    assert int(deadline) - int(called) <= 40, calls
    assert "profile: exit 0" in summary


@pytest.mark.parametrize("rows, line, rc", [
    ("err err", "bench_embedding: FAILED (no row timed: 2 of 2 rows errored)", 1),
    ("ok err", "bench_embedding: ok (1 of 2 rows errored)", 0),
])
def test_gpu_check_counts_errored_bench_rows(tmp_path, rows, line, rc):
    run, summary, calls = _gpu_check(tmp_path, FASTBERT_GPU_PHASES="bench", FAKE_ROWS=rows,
                                     FASTBERT_GPU_BUDGET="200", FASTBERT_BENCHES="embedding")
    assert line in summary and run.returncode == rc, summary


def test_gpu_check_profile_not_run_is_a_failure(tmp_path):
    """A profile phase asked for but given no time fails the run (its status stayed 0)."""
    run, summary, calls = _gpu_check(tmp_path, FASTBERT_GPU_PHASES="profile",
                                     FASTBERT_GPU_BUDGET="20")
    assert "profile: not run" in summary and run.returncode == 1, summary


def test_gpu_check_reads_numbers_as_decimal_and_phases_split_by_any_whitespace(tmp_path):
    """A leading zero is not octal (bash's arithmetic: "08" failed, "00" divided by zero, and no
    bench ran with status 0), and tab-separated phases run (they passed the check, then nothing
    ran)."""
    run, summary, calls = _gpu_check(tmp_path, FASTBERT_GPU_PHASES="bench\tprofile",
                                     FASTBERT_GPU_BUDGET="0300", FASTBERT_PROFILE_SECS="08",
                                     FASTBERT_BENCHES="embedding:08 lstm:09")
    assert run.returncode == 0, summary + run.stderr
    assert [c.split()[0] for c in calls if c] == ["embedding", "lstm", "profile"]
    name, called, deadline = calls[0].split()[:3]
    # 300 s (not octal 0300 = 192), 8 of them kept for the profile, 8 / 17 of the rest: ~138 s,
    # its deadline 15 s before that
    assert 110 <= int(deadline) - int(called) <= 130, calls


def test_gpu_check_moves_an_earlier_tuned_file_aside(tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    (res / "attention_tuned_fakecard.txt").write_text("old\n")
    run, summary, calls = _gpu_check(tmp_path, FASTBERT_GPU_PHASES="bench",
                                     FASTBERT_GPU_BUDGET="200", FASTBERT_BENCHES="embedding")
    assert run.returncode == 0, summary
    assert not (res / "attention_tuned_fakecard.txt").exists()
    assert (res / "attention_tuned_fakecard.txt.prev").read_text() == "old\n"


def test_write_tuned_writes_nothing_when_nothing_was_tuned_and_the_pairs_otherwise(
        tmp_path, monkeypatch):
    from benchmarks import bench_attention as ba
    from fastbert.kernels import _tune
    monkeypatch.setenv("FASTBERT_RESULTS", str(tmp_path))
    dev = torch.device("cpu")
    _tune.clear()
    assert ba.write_tuned(dev, "-quick") is None and os.listdir(tmp_path) == []
    monkeypatch.setattr(_tune, "_CHOSEN", {(0, ("attention_fwd", "k")): (4, 3)})
    path = ba.write_tuned(dev, "-quick")
    assert path.endswith("-quick.txt") and os.path.basename(path).startswith("attention_tuned_")
    assert os.listdir(tmp_path) == [os.path.basename(path)]      # no .tmp left behind
    text = open(path).read()
    assert "cuda:0 ('attention_fwd', 'k') -> num_warps=4 num_stages=3" in text


def test_bench_main_writes_the_tuned_file_only_when_results_are_written(tmp_path, monkeypatch):
    from benchmarks import bench_attention as ba
    calls = []
    monkeypatch.setattr(ba, "main_for", lambda *a, **k: None)
    monkeypatch.setattr(ba, "write_tuned", lambda dev, tag="": calls.append((dev, tag)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ba.main(["--device", "cuda", "--no-write"])
    assert calls == []
    ba.main(["--device", "cuda", "--quick"])
    assert calls == [(torch.device("cuda"), "-quick")]


def test_tuned_rows_turn_the_tuner_on(monkeypatch):
    from benchmarks import bench_attention as ba
    from fastbert.kernels import _tune
    seen = []
    wrapped = ba._tuned(lambda: seen.append(_tune.ENABLED))
    wrapped()
    assert seen == [True]


def test_bench_lstm_times_the_resident_coop_kernels_where_they_apply(monkeypatch):
    """On a (here pretended) 132-SM GPU, bench_lstm's padded cases time
    fastbert_triton_coop_resident exactly where COOP_RESIDENT_W changes a kernel (hidden 256:
    COOP_RESIDENT_MAX_HIDDEN), and fastbert_triton_no_coop (the default without the
    cooperative loop) wherever that loop applies; the cases are only built, not run."""
    from benchmarks import bench_lstm
    from fastbert.kernels import lstm as k
    monkeypatch.setattr(k, "_sm_count", lambda index=None: 132)
    seen = set()
    for case in bench_lstm.cases(torch.device("cuda"), False):
        if case.name != "lstm fwd+bwd padded":
            continue
        batch, hidden = case.params["batch"], case.params["hidden"]
        resident = "fastbert_triton_coop_resident" in case.impls
        assert "fastbert_triton_no_coop" in case.impls
        assert resident == (hidden == 256), (batch, hidden)
        seen.add((batch, hidden, resident))
    assert (64, 256, True) in seen and (64, 1024, False) in seen and (16, 512, False) in seen


def test_gpu_check_warms_the_scripts_in_parallel_before_timing_them(tmp_path):
    """The compile-ahead warm-up: FASTBERT_WARM_PROCS processes split over the scripts that
    take --warm (bench_translation has its own command line: not warmed; a script named twice
    is warmed once), each a shard I/N, all started before the first timed script, with one
    deadline 10 s before the warm-up's end: min(FASTBERT_WARM_SECS, 25% of the benches'
    time); one TRITON_CACHE_DIR for all; their counts summed in the summary; the per-process
    logs merged into gpu_warm.log (stale ones from a killed run neither counted nor kept)."""
    res = tmp_path / "res"
    res.mkdir()
    (res / "gpu_warm_lstm.7.log").write_text("lstm warm-up shard 7/8: ran=100 failed=0 "
                                             "not_reached=0 skipped=0 secs=1\n")
    (res / "gpu_warm.log").write_text("embedding warm-up shard 0/2: ran=50\n")
    run, summary, calls = _gpu_check(tmp_path, FASTBERT_GPU_PHASES="bench",
                                     FASTBERT_GPU_BUDGET="400", FASTBERT_WARM_SECS="060",
                                     FASTBERT_WARM_PROCS="5", TRITON_CACHE_DIR=None,
                                     FASTBERT_BENCHES="embedding:1 translation:1 lstm:1 lstm:1")
    assert run.returncode == 0, summary + run.stderr
    calls = [c.split() for c in calls if c]
    warm = [c for c in calls if c[0] == "warm"]
    assert sorted((c[1], c[2]) for c in warm) == [
        ("embedding", "0/2"), ("embedding", "1/2"), ("lstm", "0/2"), ("lstm", "1/2")]
    # every warm process before the first timed script; the timed ones in the given order
    assert all(c[0] == "warm" for c in calls[:4]) and [c[0] for c in calls[4:]] == [
        "embedding", "translation", "lstm", "lstm"]
    start, deadline = int(warm[0][3]), int(warm[0][4])
    assert 45 <= deadline - start <= 50 and len({c[4] for c in warm}) == 1   # min(60, 100) - 10
    cache_dirs = {c[-1] for c in calls}   # the warm and the timed processes alike
    assert len(cache_dirs) == 1 and cache_dirs.pop().endswith("/.triton/cache")
    assert ("bench warm-up: " in summary and "2 process(es) a script (embedding lstm): 4 of 4 "
            "processes reported: 12 calls, 4 failed, 8 not reached") in summary, summary
    log = (res / "gpu_warm.log").read_text()
    assert "embedding warm-up shard 1/2" in log and "ran=100" not in log and "ran=50" not in log
    assert not list(res.glob("gpu_warm_*.log"))


@pytest.mark.parametrize("env, warmed, shards", [
    ({"FASTBERT_WARM_SECS": "0"}, None, None),                 # off
    ({"FASTBERT_GPU_BUDGET": "60"}, None, None),               # 25% of 60 s: under 20 s
    ({"FASTBERT_GPU_BUDGET": "100"}, (15, 15), ["0/1"]),       # 25 s of 100: deadline 15 s away
    # the profile's 300 s are kept from the benches first: 25% of 100 s
    ({"FASTBERT_GPU_BUDGET": "400", "FASTBERT_PROFILE_SECS": "300",
      "FASTBERT_GPU_PHASES": "bench profile"}, (15, 15), ["0/1"]),
    # fewer processes than scripts: one each all the same
    ({"FASTBERT_BENCHES": "embedding lstm", "FASTBERT_WARM_PROCS": "1"}, (50, 50),
     ["0/1", "0/1"]),
])
def test_gpu_check_warm_up_is_capped_by_the_time_the_benches_have(tmp_path, env, warmed,
                                                                   shards):
    full = dict(FASTBERT_GPU_PHASES="bench", FASTBERT_GPU_BUDGET="400",
                FASTBERT_WARM_SECS="60", FASTBERT_WARM_PROCS="1", FASTBERT_BENCHES="embedding")
    full.update(env)
    run, summary, calls = _gpu_check(tmp_path, **full)
    warm = [c.split() for c in calls if c.startswith("warm")]
    assert bool(warm) == bool(warmed), summary
    assert ("bench warm-up: not run" in summary) == (not warmed), summary
    if warmed:
        assert [w[2] for w in warm] == shards
        lo, hi = warmed
        # the start delay of a loaded host may eat a few of these seconds
        assert all(lo - 4 <= int(w[4]) - int(w[3]) <= hi for w in warm), (warm, summary)
    assert "bench_embedding: ok" in summary


def _warm_cases(n, calls, fail=()):
    """n cases of three impls: eager (compiles nothing: the warm-up skips it), fastbert and
    torch.compile; each call appends (case, impl) to calls; (case, impl) in fail raise."""
    from benchmarks._harness import Case

    def make(i, name):
        def run():
            calls.append((i, name))
            if (i, name) in fail:
                raise AssertionError()
            return torch.ones(4).sum()
        return run
    return [Case("case", {"i": i}, {name: make(i, name) for name in
                                    ("eager", "fastbert", "torch.compile")}) for i in range(n)]


def test_warm_cases_calls_its_shard_once_each_and_writes_nothing(tmp_path, monkeypatch,
                                                                  capsys):
    """The j-th compiling impl of case c goes to shard (j + c) mod N (an impl at the same place
    in every case lands in another shard each case); each pair called once, a failing one
    counted (its empty message printed, not a crash); impls that compile nothing skipped;
    every case released; nothing started past the deadline; main_for --warm writes no result
    file and builds the full (not --quick) cases on a GPU."""
    import re
    import time

    from benchmarks import _harness
    monkeypatch.setenv("FASTBERT_RESULTS", str(tmp_path))
    monkeypatch.delenv(_harness.DEADLINE_ENV, raising=False)
    cpu = torch.device("cpu")
    calls = []
    f, c = "fastbert", "torch.compile"
    for shard, want, failed in ((0, [(0, f), (1, c), (2, f)], 0),
                                (1, [(0, c), (1, f), (2, c)], 1)):
        calls.clear()
        cs = _warm_cases(3, calls, fail={(1, f)})
        counts = _harness.warm_cases("demo", cs, cpu, shard, 2)
        assert calls == want and counts == {"ran": 3 - failed, "failed": failed,
                                            "not_reached": 0, "skipped": 3}
        for case in cs:
            with pytest.raises(RuntimeError, match="run already"):
                case.impls["eager"]()
    out = capsys.readouterr().out
    assert "demo warm-up: case i=1 fastbert: AssertionError: " in out
    # the summary line gpu_check.sh adds up
    last = [line for line in out.splitlines() if " warm-up shard " in line]
    assert [re.findall(r"\b(ran|failed|not_reached)=(\d+)", line) for line in last] == [
        [("ran", "3"), ("failed", "0"), ("not_reached", "0")],
        [("ran", "2"), ("failed", "1"), ("not_reached", "0")]]
    calls.clear()
    _harness.warm_cases("demo", _warm_cases(5, calls), cpu, 2, 3, verbose=False)
    assert calls == [(1, c), (2, f), (4, c)]
    monkeypatch.setenv(_harness.DEADLINE_ENV, str(time.time() - 1))
    calls.clear()
    counts = _harness.warm_cases("demo", _warm_cases(3, calls), cpu, 0, 1, verbose=False)
    assert calls == [] and counts == {"ran": 0, "failed": 0, "not_reached": 6, "skipped": 3}
    with pytest.raises(ValueError, match="shard"):
        _harness.warm_cases("demo", [], cpu, 2, 2)
    monkeypatch.delenv(_harness.DEADLINE_ENV)
    calls.clear()
    assert _harness.main_for("demo", lambda dev, quick: _warm_cases(2, calls), "d",
                             ["--warm", "0/1"]) == []
    assert sorted(calls) == [(0, f), (0, c), (1, f), (1, c)] and os.listdir(tmp_path) == []
    seen = []
    _harness.main_for("demo", lambda dev, quick: seen.append((dev, quick)) or [], "d",
                      ["--device", "cuda", "--warm", "0/1"])
    assert seen == [(torch.device("cuda"), False)] and os.listdir(tmp_path) == []


def test_bench_attention_warm_up_writes_no_tuned_file(monkeypatch):
    from benchmarks import bench_attention as ba
    calls = []
    monkeypatch.setattr(ba, "main_for", lambda *a, **k: None)
    monkeypatch.setattr(ba, "write_tuned", lambda dev, tag="": calls.append((dev, tag)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ba.main(["--device", "cuda", "--warm", "0/1"])
    assert calls == []


@pytest.mark.parametrize("arg", ["1/1", "0/0", "a/2", "1", "-1/2", "1/2/3"])
def test_warm_option_refuses_a_shard_outside_its_count(arg, capsys):
    from benchmarks import _harness
    with pytest.raises(SystemExit):
        _harness.parse_args("d", [f"--warm={arg}"])
    assert "expected" in capsys.readouterr().err


def test_harness_records_the_first_call_and_reports_an_impl_failing_without_a_message(
        tmp_path, monkeypatch):
    """first_s: the first call's seconds (JIT compiles, or loads what the warm-up cached), on
    its own before the timing; an exception with an empty message is an error row, not a
    crash of the script (its first line was read from an empty list)."""
    import time

    from benchmarks import _harness
    monkeypatch.setenv("FASTBERT_RESULTS", str(tmp_path))
    monkeypatch.delenv(_harness.DEADLINE_ENV, raising=False)
    state = {"calls": 0}

    def compiles_first():
        state["calls"] += 1
        if state["calls"] == 1:
            time.sleep(0.2)
        return torch.ones(2).sum()

    def fails():
        raise AssertionError()
    case = _harness.Case("c", {"n": 1}, {"a": compiles_first, "b": fails})
    rows = _harness.run_cases("demo", [case], torch.device("cpu"), verbose=False)
    assert rows[0]["first_s"] >= 0.2 and rows[0]["ms"] < 100
    assert rows[1]["error"] == "AssertionError: " and rows[1]["first_s"] is None
    # the first call alone, before the timing (which takes its own time)
    real = _harness.time_fn

    def slow_timing(fn, device):
        time.sleep(0.5)
        return real(fn, device)
    monkeypatch.setattr(_harness, "time_fn", slow_timing)
    case = _harness.Case("c", {"n": 1}, {"a": lambda: torch.ones(2).sum()})
    rows = _harness.run_cases("demo", [case], torch.device("cpu"), verbose=False)
    assert rows[0]["first_s"] < 0.3


def test_gpu_check_default_phases_are_the_gpu_tests_and_the_benches(tmp_path):
    """The rest of the suite on compiled kernels is opt-in (phase "tests"): in one device
    call's budget it took the benches' time."""
    run, summary, calls = _gpu_check(tmp_path, FASTBERT_GPU_BUDGET="300",
                                     FASTBERT_BENCHES="embedding")
    assert run.returncode == 0, summary + run.stderr
    assert "phases: gpu-tests bench\n" in summary and "tests_gpu: exit 0" in summary
    assert '== tests_gpu (-m "gpu and not aot", 120s)' in run.stdout   # 40% of the budget
    assert "tests_rest" not in summary and "bench_embedding: ok" in summary
    (tmp_path / "b").mkdir()
    run, summary, calls = _gpu_check(tmp_path / "b", FASTBERT_GPU_BUDGET="300",
                                     FASTBERT_GPU_PHASES="tests", FASTBERT_BENCHES="embedding")
    assert "tests_rest: exit 0" in summary and "bench_embedding" not in summary
    # alone, the rest of the suite takes the whole budget but for the packing (with the
    # benches it was 55% of it: in a 125 s call it got 48 s)
    secs = int(run.stdout.split('== tests_rest (-m "not gpu and not aot", ')[1].split("s)")[0])
    assert 280 <= secs <= 290, run.stdout
    (tmp_path / "c").mkdir()
    run, summary, calls = _gpu_check(tmp_path / "c", FASTBERT_GPU_BUDGET="300",
                                     FASTBERT_GPU_PHASES="tests bench",
                                     FASTBERT_BENCHES="embedding")
    secs = int(run.stdout.split('== tests_rest (-m "not gpu and not aot", ')[1].split("s)")[0])
    assert 150 <= secs <= 165 and "bench_embedding: ok" in summary, run.stdout
