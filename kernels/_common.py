"""Helpers shared by the Triton kernels: constants, GELU and dropout device functions,
block-size choice and the ahead-of-time (AOT) compile descriptions.

Kernel modules import from here so that a block-size rule or a constant lives in one place.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Optional, TypeVar

import torch
import triton
import triton.language as tl

# exp(x) = exp2(x * LOG2E)
LOG2E = tl.constexpr(1.4426950408889634)
# GELU, erf form: x * Phi(x) with Phi(x) = 0.5 * (1 + erf(x / sqrt(2)))
SQRT1_2 = tl.constexpr(0.7071067811865476)
# d/dx Phi(x) = exp(-x^2 / 2) / sqrt(2 * pi)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
# GELU, tanh form (Hendrycks & Gimpel): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_TANH_CUBIC = tl.constexpr(0.044715)
# tanh(x) rounds to +-1 in fp32 for |x| > 9.01 (1 - tanh(9) = 3e-8 < 2**-24)
TANH_SATURATION = tl.constexpr(10.0)

# The widest row a single program holds in registers. The LayerNorm backward keeps x, dy and
# three fp32 accumulators per element: ptxas -v shows no spill up to 4096, 380 B/thread at
# 8192 (32 warps) and kilobytes at 16384, so the ops fall back to the PyTorch reference past
# 8192.
MAX_FUSED_COLS = 8192
# The CPU interpreter runs one program at a time; a handful of programs is enough to
# exercise the multi-program (partial-sum) code paths without making tests slow.
INTERPRETER_PROGRAMS = 4


_F = TypeVar("_F", bound=Callable)


def on_tensor_device(fn: _F) -> _F:
    """Decorator for launchers: run ``fn`` with its first tensor argument's GPU as the
    current CUDA device. Triton launches on the current device (and its current stream);
    tensors on another GPU of a multi-GPU process would otherwise be handed to a kernel
    running on the wrong device. A no-op for CPU tensors and when the device is already
    current."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.is_cuda and a.device.index != torch.cuda.current_device():
                    with torch.cuda.device(a.device):
                        return fn(*args, **kwargs)
                break
        return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1); |x| is clamped where tanh is already +-1 in fp32, so
    # exp never overflows to inf
    x = tl.minimum(tl.maximum(x, -TANH_SATURATION), TANH_SATURATION)
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def gelu_fwd(x, APPROX_TANH: tl.constexpr):
    """GELU of an fp32 block; APPROX_TANH selects the tanh form."""
    if APPROX_TANH:
        u = (x + x * x * x * GELU_TANH_CUBIC) * SQRT_2_OVER_PI
        return 0.5 * x * (1.0 + _tanh(u))
    else:
        return 0.5 * x * (1.0 + tl.erf(x * SQRT1_2))


@triton.jit
def gelu_grad(x, APPROX_TANH: tl.constexpr):
    """d GELU(x) / dx of an fp32 block."""
    if APPROX_TANH:
        u = (x + x * x * x * GELU_TANH_CUBIC) * SQRT_2_OVER_PI
        t = _tanh(u)
        du = (x * x * (3.0 * GELU_TANH_CUBIC) + 1.0) * SQRT_2_OVER_PI
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    else:
        cdf = 0.5 * (1.0 + tl.erf(x * SQRT1_2))
        pdf = tl.exp2(x * x * (-0.5 * LOG2E)) * INV_SQRT_2PI
        return cdf + x * pdf


@triton.jit
def dropout_keep(seed, offsets, p):
    """Keep-mask of inverted dropout: True with probability 1 - p.

    Philox (tl.rand) on (seed, element offset): the backward regenerates the same mask from
    the same seed instead of storing it.
    """
    return tl.rand(seed, offsets) >= p


@triton.jit
def _dropout_mask_kernel(seed_ptr, mask_ptr, n_rows, n_cols, p, BLOCK_N: tl.constexpr):
    # each program owns one row of the mask
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    seed = tl.load(seed_ptr)
    for start in range(0, n_cols, BLOCK_N):
        c = start + cols
        keep = dropout_keep(seed, row * n_cols + c, p)
        tl.store(mask_ptr + row * n_cols + c, keep.to(tl.int8), mask=c < n_cols)


def dropout_mask(seed: torch.Tensor, n_rows: int, n_cols: int, p: float) -> torch.Tensor:
    """The keep-mask (bool, (n_rows, n_cols)) that row-wise kernels draw for ``seed``.

    Element (r, c) uses Philox offset ``r * n_cols + c``. Test-only: lets tests check
    dropout numerics and gradients against a reference with the same mask.
    """
    out = torch.empty((n_rows, n_cols), dtype=torch.int8, device=seed.device)
    block = min(next_power_of_2(max(n_cols, 16)), 4096)
    _dropout_mask_kernel[(n_rows,)](seed, out, n_rows, n_cols, float(p), BLOCK_N=block)
    return out.bool()


# Host-side integer helpers for the launchers. triton.cdiv and triton.next_power_of_2 are
# ConstexprFunctions: ~5 us a call from Python (argument unwrapping), measured with triton 3.6
# and 3.8; a launcher calls several, at every launch, and small BERT shapes are host-bound.

def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative a and positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1, and 0 for 0, as triton.next_power_of_2."""
    n = int(n)
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def mm_fp32(a: torch.Tensor, b: torch.Tensor,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b as float32 (into ``out`` if given), a and b in one dtype, the product not rounded
    to their 16-bit dtype first: on CUDA cuBLAS returns its fp32 accumulator (aten::mm.dtype /
    .dtype_out, which have no CPU kernel); elsewhere the operands are upcast (16-bit products
    are exact in fp32)."""
    if a.dtype != torch.float32 and a.is_cuda:
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    a, b = a.float(), b.float()
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """View ``t`` as (rows, n_cols) with unit column stride, copying only if it must."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A (N,) vector that kernels index by column, with unit stride (a strided view or an
    expanded, stride-0 vector would be read wrongly or past its storage), copied only if
    needed."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def row_block(n_cols: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for kernels that keep one whole row in registers."""
    block_n = next_power_of_2(max(int(n_cols), 16))
    # about 8 fp32 elements per thread at 32 threads a warp, between 1 and 32 warps
    num_warps = min(max(block_n // 256, 1), 32)
    return block_n, num_warps


def row_block_configs():
    """Every (BLOCK_N, num_warps) ``row_block`` can return, for the AOT compile test."""
    out, n = [], 16
    while n <= MAX_FUSED_COLS:
        out.append(row_block(n))
        n *= 2
    return out


def num_programs(device: torch.device, per_sm: int) -> int:
    """A persistent grid: ``per_sm`` programs per streaming multiprocessor."""
    if device.type == "cuda":
        # get_device_properties checks and wraps at every call; the count never changes
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _sm_count(index) * per_sm
    return INTERPRETER_PROGRAMS


@dataclasses.dataclass(frozen=True)
class AotConfig:
    """One launch configuration of one kernel, for ahead-of-time compile checks."""
    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int = 4
    num_stages: Optional[int] = None
    name: str = ""


def aot_configs():
    yield AotConfig(_dropout_mask_kernel,
                    {"seed_ptr": "*i64", "mask_ptr": "*i8", "n_rows": "i32", "n_cols": "i32",
                     "p": "fp32", "BLOCK_N": "constexpr"},
                    {"BLOCK_N": 4096}, 4, name="dropout_mask")
