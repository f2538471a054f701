"""Helpers shared by the Triton kernels: constants, GELU and dropout device functions,
block-size choice, the column sum that turns the persistent backward kernels' per-program
partial rows into parameter gradients, and the ahead-of-time (AOT) compile descriptions.

Kernel modules import from here so that a block-size rule or a constant lives in one place.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

import torch
import triton
import triton.language as tl

from ._launch import launch

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
# _tanh near 0: tanh(x) = x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - ... for |x| below this.
TANH_SERIES_BELOW = tl.constexpr(0.25)
TANH_C3 = tl.constexpr(-1.0 / 3.0)
TANH_C5 = tl.constexpr(2.0 / 15.0)
TANH_C7 = tl.constexpr(-17.0 / 315.0)
TANH_C9 = tl.constexpr(62.0 / 2835.0)

# The widest row a single program holds in registers. The LayerNorm backward keeps x, dy and
# three fp32 accumulators per element: ptxas -v shows no spill up to 4096, 380 B/thread at
# 8192 (32 warps) and kilobytes at 16384, so the ops fall back to the PyTorch reference past
# 8192.
MAX_FUSED_COLS = 8192
# The CPU interpreter runs one program at a time; a handful of programs is enough to
# exercise the multi-program (partial-sum) code paths without making tests slow.
INTERPRETER_PROGRAMS = 4
# The column sum of partial rows (``sum_param_parts``): each program adds BLOCK_M rows a step
# over BLOCK_N columns. 32 fp32 columns are one 128-byte line per row; 64 rows a step keep 16
# accumulators per thread at 4 warps and take a 528-row part (132 SMs x 4 programs) in 9 steps.
SUM_PARTS_BLOCK_M = 64
SUM_PARTS_BLOCK_N = 32
SUM_PARTS_NUM_WARPS = 4
# Gradients one launch of the column sum writes: LayerNorm's weight, bias and x_bias; and
# the fp32 tables it converts besides (the embedding's position and token type gradients).
SUM_PARTS_MAX_OUT = 3
SUM_PARTS_MAX_TABLES = 2


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
    # exp never overflows to inf. A NaN stays NaN (tl.minimum / tl.maximum return the other
    # operand: tanh(NaN) was -1, and an LSTM turned a NaN state or weight into finite outputs
    # and gradients, where torch gives NaN)
    xc = tl.clamp(x, -TANH_SATURATION, TANH_SATURATION, propagate_nan=tl.PropagateNan.ALL)
    big = 1.0 - 2.0 / (tl.exp2(xc * (2.0 * LOG2E)) + 1.0)
    # Near 0 that difference cancels (19% off at |x| = 1e-7, 0.14% at 1e-5: an fp32 LSTM of
    # small activations was 3-5x less accurate than torch, a review found); there the odd
    # Taylor series to x^9 is within fp32 rounding (the next term is < 1e-8 relative at 0.25).
    x2 = x * x
    small = x + x * x2 * (TANH_C3 + x2 * (TANH_C5 + x2 * (TANH_C7 + x2 * TANH_C9)))
    return tl.where(tl.abs(x) < TANH_SERIES_BELOW, small, big)


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
def row_mean(s, mask, n_cols):
    """Mean of a row ``s`` (fp32, zero where ``mask`` is False) of ``n_cols`` values, with one
    correction step: the first mean's rounding error, measured on the row itself, is taken
    out. A constant row then gets its value exactly (its centered values are all 0, as
    Welford's algorithm gives, torch's on CUDA): with the plain sum / n a rounding error of
    one ulp of the value becomes the row's whole spread, so a LayerNorm of a constant row with
    BERT's eps = 1e-12 gave values of up to +-1 instead of the bias."""
    mean = tl.sum(s, axis=0) / n_cols
    return mean + tl.sum(tl.where(mask, s - mean, 0.0), axis=0) / n_cols


@triton.jit
def dropout_keep_row(seed, row, n_cols, start, p, BLOCK: tl.constexpr):
    """Keep-mask of inverted dropout for columns start + arange(BLOCK) of a row of n_cols
    (start a multiple of 4, BLOCK >= 4): True with probability 1 - p.

    Element (row, c) takes output c % 4 of Philox (tl.randint4x) at counter
    row * ceil(n_cols / 4) + c // 4 (the backward regenerates the mask from the seed instead
    of storing it): one Philox evaluation (10 rounds of 32-bit multiplies) serves four
    elements, where ``tl.rand`` (used before) ran one per element and kept one of its four
    outputs. That evaluation was about 50 integer instructions an element, more than the
    memory traffic of the LayerNorm / embedding kernels takes at the H100's integer rate (the
    sm_90 SASS of the LayerNorm dropout epilogue at 768 columns: 824 -> 536 instructions a
    row forward, 1104 -> 784 backward; not timed). Every kernel that applies or recovers a
    row-kernel mask calls this, so they agree.
    """
    counters = (tl.cast(row, tl.int64) * ((n_cols + 3) // 4) + start // 4
                + tl.arange(0, BLOCK // 4))
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    # element 4 g + 2 i + j <- output 2 i + j of counter g (join stacks on a new last axis)
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK,))
    return tl.random.uint_to_uniform_float(r) >= p


@triton.jit
def _dropout_mask_kernel(seed_ptr, mask_ptr, n_rows, n_cols, p, BLOCK_N: tl.constexpr):
    # each program owns one row of the mask
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    seed = tl.load(seed_ptr)
    for start in range(0, n_cols, BLOCK_N):
        c = start + cols
        keep = dropout_keep_row(seed, row, n_cols, start, p, BLOCK_N)
        tl.store(mask_ptr + row * n_cols + c, keep.to(tl.int8), mask=c < n_cols)


@on_tensor_device
def dropout_mask(seed: torch.Tensor, n_rows: int, n_cols: int, p: float) -> torch.Tensor:
    """The keep-mask (bool, (n_rows, n_cols)) that row-wise kernels draw for ``seed``.

    Element (r, c) is ``dropout_keep_row``'s: output c % 4 of Philox counter
    r * ceil(n_cols / 4) + c // 4. Test-only: lets tests check dropout numerics and gradients
    against a reference with the same mask.
    """
    out = torch.empty((n_rows, n_cols), dtype=torch.int8, device=seed.device)
    block = min(next_power_of_2(max(n_cols, 16)), 4096)
    launch(_dropout_mask_kernel, (n_rows,), seed, out, n_rows, n_cols, float(p), BLOCK_N=block)
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


def env_flag(name: str) -> bool:
    """An on/off environment variable of an opt-in mode: "1" on, "0" or unset off (spaces
    around ignored); anything else is refused, naming the variable."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"${name} must be 0 or 1, got {value!r}")
    return value == "1"


def mm_fp32(a: torch.Tensor, b: torch.Tensor,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b as float32 (into ``out`` if given), a and b in one dtype, the product not rounded
    to their 16-bit dtype first: on CUDA cuBLAS returns its fp32 accumulator (aten::mm.dtype /
    .dtype_out, which have no CPU kernel); elsewhere the operands are upcast (16-bit products
    are exact in fp32). Also inside an autocast region (a backward called under autocast),
    which would run the upcast product in its 16-bit dtype."""
    if a.dtype != torch.float32 and a.is_cuda:
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    a, b = a.float(), b.float()
    dev = a.device.type
    # (cpu and cuda always have autocast: the availability query costs ~1 us a call)
    if ((dev == "cpu" or dev == "cuda" or torch.amp.is_autocast_available(dev))
            and torch.is_autocast_enabled(dev)):
        with torch.autocast(dev, enabled=False):
            return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


@triton.jit
def _store_sum(out_ptr, total, cols, mask):
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cast_rows(src_ptr, dst_ptr, row0, n_rows, n_cols, cols, mask, BLOCK_M: tl.constexpr):
    """Copy rows [row0, row0 + BLOCK_M) of a contiguous (n_rows, n_cols) fp32 table into
    dst_ptr's dtype."""
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    m = (rows < n_rows)[:, None] & mask[None, :]
    offs = rows[:, None] * n_cols + cols[None, :]
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=m).to(dst_ptr.dtype.element_ty), mask=m)


# CUDA's limit on grid axes 1 and 2.
CUDA_MAX_GRID_Y = 65535


@triton.jit
def _sum_parts_kernel(part_ptr, out0_ptr, out1_ptr, out2_ptr, tab0_ptr, tab1_ptr, tab_out0_ptr,
                      tab_out1_ptr, n_rows, n_cols, stride_part, stride_row, n_tab_rows0,
                      n_tab_rows1, N_OUT: tl.constexpr, N_TAB: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # each program owns one column block (pid_n) of one job (k): for k < N_OUT, output k's
    # sum of part[k, :n_rows, cols], added in a fixed order (a BLOCK_M-row tile accumulator,
    # then one tree over its rows) so the result is the same bits at every run; past those,
    # BLOCK_M rows of table 0, then of table 1, copied into their outputs' dtype
    pid_n = tl.program_id(0)
    k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    # pointers to absent outputs are None (constexpr): each branch is compiled only where
    # its outputs exist
    if N_OUT > 0:
        if k < N_OUT:
            rows = tl.arange(0, BLOCK_M)
            base = part_ptr + k.to(tl.int64) * stride_part
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for start in range(0, n_rows, BLOCK_M):
                r = start + rows
                acc += tl.load(base + r[:, None] * stride_row + cols[None, :],
                               mask=(r < n_rows)[:, None] & mask[None, :], other=0.0)
            total = tl.sum(acc, axis=0)
            if k == 0:
                _store_sum(out0_ptr, total, cols, mask)
            if N_OUT > 1:
                if k == 1:
                    _store_sum(out1_ptr, total, cols, mask)
            if N_OUT > 2:
                if k == 2:
                    _store_sum(out2_ptr, total, cols, mask)
    if N_TAB > 0:
        blk = k - N_OUT
        blocks0 = tl.cdiv(n_tab_rows0, BLOCK_M)
        if (blk >= 0) & (blk < blocks0):
            _cast_rows(tab0_ptr, tab_out0_ptr, blk * BLOCK_M, n_tab_rows0, n_cols, cols, mask,
                       BLOCK_M)
        if N_TAB > 1:
            if blk >= blocks0:
                _cast_rows(tab1_ptr, tab_out1_ptr, (blk - blocks0) * BLOCK_M, n_tab_rows1,
                           n_cols, cols, mask, BLOCK_M)


def _sum_param_parts(parts: Optional[torch.Tensor], n_rows: int,
                    params: Sequence[Optional[torch.Tensor]],
                    tables: Sequence[tuple] = ()) -> List[Optional[torch.Tensor]]:
    """The last step of a backward, in one launch: parameter gradients from the kernel's
    fp32 accumulators.

    The k-th of ``params`` that is not None gets ``parts[k, :n_rows].sum(0)`` (the column sum
    of a persistent kernel's per-program partial rows), added in fp32 in a fixed order
    (bit-identical run to run) and stored in its own dtype. Each ``tables`` pair (acc, param)
    gets ``acc`` (a gradient table summed in fp32, by atomics say) in ``param``'s dtype: as it
    is when that is float32, else converted by the same launch, where a torch cast would
    cost one more op.

    Args:
        parts: (k, P, N) float32 with unit column stride, one slice per parameter present in
            ``params`` (in their order), k <= 3; None when every parameter is None.
        n_rows: the leading rows of each slice to add, 0 <= n_rows <= P; 0 gives zeros and
            reads nothing (a backward that launched no program leaves parts unwritten).
        params: the parameters, each (N,) or None.
        tables: up to two (acc, param): acc a contiguous float32 (R, N), param (R, N).

    Returns:
        A list: the gradient of each of ``params`` present ((N,), its dtype), None for the
        absent ones, then one (R, N) gradient per table.
    """
    # a launcher calls this at every backward of small, host-bound shapes: plain loops, no
    # work past what the launch needs (about half a torch op of host time, measured)
    grads, outs = [], []
    if parts is not None:
        shape, strides, device = parts.shape, parts.stride(), parts.device
        n_cols = shape[-1]
    for p in params:
        if p is None:
            grads.append(None)
        else:
            if parts is None:
                raise ValueError("sum_param_parts: parts is None but a parameter is given")
            g = torch.empty(n_cols, dtype=p.dtype, device=device)
            grads.append(g)
            outs.append(g)
    n_out = len(outs)
    if n_out:
        if (len(shape) != 3 or parts.dtype != torch.float32 or shape[0] != n_out
                or strides[2] != 1 or n_out > SUM_PARTS_MAX_OUT):
            raise ValueError(f"sum_param_parts: parts must be float32 (k, P, N) with unit "
                             f"column stride, k = {n_out} <= {SUM_PARTS_MAX_OUT} (the "
                             f"parameters given), got {parts.dtype} {tuple(shape)}")
        if not 0 <= n_rows <= shape[1]:
            raise ValueError(f"sum_param_parts: n_rows {n_rows} outside [0, {shape[1]}]")
        stride_part, stride_row = strides[0], strides[1]
    else:
        parts, n_cols, stride_part, stride_row = None, None, 0, 0
    # tables: (accumulator, output, rows) of those converted; fp32 ones are the gradient
    tabs = [None, None, None, None, 0, 0]
    n_tab = n_blocks = 0
    for acc, p in tables:
        shape = acc.shape
        if (acc.dtype != torch.float32 or not acc.is_contiguous() or shape != p.shape
                or len(shape) != 2 or (n_cols is not None and shape[1] != n_cols)
                or n_tab == SUM_PARTS_MAX_TABLES):
            raise ValueError(f"sum_param_parts: a table must be a contiguous float32 (R, N) "
                             f"with its parameter's shape and N = {n_cols}, at most "
                             f"{SUM_PARTS_MAX_TABLES}, got {acc.dtype} {tuple(shape)} for "
                             f"a parameter of {tuple(p.shape)}")
        n_cols = shape[1]
        if p.dtype == torch.float32:
            grads.append(acc)
            continue
        g = torch.empty(shape, dtype=p.dtype, device=acc.device)
        grads.append(g)
        tabs[n_tab], tabs[2 + n_tab], tabs[4 + n_tab] = acc, g, shape[0]
        n_tab += 1
        n_blocks += cdiv(shape[0], SUM_PARTS_BLOCK_M)
    if n_out + n_blocks > CUDA_MAX_GRID_Y:
        # the row blocks of the tables go on grid axis 1 (position / type tables are small:
        # this is ~4M rows)
        raise ValueError(f"sum_param_parts: tables of {n_blocks * SUM_PARTS_BLOCK_M} rows in "
                         f"all exceed the {(CUDA_MAX_GRID_Y - n_out) * SUM_PARTS_BLOCK_M} this "
                         "launch can convert")
    if n_out + n_blocks and n_cols:
        while len(outs) < SUM_PARTS_MAX_OUT:
            outs.append(None)
        launch(
            _sum_parts_kernel, (cdiv(n_cols, SUM_PARTS_BLOCK_N), n_out + n_blocks),
            parts, *outs, *tabs[:4], n_rows, n_cols, stride_part, stride_row, *tabs[4:],
            N_OUT=n_out, N_TAB=n_tab, BLOCK_M=SUM_PARTS_BLOCK_M, BLOCK_N=SUM_PARTS_BLOCK_N,
            num_warps=SUM_PARTS_NUM_WARPS)
    return grads


# Launchers already running on their tensors' device call _sum_param_parts directly (the
# decorator's argument scan is host time at every backward).
sum_param_parts = on_tensor_device(_sum_param_parts)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """View ``t`` as (rows, n_cols) with unit column stride, copying only if it must."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rows_arg(t: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, int]:
    """``t`` as a kernel reads it, rows of ``n_cols`` with unit column stride: (tensor, row
    stride). A contiguous tensor goes as it is, row stride n_cols: ``as_rows``' reshape is a
    view, but a dispatcher call (host time) all the same; anything else goes through
    ``as_rows``."""
    if t.is_contiguous():
        return t, n_cols
    t2 = as_rows(t, n_cols)
    return t2, t2.stride(0)


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
    # one, two and three outputs in every dtype the parameters take; the embedding's two
    # (bias and weight) with its two tables converted, and the tables alone
    sig = lambda dt: {
        "part_ptr": "*fp32", "out0_ptr": f"*{dt}", "out1_ptr": f"*{dt}", "out2_ptr": f"*{dt}",
        "tab0_ptr": "*fp32", "tab1_ptr": "*fp32", "tab_out0_ptr": f"*{dt}",
        "tab_out1_ptr": f"*{dt}", "n_rows": "i32", "n_cols": "i32", "stride_part": "i32",
        "stride_row": "i32", "n_tab_rows0": "i32", "n_tab_rows1": "i32",
        "N_OUT": "constexpr", "N_TAB": "constexpr", "BLOCK_M": "constexpr",
        "BLOCK_N": "constexpr"}
    for dt in ("fp32", "fp16", "bf16"):
        for n_out, n_tab in [(1, 0), (2, 0), (3, 0), (2, 2), (1, 1), (0, 2), (0, 1)]:
            absent = ([f"out{i}_ptr" for i in range(n_out, SUM_PARTS_MAX_OUT)]
                      + [f"tab{i}_ptr" for i in range(n_tab, SUM_PARTS_MAX_TABLES)]
                      + [f"tab_out{i}_ptr" for i in range(n_tab, SUM_PARTS_MAX_TABLES)]
                      + (["part_ptr"] if n_out == 0 else []))
            consts = {"N_OUT": n_out, "N_TAB": n_tab, "BLOCK_M": SUM_PARTS_BLOCK_M,
                      "BLOCK_N": SUM_PARTS_BLOCK_N, **{name: None for name in absent}}
            yield AotConfig(_sum_parts_kernel, {k: ("constexpr" if k in absent else v)
                                                for k, v in sig(dt).items()},
                            consts, SUM_PARTS_NUM_WARPS, name=f"sum_parts[{dt},{n_out},{n_tab}]")
