"""Argument checks shared by the ops: each error names the argument and what was expected.

They run at every op call, on the host's critical path for small shapes, so each first tries
a fast accept (a few C getters and comparisons that pass every valid argument) and only
falls back to the full check, which builds the error, when that fails.
"""
from __future__ import annotations

import math
import numbers
from typing import Collection, Optional, Sequence

import torch
import torch._guards
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The PyTorch reference also runs in float64 (gradcheck, test oracles); the kernels do not.
REF_DTYPES = FLOAT_DTYPES + (torch.float64,)


_try_tracing_context = torch._guards.TracingContext.try_get


if hasattr(torch.compiler, "_compile_session_context"):
    # torch.compile sessions hold torch.compiler._is_compiling_flag (torch 2.14; in 2.11 only
    # export sets it), so the flag off rules a trace out
    def tracing() -> bool:
        """Whether this call is being traced, in this thread: by torch.compile (Dynamo, and
        AOTAutograd's trace of the backward) or torch.export. Value checks that read the host
        skip it or run on the device then. (torch.compiler.is_compiling() is True in every
        thread while any thread compiles: eager calls of other threads would skip their
        checks.) The process-wide flag first: when it is off (eager, the usual case) no
        thread-local lookup is made."""
        return torch.compiler.is_dynamo_compiling() or (
            torch.compiler._is_compiling_flag and _try_tracing_context() is not None)
else:
    def tracing() -> bool:
        """Whether this call is being traced, in this thread (see above)."""
        return torch.compiler.is_dynamo_compiling() or _try_tracing_context() is not None


def real_values(t: torch.Tensor) -> bool:
    """Whether ``t`` is neither fake nor meta, traced or not (FLOP formulas, which inductor
    also runs on fake tensors while it compiles, read values only then)."""
    return not (t.is_meta or is_fake(t))


def has_values(t: torch.Tensor) -> bool:
    """Whether ``t`` holds values a check can read: not a fake tensor (FakeTensorMode shape
    inference, outside torch.compile) nor a meta tensor. Value checks skip the others, as
    torch's own ops do. (While torch.compile traces, every tensor is fake: True there, the
    callers check on the device or not at all.)"""
    return tracing() or not (t.is_meta or is_fake(t))


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s CUDA stream is being captured into a CUDA graph (torch.cuda.graph,
    torch.compile's mode="reduce-overhead"), where a host read of a device value is illegal
    (and a host copy would be replayed as captured). Every op asks here (tests patch it)."""
    # never asked while Dynamo traces (its bool result would break the graph; the checks that
    # ask are the eager ones)
    return (t.is_cuda and not torch.compiler.is_dynamo_compiling()
            and torch.cuda.is_current_stream_capturing())


def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for ``t``'s device type (any type autocast
    knows: cuda, cpu, xpu, mps, ...), else None (also for meta tensors, which autocast does
    not know)."""
    dev = t.device.type
    if torch.compiler.is_dynamo_compiling():
        # torch 2.11's Dynamo cannot trace is_autocast_available (a graph break, fatal under
        # fullgraph=True); the tensors it traces are fakes of a real device, or meta
        available = dev != "meta"
    else:
        available = torch.amp.is_autocast_available(dev)
    if available and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def cuda_autocast_layer_norm_fp32(dtype: torch.dtype, on_cuda: bool) -> bool:
    """Whether torch's layer_norm computes and returns float32 for inputs of ``dtype``: under
    CUDA autocast (layer_norm is on its fp32 list; CPU autocast keeps the input dtype), which
    leaves float64 alone."""
    return dtype is not torch.float64 and on_cuda and torch.is_autocast_enabled("cuda")


def kernel_dtype_reason(**tensors) -> Optional[str]:
    """Why the kernels cannot take these tensors' dtypes (float64), or None."""
    for t in tensors.values():
        if t is not None and t.dtype not in FLOAT_DTYPES:
            break
    else:
        return None
    for name, t in tensors.items():
        if t is not None and t.is_floating_point() and t.dtype not in FLOAT_DTYPES:
            return f"{name} is {str(t.dtype).replace('torch.', '')}; the kernels take float32/float16/bfloat16"
    return None


def check_tensor(name: str, t, *, dtypes: Optional[Collection[torch.dtype]] = None,
                 ndim: Optional[Collection[int]] = None, device: Optional[torch.device] = None,
                 optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if (isinstance(t, torch.Tensor) and (dtypes is None or t.dtype in dtypes)
            and (ndim is None or t.dim() in ndim) and (device is None or t.device == device)):
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                             f"got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the input)")


def check_shape(name: str, t: Optional[torch.Tensor], shape: Sequence[int], what: str = "") -> None:
    if t is None or t.shape == shape:  # torch.Size equals a tuple of the same ints
        return
    if tuple(t.shape) != tuple(shape):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{extra}, got {tuple(t.shape)}")


def check_same_device(**tensors) -> torch.device:
    """All given (non-None) tensors on one device; returns it (None when there are none)."""
    dev = None
    for t in tensors.values():
        if t is not None:
            if dev is None:
                dev = t.device
            elif t.device != dev:
                break
    else:
        return dev
    dev = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if dev is None:
            dev, first = t.device, name
        elif t.device != dev:
            raise ValueError(f"{name} is on {t.device} but {first} is on {dev}; "
                             "all tensors must be on one device")
    return dev


def dropout_seed(device: torch.device) -> torch.Tensor:
    """The Philox seed of one dropout call, a one-element int64 tensor on ``device``: drawn from
    torch's generator there (no host sync; ``torch.manual_seed`` reproduces it), 63 random bits
    (the kernels' Philox takes a 64-bit key), so two calls of a long training run practically
    never share a mask (31 bits gave ~1e4 repeated pairs over 1M BERT steps)."""
    return torch.randint(0, 2**63 - 1, (1,), device=device, dtype=torch.int64)


def drops_everything(p: float) -> bool:
    """Whether dropout with probability p (a float already checked to be in [0, 1]) drops
    every element: p == 1, or a p below 1 that float32 rounds to 1 (p >= 1 - 2**-25): the
    kernels take p as a float32, where 1 / (1 - p) would be inf (NaN outputs). Both backends
    treat such a p as 1 (zeros), so that they agree."""
    return p >= _FP32_BELOW_ONE_ROUNDS_UP


# The smallest float that float32 rounds to 1.0: halfway between 1 - 2**-24 and 1 (a tie,
# rounded to the even 1.0).
_FP32_BELOW_ONE_ROUNDS_UP = 1.0 - 2.0 ** -25


def check_probability(name: str, p: float) -> None:
    """A dropout probability in [0, 1]; 1 drops everything (as torch's dropout: zeros), which
    the ops compute without dropout and then zero, so the kernels never see it."""
    if type(p) is float and 0.0 <= p <= 1.0:
        return
    check_real(name, p)
    if not (0.0 <= float(p) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {p}")


def check_real(name: str, value) -> None:
    """A python real number (bools included, as torch takes ``dropout_p=self.training and p``),
    a one-element tensor, a SymFloat / SymInt; not a string that float() would parse, nor
    None."""
    if type(value) is float:
        return
    if not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt, torch.Tensor)) or (
            isinstance(value, torch.Tensor) and value.numel() != 1):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")


def check_eps(op: str, eps) -> None:
    """A LayerNorm epsilon: a finite number > 0 (0 divides by zero on a constant row, a
    negative one takes the square root of a negative variance, inf zeroes every output)."""
    if type(eps) is float and 0.0 < eps < math.inf:  # an isinstance with an ABC: ~0.4 us
        return
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: eps must be a positive float, got {type(eps).__name__}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{op}: eps must be positive and finite, got {eps}")


def check_size(name: str, n) -> None:
    """A size given as a python int (a shape entry): >= 0."""
    if type(n) is int and n >= 0:
        return
    if isinstance(n, bool) or not isinstance(n, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
