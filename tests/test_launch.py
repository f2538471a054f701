"""kernels/_launch.py: the direct launch path hands a compiled kernel's launcher exactly what
the installed Triton's own ``JITFunction.run`` hands it, and its argument class never merges
arguments that Triton specializes differently.

There is no GPU here, so the driver is a stub (device 0, a fixed stream, an sm_90 target) and
compiling is replaced by a recording kernel; everything between the call and the launcher is
Triton's real code. The kernels under test are built as ``JITFunction`` directly (the suite
runs with ``TRITON_INTERPRET=1``, where ``triton.jit`` gives interpreted functions)."""
from __future__ import annotations

import itertools

import pytest
import torch
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver as triton_driver
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastbert.kernels import _launch

STREAM = 0xABC


def _probe(x_ptr, y_ptr, n, stride, scale, flag, maybe_ptr, BLOCK: tl.constexpr,
           HAS_Y: tl.constexpr = False, SCALE_MODE: tl.constexpr = 2):
    pass


def _one_arg(a):
    pass


class _StubDriver:
    def __init__(self):
        self.device = 0

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return STREAM + device

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class _RecordingKernel:
    """Stands in for a CompiledKernel: records each launcher call."""

    def __init__(self, key, calls):
        self.key, self.calls = key, calls
        self.function = f"function-{len(calls)}"
        self.packed_metadata = ("packed", key[:1])

    def run(self, *args):
        self.calls.append((self, args))

    def launch_metadata(self, grid, stream, *args):
        # as CompiledKernel's: None only when the enter hook is None
        if knobs.runtime.launch_enter_hook is None:
            return None
        return ("metadata", grid, stream, args)


def _same_launch(direct, ref):
    """The direct path's launcher call equals Triton's, except that with idle launch hooks
    (None or an empty HookChain: the default) it passes None for the metadata and both hooks,
    which the launcher treats the same (it calls a hook only when it is not None)."""
    if direct == ref:           # Triton's path (a class's first launch), or hooks set
        return True
    return all(_launch._idle(h) for h in ref[7:9]) and direct[:6] == ref[:6] \
        and direct[6:9] == (None, None, None) and direct[9:] == ref[9:]


@pytest.fixture
def stub(monkeypatch):
    """A stub driver, a recording compile, and a fresh direct-launch switch. Returns the list
    of launcher calls (kernel, args) and a counter of JITFunction.run calls."""
    drv = _StubDriver()
    monkeypatch.setattr(triton_driver, "_active", drv)
    calls, runs = [], []

    def fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = _RecordingKernel(key, calls)
        self.device_caches[device][0][key] = kernel
        return kernel

    real_run = JITFunction.run

    def counting_run(self, *args, **kwargs):
        runs.append(1)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "_do_compile", fake_compile)
    monkeypatch.setattr(JITFunction, "run", counting_run)
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(_launch, "_supported", None)
    return drv, calls, runs


def _args(gen_offset=0, n=1000, stride=64, scale=0.5, flag=True, maybe=None):
    x = torch.empty(64)[gen_offset:]
    y = torch.empty(64, dtype=torch.float16)
    return (x, y, n, stride, scale, flag, maybe)


def test_direct_launch_hands_the_launcher_what_jitfunction_run_does(stub):
    _, calls, runs = stub
    fn = JITFunction(_probe)
    assert _launch.enabled(), "the installed Triton's JITFunction.run is not the one read"
    cases = [
        ((7,), _args(), dict(BLOCK=128, num_warps=4)),
        ((3, 2, 5), _args(n=1, stride=17, maybe=torch.empty(8, dtype=torch.int8)),
         dict(SCALE_MODE=1, BLOCK=64, HAS_Y=True, num_warps=8, num_stages=3)),
        ((1, 4), _args(gen_offset=1, n=2 ** 40, flag=False), dict(BLOCK=32)),
    ]
    for grid, args, meta in cases:
        calls.clear()
        fn[grid](*args, **meta)                     # Triton's path, as a reference
        _launch.launch(fn, grid, *args, **meta)     # first of its class: Triton's path again
        n_runs = len(runs)
        _launch.launch(fn, grid, *args, **meta)     # direct
        assert len(runs) == n_runs, "the third launch went through JITFunction.run"
        assert len(calls) == 3
        (k0, ref), (k1, first), (k2, direct) = calls
        assert k0 is k1 is k2
        assert first == ref and _same_launch(direct, ref), (grid, meta)
        assert direct[6:9] == (None, None, None)        # the default hooks are idle
        # the launcher's arguments: grid padded to 3-D, stream, handles, metadata, then every
        # parameter in signature order with the defaults filled in
        g = tuple(grid) + (1,) * (3 - len(grid))
        assert ref[:4] == (*g, STREAM)
        full = ref[9:]
        assert full[:7] == args
        assert full[7:] == (meta["BLOCK"], meta.get("HAS_Y", False), meta.get("SCALE_MODE", 2))


def test_direct_launch_passes_launch_metadata_when_a_hook_is_set(stub, monkeypatch):
    _, calls, runs = stub
    fn = JITFunction(_probe)
    hook = lambda metadata: None  # noqa: E731
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
    args = _args()
    fn[(5, 3)](*args, BLOCK=8)
    _launch.launch(fn, (5, 3), *args, BLOCK=8)
    _launch.launch(fn, (5, 3), *args, BLOCK=8)
    (_, ref), (_, first), (_, direct) = calls
    assert ref[6] == ("metadata", (5, 3), STREAM, args + (8, False, 2))
    assert ref[7] is hook
    assert first == ref and direct == ref


def test_direct_launch_reuses_a_kernel_only_within_its_argument_class(stub):
    drv, calls, runs = stub
    fn = JITFunction(_probe)
    meta = dict(BLOCK=128)
    _launch.launch(fn, (4,), *_args(), **meta)
    n = len(runs)
    # new tensors and new values of the same class: no JITFunction.run
    _launch.launch(fn, (4,), *_args(n=3000, stride=128, scale=3.0), **meta)
    assert len(runs) == n
    kernel = calls[-1][0]
    # each of these is another class: a misaligned pointer, n == 1, another dtype, another
    # constexpr, an int past int32, a tensor where None was, another device
    variants = [
        (_args(gen_offset=1), meta),
        (_args(n=1), meta),
        ((torch.empty(8, dtype=torch.float16),) + _args()[1:], meta),
        (_args(), dict(BLOCK=64)),
        (_args(n=2 ** 33), meta),
        (_args(maybe=torch.empty(4)), meta),
    ]
    for args, m in variants:
        before = len(runs)
        _launch.launch(fn, (4,), *args, **m)
        assert len(runs) == before + 1, (args, m)
    before = len(runs)
    drv.device = 1
    _launch.launch(fn, (4,), *_args(), **meta)
    assert len(runs) == before + 1
    assert calls[-1][1][3] == STREAM + 1
    assert calls[-1][0] is not kernel      # compiled again for device 1


def test_direct_launch_is_off_when_disabled_and_for_unclassified_arguments(stub, monkeypatch):
    _, calls, runs = stub
    fn = JITFunction(_probe)
    meta = dict(BLOCK=16)
    monkeypatch.setattr(_launch, "ENABLED", False)
    for _ in range(3):
        _launch.launch(fn, (2,), *_args(), **meta)
    assert len(runs) == 3
    monkeypatch.setattr(_launch, "ENABLED", True)
    odd = _args()[:5] + ([1, 2],) + _args()[6:]     # a list: not a type the class knows
    assert _launch.arg_class(odd) is None
    for _ in range(3):
        try:
            _launch.launch(fn, (2,), *odd, **meta)
        except Exception:
            pass                                     # Triton may reject it; it must see it
    assert len(runs) == 6
    # a callable grid is Triton's business too
    for _ in range(2):
        _launch.launch(fn, lambda meta: (2,), *_args(), **meta)
    assert len(runs) == 8


def test_direct_launch_defers_to_triton_when_a_global_changed(stub):
    _, calls, runs = stub
    fn = JITFunction(_probe)
    env = {"G": 1000}
    fn.used_global_vals = {("G", id(env)): (1000, env)}
    _launch.launch(fn, (1,), *_args(), BLOCK=8)
    _launch.launch(fn, (1,), *_args(), BLOCK=8)
    # an equal value in a new object: the full check passes, still the direct path
    env["G"] = int("1000")
    n_runs = len(runs)
    _launch.launch(fn, (1,), *_args(), BLOCK=8)
    assert len(runs) == n_runs
    env["G"] = 2
    with pytest.raises(RuntimeError, match="Global variable G has changed"):
        _launch.launch(fn, (1,), *_args(), BLOCK=8)


def test_direct_launch_disabled_when_jitfunction_run_launches_differently(stub, monkeypatch):
    _, calls, runs = stub
    def other_run(self, *args, grid, warmup, **kwargs):
        kernel = self.compile(args)
        kernel.launch(grid, *args)
    monkeypatch.setattr(_launch, "_JIT_RUN", other_run)
    fn = JITFunction(_probe)
    assert not _launch.enabled()
    for _ in range(3):
        _launch.launch(fn, (2,), *_args(), BLOCK=16)
    assert len(runs) == 3


def _values():
    """Arguments of every kind a launcher passes, several of each class."""
    base = torch.empty(256, dtype=torch.float32)
    tensors = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int32,
                  torch.int64, torch.bool):
        t = torch.empty(256, dtype=dtype)
        for off in (0, 1, 2, 4, 8, 16, 32):
            tensors.append(t[off:])
    tensors.append(base.view(16, 16).t())            # strided view, aligned start
    ints = [0, 1, 2, 3, 15, 16, 17, 32, 48, 1000, 1024, -1, -16, -17, 2 ** 31 - 16,
            2 ** 31 - 1, 2 ** 31, 2 ** 31 + 16, -2 ** 31, -2 ** 31 - 1, -2 ** 31 - 16, 2 ** 40,
            2 ** 40 + 1, 2 ** 63 - 16, 2 ** 63, 2 ** 63 + 16, 2 ** 64 - 16]
    return tensors + ints + [0.0, 1.0, 0.125, -3.5, 1e30, True, False, None]


def test_arg_class_never_merges_arguments_triton_specializes_differently():
    from triton.compiler import make_backend
    fn = JITFunction(_one_arg)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    by_class = {}
    for v in _values():
        cls = _launch.arg_class((v,))
        assert cls is not None, v
        spec = binder(v)[1][0]
        by_class.setdefault(cls, []).append((v, spec))
    for cls, members in by_class.items():
        specs = {repr(s) for _, s in members}
        assert len(specs) == 1, (cls, [(type(v).__name__, s) for v, s in members])
    # and the class is not trivially coarse: it tells apart what Triton tells apart
    assert len(by_class) >= 20


def test_arg_class_of_a_tuple_of_arguments_is_per_position():
    a, b = torch.empty(4), torch.empty(4, dtype=torch.float16)
    assert _launch.arg_class((a, 1, None)) != _launch.arg_class((a, None, 1))
    assert _launch.arg_class((a, b)) != _launch.arg_class((b, a))
    assert _launch.arg_class((True,)) != _launch.arg_class((1,))
    assert _launch.arg_class((1.0,)) != _launch.arg_class((1,))
    for x, y in itertools.product((16, 32, 0), repeat=2):
        assert _launch.arg_class((x,)) == _launch.arg_class((y,))


def test_fast_launch_env_var_is_read_at_import():
    import subprocess
    import sys
    code = "from fastbert.kernels import _launch; print(_launch.ENABLED)"
    for value, expect in (("0", "False"), ("1", "True"), (None, "True")):
        env = {k: v for k, v in __import__("os").environ.items() if k != _launch.ENV_VAR}
        if value is not None:
            env[_launch.ENV_VAR] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == expect


def _step_probe(x_ptr, y_ptr, n, s, t, eps, BLOCK: tl.constexpr, HAS_NEXT: tl.constexpr = False,
                num_extra: tl.constexpr = 0):
    pass


def test_bind_launches_each_step_as_jitfunction_run_does(stub):
    _, calls, runs = stub
    fn = JITFunction(_step_probe)
    x, y = torch.empty(64), torch.empty(64, dtype=torch.bfloat16)
    grid = (3, 2)
    step = _launch.bind(fn, grid, x, y, 1000, BLOCK=64)
    steps = [(s, 255 - s, 1e-5, s < 255) for s in (0, 1, 2, 16, 17, 32, 1, 3, 48, 0)]
    refs = []
    for s, t, eps, has_next in steps:
        calls.clear()
        fn[grid](x, y, 1000, s, t, eps, BLOCK=64, HAS_NEXT=has_next)
        refs.append(calls[0][1])
    calls.clear()
    n_runs = len(runs)
    for s, t, eps, has_next in steps:
        step(s, t, eps, HAS_NEXT=has_next)
    assert len(calls) == len(refs)
    assert all(_same_launch(c[1], r) for c, r in zip(calls, refs))
    # JITFunction.run only for a step whose class of (s, t = 255 - s) is new: (0, 255) is
    # (16, other), (1, 254) (1, other), (2, 253) (other, other); every later step repeats one
    assert len(runs) - n_runs == 3
    # a second bind of the same kernel and classes finds the kernels launch() kept
    calls.clear()
    n_runs = len(runs)
    again = _launch.bind(fn, grid, torch.empty(32), torch.empty(32, dtype=torch.bfloat16),
                         3000, BLOCK=64)
    again(2, 5, 0.5, HAS_NEXT=True)
    assert len(runs) == n_runs
    assert calls[0][1][9:] == (calls[0][1][9], calls[0][1][10], 3000, 2, 5, 0.5, 64, True, 0)


def test_bind_defers_to_triton_on_another_device_or_when_disabled(stub, monkeypatch):
    drv, calls, runs = stub
    fn = JITFunction(_step_probe)
    step = _launch.bind(fn, (1,), torch.empty(8), torch.empty(8), 7, BLOCK=8)
    step(2, 3, 0.0)
    step(2, 3, 0.0)
    n_runs = len(runs)
    drv.device = 1
    step(2, 3, 0.0)
    assert len(runs) == n_runs + 1 and calls[-1][1][3] == STREAM + 1
    step(2, 3, 0.0)
    assert len(runs) == n_runs + 1
    monkeypatch.setattr(_launch, "ENABLED", False)
    step(2, 3, 0.0)
    step(2, 3, 0.0)
    assert len(runs) == n_runs + 3


def test_debug_knob_and_big_ints_and_hooks_are_respected(stub, monkeypatch):
    _, calls, runs = stub
    fn = JITFunction(_probe)
    _launch.launch(fn, (1,), *_args(n=2 ** 40), BLOCK=8)
    n_runs = len(runs)
    # another int64 of the same class (multiple of 16): the kept kernel
    _launch.launch(fn, (1,), *_args(n=2 ** 40 + 48), BLOCK=8)
    assert len(runs) == n_runs
    # Triton's debug knob is part of its options: a new key
    monkeypatch.setattr(knobs.runtime, "debug", True)
    _launch.launch(fn, (1,), *_args(n=2 ** 40), BLOCK=8)
    assert len(runs) == n_runs + 1
    monkeypatch.setattr(knobs.runtime, "debug", False)
    # a pre-run hook added after a bind's steps were seen is still run (Triton's path)
    step = _launch.bind(fn, (1,), *_args()[:2], BLOCK=8)
    step(1000, 64, 0.5, True, None)
    step(1000, 64, 0.5, True, None)
    seen = []
    fn.add_pre_run_hook(lambda *a, **kw: seen.append(1))
    step(1000, 64, 0.5, True, None)
    _launch.launch(fn, (1,), *_args(), BLOCK=8)
    assert seen == [1, 1]
