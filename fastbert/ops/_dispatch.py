"""Backend resolution for every fastbert op, in one place.

Backends:
    "triton" -- kernels in ``fastbert.kernels`` (CUDA tensors; CPU tensors only under the
                Triton interpreter, ``TRITON_INTERPRET=1``, which is how CI checks kernels)
    "cuda"   -- CUDA C++ kernels in the optional extension ``fastbert._C`` (built from csrc/)
    "torch"  -- the PyTorch reference of the op (always available; the CPU path and the
                test oracle)

Resolution order (first that applies wins):
    1. the op's ``backend=`` argument
    2. the environment variable ``FASTBERT_BACKEND``
    3. the innermost ``with fastbert.use_backend("..."):`` block
    4. auto: CUDA tensors -> the fastest backend that can run the call; CPU tensors -> torch.

An explicitly requested backend (1-3) that cannot run the call raises ``BackendUnavailable``
with the reason. Auto falls back to "torch" with a one-time warning that names the reason.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch

BACKENDS = ("triton", "cuda", "torch")
ENV_VAR = "FASTBERT_BACKEND"

_local = threading.local()
_warned: set = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the fastbert ops inside the block on backend ``name`` ("triton", "cuda", "torch").

    An op's explicit ``backend=`` argument and ``FASTBERT_BACKEND`` take precedence.
    """
    _check_name(name, "use_backend")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Import probes, answered once per process. torch.compile cannot trace an import, so the
# answers are computed when this module loads (importing triton there is cheap next to torch).
def _probe(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"{type(e).__name__}: {e}"
    return None


_TRITON_ERROR = _probe("triton") or _probe("fastbert.kernels")
_CUDA_EXT_ERROR = _probe("fastbert._C")


def triton_import_error() -> Optional[str]:
    """None when triton and fastbert.kernels import, else why not."""
    return None if _TRITON_ERROR is None else f"triton is not importable ({_TRITON_ERROR})"


def cuda_extension_error() -> Optional[str]:
    """None when the CUDA C++ extension ``fastbert._C`` imports, else why not."""
    if _CUDA_EXT_ERROR is None:
        return None
    return ("the CUDA C++ extension fastbert._C is not built "
            f"({_CUDA_EXT_ERROR}); build it with "
            "FASTBERT_BUILD_CUDA=1 pip install --no-build-isolation -e .")


@functools.lru_cache(maxsize=None)
def kernel_module(name: str):
    """``fastbert.kernels.<name>``, imported at first use (fastbert.ops imports without
    Triton). The ops call it per call: an import statement in a function body costs ~1 us
    each time, this cached lookup a tenth of that."""
    return importlib.import_module(f"fastbert.kernels.{name}")


def _devices(tensors: Iterable[Optional[torch.Tensor]]) -> list:
    return [t.device for t in tensors if isinstance(t, torch.Tensor)]


def why_not(backend: str, tensors: Sequence[Optional[torch.Tensor]], op: str,
            cuda_ops: Sequence[str] = (), devices: Optional[list] = None) -> Optional[str]:
    """Why ``backend`` cannot run op ``op`` on ``tensors``; None when it can. ``devices``:
    the tensors' devices, if the caller has them already (host time: ops call this per call)."""
    if backend == "torch":
        return None
    if devices is None:
        devices = _devices(tensors)
    on_cuda = bool(devices) and all(d.type == "cuda" for d in devices)
    on_cpu = bool(devices) and all(d.type == "cpu" for d in devices)
    if backend == "triton":
        err = triton_import_error()
        if err:
            return err
        if on_cuda:
            return None
        if on_cpu:
            if interpreter_enabled():
                return None
            return ("the tensors are on the CPU and the Triton interpreter is off "
                    "(set TRITON_INTERPRET=1 before importing triton to run kernels on CPU)")
        return f"the tensors are on {sorted({str(d) for d in devices})}; triton needs CUDA tensors"
    if backend == "cuda":
        if op not in cuda_ops:
            return f"{op} has no CUDA C++ kernel yet (csrc/); use 'triton' or 'torch'"
        err = cuda_extension_error()
        if err:
            return err
        if not on_cuda:
            return "the CUDA C++ kernels need CUDA tensors"
        return None
    raise ValueError(f"unknown backend {backend!r}")


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The explicitly requested backend (argument, env var, context), or None for auto."""
    if backend is not None:
        return _check_name(backend, "backend=")
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "auto":
        return _check_name(env, ENV_VAR)
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return None


def resolve(op: str, tensors: Sequence[Optional[torch.Tensor]], backend: Optional[str] = None,
            *, preference: Sequence[str] = ("cuda", "triton"), cuda_ops: Sequence[str] = (),
            extra_check: Optional[Callable[[str], Optional[str]]] = None) -> str:
    """Pick the backend that runs ``op`` on ``tensors``.

    Args:
        op: the op's name, used in messages.
        tensors: the call's tensor arguments (None entries are ignored).
        backend: the op's ``backend=`` argument.
        preference: fastest first, the kernel backends auto tries on CUDA tensors.
        cuda_ops: op names that have a CUDA C++ kernel.
        extra_check: op-specific limits: returns why a kernel backend cannot run this call
            (an unsupported head dim, say), or None.
    """
    devices = _devices(tensors)

    def reason(b: str) -> Optional[str]:
        r = why_not(b, tensors, op, cuda_ops, devices)
        if r is None and b != "torch" and extra_check is not None:
            r = extra_check(b)
        return r

    asked = requested_backend(backend)
    if asked is not None:
        r = reason(asked)
        if r is not None:
            raise BackendUnavailable(f"fastbert.ops.{op}: backend {asked!r} cannot run this call: {r}")
        return asked
    if not devices or any(d.type != "cuda" for d in devices):
        return "torch"
    reasons = []
    for b in preference:
        r = reason(b)
        if r is None:
            return b
        reasons.append(f"{b}: {r}")
    key = (op, tuple(reasons))
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"fastbert.ops.{op}: falling back to the PyTorch reference because "
            + "; ".join(reasons),
            RuntimeWarning,
            stacklevel=3,
        )
    return "torch"


def backend_report() -> dict:
    """For ``python -m fastbert.env``: each backend -> None if usable on this machine, else why."""
    out = {}
    has_cuda = torch.cuda.is_available()
    probe = [torch.empty(0, device="cuda")] if has_cuda else [torch.empty(0)]
    for b in BACKENDS:
        if b == "cuda":
            err = cuda_extension_error() or (None if has_cuda else "no CUDA device")
        else:
            err = why_not(b, probe, "probe")
        out[b] = err
    return out
