"""Shared benchmark harness: timing, hardware ceilings measured in the same run, result files.

Every ``benchmarks/bench_<op>.py`` builds a list of ``Case`` objects (a name, the shape, and
one callable per implementation) and hands them to ``run_cases``; the harness times each
with ``triton.testing.do_bench`` (median and 20/80% quantiles) on CUDA, or a plain timer on
CPU, records peak memory, computes GB/s or TFLOP/s and their fraction of the ceiling measured
in the same process (device-to-device copy bandwidth, bf16 matmul rate), the summed kernel
time of a call from torch.profiler (``gpu_ms``: far below ``ms`` means host-bound), the
seconds of the first call on its own (``first_s``: JIT compiles, or loads from the caches the
compile-ahead warm-up filled, see ``warm_cases``), and writes
``<results>/<bench>_<card>.csv`` plus a markdown table naming the card, driver, torch and
triton versions.

The results directory is ``$FASTBERT_RESULTS`` (default ``benchmarks/results`` on a GPU, its
git-ignored ``_scratch/`` on CPU). The files are rewritten after every case, so a run stopped
part-way keeps what it measured.
``$FASTBERT_BENCH_DEADLINE`` (Unix time, seconds) makes a run stop starting new cases once it
has passed; the cases left out are listed in the markdown (``make gpu-check`` sets it to share
its time budget between the scripts). Each script lists its cases most important first.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import gc
import os
import platform
import re
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

RESULTS_ENV = "FASTBERT_RESULTS"
DEADLINE_ENV = "FASTBERT_BENCH_DEADLINE"
DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Bytes moved by the copy-bandwidth probe: large enough to defeat L2 (50 MB on H100).
COPY_PROBE_BYTES = 1 << 30
# Square bf16 matmul for the compute-ceiling probe (large enough to saturate tensor cores).
MATMUL_PROBE_N = 8192


@dataclasses.dataclass
class Case:
    """One benchmark point.

    Attributes:
        name: what is measured, e.g. "layer_norm fwd+bwd".
        params: the shape and options, e.g. {"rows": 8192, "hidden": 768, "dtype": "bf16"}.
        impls: implementation name -> zero-argument callable running the work once.
        bytes: bytes a perfect implementation must move (for GB/s), or None.
        flops: floating-point operations (for TFLOP/s), or None.
        baseline: the impl the others are compared against (speedup = baseline / impl).
        setup: optional zero-argument callable run before timing (allocate inputs lazily).
    """
    name: str
    params: Dict[str, object]
    impls: Dict[str, Callable[[], object]]
    bytes: Optional[float] = None
    flops: Optional[float] = None
    baseline: Optional[str] = None


def results_dir(device: Optional[torch.device] = None) -> str:
    """``$FASTBERT_RESULTS``, else benchmarks/results for a GPU run and its git-ignored
    ``_scratch/`` for a CPU one (only GPU measurements are committed)."""
    d = os.environ.get(RESULTS_ENV)
    if not d:
        d = DEFAULT_RESULTS if device is not None and device.type == "cuda" else \
            os.path.join(DEFAULT_RESULTS, "_scratch")
    os.makedirs(d, exist_ok=True)
    return d


def deadline() -> Optional[float]:
    """The Unix time after which no new case starts (``$FASTBERT_BENCH_DEADLINE``), or None."""
    v = os.environ.get(DEADLINE_ENV, "").strip()
    if not v:
        return None
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"{DEADLINE_ENV} must be a Unix time in seconds, got {v!r}") from None


def device_info(device: torch.device) -> Dict[str, str]:
    info = {
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["card"] = props.name
        info["cuda"] = torch.version.cuda or ""
        info["driver"] = _driver_version()
        info["sms"] = str(props.multi_processor_count)
    else:
        info["card"] = "cpu-" + (platform.processor() or platform.machine())
        info["cuda"] = ""
        info["driver"] = ""
    return info


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:
        return "not importable"


@functools.lru_cache(maxsize=None)
def _driver_version() -> str:
    """The driver's version (nvidia-smi, up to 20 s), read once a process: results are
    written after every timed impl."""
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else ""
    except Exception:
        return ""


def card_slug(info: Dict[str, str]) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", info["card"]).strip("-").lower()


def with_setting(module, name: str, value, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``module.<name>`` set to ``value`` (restored after): forces one of a
    kernel module's choices (a threshold between two code paths) for one implementation."""
    def run():
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn()
        finally:
            setattr(module, name, saved)
    return run


def error_text(e: BaseException, width: int = 120) -> str:
    """``Type: first line of the message`` (cut to ``width``), for a result row or a log line;
    an exception with an empty message gives ``Type: ``."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:width]}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25,
            rep_ms: float = 100) -> tuple[float, float, float]:
    """(median, 20%, 80%) milliseconds of ``fn``."""
    if device.type == "cuda":
        import triton.testing
        q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    fn()  # warm up (first call may compile / allocate)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return statistics.median(times), q(0.2), q(0.8)


# Calls of an impl profiled for its GPU time (kernel durations from CUPTI, after the timing).
GPU_TIME_CALLS = 5


def gpu_kernel_times(fn: Callable[[], object], calls: int) -> Dict[str, float]:
    """Device time (us) per call of ``fn`` by kernel name, from torch.profiler: what the GPU
    itself spends, whatever the host does between launches."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    names: Dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = getattr(e, "device_time_total", None)
            if t is None:
                t = e.cuda_time_total
            names[e.name] = names.get(e.name, 0.0) + t / calls
    return names


def gpu_time_ms(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Summed kernel time of one call (ms) on CUDA, else None. Next to the wall time ``ms``
    it tells a host-bound case (gpu_ms well below ms: Python and launches set the pace) from
    a kernel-bound one."""
    if device.type != "cuda":
        return None
    try:
        return sum(gpu_kernel_times(fn, GPU_TIME_CALLS).values()) / 1e3
    except Exception as e:  # no profiler (CUPTI) on a machine: keep the timing, drop gpu_ms
        print(f"gpu_ms not measured: {error_text(e)}", flush=True)
        return None


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory allocated while ``fn`` runs, above what was allocated before (MB)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def copy_bandwidth_gbps(device: torch.device) -> Optional[float]:
    """Device-to-device copy rate (read + write bytes per second), measured now."""
    if device.type != "cuda":
        return None
    n = COPY_PROBE_BYTES // 2
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_fn(lambda: dst.copy_(src), device)
    return 2 * n / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype=torch.bfloat16) -> Optional[float]:
    """Dense matmul rate (TFLOP/s) for ``dtype``, measured now."""
    if device.type != "cuda":
        return None
    n = MATMUL_PROBE_N
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms, _, _ = time_fn(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def run_cases(bench: str, cases: List[Case], device: torch.device, *,
              ceilings: Optional[Dict[str, Optional[float]]] = None,
              write: bool = True, verbose: bool = True, tag: str = "") -> List[Dict[str, object]]:
    """Time every impl of every case; return the rows and (by default) write CSV + markdown
    (``tag``: appended to the card in the file names, see ``write_results``)."""
    ceilings = ceilings if ceilings is not None else {
        "copy_gbps": copy_bandwidth_gbps(device),
        "matmul_tflops": matmul_tflops(device) if any(c.flops for c in cases) else None,
    }
    rows: List[Dict[str, object]] = []
    stop_at = deadline()
    skipped: List[Case] = []
    done = 0
    for case in cases:
        if stop_at is not None and time.time() > stop_at:
            skipped.append(case)
            continue
        results = {}
        for impl, fn in case.impls.items():
            if stop_at is not None and time.time() > stop_at and results:
                # the budget ran out inside a case: the impls not timed are reported so, and
                # what was timed is kept
                results[impl] = (float("nan"),) * 3 + (None, None, None, "not run: time budget")
                continue
            first = None
            began = time.perf_counter()
            try:
                # the first call on its own: JIT compiles (or loads from the caches the warm-up
                # filled) and allocates; its seconds are the first_s column
                fn()
                sync(device)
                first = time.perf_counter() - began
                ms, lo, hi = time_fn(fn, device)
                mem = peak_memory_mb(fn, device)
                gpu = gpu_time_ms(fn, device)
                err = ""
            except Exception as e:  # an impl that cannot run this shape is reported, not fatal
                ms = lo = hi = float("nan")
                mem = gpu = None
                err = error_text(e)
            results[impl] = (ms, lo, hi, mem, gpu, first, err)
            if verbose:
                # [first call / all the harness spent on the impl: timing, memory, profile]
                print(f"{bench:>14} {case.name:<24} {_fmt_params(case.params):<44} {impl:<16} "
                      f"{ms:9.4f} ms  [{first or 0:.1f} / {time.perf_counter() - began:.1f} s]"
                      f"{'  ' + err if err else ''}", flush=True)
            if write and len(results) < len(case.impls):
                # written after every impl: a run killed inside a long case keeps what it
                # timed (the case's rows so far, speedups where the baseline has run)
                write_results(bench, rows + _case_rows(bench, case, results, ceilings), device,
                              ceilings, tag=tag, note=f"Incomplete: the run stopped inside "
                              f"case {done + 1} of {len(cases)} ({case.name}).")
        case_rows = _case_rows(bench, case, results, ceilings)
        rows.extend(case_rows)
        if verbose:
            for row in case_rows:
                extra = "".join(f"  {k}={row[k]}" for k in ("GB/s", "%copy_bw", "TFLOP/s", "%matmul")
                                if k in row)
                if extra:
                    print(f"{bench:>14} {case.name:<24} {row['impl']:<16}{extra}", flush=True)
        done += 1
        # free the case's lazily built inputs before the next one: a list of cases that each
        # fill much of the card must not accumulate (the callables are spent once timed)
        case.impls = {impl: _spent for impl in case.impls}
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        if write and done < len(cases):  # a run stopped part-way keeps what it measured
            write_results(bench, rows, device, ceilings, tag=tag,
                          note=f"Incomplete: the run stopped after {done} of {len(cases)} cases.")
    note = ""
    if skipped:
        note = (f"Time budget (${DEADLINE_ENV}) reached: {len(skipped)} of {len(cases)} cases not "
                "run: " + "; ".join(f"{c.name} {_fmt_params(c.params)}" for c in skipped) + ".")
        print(f"{bench}: {note}", flush=True)
    if write:
        write_results(bench, rows, device, ceilings, note=note, tag=tag)
    return rows


# impls the warm-up calls: those that JIT-compile (fastbert's Triton kernels, torch.compile
# graphs, Liger's Triton kernels); eager / cuDNN / SDPA / HF calls compile nothing and hold the
# most memory (an eager causal attention at seq 8192 keeps GBs of scores)
def compiles_ahead(impl: str) -> bool:
    """Whether the warm-up calls ``impl`` (see ``warm_cases``)."""
    return any(word in impl for word in ("fastbert", "compile", "liger"))


def warm_cases(bench: str, cases: List[Case], device: torch.device, shard: int,
               n_shards: int, *, verbose: bool = True) -> Dict[str, int]:
    """Compile ahead: call once each, untimed, this shard's (case, impl) pairs of the impls
    that compile (``compiles_ahead``), and return the counts {"ran", "failed", "not_reached",
    "skipped"} (skipped: impls that compile nothing, in this shard's cases).

    ``make gpu-check`` runs ``n_shards`` of these in parallel processes (``--warm I/N``) before
    the timed run: each first call JIT-compiles its Triton kernels (single-threaded) and its
    ``torch.compile`` graphs into the on-disk caches of Triton and Inductor, which the timed
    process, run after them, then loads instead of compiling one after another inside its
    share of the time budget. The j-th compiling impl of case c goes to shard (j + c) mod N:
    every shard works through the cases in their order (most important first), takes the
    same number of pairs from any N cases in a row, and an impl at the same place in every
    case (a torch.compile baseline, say) lands in another shard each case. Nothing
    is timed or written; an impl that fails is counted, not fatal (the timed run reports
    it). New pairs stop starting at ``$FASTBERT_BENCH_DEADLINE``; each case is released once
    the loop has passed it (its lazily built inputs go with the last case holding them).
    """
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard must be in [0, {n_shards}), got {shard}")
    stop_at = deadline()
    counts = {"ran": 0, "failed": 0, "not_reached": 0, "skipped": 0}
    start = time.time()
    for ci, case in enumerate(cases):
        compiling = [impl for impl in case.impls if compiles_ahead(impl)]
        mine = [impl for j, impl in enumerate(compiling) if (j + ci) % n_shards == shard]
        if mine:
            counts["skipped"] += len(case.impls) - len(compiling)
        for impl in mine:
            if stop_at is not None and time.time() > stop_at:
                counts["not_reached"] += 1
                continue
            try:
                case.impls[impl]()
                sync(device)
                counts["ran"] += 1
            except Exception as e:  # reported by the timed run, which calls it again
                counts["failed"] += 1
                if verbose:
                    print(f"{bench} warm-up: {case.name} {_fmt_params(case.params)} {impl}: "
                          f"{error_text(e)}", flush=True)
        case.impls = {impl: _spent for impl in case.impls}
        if mine and device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    if verbose:
        # the line gpu_check.sh sums over the shards (WARM_LINE)
        print(WARM_LINE.format(bench=bench, shard=shard, n_shards=n_shards,
                               secs=time.time() - start, **counts), flush=True)
    return counts


# each warm-up shard's last line; gpu_check.sh finds it by " warm-up shard " and adds up the
# ran= / failed= / not_reached= fields
WARM_LINE = ("{bench} warm-up shard {shard}/{n_shards}: ran={ran} failed={failed} "
             "not_reached={not_reached} skipped={skipped} secs={secs:.0f}")


def _case_rows(bench: str, case: Case, results: Dict[str, tuple],
               ceilings: Dict[str, Optional[float]]) -> List[Dict[str, object]]:
    """The CSV rows of ``case`` from the impls timed so far (``results``: impl -> (ms, p20,
    p80, peak MB, GPU ms, first call's seconds, error))."""
    base = case.baseline or next(iter(case.impls))
    base_ms = results[base][0] if base in results else float("nan")
    out = []
    for impl, (ms, lo, hi, mem, gpu, first, err) in results.items():
        row = {"bench": bench, "case": case.name, **case.params, "impl": impl,
               "ms": round(ms, 5), "ms_p20": round(lo, 5), "ms_p80": round(hi, 5),
               "gpu_ms": None if gpu is None else round(gpu, 5),
               "peak_mb": None if mem is None else round(mem, 1),
               "first_s": None if first is None else round(first, 3),
               f"speedup_vs_{base}": (round(base_ms / ms, 3)
                                      if ms == ms and ms > 0 and base_ms == base_ms else None)}
        if case.bytes is not None and ms == ms:
            gbps = case.bytes / (ms * 1e-3) / 1e9
            row["GB/s"] = round(gbps, 1)
            if ceilings.get("copy_gbps"):
                row["%copy_bw"] = round(100 * gbps / ceilings["copy_gbps"], 1)
        if case.flops is not None and ms == ms:
            tf = case.flops / (ms * 1e-3) / 1e12
            row["TFLOP/s"] = round(tf, 2)
            if ceilings.get("matmul_tflops"):
                row["%matmul"] = round(100 * tf / ceilings["matmul_tflops"], 1)
        if err:
            row["error"] = err
        out.append(row)
    return out


def _spent():
    raise RuntimeError("this benchmark case has been run already; its inputs were freed")


def _fmt_params(p: Dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in p.items())


def write_results(bench: str, rows: List[Dict[str, object]], device: torch.device,
                  ceilings: Dict[str, Optional[float]], note: str = "", tag: str = "") -> str:
    """Write ``<bench>_<card><tag>.csv`` and ``.md`` (``note``, if any, under the header);
    returns the CSV path. Each file is written whole, then renamed into place. ``tag``
    "-quick": a --quick run on a GPU (small shapes), kept apart from the real results, which
    benchmarks/targets.py judges only when asked for that card slug."""
    info = device_info(device)
    out = results_dir(device)
    stem = os.path.join(out, f"{bench}_{card_slug(info)}{tag}")
    keys: List[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(stem + ".csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    with open(stem + ".md.tmp", "w") as f:
        f.write(f"# {bench} on {info['card']}\n\n")
        f.write(f"driver {info['driver'] or '-'}, CUDA {info['cuda'] or '-'}, torch {info['torch']}, "
                f"triton {info['triton']}, {info['date']}\n\n")
        cb = ceilings.get("copy_gbps")
        mm = ceilings.get("matmul_tflops")
        f.write(f"Measured in the same run: copy bandwidth {cb:.0f} GB/s" if cb else
                "No GPU: CPU timings of the reference paths only; they say nothing about GPU speed")
        if mm:
            f.write(f", bf16 matmul {mm:.0f} TFLOP/s")
        f.write("\n\n")
        if note:
            f.write(note + "\n\n")
        f.write("| " + " | ".join(keys) + " |\n")
        f.write("|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |\n")
    os.replace(stem + ".csv.tmp", stem + ".csv")
    os.replace(stem + ".md.tmp", stem + ".md")
    return stem + ".csv"


# the file-name tag of a --quick run's results on a GPU (tiny shapes: not the real results)
QUICK_TAG = "-quick"

# the columns of a result row that are measurements or the impl name (besides speedup_vs_*);
# the others identify the case (benchmarks/targets.py groups rows by them)
MEASURED_COLUMNS = frozenset({"bench", "impl", "ms", "ms_p20", "ms_p80", "gpu_ms", "peak_mb",
                              "first_s",
                              "GB/s", "%copy_bw", "TFLOP/s", "%matmul", "error",
                              # bench_translation's training rows
                              "steps_run", "tok/s", "outliers", "loss", "bleu", "exact%",
                              "decode_ms", "note"})


def parse_args(description: str, argv=None) -> argparse.Namespace:
    """Common command line of every bench script."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="a few small shapes (the default on CPU, where only the torch paths run)")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    p.add_argument("--warm", metavar="I/N", type=_shard,
                   help="compile ahead: call shard I of N of the (case, impl) pairs of the "
                        "impls that compile once each, untimed, and write nothing (see "
                        "warm_cases)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type != "cuda":
        args.quick = True
    if args.warm is not None:
        args.no_write = True
    return args


def _shard(text: str) -> tuple:
    """``--warm``'s I/N: (I, N) with 0 <= I < N."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (two whole numbers), got {text!r}")
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected 0 <= I < N, got {text!r}")
    return i, n


def main_for(bench: str, cases_fn, description: str, argv=None) -> List[Dict[str, object]]:
    """The ``main`` of every bench script: parse the common arguments, build the cases for
    the chosen device, time them and write the results."""
    args = parse_args(description, argv)
    if args.warm is not None:
        warm_cases(bench, cases_fn(args.device, args.quick), args.device, *args.warm)
        return []
    quick_gpu = args.quick and args.device.type == "cuda"
    return run_cases(bench, cases_fn(args.device, args.quick), args.device,
                     write=not args.no_write, tag=QUICK_TAG if quick_gpu else "")
