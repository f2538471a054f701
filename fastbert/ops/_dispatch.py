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
import sys
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad

BACKENDS = ("triton", "cuda", "torch")
ENV_VAR = "FASTBERT_BACKEND"


# The open ``use_backend`` blocks, innermost last: process-wide, as torch's own backend
# switches (torch.backends.cuda.sdpa_kernel, cudnn.flags), so that autograd's worker threads
# (a CUDA backward runs there: activation-checkpoint recomputation inside the block) and
# nn.DataParallel's replica threads see the block their caller opened. Entries are distinct
# objects removed by identity (list.append / list.remove are single, GIL-atomic calls: no lock,
# which torch.compile could not trace), so blocks of different threads close in any order.
_STACK: list = []
# Blocks opened inside a function torch.compile traces go here instead: after the compiled
# graph runs, Dynamo writes a global list it mutated back whole (``_STACK[:] = [...]`` as at
# guard time), which on _STACK would drop or resurrect other threads' entries meanwhile. Only
# traced code touches this one, and a block opened there also closes there.
_TRACE_STACK: list = []
_dynamo_compiling = torch.compiler.is_dynamo_compiling
_warned: set = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


class _Entry:
    """One open ``use_backend`` block on the stack (compared by identity)."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the fastbert ops called inside the block on backend ``name`` ("triton", "cuda",
    "torch").

    An op's explicit ``backend=`` argument and ``FASTBERT_BACKEND`` take precedence. The
    setting is process-wide while the block is open, like ``torch.backends.cuda.sdpa_kernel``:
    other threads' ops (autograd's backward threads, DataParallel replicas) use it too, and
    the most recently opened block of any thread wins; pass ``backend=`` for per-call control.

    It applies to calls made while the block is open. Activation checkpointing recomputes the
    forward during ``backward()``: if that runs after the block closed, the recomputation
    resolves the backend again (auto), and with dropout that draws other masks than the
    forward did. For checkpointed code, pass ``backend=`` (the ``fastbert.nn`` modules take
    one), set ``FASTBERT_BACKEND``, or checkpoint with ``use_reentrant=False,
    context_fn=fastbert.checkpoint_context_fn``, which reopens the forward's block around the
    recomputation.
    """
    _check_name(name, "use_backend")
    entry = _Entry(name)
    stack = _TRACE_STACK if _dynamo_compiling() else _STACK
    stack.append(entry)
    try:
        yield
    finally:
        # by identity (_Entry defines no __eq__); tolerant, so that a block's exit never
        # raises over the exception that may be unwinding it
        try:
            stack.remove(entry)
        except ValueError:
            pass


class _Reopen:
    """A reusable context manager: each ``with`` opens a fresh ``use_backend(name)`` block
    (a recomputation can run more than once: backward with retain_graph, autograd.grad
    twice)."""

    def __init__(self, name: str):
        self.name = name
        self._open: list = []

    def __enter__(self):
        block = use_backend(self.name)
        block.__enter__()
        self._open.append(block)
        return self

    def __exit__(self, *exc):
        return self._open.pop().__exit__(*exc)


def current_use_backend() -> Optional[str]:
    """The backend of the innermost open ``use_backend`` block, or None."""
    # one read of each list: another thread may close a block meanwhile
    top = (_TRACE_STACK[-1:] or _STACK[-1:]) if _dynamo_compiling() else _STACK[-1:]
    return top[0].name if top else None


def checkpoint_context_fn():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``:
    the recomputation in backward runs under the ``use_backend`` block that was open during
    the forward (if any), so it takes the same kernels and draws the same dropout masks."""
    name = current_use_backend()
    return contextlib.nullcontext(), (_Reopen(name) if name else contextlib.nullcontext())


def _env_reader(name: str) -> Callable[[], Optional[str]]:
    """A function returning environment variable ``name`` (None when unset), as
    ``os.environ.get(name)`` does, changes through os.environ (monkeypatch.setenv) included.

    resolve reads the variables at every op call, and ``os.environ.get`` costs ~1 us (it
    encodes the key and decodes the value in Python each time): on POSIX this looks the
    encoded key up in the dict os.environ keeps (``_data``, which its setters update), ~0.05 us.
    """
    environ = os.environ
    data = getattr(environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return lambda: os.environ.get(name)
    key = os.fsencode(name)
    encoding = sys.getfilesystemencoding()  # and "surrogateescape": as os.environ decodes

    def read() -> Optional[str]:
        if os.environ is not environ:  # replaced wholesale (a test's mock): ask it
            return os.environ.get(name)
        value = data.get(key)
        return None if value is None else value.decode(encoding, "surrogateescape")
    return read


_backend_env = _env_reader(ENV_VAR)
_interpret_env = _env_reader("TRITON_INTERPRET")


# what Triton's getenv_bool reads as on (triton/_C: 1, true, on, yes, y in any case; any other
# value, "false", "off", "2" included, is off)
_TRUE_VALUES = frozenset(("1", "true", "on", "yes", "y"))


def _interpret_env_on() -> bool:
    value = _interpret_env()
    return value is not None and value.lower() in _TRUE_VALUES


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter: ``TRITON_INTERPRET=1`` when triton
    was imported (Triton's own library functions were decorated then, interpreted or
    compiled, and a kernel can only run in that mode); the variable itself where that is not
    known."""
    if _TRITON_INTERPRETS is None:
        return _interpret_env_on()
    return _TRITON_INTERPRETS


def interpreter_mode_error() -> Optional[str]:
    """Why the kernels cannot run after ``TRITON_INTERPRET`` changed since triton's import
    (fastbert's kernels, decorated at first use, would follow the new value and Triton's
    library functions the old one: an obscure InterpreterError or wrong launch), else None."""
    if _TRITON_INTERPRETS is None or _interpret_env_on() == _TRITON_INTERPRETS:
        return None
    now, then = ("turned on", "off") if _interpret_env_on() else ("turned off", "on")
    return (f"TRITON_INTERPRET was {now} after triton was imported (the interpreter was {then} "
            f"then, and Triton fixes it at import): set it before importing fastbert or triton")


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


def _triton_interprets() -> Optional[bool]:
    """Whether triton's library functions (triton.language.standard) were decorated for the
    interpreter (at triton's import), or None if that cannot be told."""
    try:
        import triton.language.standard as std
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except Exception:  # not importable, or laid out otherwise
        return None
    for value in vars(std).values():
        if isinstance(value, InterpretedFunction):
            return True
        if isinstance(value, JITFunction):
            return False
    return None


_TRITON_INTERPRETS = _triton_interprets() if _TRITON_ERROR is None else None


def triton_import_error() -> Optional[str]:
    """None when triton and fastbert.kernels import, else why not."""
    return None if _TRITON_ERROR is None else f"triton is not importable ({_TRITON_ERROR})"


# The oldest Triton whose interpreter runs every kernel: 3.6's gives program_id a shape (1,)
# array, so a loop over rows with a bound computed from it (the LayerNorm, embedding,
# bias_gelu and cross-entropy kernels) fails there ("only 0-dimensional arrays can be
# converted to Python scalars"); 3.7.1 and 3.8 run them. Compiled kernels (a GPU) are fine on 3.6.
MIN_INTERPRETER_TRITON = (3, 7)


def _triton_version() -> Optional[tuple]:
    try:
        import triton
        return tuple(int(p) for p in triton.__version__.split(".")[:2])
    except Exception:  # not importable, or a version string of another form
        return None


_TRITON_VERSION = _triton_version() if _TRITON_ERROR is None else None


def interpreter_version_error() -> Optional[str]:
    """None when the installed Triton's interpreter runs fastbert's kernels, else why not."""
    if _TRITON_VERSION is not None and _TRITON_VERSION < MIN_INTERPRETER_TRITON:
        have = ".".join(map(str, _TRITON_VERSION))
        need = ".".join(map(str, MIN_INTERPRETER_TRITON))
        return (f"the Triton {have} interpreter cannot run fastbert's kernels on CPU (Triton >= "
                f"{need} can; compiled kernels on a GPU run on {have})")
    return None


def _csrc_has_no_sources() -> bool:
    """A checkout whose csrc/ holds no .cu / .cpp file (an installed wheel has no csrc/)."""
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "csrc")
    return os.path.isdir(csrc) and not any(f.endswith((".cu", ".cpp")) for f in os.listdir(csrc))


# read once, with the import probes: the resolver may ask at every op call
_CSRC_EMPTY = _CUDA_EXT_ERROR is not None and _csrc_has_no_sources()


def cuda_extension_error() -> Optional[str]:
    """None when the CUDA C++ extension ``fastbert._C`` imports, else why not."""
    if _CUDA_EXT_ERROR is None:
        return None
    if _CSRC_EMPTY:
        return "no op has a CUDA C++ kernel yet (csrc/ holds no sources)"
    return ("the CUDA C++ extension fastbert._C is not built "
            f"({_CUDA_EXT_ERROR}); build it with "
            "FASTBERT_BUILD_CUDA=1 pip install --no-build-isolation -e .")


@functools.lru_cache(maxsize=None)
def kernel_module(name: str):
    """``fastbert.kernels.<name>``, imported at first use (fastbert.ops imports without
    Triton). The ops call it per call: an import statement in a function body costs ~1 us
    each time, this cached lookup a tenth of that."""
    return importlib.import_module(f"fastbert.kernels.{name}")


# Tensor.is_cuda / is_cpu are C getters; Tensor.device builds a device object and device.type
# a new string at each call (~0.4 us here), and resolve runs at every op call.
def _all_on(tensors: Iterable[Optional[torch.Tensor]], cuda: bool) -> bool:
    """Some tensor among ``tensors`` and every one on CUDA (``cuda``) or on the CPU."""
    seen = False
    for t in tensors:
        if t is not None and isinstance(t, torch.Tensor):
            if not (t.is_cuda if cuda else t.is_cpu):
                return False
            seen = True
    return seen


def _under_grad_transform() -> bool:
    """Whether a torch.func grad or jvp transform is active at any level (grad(vmap(f))
    included; vmap alone runs the kernels through torch's per-example fallback)."""
    kinds = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    return any(i.key() in kinds for i in torch._C._functorch.get_interpreter_stack() or ())


def _why_not(backend: str, on_cuda: bool, tensors: Sequence[Optional[torch.Tensor]], op: str,
             cuda_ops: Sequence[str]) -> Optional[str]:
    """why_not, given ``on_cuda = _all_on(tensors, True)``."""
    if backend == "torch":
        return None
    if torch._C._are_functorch_transforms_active() and _under_grad_transform():
        return ("torch.func grad / vjp / jacrev / jvp transforms differentiate only the PyTorch "
                "reference (the kernels' autograd has no functorch rule): use backend='torch'")
    if _forward_ad._current_level >= 0:
        # inside torch.autograd.forward_ad.dual_level(): the kernels have no forward-mode
        # derivative, and their outputs would carry no tangent (silently)
        return ("forward-mode AD (torch.autograd.forward_ad) differentiates only the PyTorch "
                "reference (the kernels have no jvp rule): use backend='torch'")
    if backend == "triton":
        if _TRITON_ERROR is not None:
            return triton_import_error()
        mode_error = interpreter_mode_error()
        if mode_error is not None:
            return mode_error
        if on_cuda:
            return None
        if _all_on(tensors, False):
            if interpreter_enabled():
                return interpreter_version_error()
            return ("the tensors are on the CPU and the Triton interpreter is off "
                    "(set TRITON_INTERPRET=1 before importing triton to run kernels on CPU)")
        devices = sorted({str(t.device) for t in tensors if isinstance(t, torch.Tensor)})
        return f"the tensors are on {devices}; triton needs CUDA tensors"
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


def why_not(backend: str, tensors: Sequence[Optional[torch.Tensor]], op: str,
            cuda_ops: Sequence[str] = ()) -> Optional[str]:
    """Why ``backend`` cannot run op ``op`` on ``tensors``; None when it can."""
    return _why_not(backend, _all_on(tensors, True), tensors, op, cuda_ops)


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The explicitly requested backend (argument, env var, context), or None for auto."""
    if backend is not None:
        return backend if backend in BACKENDS else _check_name(backend, "backend=")
    env = _backend_env()
    if env:
        env = env.strip()
        if env and env != "auto":
            return _check_name(env, ENV_VAR)
    return current_use_backend()


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
    # Runs at every op call. Nothing is cached: what is pure here (where the tensors are,
    # which backends import) costs less to recompute than a cache key would to build.
    asked = requested_backend(backend)
    if asked == "torch":
        return "torch"
    on_cuda = _all_on(tensors, True)
    if asked is not None:
        r = _why_not(asked, on_cuda, tensors, op, cuda_ops)
        if r is None and extra_check is not None:
            r = extra_check(asked)
        if r is not None:
            raise BackendUnavailable(f"fastbert.ops.{op}: backend {asked!r} cannot run this call: {r}")
        return asked
    if not on_cuda:
        return "torch"
    reasons = []
    for b in preference:
        r = _why_not(b, on_cuda, tensors, op, cuda_ops)
        if r is None and b != "torch" and extra_check is not None:
            r = extra_check(b)
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
