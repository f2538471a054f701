"""LayerNorm with BERT's epilogues fused in, forward and backward.

One kernel pair computes

    s = dropout(act(x + x_bias)) + residual          (each term optional; act = GELU or none)
    y = (s - mean(s)) * rstd(s) * weight + bias       (statistics in fp32)

which covers BERT's post-attention / post-FFN epilogue ``LayerNorm(dropout(x + b) + res)``
and the MLM head transform ``LayerNorm(GELU(x + b))`` in a single read of each input.

Trade-offs:
- The forward stores only y, mean and rstd (fp32, one per row). The backward recomputes s
  from x, x_bias, residual and the dropout seed instead of reading a stored copy: the same
  memory traffic as storing s (read x and residual vs. write s then read it back) with no
  extra activation memory.
- Dropout regenerates its mask in the backward from a Philox seed held in a device tensor,
  so nothing of the mask is stored and no host sync is needed to launch.
- The backward is a persistent kernel (a few programs per SM, each looping over a range of
  rows) that accumulates dweight / dbias / dx_bias in registers and writes one partial row
  per program into one (k, programs, N) buffer; one launch of ``sum_param_parts`` then adds
  the rows of all k in a fixed order and stores each gradient in its parameter's dtype
  (torch's column reduction of a (528, 768) part took 20-38 us of GPU time on an H200, plus
  a sum and a cast per parameter on the host). This avoids the locks and atomics of the
  Triton tutorial's two-stage backward, which loses to torch at hidden 768/1024 (as Liger
  observed).

References: Triton tutorial 05 (layer norm), apex FusedLayerNorm, flash-attention's
dropout_add_layer_norm, Liger-Kernel's layer_norm.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (AotConfig, MAX_FUSED_COLS, rows_arg, unit_stride, dropout_keep_row, gelu_fwd,
                      gelu_grad, num_programs, on_tensor_device, row_block, row_block_configs, cdiv,
                      row_mean, _sum_param_parts)
from ._launch import launch

# Programs per SM in the persistent backward: enough rows in flight per SM to cover memory
# latency while keeping the partial-sum buffers (programs x n_cols fp32) small.
BWD_PROGRAMS_PER_SM = 4


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, x_bias_ptr, res_ptr, w_ptr, b_ptr, seed_ptr,
    y_ptr, mean_ptr, rstd_ptr,
    stride_x_row, stride_res_row, stride_y_row,
    n_cols, eps, dropout_p,
    BLOCK_N: tl.constexpr,
    HAS_X_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, APPROX_TANH: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # each program owns one row
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    s = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        s += tl.load(x_bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT_GELU:
        s = gelu_fwd(s, APPROX_TANH)
    if HAS_DROPOUT:
        keep = dropout_keep_row(tl.load(seed_ptr), row, n_cols, 0, dropout_p, BLOCK_N)
        # s * 0.0, not 0.0: a dropped NaN / inf gives NaN, as torch's dropout (a product)
        s = tl.where(keep, s / (1.0 - dropout_p), s * 0.0)
    if HAS_RESIDUAL:
        s += tl.load(res_ptr + row * stride_res_row + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.where(mask, s, 0.0)
    mean = row_mean(s, mask, n_cols)
    sc = tl.where(mask, s - mean, 0.0)
    var = tl.sum(sc * sc, axis=0) / n_cols
    # + var * 0.0: NaN if the variance overflowed (|x - mean| past ~1.8e19), not rstd = 0
    # (y = bias, zero gradients: a finite, wrong answer, which torch's fp32 CPU kernel, and so
    # the "torch" backend, gives for some such rows; NaN for others)
    rstd = 1.0 / tl.sqrt(var + eps) + var * 0.0
    y = sc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    x_ptr, x_bias_ptr, res_ptr, w_ptr, seed_ptr, dy_ptr, mean_ptr, rstd_ptr,
    dx_ptr, dres_ptr, part_ptr,
    stride_x_row, stride_res_row, stride_dy_row, stride_dx_row, stride_dres_row, stride_part,
    n_rows, n_cols, rows_per_program, dropout_p,
    BLOCK_N: tl.constexpr,
    HAS_X_BIAS: tl.constexpr, ACT_GELU: tl.constexpr, APPROX_TANH: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_DRES: tl.constexpr, COMPUTE_DX_BIAS: tl.constexpr,
):
    # each program owns rows [pid * rows_per_program, (pid + 1) * rows_per_program) and row pid
    # of each partial-sum slice of part_ptr: dweight, dbias, dx_bias in that order, the
    # absent ones left out; it writes its rows even when it gets no input rows (zeros)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    # int64 row indices: row * stride may pass 2**31 on large activations
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        xb = tl.load(x_bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dxb_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(row_start, row_end):
        # recompute s exactly as the forward did
        pre = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_X_BIAS:
            pre += xb
        s = pre
        if ACT_GELU:
            s = gelu_fwd(pre, APPROX_TANH)
        if HAS_DROPOUT:
            keep = dropout_keep_row(seed, row, n_cols, 0, dropout_p, BLOCK_N)
            s = tl.where(keep, s / (1.0 - dropout_p), s * 0.0)
        if HAS_RESIDUAL:
            s += tl.load(res_ptr + row * stride_res_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (s - mean) * rstd, 0.0)
        dy = tl.load(dy_ptr + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = dy
        if HAS_WEIGHT:
            g = dy * w
            dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
        c1 = tl.sum(xhat * g, axis=0) / n_cols
        c2 = tl.sum(g, axis=0) / n_cols
        ds = tl.where(mask, (g - (xhat * c1 + c2)) * rstd, 0.0)
        if STORE_DRES:
            tl.store(dres_ptr + row * stride_dres_row + cols,
                     ds.to(dres_ptr.dtype.element_ty), mask=mask)
        d = ds
        if HAS_DROPOUT:
            d = tl.where(keep, d / (1.0 - dropout_p), d * 0.0)
        if ACT_GELU:
            d = d * gelu_grad(pre, APPROX_TANH)
        tl.store(dx_ptr + row * stride_dx_row + cols, d.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DX_BIAS:
            dxb_acc += d
    # slice index of each partial sum: the number of present slices before it
    if HAS_WEIGHT:
        tl.store(part_ptr + pid * n_cols + cols, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(part_ptr + HAS_WEIGHT * stride_part + pid * n_cols + cols, db_acc, mask=mask)
    if COMPUTE_DX_BIAS:
        tl.store(part_ptr + (HAS_WEIGHT + HAS_BIAS) * stride_part + pid * n_cols + cols, dxb_acc,
                 mask=mask)


def _check_width(n_cols: int):
    if n_cols > MAX_FUSED_COLS:
        raise ValueError(f"the normalized size {n_cols} exceeds the fused kernels' limit "
                         f"{MAX_FUSED_COLS}; use backend='torch'")


@on_tensor_device
def layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float, residual: Optional[torch.Tensor] = None,
                   x_bias: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None,
                   dropout_p: float = 0.0, activation: str = "none",
                   out_dtype: Optional[torch.dtype] = None):
    """Launch the fused forward.

    Args:
        x: (..., N) fp32/fp16/bf16; the last dimension is normalized.
        weight, bias, x_bias: (N,) or None.
        residual: same shape as x, or None.
        seed: int64 tensor of one element on x's device (dropout), or None.
        dropout_p: probability of zeroing an element of act(x + x_bias); used when seed is given.
        activation: "none", "gelu" (erf form) or "gelu_tanh".
        out_dtype: dtype of y (default x.dtype).

    Returns:
        y (same shape as x), mean and rstd (fp32, (rows,)).
    """
    n_cols = x.shape[-1]
    _check_width(n_cols)
    x2, stride_x = rows_arg(x, n_cols)
    n_rows = x.numel() // n_cols
    res2, stride_res = rows_arg(residual, n_cols) if residual is not None else (None, 0)
    weight, bias, x_bias = unit_stride(weight), unit_stride(bias), unit_stride(x_bias)
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    mean = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    block_n, num_warps = row_block(n_cols)
    has_dropout = seed is not None and dropout_p > 0.0
    if n_rows > 0:
        launch(
            _layer_norm_fwd_kernel, (n_rows,),
            x2, x_bias, res2, weight, bias, seed, y, mean, rstd,
            stride_x, stride_res, n_cols, n_cols, float(eps), float(dropout_p),
            BLOCK_N=block_n,
            HAS_X_BIAS=x_bias is not None, ACT_GELU=activation != "none",
            APPROX_TANH=activation == "gelu_tanh", HAS_DROPOUT=has_dropout,
            HAS_RESIDUAL=res2 is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, num_warps=num_warps,
        )
    return y, mean, rstd


@on_tensor_device
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                   residual: Optional[torch.Tensor] = None, x_bias: Optional[torch.Tensor] = None,
                   seed: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                   activation: str = "none", need_dres: bool = True):
    """Launch the fused backward.

    Returns (dx, dresidual, dweight, dbias, dx_bias); entries for absent inputs are None.
    dresidual is dx itself when x's path has no dropout and no activation (d s / d x = 1) and
    the residual has x's dtype; a residual of another dtype (a float32 residual stream) gets
    its own store, rounded once from fp32 to its dtype, not through x's.
    """
    n_cols = x.shape[-1]
    _check_width(n_cols)
    x2, stride_x = rows_arg(x, n_cols)
    dy2, stride_dy = rows_arg(dy, n_cols)
    n_rows = x.numel() // n_cols
    res2, stride_res = rows_arg(residual, n_cols) if residual is not None else (None, 0)
    weight, x_bias = unit_stride(weight), unit_stride(x_bias)
    has_dropout = seed is not None and dropout_p > 0.0
    act = activation != "none"
    store_dres = (residual is not None and need_dres
                  and (has_dropout or act or residual.dtype != x.dtype))
    # allocated in their final shapes, contiguous: row stride n_cols
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dres = (torch.empty(residual.shape, dtype=residual.dtype, device=x.device)
            if store_dres else None)
    grid = max(1, min(num_programs(x.device, BWD_PROGRAMS_PER_SM), n_rows))
    rows_per_program = cdiv(n_rows, grid) if n_rows > 0 else 0
    # one partial-sum buffer for the parameters present (every program writes its rows)
    n_parts = (weight is not None) + (bias is not None) + (x_bias is not None)
    parts = (torch.empty((n_parts, grid, n_cols), dtype=torch.float32, device=x.device)
             if n_parts else None)
    block_n, num_warps = row_block(n_cols)
    if n_rows > 0:
        launch(
            _layer_norm_bwd_kernel, (grid,),
            x2, x_bias, res2, weight, seed, dy2, mean, rstd, dx, dres, parts,
            stride_x, stride_res, stride_dy, n_cols, n_cols if dres is not None else 0,
            parts.stride(0) if parts is not None else 0,
            n_rows, n_cols, rows_per_program, float(dropout_p),
            BLOCK_N=block_n,
            HAS_X_BIAS=x_bias is not None, ACT_GELU=act, APPROX_TANH=activation == "gelu_tanh",
            HAS_DROPOUT=has_dropout, HAS_RESIDUAL=res2 is not None,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            STORE_DRES=store_dres, COMPUTE_DX_BIAS=x_bias is not None,
            num_warps=num_warps,
        )
    # no rows: no program ran, and the sum over zero rows gives zero gradients
    dw, db, dxb = _sum_param_parts(parts, grid if n_rows > 0 else 0, (weight, bias, x_bias))
    if residual is None or not need_dres:
        dres_out = None
    else:
        dres_out = dres if store_dres else dx
    return dx, dres_out, dw, db, dxb


def aot_configs():
    """Every block config, with all options on (bf16, the heaviest) and all off (fp32), and
    every option combination at hidden 1024 (fp16)."""
    fwd_sig = lambda dt: {
        "x_ptr": f"*{dt}", "x_bias_ptr": f"*{dt}", "res_ptr": f"*{dt}", "w_ptr": "*fp32",
        "b_ptr": "*fp32", "seed_ptr": "*i64", "y_ptr": f"*{dt}", "mean_ptr": "*fp32",
        "rstd_ptr": "*fp32", "stride_x_row": "i64", "stride_res_row": "i64",
        "stride_y_row": "i64", "n_cols": "i32", "eps": "fp32", "dropout_p": "fp32",
        "BLOCK_N": "constexpr", "HAS_X_BIAS": "constexpr", "ACT_GELU": "constexpr",
        "APPROX_TANH": "constexpr", "HAS_DROPOUT": "constexpr", "HAS_RESIDUAL": "constexpr",
        "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr"}
    bwd_sig = lambda dt: {
        "x_ptr": f"*{dt}", "x_bias_ptr": f"*{dt}", "res_ptr": f"*{dt}", "w_ptr": "*fp32",
        "seed_ptr": "*i64", "dy_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
        "dx_ptr": f"*{dt}", "dres_ptr": f"*{dt}", "part_ptr": "*fp32", "stride_x_row": "i64",
        "stride_res_row": "i64", "stride_dy_row": "i64", "stride_dx_row": "i64",
        "stride_dres_row": "i64", "stride_part": "i32", "n_rows": "i32", "n_cols": "i32",
        "rows_per_program": "i32", "dropout_p": "fp32",
        "BLOCK_N": "constexpr", "HAS_X_BIAS": "constexpr", "ACT_GELU": "constexpr",
        "APPROX_TANH": "constexpr", "HAS_DROPOUT": "constexpr", "HAS_RESIDUAL": "constexpr",
        "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr", "STORE_DRES": "constexpr",
        "COMPUTE_DX_BIAS": "constexpr"}

    def flags(xb, act, tanh, drop, res, w, b):
        return dict(HAS_X_BIAS=xb, ACT_GELU=act, APPROX_TANH=tanh, HAS_DROPOUT=drop,
                    HAS_RESIDUAL=res, HAS_WEIGHT=w, HAS_BIAS=b)

    def both(dt, block_n, num_warps, f, tag):
        yield AotConfig(_layer_norm_fwd_kernel, fwd_sig(dt), dict(BLOCK_N=block_n, **f),
                        num_warps, name=f"layer_norm_fwd[{tag}]")
        extra = dict(STORE_DRES=f["HAS_RESIDUAL"] and (f["HAS_DROPOUT"] or f["ACT_GELU"]),
                     COMPUTE_DX_BIAS=f["HAS_X_BIAS"])
        yield AotConfig(_layer_norm_bwd_kernel, bwd_sig(dt), dict(BLOCK_N=block_n, **f, **extra),
                        num_warps, name=f"layer_norm_bwd[{tag}]")

    for block_n, num_warps in row_block_configs():
        yield from both("bf16", block_n, num_warps, flags(*[True] * 7), f"bf16,all,{block_n}")
        yield from both("fp32", block_n, num_warps, flags(*[False] * 7), f"fp32,none,{block_n}")
    block_n, num_warps = row_block(1024)
    for bits in range(1 << 6):
        xb, act, drop, res, w, b = [(bits >> i) & 1 == 1 for i in range(6)]
        yield from both("fp16", block_n, num_warps, flags(xb, act, False, drop, res, w, b),
                        f"fp16,flags={bits:06b}")
    # a float32 residual stream under bf16 x: the residual and its gradient in float32
    f = flags(True, False, False, False, True, True, True)
    yield AotConfig(_layer_norm_fwd_kernel, dict(fwd_sig("bf16"), res_ptr="*fp32", y_ptr="*fp32"),
                    dict(BLOCK_N=block_n, **f), num_warps, name="layer_norm_fwd[bf16,fp32 residual]")
    yield AotConfig(_layer_norm_bwd_kernel,
                    dict(bwd_sig("bf16"), res_ptr="*fp32", dy_ptr="*fp32", dres_ptr="*fp32"),
                    dict(BLOCK_N=block_n, **f, STORE_DRES=True, COMPUTE_DX_BIAS=True), num_warps,
                    name="layer_norm_bwd[bf16,fp32 residual]")
