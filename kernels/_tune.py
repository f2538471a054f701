"""Opt-in run-time choice of a kernel's ``num_warps`` / ``num_stages`` by timing on the GPU.

The block configs in the launchers were chosen from ``ptxas -v`` (registers, shared memory,
spills) on a machine without a GPU; how many warps share a tile and how deep the loads are
pipelined are the choices that reading cannot settle. With this mode on, the first call of a
kernel for a *tuning key* (its variant flags and a bucket of the shapes that set its
occupancy) times each candidate pair on the caller's inputs and keeps the fastest for the
rest of the process, as ``torch.backends.cudnn.benchmark`` does for convolutions.

Only ``num_warps`` and ``num_stages`` vary, never a block size: the tiles, the loop bounds and
the order in which a program adds up its blocks stay the launcher's, so every candidate
computes what the tested config computes (the Triton interpreter ignores both options, so
the numerics tests cover every pair; ``tests/aot_compile.py`` compiles every pair for sm_80 /
sm_90, in the heaviest variant of each kernel: bf16, every padded option on, at each
head-dim tile and at head dim 80, whose masked columns take the most registers). The result
bits may differ between candidates (the warps split a tile's dot products and reductions
differently).

Off by default (``FASTBERT_AUTOTUNE=1`` in the environment, read at the first launch that
asks, "0" or unset off; or ``ENABLED = True`` here): on the H200 (2026-11-28,
benchmarks/results/attention_tuned_nvidia-h200.txt) it chose the same pair for each kernel at
every shape, which became the attention backward's defaults, and its per-call lookup cost
more host time than it saved (the ``fastbert_tuned`` rows of bench_attention). A key not
tuned yet is not tuned, and the launcher's default is taken:
- on the CPU (the interpreter), and while the current stream is being captured into a CUDA
  graph (the timing synchronizes the device); a later eager call tunes it. A key already tuned
  keeps its pair during a capture. The synchronization also breaks *another* thread's capture
  in torch's default ("global") capture mode: tune (one eager call) before capturing there;
- under ``torch.use_deterministic_algorithms(True)``: the pair, and with it the result bits,
  could differ from one process to the next.
A candidate that does not fit the GPU (Triton's OutOfResources: too much shared memory) is
skipped, and another must beat the default by ``MARGIN`` to be kept (timing noise must not
trade a tested default for a pair that only looked faster). Tuning costs one compile per
candidate and a few runs of each, once per key and device; the choices live in ``_CHOSEN``
(``chosen()`` lists them, ``clear()`` forgets them).
"""
from __future__ import annotations

import statistics
import threading
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ._common import env_flag

ENV_VAR = "FASTBERT_AUTOTUNE"
# None: ``$FASTBERT_AUTOTUNE`` decides, read once by ``on()``; tests, benchmarks and users may
# set it to True / False
ENABLED: Optional[bool] = None
# each candidate: one untimed run (compile, caches warm), then ROUNDS rounds of REPS runs back
# to back between one pair of events (so a drained queue times the kernels, not the host's
# launches between them); the median round is compared
REPS = 5
ROUNDS = 3
# another candidate is kept only when it takes at most (1 - MARGIN) of the default's time
MARGIN = 0.03

Config = Tuple[int, int]          # (num_warps, num_stages)
_CHOSEN: Dict[tuple, Config] = {}
_LOCK = threading.Lock()


def on() -> bool:
    """``ENABLED``; while it is None, $FASTBERT_AUTOTUNE decides ("1" on, "0" or unset off),
    read once into it."""
    global ENABLED
    if ENABLED is None:
        ENABLED = env_flag(ENV_VAR)
    return ENABLED


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


def _cuda_ms(run: Callable[[], None], device: torch.device) -> float:
    """Milliseconds of one ``run()`` on the current stream of ``device``: the median of
    ROUNDS rounds of REPS runs queued back to back."""
    stream = torch.cuda.current_stream(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(ROUNDS)]
    for start, end in events:
        start.record(stream)
        for _ in range(REPS):
            run()
        end.record(stream)
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events) / REPS


def choose(candidates: Sequence[Config], run: Callable[[Config], None],
           time_ms: Callable[[Callable[[], None]], float]) -> Config:
    """The fastest of ``candidates``, the first (the launcher's default) unless another takes
    at most (1 - MARGIN) of its time: each is run once (compile, warm-up), then timed by
    ``time_ms`` (a function of a zero-argument callable). Candidates that do not fit the GPU
    are skipped; when none fits, the first one's error is raised."""
    skip = _out_of_resources()
    times, first_error = {}, None
    for cand in candidates:
        try:
            run(cand)
        except skip as e:
            first_error = first_error or e
            continue
        times[cand] = time_ms(lambda cand=cand: run(cand))
    if not times:
        raise first_error
    best = min(times, key=times.get)
    default = candidates[0]
    if default in times and times[best] > (1.0 - MARGIN) * times[default]:
        return default
    return best


def pick(key: tuple, candidates: Sequence[Config], run: Callable[[Config], None],
         device: torch.device) -> Config:
    """The pair to launch with: ``candidates[0]`` (the launcher's default) unless tuning is on
    and may run here (module docstring), else the fastest candidate for ``key`` on
    ``device``, timed now with ``run`` (which launches the kernel with a given pair, on the
    call's own inputs and outputs, and must give the same outputs every time it runs: a
    kernel that accumulates into an output zeroes it first) at the first call of the key."""
    if not on() or len(candidates) < 2 or device.type != "cuda":
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
            hit = choose(candidates, run, lambda fn: _cuda_ms(fn, device))
            _CHOSEN[full] = hit
    return hit


def known(key: tuple, device: torch.device) -> bool:
    """Whether ``key`` has been tuned on ``device`` (its next ``pick`` runs nothing)."""
    return (device.index, key) in _CHOSEN
