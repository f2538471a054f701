"""kernels/_tune.py, the opt-in run-time choice of num_warps / num_stages: which candidate it
keeps, when it must not tune, and that a launcher's tuning runs leave its results exactly as
the default launch leaves them (the attention kernels in the interpreter, which ignores both
options, so any difference is the launcher's doing: an output accumulated twice, say).

There is no GPU here: the CUDA timing (``_cuda_ms``) and the capture query are stood in for;
the choice on a real GPU is the benchmarks' ``fastbert_tuned`` rows."""
from __future__ import annotations

import pytest
import torch
from triton.runtime.errors import OutOfResources

from fastbert.kernels import _tune
from fastbert.kernels import attention as ka
import fastbert.ops as ops
from tests._utils import _interpreting

CUDA0 = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _fresh_choices():
    _tune.clear()
    yield
    _tune.clear()


def _timer(times: dict, log: list):
    """A stand-in for the GPU timing: runs ``fn`` (as the real one does) and returns the
    time listed for the candidate ``fn`` last ran."""
    def time_ms(fn):
        fn()
        return times[log[-1]]
    return time_ms


def test_choose_keeps_the_fastest_candidate_and_skips_those_that_do_not_fit():
    log = []

    def run(c):
        log.append(c)
        if c == (4, 4):
            raise OutOfResources(300000, 232448, "shared memory")

    times = {(8, 3): 2.0, (4, 3): 1.5, (8, 2): 1.7, (4, 4): 0.1}
    best = _tune.choose([(8, 3), (4, 3), (8, 2), (4, 4)], run, _timer(times, log))
    assert best == (4, 3)
    # each fitting candidate: one untimed run (compile, warm-up), then the timed one(s)
    assert log == [(8, 3), (8, 3), (4, 3), (4, 3), (8, 2), (8, 2), (4, 4)]


def test_choose_keeps_the_default_unless_another_beats_it_by_the_margin():
    log = []
    margin = _tune.MARGIN
    near = {(8, 3): 1.0, (4, 3): 1.0 - margin / 2, (8, 2): 1.1}
    assert _tune.choose(list(near), log.append, _timer(near, log)) == (8, 3)
    far = {(8, 3): 1.0, (4, 3): 1.0 - 2 * margin, (8, 2): 1.1}
    assert _tune.choose(list(far), log.append, _timer(far, log)) == (4, 3)

    def default_does_not_fit(c):
        log.append(c)
        if c == (8, 3):
            raise OutOfResources(300000, 232448, "shared memory")
    only = {(4, 3): 1.0, (8, 2): 0.99}
    assert _tune.choose([(8, 3), (4, 3), (8, 2)], default_does_not_fit,
                        _timer(only, log)) == (8, 2)


def test_choose_raises_the_first_error_when_no_candidate_fits():
    def run(c):
        raise OutOfResources(300000 + c[0], 232448, "shared memory")

    with pytest.raises(OutOfResources, match="300008"):
        _tune.choose([(8, 3), (4, 3)], run, lambda fn: 1.0)


def test_choose_lets_other_errors_through():
    def run(c):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        _tune.choose([(8, 3), (4, 3)], run, lambda fn: 1.0)


def _never(c):
    raise AssertionError(f"ran candidate {c}: must not tune here")


def test_pick_takes_the_default_when_off_single_on_cpu_deterministic_or_capturing(monkeypatch):
    cands = [(8, 3), (4, 3)]
    monkeypatch.setattr(_tune, "ENABLED", False)
    assert _tune.pick(("k",), cands, _never, CUDA0) == (8, 3)
    monkeypatch.setattr(_tune, "ENABLED", True)
    assert _tune.pick(("k",), [(4, 2)], _never, CUDA0) == (4, 2)
    assert _tune.pick(("k",), cands, _never, torch.device("cpu")) == (8, 3)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _tune.pick(("k",), cands, _never, CUDA0) == (8, 3)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert _tune.pick(("k",), cands, _never, CUDA0) == (8, 3)
    finally:
        torch.use_deterministic_algorithms(was)
    assert _tune.chosen() == {}   # none of these is remembered: a later call may tune


def test_pick_tunes_once_per_key_and_device_and_forgets_on_clear(monkeypatch):
    monkeypatch.setattr(_tune, "ENABLED", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    log = []
    times = {(8, 3): 2.0, (4, 3): 1.0}
    monkeypatch.setattr(_tune, "_cuda_ms", lambda fn, device: _timer(times, log)(fn))
    cands = [(8, 3), (4, 3)]
    assert _tune.pick(("k",), cands, log.append, CUDA0) == (4, 3)
    n = len(log)
    assert n > 0 and _tune.known(("k",), CUDA0)
    assert _tune.pick(("k",), cands, _never, CUDA0) == (4, 3)   # kept: nothing runs
    times[(8, 3)] = 0.5
    assert _tune.pick(("k",), cands, log.append, torch.device("cuda", 1)) == (8, 3)
    times[(8, 3)] = 2.0
    assert _tune.pick(("other",), cands, log.append, CUDA0) == (4, 3)
    assert _tune.chosen() == {(0, ("k",)): (4, 3), (1, ("k",)): (8, 3), (0, ("other",)): (4, 3)}
    _tune.clear()
    assert not _tune.known(("k",), CUDA0)
    times[(4, 3)] = 3.0
    assert _tune.pick(("k",), cands, log.append, CUDA0) == (8, 3)


@pytest.mark.parametrize("value, want", [(None, False), ("", False), ("0", False), (" 1 ", True),
                                         ("1", True), ("true", ValueError), ("2", ValueError)])
def test_the_environment_variable_is_read_once_and_checked(monkeypatch, value, want):
    monkeypatch.setattr(_tune, "ENABLED", None)
    if value is None:
        monkeypatch.delenv(_tune.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(_tune.ENV_VAR, value)
    if want is ValueError:
        with pytest.raises(ValueError, match="FASTBERT_AUTOTUNE must be 0 or 1"):
            _tune.on()
        return
    assert _tune.on() is want and _tune.ENABLED is want
    monkeypatch.setenv(_tune.ENV_VAR, "0" if want else "1")   # read once: no change now
    assert _tune.on() is want


def test_bucket_rounds_up_to_a_power_of_two():
    assert [_tune.bucket(n) for n in (0, 1, 2, 3, 5, 128, 129)] == [0, 1, 2, 4, 8, 128, 256]


def test_candidates_start_with_the_launchers_default_and_fp32_has_no_other():
    for d in (16, 32, 64, 80, 96, 128):
        for dt in (torch.float16, torch.bfloat16):
            for drop in (False, True):
                fwd = ka.fwd_candidates(d, dt, drop)
                assert fwd[0] == ka.fwd_config(d, dt, drop)[2:] and len(set(fwd)) == len(fwd) > 1
            dkdv, dq = ka.bwd_candidates(d, dt)
            (_, _, w1, s1), (_, _, w2, s2) = ka.bwd_configs(d, dt)
            assert dkdv[0] == (w1, s1) and dq[0] == (w2, s2) and len(dkdv) > 1 and len(dq) > 1
        assert len(ka.fwd_candidates(d, torch.float32, False)) == 1
        assert all(len(c) == 1 for c in ka.bwd_candidates(d, torch.float32))


@pytest.mark.skipif(not _interpreting(), reason="the interpreter ignores num_warps / "
                    "num_stages, so every candidate must give the default's bits there; on a GPU "
                    "they may differ (test_attention_gpu_tuned_configs_match_fp32_reference)")
@pytest.mark.parametrize("path", ["fused", "three_kernel", "atomic_dq"])
def test_attention_tuning_runs_leave_the_default_launchs_results(monkeypatch, path):
    """Every candidate of every attention kernel run twice (as the tuner does) before the
    chosen one: forward output and dq / dk / dv stay bit-identical to the untuned call. The
    atomic-dQ kernel adds into dQ: its tuning runs must not be added up."""
    if path != "fused":
        monkeypatch.setattr(ka, "ONE_LAUNCH_BACKWARD", False)
    if path == "atomic_dq":
        monkeypatch.setattr(ka, "ATOMIC_DQ_BACKWARD", True)
    g = torch.Generator().manual_seed(7)
    b, s, h, d = 2, 19, 2, 16
    q, k, v = (torch.randn(b, s, h, d, generator=g).half().requires_grad_() for _ in range(3))
    mask = torch.arange(s)[None, :] < torch.tensor([[19], [11]])
    dout = torch.randn(b, s, h, d, generator=g).half()

    def run():
        out = ops.attention(q, k, v, attention_mask=mask, backend="triton")
        return (out,) + torch.autograd.grad(out, (q, k, v), dout)

    want = run()
    picked = []

    def every_candidate(key, candidates, fn, device):
        for c in candidates:
            fn(c)
            fn(c)
        picked.append(key[0])
        return candidates[-1]

    monkeypatch.setattr(_tune, "ENABLED", True)
    monkeypatch.setattr(_tune, "pick", every_candidate)
    got = run()
    expect = {"fused": ["attention_fwd", "attention_bwd_dkdv"],
              "three_kernel": ["attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"],
              "atomic_dq": ["attention_fwd", "attention_bwd_dkdv"]}[path]
    assert picked == expect
    for w, t in zip(want, got):
        assert torch.equal(w, t)


# ---- from the mutation review (s14 L): what a mutant of the tuner or its use survived

def test_choose_keeps_a_candidate_at_exactly_the_margin():
    # "kept only when it takes at most (1 - MARGIN) of the default's time": equality keeps it
    times = {(8, 3): 1.0, (4, 3): 1.0 - _tune.MARGIN}
    log = []
    def tm(fn):
        fn()
        return times[log[-1]]
    assert _tune.choose(list(times), log.append, tm) == (4, 3)


def test_pick_keeps_a_tuned_pair_during_capture(monkeypatch):
    monkeypatch.setattr(_tune, "ENABLED", True)
    monkeypatch.setattr(_tune, "_cuda_ms", lambda fn, device: (fn(), 1.0)[1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_tune, "choose", lambda c, run, t: c[-1])
    assert _tune.pick(("k",), [(8, 3), (4, 3)], lambda c: None, CUDA0) == (4, 3)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _tune.pick(("k",), [(8, 3), (4, 3)], _never, CUDA0) == (4, 3)


def test_pick_rechecks_under_the_lock(monkeypatch):
    """Another thread stores the key between the unlocked lookup and the lock: no second
    tuning."""
    monkeypatch.setattr(_tune, "ENABLED", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    class Racy(dict):
        raced = False

        def get(self, k, d=None):
            if not self.raced:
                self.raced = True
                self[k] = (4, 3)       # the other thread finished tuning just now
                return None
            return super().get(k, d)

    monkeypatch.setattr(_tune, "_CHOSEN", Racy())
    assert _tune.pick(("k",), [(8, 3), (4, 3)], _never, CUDA0) == (4, 3)


def test_cuda_ms_is_the_median_round_per_run(monkeypatch):
    """ROUNDS rounds of REPS back-to-back runs, one event pair a round: the median round's
    time divided by REPS (CUDA events stood in for)."""
    round_ms = [30.0, 10.0, 95.0]          # median 30, mean 45

    class Ev:
        def __init__(self, ms):
            self.ms = ms

        def record(self, stream=None):
            pass

        def elapsed_time(self, end):
            return end.ms - self.ms

    made = []

    def event(enable_timing=False):
        i = len(made)
        e = Ev(round_ms[i // 2] if i % 2 else 0.0)
        made.append(e)
        return e

    monkeypatch.setattr(torch.cuda, "Event", event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(_tune, "ROUNDS", 3)
    monkeypatch.setattr(_tune, "REPS", 5)
    calls = []
    assert _tune._cuda_ms(lambda: calls.append(1), CUDA0) == pytest.approx(30.0 / 5)
    assert len(calls) == 15


def test_128_wide_tiles_never_try_four_warps_where_they_spill():
    for d in (80, 96, 128):
        for dt in (torch.float16, torch.bfloat16):
            for drop in (False, True):
                assert all(w == 8 for w, _ in ka.fwd_candidates(d, dt, drop))
            dkdv, dq = ka.bwd_candidates(d, dt)
            assert all(w == 8 for w, _ in dkdv)
            assert any(w == 4 for w, _ in dq)          # the dQ kernel does try four
    for d in (16, 32, 64):
        for dt in (torch.float16, torch.bfloat16):
            assert any(w == 4 for w, _ in ka.fwd_candidates(d, dt, False))
            assert all(any(w == 4 for w, _ in c) for c in ka.bwd_candidates(d, dt))


def test_aot_configs_cover_every_tuning_pair_at_head_dim_80():
    names = [c.name for c in ka.aot_configs()]
    for kern in ("attention_fwd[bf16,d80", "attention_bwd_dkdv[bf16,d80",
                 "attention_bwd_dq[bf16,d80"):
        assert any(n.startswith(kern) and "tuning" in n for n in names), kern


def _spy(monkeypatch, mark):
    """Record every attention launch's (kernel name, num_warps, num_stages) and make pick
    return ``mark(candidates)`` after running each candidate once."""
    launches, picks = [], []
    real = ka.launch

    def launch(kernel, grid, *args, num_warps=None, num_stages=None, **meta):
        launches.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, num_warps,
                         num_stages))
        return real(kernel, grid, *args, num_warps=num_warps, num_stages=num_stages, **meta)

    def pick(key, candidates, run, device):
        for c in candidates:
            run(c)
        picks.append((key, tuple(candidates)))
        return mark(candidates)

    monkeypatch.setattr(ka, "launch", launch)
    monkeypatch.setattr(_tune, "pick", pick)
    return launches, picks


@pytest.mark.skipif(not _interpreting(), reason="CPU tensors on the Triton backend (the "
                    "interpreter ignores num_warps / num_stages: the pair launched is only seen "
                    "through a spy)")
@pytest.mark.parametrize("three_kernel, d", [(False, 16), (True, 16), (True, 128)])
def test_each_kernel_launches_with_the_pair_pick_returned(monkeypatch, three_kernel, d):
    monkeypatch.setattr(_tune, "ENABLED", True)
    if three_kernel:
        monkeypatch.setattr(ka, "ONE_LAUNCH_BACKWARD", False)
    # a pair no candidate list holds, so its use is unmistakable (the interpreter ignores it)
    launches, picks = _spy(monkeypatch, lambda c: (2, 7))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 19, 2, d, generator=g).half().requires_grad_() for _ in range(3))
    out = ops.attention(q, k, v, backend="triton")
    out.float().sum().backward()
    names = {"attention_fwd": "_attention_fwd_kernel",
             "attention_bwd_dkdv": "_attention_bwd_dkdv_kernel",
             "attention_bwd_dq": "_attention_bwd_dq_kernel"}
    want_cands = {"attention_fwd": ka.fwd_candidates(d, torch.float16, False),
                  "attention_bwd_dkdv": ka.bwd_candidates(d, torch.float16)[0],
                  "attention_bwd_dq": ka.bwd_candidates(d, torch.float16)[1]}
    assert len(picks) == (3 if three_kernel else 2)
    for key, cands in picks:
        kname = key[0]
        assert cands == want_cands[kname]
        runs = [(w, s) for n, w, s in launches if n == names[kname]]
        # every candidate as (num_warps, num_stages), then the final launch with pick's pair
        assert runs == list(cands) + [(2, 7)], kname


@pytest.mark.skipif(not _interpreting(), reason="CPU tensors on the Triton backend (the "
                    "interpreter ignores num_warps / num_stages: the pair launched is only seen "
                    "through a spy)")
def test_the_environment_variable_turns_tuning_on_for_attention(monkeypatch):
    monkeypatch.setattr(_tune, "ENABLED", None)
    monkeypatch.setenv(_tune.ENV_VAR, "1")
    launches, picks = _spy(monkeypatch, lambda c: c[0])
    q, k, v = (torch.randn(1, 5, 2, 16).half() for _ in range(3))
    ops.attention(q, k, v, backend="triton")
    assert [p[0][0] for p in picks] == ["attention_fwd"]


@pytest.mark.skipif(not _interpreting(), reason="CPU tensors on the Triton backend (the "
                    "interpreter ignores num_warps / num_stages: the pair launched is only seen "
                    "through a spy)")
def test_tuning_keys_tell_variants_and_gqa_apart(monkeypatch):
    monkeypatch.setattr(_tune, "ENABLED", True)
    launches, picks = _spy(monkeypatch, lambda c: c[0])
    g = torch.Generator().manual_seed(2)
    keys = {}
    for causal in (False, True):
        for hkv in (4, 2):
            q = torch.randn(1, 9, 4, 16, generator=g).half().requires_grad_()
            k, v = (torch.randn(1, 9, hkv, 16, generator=g).half().requires_grad_()
                    for _ in range(2))
            picks.clear()
            ops.attention(q, k, v, causal=causal, backend="triton").float().sum().backward()
            keys[causal, hkv] = {p[0][0]: p[0] for p in picks}
    assert keys[False, 4]["attention_fwd"] != keys[True, 4]["attention_fwd"]
    # the dK/dV grid is over kv heads and each program loops over its group of q heads
    d4, d2 = keys[False, 4]["attention_bwd_dkdv"], keys[False, 2]["attention_bwd_dkdv"]
    assert d4 != d2
    assert d4[-1] == 1 and d2[-1] == 2                  # groups
    assert d4[-4] == _tune.bucket(4) and d2[-4] == _tune.bucket(2)   # batch x kv heads
