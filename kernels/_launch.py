"""Kernel launches without Triton's per-call argument binding.

``kernel[grid](*args, **meta)`` runs Triton's ``JITFunction.run`` on every call: it binds
and specializes every argument (``native_specialize_impl`` per argument, through the
backend), builds a cache key from the specialization list and ``str(options)``, and only then
calls the compiled kernel's launcher. For our 30-argument attention kernel that is ~14 us of
host time per launch on the 2-core dev box (``binder`` 12 us + key 2 us, measured with
Triton 3.8), and the H200 machine's host is ~3.5x slower. BERT-shape calls are host-bound
there (``benchmarks/results/overhead_nvidia-h200.txt``), and an LSTM launches one kernel per
time step, so this cost is paid a few times per op, or hundreds of times.

``launch(kernel, grid, *args, **meta)`` is a drop-in for ``kernel[grid](*args, **meta)``:

- The first call with a given *argument class* takes Triton's own path, which compiles if
  needed, launches, and returns the ``CompiledKernel``; we keep it.
- Later calls with the same class call that kernel's launcher directly, with exactly the
  arguments ``JITFunction.run`` passes it (every parameter in signature order, constexprs and
  defaults included). ``tests/test_launch.py`` checks the two paths hand the launcher the
  same arguments, with the installed Triton's own ``JITFunction.run`` and a stub driver.

The argument class is at least as fine as Triton's specialization, so a kept kernel is never
used for arguments Triton would have compiled differently:

- a tensor: its dtype, and whether its address is a multiple of 16;
- an int: 1, a multiple of 16, or neither, when it fits int32; else i64 or u64 (by range, as
  Triton picks them) and whether it is a multiple of 16;
- a float, a bool, None: the type (floats and bools are not specialized on their value);
- the keyword arguments (constexprs and options such as ``num_warps``): their names and
  values; and the current device.

Anything else (an unknown argument type, a callable grid, pre-run hooks, an autotuned kernel,
the interpreter, a Triton whose ``JITFunction.run`` does not launch the way read here) takes
Triton's path unchanged. ``FASTBERT_FAST_LAUNCH=0`` in the environment at import (or
``ENABLED = False`` here) turns the direct path off.

Triton's debug and instrumentation knobs are part of the key (JITFunction.run folds them into
its options); a stages-inspection hook (Triton 3.8) sends every launch down Triton's path.
Not covered: a tool that replaces ``JITFunction.run`` itself after import.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Dict, Optional, Tuple

import torch
from triton.runtime.driver import driver as _driver
from triton.runtime.jit import JITFunction

try:  # Triton >= 3.3 keeps the launch hooks on knobs.runtime
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: the check below disables the path
    _knobs = None

_HOOK_CHAIN = getattr(_knobs, "HookChain", None)

ENV_VAR = "FASTBERT_FAST_LAUNCH"
# a kernel's kept launches; past this many argument classes the cache starts over (an LSTM
# step index is one argument class per value class, not per value, so this is never reached
# by our launchers in practice)
MAX_CACHED = 4096
# the launch line of JITFunction.run this module reproduces (Triton 3.6 - 3.8)
_LAUNCH_LINE = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, "
                "kernel.packed_metadata, launch_metadata,")
# the method whose source is checked (taken at import: what Triton calls on the slow path)
_JIT_RUN = JITFunction.run

# ``$FASTBERT_FAST_LAUNCH`` is read once, at import; tests and users may set ENABLED directly
ENABLED = os.environ.get(ENV_VAR, "1") != "0"
_supported: Optional[bool] = None


def _triton_launches_as_read() -> bool:
    """True when the installed Triton's JITFunction.run launches the way this module does."""
    global _supported
    if _supported is None:
        try:
            src = " ".join(inspect.getsource(_JIT_RUN).split())
            _supported = (_knobs is not None and " ".join(_LAUNCH_LINE.split()) in src
                          and "launch_metadata = kernel.launch_metadata(grid, stream, "
                              "*bound_args.values())" in src)
        except (OSError, TypeError):
            _supported = False
    return _supported


def enabled() -> bool:
    """Whether the direct launch path is on: ``ENABLED`` (``$FASTBERT_FAST_LAUNCH`` != "0" at
    import) and the installed Triton launches as this module expects."""
    return ENABLED and _triton_launches_as_read()


def arg_class(args: Tuple[Any, ...], _int=int, _float=float, _bool=bool, _tensor=torch.Tensor,
              _lo=-2 ** 31, _hi=2 ** 31 - 1, _lo64=-2 ** 63, _hi64=2 ** 64 - 1,
              _u64=2 ** 63) -> Optional[tuple]:
    """The argument class of a launch's positional arguments (see the module docstring), or
    None when an argument is of a type this module does not classify. (The defaults are
    locals for speed: this runs on every launch, ~0.14 us an argument on the dev box.)"""
    key = []
    append = key.append
    for a in args:
        t = type(a)
        if t is _int:
            if _lo <= a <= _hi:
                append(1 if a == 1 else (16 if not a & 15 else 0))
            elif _lo64 <= a <= _hi64:   # Triton: i64 or u64 by range, and % 16
                append(("i64" if a < _u64 else "u64", not a & 15))
            else:
                append(("int", a))      # Triton's business (it rejects it)
        elif t is _tensor or isinstance(a, _tensor):
            append((a.dtype, not a.data_ptr() & 15))
        elif t is _float or t is _bool or a is None:
            append(t)
        else:
            return None
    return tuple(key)


def _tail(fn: JITFunction, n_args: int, meta: Dict[str, Any]) -> Optional[tuple]:
    """The values JITFunction.run binds to the parameters after the positional ones: the
    keyword value, else the parameter's default (None: a parameter has neither)."""
    tail = []
    for p in fn.params[n_args:]:
        if p.name in meta:
            tail.append(meta[p.name])
        elif p.default is not inspect.Parameter.empty:
            tail.append(p.default)
        else:
            return None
    return tuple(tail)


def _kept(fn: Any, grid: Any, args: tuple, meta: Dict[str, Any]):
    """(the key, the kept (kernel, tail) or None, the device) of a launch the direct path may
    take, or None when it must take Triton's path."""
    if type(fn) is not JITFunction or type(grid) is not tuple or not ENABLED \
            or fn.pre_run_hooks or not (_supported or _triton_launches_as_read()) \
            or getattr(_knobs.runtime, "add_stages_inspection_hook", None) is not None:
        return None
    akey = arg_class(args)
    if akey is None:
        return None
    device = _driver.active.get_current_device()
    # the knobs JITFunction.run folds into its options
    key = (device, akey, tuple(meta.items()), _knobs.runtime.debug,
           _knobs.compilation.instrumentation_mode)
    try:
        cache = fn._fastbert_launches
    except AttributeError:
        cache = fn._fastbert_launches = {}
    kept = cache.get(key)
    if kept is not None and fn.used_global_vals and not _globals_unchanged(fn):
        kept = None
    return key, kept, device


def _keep(fn: JITFunction, key: tuple, kernel: Any, n_args: int, meta: Dict[str, Any]):
    """Keep what Triton's path returned for ``key``; returns the (kernel, tail) kept, or None
    when it is not a kernel this module can launch."""
    tail = _tail(fn, n_args, meta)
    if tail is None or not hasattr(kernel, "packed_metadata") or not hasattr(kernel, "run"):
        return None
    cache = fn._fastbert_launches
    if len(cache) >= MAX_CACHED:
        cache.clear()
    cache[key] = kept = (kernel, tail)
    return kept


def _run(kernel: Any, grid: tuple, full: tuple, device: int) -> None:
    """Launch ``kernel`` as JITFunction.run does: grid padded to 3-D, the current stream, the
    handles, the launch metadata and hooks, then ``full`` (every parameter)."""
    stream = _driver.active.get_current_stream(device)
    n = len(grid)
    runtime = _knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if _idle(enter) and _idle(leave):
        # The launcher calls a hook with the metadata only when the hook is not None (the C
        # launch code of Triton 3.6 and 3.8), and an empty HookChain (their default) does
        # nothing: so None for both hooks and the metadata launches the same, without
        # building the metadata and two empty calls (~1.5 us on the dev box)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream,
                   kernel.function, kernel.packed_metadata, None, None, None, *full)
        return
    # as CompiledKernel.launch_metadata: None only when the enter hook is None
    kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream,
               kernel.function, kernel.packed_metadata,
               None if enter is None else kernel.launch_metadata(grid, stream, *full),
               enter, leave, *full)


def _idle(hook: Any) -> bool:
    """A launch hook that does nothing: None, or an empty ``knobs.HookChain``."""
    return hook is None or (type(hook) is _HOOK_CHAIN and not hook.calls)


def launch(fn: Any, grid: tuple, *args: Any, **meta: Any) -> None:
    """``fn[grid](*args, **meta)``, without Triton's per-call binding once this argument class
    has been launched before (see the module docstring)."""
    found = _kept(fn, grid, args, meta)
    if found is None:
        fn[grid](*args, **meta)
        return
    key, kept, device = found
    if kept is None:
        # Triton's own path: compiles if needed, checks the globals, launches
        _keep(fn, key, fn[grid](*args, **meta), len(args), meta)
        return
    kernel, tail = kept
    _run(kernel, grid, args + tail, device)


_MISSING = object()


def _globals_unchanged(fn: JITFunction) -> bool:
    """JITFunction.run's check that the Python globals a kernel read at compile time still
    hold the same values (False sends the launch down Triton's path, which raises).

    Triton compares with ``!=``, which for a ``tl.constexpr`` global is a Triton operator
    (~1.6 us each on the dev box). After a full check passes, the objects seen are kept and
    later checks compare identities (~0.1 us each); a different object gets the full check."""
    used = fn.used_global_vals
    seen = fn.__dict__.get("_fastbert_globals")
    if seen is not None and seen[0] is used:
        for globals_dict, name, obj in seen[1]:
            if globals_dict.get(name, _MISSING) is not obj:
                break
        else:
            return True
    for (name, _), (val, globals_dict) in used.items():
        if globals_dict.get(name, _MISSING) != val:
            return False
    fn._fastbert_globals = (used, tuple((globals_dict, name, globals_dict.get(name, _MISSING))
                                        for (name, _), (_, globals_dict) in used.items()))
    return True


class bind:
    """``kernel[grid]`` with its leading arguments and some keyword arguments fixed, for loops
    that launch one kernel per time step: ``step = bind(kernel, grid, *fixed, **meta)``, then
    ``step(s, t, HAS_NEXT=...)`` launches ``kernel[grid](*fixed, s, t, **meta, HAS_NEXT=...)``.

    The fixed arguments are classified once; a step classifies only its own arguments and
    finds its kernel in a small table of this object's, so a step costs little more than the
    launcher itself. (The globals and knobs checks of ``launch`` run when a table entry is
    made, not at every step; pre-run hooks are checked at every step.)"""
    __slots__ = ("fn", "grid", "args", "meta", "_direct", "_device", "_steps")

    def __init__(self, fn: Any, grid: tuple, *args: Any, **meta: Any):
        self.fn, self.grid, self.args, self.meta = fn, grid, args, meta
        # the fixed arguments' class is fixed too: a step's table is keyed by the rest
        self._direct = type(fn) is JITFunction and type(grid) is tuple \
            and arg_class(args) is not None
        self._device = None
        self._steps: Dict[tuple, tuple] = {}

    def __call__(self, *more: Any, **more_meta: Any) -> None:
        step_key = None
        if self._direct and ENABLED and not self.fn.pre_run_hooks:
            more_class = arg_class(more)
            if more_class is not None:
                step_key = (more_class, tuple(more_meta.items()))
                kept = self._steps.get(step_key)
                if kept is not None and self._device == _driver.active.get_current_device():
                    _run(kept[0], self.grid, self.args + more + kept[1], self._device)
                    return
        meta = {**self.meta, **more_meta} if more_meta else self.meta
        args = self.args + more
        found = _kept(self.fn, self.grid, args, meta)
        if found is None:
            self.fn[self.grid](*args, **meta)
            return
        key, kept, device = found
        if kept is None:
            kept = _keep(self.fn, key, self.fn[self.grid](*args, **meta), len(args), meta)
        else:
            _run(kept[0], self.grid, args + kept[1], device)
        if kept is not None and step_key is not None:
            if self._device != device:
                self._steps.clear()
                self._device = device
            self._steps[step_key] = kept
