"""Opt-in run-time choice of a kernel's ``num_warps`` / ``num_stages`` by timing on the GPU.

The block configs in the launchers were chosen from ``ptxas -v`` (registers, shared memory,
spills) on a machine without a GPU; how many warps share a tile and how deep the loads are
pipelined are the choices that reading cannot settle. With this mode on, the first call of a
kernel for a *tuning key* (its variant flags and a bucket of the shapes that set its
occupancy) times each candidate pair on the caller's inputs and keeps the fastest for the
rest of the process, as ``torch.backends.cudnn.benchmark`` does for convolutions.

Only ``num_warps`` and ``num_stages`` vary, never a block size: the tiles, the loop bounds and
the order in which a program adds up its blocks stay the launcher's, so every candidate
computes what the tested config computes (the Triton interpreter ignores both options, and
``tests/aot_compile.py`` compiles every candidate for sm_80 / sm_90). The result bits may
differ between candidates (the warps split a tile's dot products and reductions differently).

Off by default (``FASTBERT_AUTOTUNE=1`` in the environment at import, or ``ENABLED = True``
here), until a GPU run shows what it gains (benchmarks/bench_attention.py times the
``fastbert_tuned`` rows beside the default and writes the chosen pairs next to its results).
Never tunes, and takes the launcher's default:
- on the CPU (the interpreter) and while the stream is being captured into a CUDA graph (the
  timing needs host synchronization), a later eager call tunes;
- under ``torch.use_deterministic_algorithms(True)``: the pair, and with it the result bits,
  could differ from one process to the next.
A candidate that does not fit the GPU (Triton's OutOfResources: too much shared memory) is
skipped. Tuning costs one compile per candidate and a few runs of each, once per key and
device; the choices live in ``_CHOSEN`` (``chosen()`` lists them, ``clear()`` forgets them).
"""
from __future__ import annotations

import os
import statistics
import threading
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

ENV_VAR = "FASTBERT_AUTOTUNE"
# ``$FASTBERT_AUTOTUNE`` is read once, at import; tests, benchmarks and users may set ENABLED
ENABLED = os.environ.get(ENV_VAR, "0") == "1"
# timed runs of each candidate after one untimed run (compile, caches warm); the median is
# compared: a few runs suffice to tell pairs apart by more than the ~1-2% launch jitter
REPS = 5

Config = Tuple[int, int]          # (num_warps, num_stages)
_CHOSEN: Dict[tuple, Config] = {}
_LOCK = threading.Lock()


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (0 stays 0): one tuning key per size class."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def chosen() -> Dict[tuple, Config]:
    """The pairs picked so far: (device index, key) -> (num_warps, num_stages)."""
    with _LOCK:
        return dict(_CHOSEN)


def clear() -> None:
    """Forget every choice (the next call of each key tunes again)."""
    with _LOCK:
        _CHOSEN.clear()


def _out_of_resources() -> tuple:
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - a Triton that moved it: skip nothing
        return ()
    return (OutOfResources,)


def _cuda_ms(run: Callable[[], None], device: torch.device, reps: int) -> float:
    """Median milliseconds of ``run()`` on the current stream of ``device``."""
    stream = torch.cuda.current_stream(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record(stream)
        run()
        end.record(stream)
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def choose(candidates: Sequence[Config], run: Callable[[Config], None],
           time_ms: Callable[[Callable[[], None]], float]) -> Config:
    """The fastest of ``candidates``: each is run once (compile, warm-up), then timed by
    ``time_ms`` (a function of a zero-argument callable). Candidates that do not fit the GPU
    are skipped; when none fits, the first one's error is raised."""
    skip = _out_of_resources()
    best, best_ms, first_error = None, float("inf"), None
    for cand in candidates:
        try:
            run(cand)
        except skip as e:
            first_error = first_error or e
            continue
        ms = time_ms(lambda cand=cand: run(cand))
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is None:
        raise first_error
    return best


def pick(key: tuple, candidates: Sequence[Config], run: Callable[[Config], None],
         device: torch.device) -> Config:
    """The pair to launch with: ``candidates[0]`` (the launcher's default) unless tuning is on
    and may run here (module docstring), else the fastest candidate for ``key`` on
    ``device``, timed now with ``run`` (which launches the kernel with a given pair, on the
    call's own inputs and outputs, and must give the same outputs every time it runs: a
    kernel that accumulates into an output zeroes it first) at the first call of the key."""
    if not ENABLED or len(candidates) < 2 or device.type != "cuda":
        return candidates[0]
    if torch.are_deterministic_algorithms_enabled():
        return candidates[0]
    full = (device.index, key)
    hit = _CHOSEN.get(full)
    if hit is not None:
        return hit
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]
    with _LOCK:   # one thread tunes a key; others wait for its choice
        hit = _CHOSEN.get(full)
        if hit is None:
            hit = choose(candidates, run, lambda fn: _cuda_ms(fn, device, REPS))
            _CHOSEN[full] = hit
    return hit


def known(key: tuple, device: torch.device) -> bool:
    """Whether ``key`` has been tuned on ``device`` (its next ``pick`` runs nothing)."""
    return (device.index, key) in _CHOSEN
