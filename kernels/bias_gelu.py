"""GELU(x + bias), forward and backward, in one pass each.

The FFN's first projection is followed by bias-add and GELU; fusing them reads x once and
writes y once (eager PyTorch reads and writes the (rows, 4H) tensor twice). The backward
recomputes x + bias instead of storing it, and reduces dbias inside the kernel: each program
owns a column block and a range of rows, accumulates its dbias partial in registers, and
writes one partial row that is summed afterwards (no atomics, deterministic).

Both the exact erf form and the tanh approximation are supported (``APPROX_TANH``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (AotConfig, as_rows, gelu_fwd, gelu_grad, num_programs, on_tensor_device,
                      unit_stride, cdiv, next_power_of_2)
from ._launch import launch

# Tile of the elementwise kernels: BLOCK_N columns (up to MAX_BLOCK_N) times enough rows to
# give each program TILE_ELEMS elements: 16 per thread at 8 warps (4 warps needed ~170
# registers a thread in the backward, limiting occupancy).
MAX_BLOCK_N = 1024
TILE_ELEMS = 4096
NUM_WARPS = 8
# Programs per SM along the rows in the backward (the dbias partial-sum rows).
BWD_PROGRAMS_PER_SM = 4


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr, b_ptr, y_ptr,
    stride_x_row, stride_y_row, n_rows, n_cols,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
):
    # each program owns a BLOCK_M x BLOCK_N tile
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    y = gelu_fwd(x, APPROX_TANH)
    tl.store(y_ptr + rows[:, None] * stride_y_row + cols[None, :],
             y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    x_ptr, b_ptr, dy_ptr, dx_ptr, db_part_ptr,
    stride_x_row, stride_dy_row, stride_dx_row, n_rows, n_cols, rows_per_program,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
):
    # each program owns columns [pid_n * BLOCK_N, ...) of rows
    # [pid_m * rows_per_program, (pid_m + 1) * rows_per_program), and one dbias partial row
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid_m.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_BIAS:
            x += b[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0)
        dx = dy.to(tl.float32) * gelu_grad(x, APPROX_TANH)
        dx = tl.where(mask, dx, 0.0)
        tl.store(dx_ptr + rows[:, None] * stride_dx_row + cols[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            acc += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid_m * n_cols + cols, acc, mask=cmask)


def _tile(n_cols: int):
    block_n = min(next_power_of_2(max(int(n_cols), 16)), MAX_BLOCK_N)
    return TILE_ELEMS // block_n, block_n


@on_tensor_device
def bias_gelu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str = "none"):
    """y = GELU(x + bias). x: (..., N) fp32/fp16/bf16; bias: (N,) or None. Returns y like x."""
    n_cols = x.shape[-1]
    x2 = as_rows(x, n_cols)
    n_rows = x2.shape[0]
    bias = unit_stride(bias)
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block_m, block_n = _tile(n_cols)
    if n_rows > 0 and n_cols > 0:
        grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n))
        launch(
            _bias_gelu_fwd_kernel, grid,
            x2, bias, y, x2.stride(0), y.stride(0), n_rows, n_cols,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None,
            APPROX_TANH=approximate == "tanh", num_warps=NUM_WARPS)
    return y.reshape(x.shape)


@on_tensor_device
def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
                  approximate: str = "none"):
    """Returns (dx, dbias); dbias is None when bias is None."""
    n_cols = x.shape[-1]
    x2 = as_rows(x, n_cols)
    dy2 = as_rows(dy, n_cols)
    n_rows = x2.shape[0]
    bias = unit_stride(bias)
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block_m, block_n = _tile(n_cols)
    n_col_blocks = cdiv(n_cols, block_n) if n_cols > 0 else 0
    # enough row ranges to fill the GPU, but never fewer than BLOCK_M rows per range
    grid_m = max(1, min(cdiv(num_programs(x.device, BWD_PROGRAMS_PER_SM), max(n_col_blocks, 1)),
                        cdiv(n_rows, block_m)))
    rows_per_program = cdiv(cdiv(n_rows, grid_m), block_m) * block_m
    db_part = (torch.zeros((grid_m, n_cols), dtype=torch.float32, device=x.device)
               if bias is not None else None)
    if n_rows > 0 and n_cols > 0:
        launch(
            _bias_gelu_bwd_kernel, (grid_m, n_col_blocks),
            x2, bias, dy2, dx, db_part, x2.stride(0), dy2.stride(0), dx.stride(0),
            n_rows, n_cols, rows_per_program,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None,
            APPROX_TANH=approximate == "tanh", num_warps=NUM_WARPS)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx.reshape(x.shape), db


def aot_configs():
    """Every tile shape the launchers can pick (bf16, tanh form, with bias: the heaviest), and
    every dtype x GELU form x bias combination at the widest tile."""
    def pair(dt, block_n, tanh, has_bias):
        c = dict(BLOCK_M=TILE_ELEMS // block_n, BLOCK_N=block_n, HAS_BIAS=has_bias,
                 APPROX_TANH=tanh)
        tag = f"{dt},{block_n},tanh={tanh},bias={has_bias}"
        yield AotConfig(_bias_gelu_fwd_kernel, {
            "x_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}",
            "stride_x_row": "i64", "stride_y_row": "i64", "n_rows": "i32",
            "n_cols": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
            "HAS_BIAS": "constexpr", "APPROX_TANH": "constexpr"}, c, NUM_WARPS,
            name=f"bias_gelu_fwd[{tag}]")
        yield AotConfig(_bias_gelu_bwd_kernel, {
            "x_ptr": f"*{dt}", "b_ptr": f"*{dt}", "dy_ptr": f"*{dt}",
            "dx_ptr": f"*{dt}", "db_part_ptr": "*fp32", "stride_x_row": "i64",
            "stride_dy_row": "i64", "stride_dx_row": "i64", "n_rows": "i32",
            "n_cols": "i32", "rows_per_program": "i32", "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr", "HAS_BIAS": "constexpr",
            "APPROX_TANH": "constexpr"}, c, NUM_WARPS, name=f"bias_gelu_bwd[{tag}]")

    block_n = 16
    while block_n <= MAX_BLOCK_N:
        yield from pair("bf16", block_n, True, True)
        block_n *= 2
    for dt in ("fp32", "fp16", "bf16"):
        for tanh in (False, True):
            for has_bias in (False, True):
                if (dt, tanh, has_bias) != ("bf16", True, True):
                    yield from pair(dt, MAX_BLOCK_N, tanh, has_bias)
