"""LSTM: one layer, one direction, with variable lengths handled inside the recurrence.

Layers of this file:
    lstm_layer_ref           -- the PyTorch reference (the recurrence in plain PyTorch ops):
                                CPU path, "torch" backend, test oracle; also covers the
                                LayerNorm-LSTM variant
    fastbert::lstm_recurrence_fwd / fastbert::lstm_recurrence_bwd
    fastbert::ln_lstm_recurrence_fwd / fastbert::ln_lstm_recurrence_bwd
                             -- torch.library custom ops over the Triton launchers of
                                kernels/lstm.py (the recurrence only), with fake
                                implementations and registered autograd
    lstm_layer               -- the public function: checks arguments, picks the backend;
                                on "triton" the input projection of all timesteps is one
                                GEMM (cuBLAS, differentiated by autograd) and the recurrence
                                runs in the custom op

Gates are in torch's order (input, forget, cell, output); the cell state is fp32 inside the
kernels. ``fastbert.nn.LSTM`` / ``LayerNormLSTM`` stack layers and directions on top.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ._checks import (FLOAT_DTYPES, autocast_dtype, check_eps, check_same_device, check_shape,
                      check_tensor)
from . import _checks
from ._fastop import fast_op
from ._dispatch import resolve, kernel_module


def _norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def lstm_layer_ref(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                   b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None,
                   w_hr: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None,
                   reverse: bool = False, ln_ih_weight: Optional[Tensor] = None,
                   ln_hh_weight: Optional[Tensor] = None, ln_cell_weight: Optional[Tensor] = None,
                   ln_cell_bias: Optional[Tensor] = None, eps: float = 1e-5,
                   upcast: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer and direction in plain PyTorch ops.

    gates = W_ih x_t + b_ih + W_hh h + b_hh, or with the LayerNorm parameters (the LayerNorm-LSTM
    of haste): LN(W_ih x_t) * ln_ih_weight + b_ih + LN(W_hh h) * ln_hh_weight + b_hh, and then
    h = o * tanh(LN(c) * ln_cell_weight + ln_cell_bias). Each of the three LayerNorms is on when
    its parameters are given (the cell's when either of its two is, as ``F.layer_norm`` takes a
    bias without a weight); the "triton" backend takes all four or none. With ``w_hr`` h is
    projected: h = w_hr @ h. Steps t >= lengths[b] leave b's state unchanged and output zeros.

    Computes in fp32 (fp64 for fp64 inputs or with ``upcast=True``), returns x.dtype.

    Args:
        x: (T, B, I); h0: (B, P) with P = proj_size or H; c0: (B, H).
        w_ih: (4H, I); w_hh: (4H, P); b_ih, b_hh: (4H,) or None; w_hr: (P, H) or None.
        lengths: (B,) integers in [0, T], or None (all T).
        reverse: run from the last valid step of each sequence back to t = 0.

    Returns:
        y (T, B, P), h_n (B, P), c_n (B, H).
    """
    ct = torch.float64 if (upcast or x.dtype == torch.float64) else torch.float32
    cv = lambda t: None if t is None else t.to(ct)
    w_ih, w_hh, b_ih, b_hh, w_hr = map(cv, (w_ih, w_hh, b_ih, b_hh, w_hr))
    g_ih, g_hh, g_c, b_c = map(cv, (ln_ih_weight, ln_hh_weight, ln_cell_weight, ln_cell_bias))
    if torch.jit.is_tracing():
        return _traced_lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                                  (g_ih, g_hh, g_c, b_c), ct)
    n_steps = x.shape[0]
    xg = x.to(ct) @ w_ih.t()  # (T, B, 4H)
    if g_ih is not None:
        xg = _norm(xg, g_ih, None, eps)
    if b_ih is not None:
        xg = xg + b_ih
    h, c = h0.to(ct), c0.to(ct)
    if lengths is not None:
        lens = lengths.to(x.device, non_blocking=x.is_cuda)   # host -> GPU only: no wait
        valid = torch.arange(n_steps, device=x.device)[:, None] < lens[None, :]
        valid = valid[..., None]  # (T, B, 1)
    ys = [None] * n_steps
    for t in (range(n_steps - 1, -1, -1) if reverse else range(n_steps)):
        rec = h @ w_hh.t()
        if g_hh is not None:
            rec = _norm(rec, g_hh, None, eps)
        gates = xg[t] + rec
        if b_hh is not None:
            gates = gates + b_hh
        i, f, g, o = gates.chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_out = _norm(c_new, g_c, b_c, eps) if g_c is not None or b_c is not None else c_new
        h_new = torch.sigmoid(o) * torch.tanh(c_out)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        if lengths is None:
            ys[t], h, c = h_new, h_new, c_new
        else:
            ys[t] = torch.where(valid[t], h_new, 0.0)
            h = torch.where(valid[t], h_new, h)
            c = torch.where(valid[t], c_new, c)
    if n_steps:
        y = torch.stack(ys)
    else:
        # no step: an empty output still in the graph of x (a backward through it runs, as
        # through the kernels'); the final states are copies of h0 / c0, not h0 / c0 themselves
        # (writing into h_n must not change h0, as on the kernels)
        y = xg[..., :h0.shape[-1]] * 0.0
        h, c = h.clone(), c.clone()
    return y.to(x.dtype), h.to(x.dtype), c.to(x.dtype)


def _traced_lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, ln, ct):
    """``lstm_layer_ref`` under torch.jit.trace (weights already in ``ct``): the Python time
    loop would be recorded unrolled at the traced length, and the traced module would then run
    other lengths wrong (only the traced number of steps) or fail. A plain layer without lengths
    is torch's own LSTM kernel instead (``torch.lstm``, one traced node, as torch.nn.LSTM traces:
    on CUDA that is cuDNN's, with its TF32 default (``torch.backends.cudnn.allow_tf32``) and
    its warning about weights outside one contiguous chunk); with lengths or LayerNorm it is
    refused."""
    if lengths is not None or any(t is not None for t in ln):
        raise RuntimeError(
            "torch.jit.trace cannot record this LSTM call on the 'torch' backend: its time loop "
            "would be frozen at the traced sequence length" + (
                " (lengths / a PackedSequence)" if lengths is not None else " (LayerNorm-LSTM)")
            + ". Use torch.export or torch.compile, or the 'triton' backend (one traced op)")
    has_bias = b_ih is not None or b_hh is not None
    if has_bias:  # torch.lstm takes both biases or neither
        b_ih = b_ih if b_ih is not None else torch.zeros_like(b_hh)
        b_hh = b_hh if b_hh is not None else torch.zeros_like(b_ih)
    params = [w_ih, w_hh] + ([b_ih, b_hh] if has_bias else []) + (
        [w_hr] if w_hr is not None else [])
    xs = x.to(ct).flip(0) if reverse else x.to(ct)
    y, h, c = torch.lstm(xs, (h0.to(ct)[None], c0.to(ct)[None]), params, has_bias,
                         1, 0.0, False, False, False)
    if reverse:
        y = y.flip(0)
    return y.to(x.dtype), h[0].to(x.dtype), c[0].to(x.dtype)


# ----------------------------------------------------------------------------------------
# custom ops (Triton backend)

@fast_op("fastbert::lstm_recurrence_fwd", mutates_args=())
def _lstm_recurrence_fwd(xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
                         lengths: Tensor, reverse: bool
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    k = kernel_module("lstm")
    y, hs, cs, gates, rs = k.lstm_fwd(xg, h0, c0, w_hh, w_hr, lengths, reverse)
    n = xg.shape[0]
    # outputs may not alias each other: h_n / c_n are copies of the last state
    return y, hs[n].clone(), cs[n].to(c0.dtype, copy=True), hs, cs, gates, rs


@_lstm_recurrence_fwd.register_fake
def _(xg, h0, c0, w_hh, w_hr, lengths, reverse):
    n_steps, n_batch, n_gates = xg.shape
    n_hidden, n_state = n_gates // 4, w_hh.shape[1]
    return (xg.new_empty((n_steps, n_batch, n_state)), xg.new_empty((n_batch, n_state)),
            c0.new_empty((n_batch, n_hidden)),
            xg.new_empty((n_steps + 1, n_batch, n_state)),
            xg.new_empty((n_steps + 1, n_batch, n_hidden), dtype=torch.float32),
            xg.new_empty((n_steps, n_batch, n_gates)),
            xg.new_empty((n_steps, n_batch, n_hidden)) if w_hr is not None else xg.new_empty(0))


@fast_op("fastbert::lstm_recurrence_bwd", mutates_args=())
def _lstm_recurrence_bwd(dy: Tensor, dh_n: Tensor, dc_n: Tensor, w_hh: Tensor,
                         w_hr: Optional[Tensor], lengths: Tensor, hs: Tensor, cs: Tensor,
                         gates: Tensor, rs: Tensor, reverse: bool
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    k = kernel_module("lstm")
    dxg, dh0, dc0, dw_hh, dw_hr = k.lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, lengths, hs, cs,
                                             gates, rs, reverse)
    return (dxg, dh0.to(hs.dtype), dc0.to(dh_n.dtype), dw_hh.to(w_hh.dtype),
            dw_hr.to(w_hr.dtype) if w_hr is not None else dw_hr)


@_lstm_recurrence_bwd.register_fake
def _(dy, dh_n, dc_n, w_hh, w_hr, lengths, hs, cs, gates, rs, reverse):
    return (gates.new_empty(gates.shape), hs.new_empty(hs.shape[1:]),
            dh_n.new_empty(dc_n.shape), w_hh.new_empty(w_hh.shape),
            w_hr.new_empty(w_hr.shape) if w_hr is not None else dy.new_empty(0, dtype=torch.float32))


def _recurrence_setup(ctx, inputs, output):
    xg, h0, c0, w_hh, w_hr, lengths, reverse = inputs
    y, h_n, c_n, hs, cs, gates, rs = output
    ctx.mark_non_differentiable(hs, cs, gates, rs)
    ctx.save_for_backward(w_hh, w_hr, lengths, hs, cs, gates, rs)
    ctx.reverse = reverse
    ctx.c_dtype = c0.dtype


def _no_double_backward() -> None:
    """Raise in a backward recording a graph (create_graph=True). The recurrence backward's
    kernels have no derivative, and the graph they would leave is partial: with frozen
    recurrent weights no graph at all (a gradient penalty silently dropped), with the
    LayerNorm-LSTM a wrong second derivative (only the part computed by torch ops)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastbert lstm_layer on the Triton kernels has no double backward "
            "(create_graph=True); use backend='torch' (the PyTorch recurrence) for second "
            "derivatives")


def _recurrence_backward(ctx, dy, dh_n, dc_n, *unused):
    _no_double_backward()
    w_hh, w_hr, lengths, hs, cs, gates, rs = ctx.saved_tensors
    n_steps, n_batch = gates.shape[:2]
    n_hidden = gates.shape[2] // 4
    if dy is None:
        dy = hs.new_zeros((n_steps, n_batch, hs.shape[2]))
    if dh_n is None:
        dh_n = hs.new_zeros(hs.shape[1:])
    if dc_n is None:
        dc_n = hs.new_zeros((n_batch, n_hidden), dtype=ctx.c_dtype)
    dxg, dh0, dc0, dw_hh, dw_hr = _lstm_recurrence_bwd(dy, dh_n, dc_n.to(ctx.c_dtype), w_hh,
                                                       w_hr, lengths, hs, cs, gates, rs,
                                                       ctx.reverse)
    need = ctx.needs_input_grad
    return (dxg if need[0] else None, dh0 if need[1] else None, dc0 if need[2] else None,
            dw_hh if need[3] else None, dw_hr if w_hr is not None and need[4] else None,
            None, None)


_lstm_recurrence_fwd.register_autograd(_recurrence_backward, setup_context=_recurrence_setup)


@fast_op("fastbert::ln_lstm_recurrence_fwd", mutates_args=())
def _ln_lstm_recurrence_fwd(xg: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                            w_hr: Optional[Tensor], g_hh: Tensor, g_c: Tensor, b_c: Tensor,
                            lengths: Tensor, reverse: bool, eps: float
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                       Tensor, Tensor]:
    k = kernel_module("lstm")
    y, hs, cs, gates, recs, stats, rs = k.ln_lstm_fwd(xg, h0, c0, w_hh, w_hr, g_hh, g_c, b_c,
                                                      lengths, reverse, eps)
    n = xg.shape[0]
    return y, hs[n].clone(), cs[n].to(c0.dtype, copy=True), hs, cs, gates, recs, stats, rs


@_ln_lstm_recurrence_fwd.register_fake
def _(xg, h0, c0, w_hh, w_hr, g_hh, g_c, b_c, lengths, reverse, eps):
    n_steps, n_batch, n_gates = xg.shape
    n_hidden, n_state = n_gates // 4, w_hh.shape[1]
    return (xg.new_empty((n_steps, n_batch, n_state)), xg.new_empty((n_batch, n_state)),
            c0.new_empty((n_batch, n_hidden)), xg.new_empty((n_steps + 1, n_batch, n_state)),
            xg.new_empty((n_steps + 1, n_batch, n_hidden), dtype=torch.float32),
            # gates and recs are fp32 (kernels/lstm.py: what the LayerNorms normalize)
            xg.new_empty((n_steps, n_batch, n_gates), dtype=torch.float32),
            xg.new_empty((n_steps, n_batch, n_gates), dtype=torch.float32),
            xg.new_empty((n_steps, n_batch, 4), dtype=torch.float32),
            xg.new_empty((n_steps, n_batch, n_hidden)) if w_hr is not None else xg.new_empty(0))


@fast_op("fastbert::ln_lstm_recurrence_bwd", mutates_args=())
def _ln_lstm_recurrence_bwd(dy: Tensor, dh_n: Tensor, dc_n: Tensor, w_hh: Tensor,
                            w_hr: Optional[Tensor], g_hh: Tensor, g_c: Tensor, b_c: Tensor,
                            lengths: Tensor, hs: Tensor, cs: Tensor, gates: Tensor, recs: Tensor,
                            stats: Tensor, rs: Tensor, reverse: bool
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                       Tensor]:
    k = kernel_module("lstm")
    dxg, dh0, dc0, dw_hh, dw_hr, dg_hh, dg_c, db_c = k.ln_lstm_bwd(
        dy, dh_n, dc_n, w_hh, w_hr, g_hh, g_c, b_c, lengths, hs, cs, gates, recs, stats, rs,
        reverse)
    return (dxg, dh0.to(hs.dtype), dc0.to(dh_n.dtype), dw_hh.to(w_hh.dtype),
            dw_hr.to(w_hr.dtype) if w_hr is not None else dw_hr, dg_hh.to(g_hh.dtype),
            dg_c.to(g_c.dtype), db_c.to(b_c.dtype))


@_ln_lstm_recurrence_bwd.register_fake
def _(dy, dh_n, dc_n, w_hh, w_hr, g_hh, g_c, b_c, lengths, hs, cs, gates, recs, stats, rs,
      reverse):
    return (hs.new_empty(gates.shape), hs.new_empty(hs.shape[1:]), dh_n.new_empty(dc_n.shape),
            w_hh.new_empty(w_hh.shape),
            w_hr.new_empty(w_hr.shape) if w_hr is not None else dy.new_empty(0, dtype=torch.float32),
            g_hh.new_empty(g_hh.shape), g_c.new_empty(g_c.shape), b_c.new_empty(b_c.shape))


def _ln_recurrence_setup(ctx, inputs, output):
    xg, h0, c0, w_hh, w_hr, g_hh, g_c, b_c, lengths, reverse, eps = inputs
    y, h_n, c_n, hs, cs, gates, recs, stats, rs = output
    ctx.mark_non_differentiable(hs, cs, gates, recs, stats, rs)
    ctx.save_for_backward(w_hh, w_hr, g_hh, g_c, b_c, lengths, hs, cs, gates, recs, stats, rs)
    ctx.reverse = reverse
    ctx.c_dtype = c0.dtype


def _ln_recurrence_backward(ctx, dy, dh_n, dc_n, *unused):
    _no_double_backward()
    w_hh, w_hr, g_hh, g_c, b_c, lengths, hs, cs, gates, recs, stats, rs = ctx.saved_tensors
    n_steps, n_batch, n_state = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    n_hidden = cs.shape[2]
    if dy is None:
        dy = hs.new_zeros((n_steps, n_batch, n_state))
    if dh_n is None:
        dh_n = hs.new_zeros((n_batch, n_state))
    if dc_n is None:
        dc_n = hs.new_zeros((n_batch, n_hidden), dtype=ctx.c_dtype)
    grads = _ln_lstm_recurrence_bwd(dy, dh_n, dc_n.to(ctx.c_dtype), w_hh, w_hr, g_hh, g_c, b_c,
                                    lengths, hs, cs, gates, recs, stats, rs, ctx.reverse)
    need = ctx.needs_input_grad
    # grads follow the inputs xg, h0, c0, w_hh, w_hr, g_hh, g_c, b_c (a None w_hr needs no
    # grad: its slot is an empty placeholder); then lengths, reverse, eps
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None, None, None)


_ln_lstm_recurrence_fwd.register_autograd(_ln_recurrence_backward, setup_context=_ln_recurrence_setup)


# FLOPs for torch.utils.flop_counter.FlopCounterMode (MFU estimates), counted as torch counts
# its own LSTM's matmuls: per step the recurrent GEMM h @ W_hh^T (2 B 4H S, S the state size:
# hidden, or proj_size with a projection) and the projection r @ W_hr^T (2 B P H); the
# backward twice that (the state gradient through W_hh, W_hr and the weight gradients). Every
# step of the padded (T, B) input counts, as the kernels run them (torch counts the same for
# padded input; for a PackedSequence it runs, and counts, only the valid rows). The input
# projection is the caller's GEMM, which FlopCounterMode sees itself; the LayerNorms count 0.
def _recurrence_flops(xg: Tensor, w_hh: Tensor, w_hr: Optional[Tensor]) -> int:
    n_steps, n_batch, n_gates = xg.shape
    flops = 2 * n_batch * n_gates * w_hh.shape[1]
    if w_hr is not None:
        flops += 2 * n_batch * w_hr.shape[0] * w_hr.shape[1]
    return n_steps * flops


try:
    from torch.utils.flop_counter import register_flop_formula as _flops_formula
except ImportError:  # pragma: no cover - a torch without the FLOP counter
    _flops_formula = None
if _flops_formula is not None:
    @_flops_formula(torch.ops.fastbert.lstm_recurrence_fwd, get_raw=True)
    def _(xg, h0, c0, w_hh, w_hr, *args, out_shape=None, **kwargs) -> int:
        return _recurrence_flops(xg, w_hh, w_hr)

    @_flops_formula(torch.ops.fastbert.ln_lstm_recurrence_fwd, get_raw=True)
    def _(xg, h0, c0, w_hh, w_hr, *args, out_shape=None, **kwargs) -> int:
        return _recurrence_flops(xg, w_hh, w_hr)

    @_flops_formula(torch.ops.fastbert.lstm_recurrence_bwd, get_raw=True)
    def _(dy, dh_n, dc_n, w_hh, w_hr, lengths, hs, cs, gates, *args, out_shape=None,
          **kwargs) -> int:
        return 2 * _recurrence_flops(gates, w_hh, w_hr)

    @_flops_formula(torch.ops.fastbert.ln_lstm_recurrence_bwd, get_raw=True)
    def _(dy, dh_n, dc_n, w_hh, w_hr, g_hh, g_c, b_c, lengths, hs, cs, gates, *args,
          out_shape=None, **kwargs) -> int:
        return 2 * _recurrence_flops(gates, w_hh, w_hr)


# ----------------------------------------------------------------------------------------
# public API

def _check_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths):
    check_tensor("x", x, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=(3,))
    check_tensor("w_ih", w_ih, dtypes=(x.dtype,), ndim=(2,))
    n_gates = w_ih.shape[0]
    if n_gates == 0 or n_gates % 4:
        raise ValueError(f"w_ih must have 4 * hidden_size rows, got shape {tuple(w_ih.shape)}")
    n_hidden = n_gates // 4
    n_steps, n_batch, n_in = x.shape
    if w_ih.shape[1] != n_in:
        raise ValueError(f"x has {n_in} features but w_ih expects {w_ih.shape[1]} "
                         f"(shape {tuple(w_ih.shape)})")
    check_tensor("w_hr", w_hr, dtypes=(x.dtype,), ndim=(2,), optional=True)
    n_state = w_hr.shape[0] if w_hr is not None else n_hidden
    check_shape("w_hr", w_hr, (n_state, n_hidden), "(proj_size, hidden_size)")
    check_tensor("w_hh", w_hh, dtypes=(x.dtype,))
    check_shape("w_hh", w_hh, (n_gates, n_state), "(4 * hidden_size, proj_size or hidden_size)")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        check_tensor(name, b, dtypes=(x.dtype,), optional=True)
        check_shape(name, b, (n_gates,), "4 * hidden_size")
    check_tensor("h0", h0, dtypes=(x.dtype,))
    check_shape("h0", h0, (n_batch, n_state), "(batch, proj_size or hidden_size)")
    check_tensor("c0", c0, dtypes=(x.dtype,))
    check_shape("c0", c0, (n_batch, n_hidden), "(batch, hidden_size)")
    check_same_device(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
    if lengths is not None:
        if isinstance(lengths, Tensor) and lengths.is_cpu:
            check_not_capturing(x, "lengths on the CPU")
        check_lengths(lengths, n_batch, n_steps)   # a non-tensor: its TypeError


def check_not_capturing(x: Tensor, what: str) -> None:
    """Raise while x's CUDA stream is captured into a CUDA graph; for lengths that are host
    data (``what`` names them): the graph would keep the copy of their host memory made at
    capture (read again at every replay, and freed for a temporary) and the decisions taken
    from their values then (the padding skipped or zeroed): silently wrong at a replay."""
    if _checks.capturing(x):
        raise RuntimeError(
            f"LSTM: {what} cannot be captured in a CUDA graph (the graph would replay the "
            f"values read at capture); pass lengths as a CUDA tensor (checked and applied on "
            f"the device), or capture the padded input without lengths")


def _check_layer_norm_args(x: Tensor, n_hidden: int, ln_ih_weight, ln_hh_weight, ln_cell_weight,
                           ln_cell_bias) -> None:
    # the row kernels read these with the sizes below: a wrong size would read out of bounds
    for name, t, n, what in (("ln_ih_weight", ln_ih_weight, 4 * n_hidden, "4 * hidden_size"),
                             ("ln_hh_weight", ln_hh_weight, 4 * n_hidden, "4 * hidden_size"),
                             ("ln_cell_weight", ln_cell_weight, n_hidden, "hidden_size"),
                             ("ln_cell_bias", ln_cell_bias, n_hidden, "hidden_size")):
        check_tensor(name, t, dtypes=(x.dtype,), optional=True)
        check_shape(name, t, (n,), what)
    check_same_device(x=x, ln_ih_weight=ln_ih_weight, ln_hh_weight=ln_hh_weight,
                      ln_cell_weight=ln_cell_weight, ln_cell_bias=ln_cell_bias)


def check_lengths(lengths: Tensor, n_batch: int, n_steps: int, *, allow_zero: bool = True,
                  sorted_desc: bool = False, name: str = "lengths") -> None:
    """lengths: an integer tensor (B,) with values in [0 or 1, T] (and in decreasing order
    with ``sorted_desc``, the rule of enforce_sorted=True), on any device but "meta" (its
    values are read). The value check reads the lengths (one sync for CUDA lengths; pass CPU
    lengths, as pack_padded_sequence wants), and runs on the device instead while
    torch.compile or torch.export traces and while a CUDA graph is captured (a device-side
    assert, a RuntimeError on the CPU: no host read). ``name`` is the argument's name in the
    messages."""
    # bool is rejected too: a (B,) mask passed as lengths would read as lengths 0 / 1
    if (not isinstance(lengths, torch.Tensor) or lengths.is_floating_point()
            or lengths.is_complex() or lengths.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got "
                        f"{lengths.dtype if isinstance(lengths, torch.Tensor) else type(lengths).__name__}")
    if lengths.dim() != 1 or lengths.shape[0] != n_batch:
        raise ValueError(f"{name} must have shape ({n_batch},) (one length per batch entry), "
                         f"got {tuple(lengths.shape)}")
    if lengths.is_meta:
        raise ValueError(f"{name} is on the meta device, which holds no values; pass the "
                         "lengths on the CPU or on the input's device")
    tracing = _checks.tracing()
    if n_batch and (tracing or not is_fake(lengths)):
        least = 0 if allow_zero else 1
        if tracing or _checks.capturing(lengths):
            ok = (lengths >= least).all() & (lengths <= n_steps).all()
            if sorted_desc and n_batch > 1:
                ok = ok & (lengths[1:] <= lengths[:-1]).all()
            torch._assert_async(ok, f"{name} must be in [{least}, {n_steps}]"
                                    + (" and sorted in decreasing order" if sorted_desc else ""))
            return
        lengths = lengths.cpu()   # one host read (none for CPU lengths)
        lo, hi = torch.stack(torch.aminmax(lengths)).tolist()
        if hi > n_steps:
            raise ValueError(f"{name} has a length {hi} longer than the sequence ({n_steps} steps)")
        if lo < least:
            raise ValueError(f"{name} must be >= {least}, got {lo}")
        if sorted_desc and n_batch > 1 and bool((lengths[1:] > lengths[:-1]).any()):
            raise ValueError(f"{name} must be sorted in decreasing order when "
                             "enforce_sorted=True; pass enforce_sorted=False for unsorted lengths")


def _zero_past_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """x (T, B, I) with every step t >= lengths[b] of sequence b set to 0. Those steps never
    reach the output, but the weight gradient of the input projection sums dxg^T x over all
    of them: its zeros times a NaN or inf in the padding would be NaN. Unchanged (no op) when
    no sequence is shorter than T, read without a sync from CPU lengths."""
    n_steps = x.shape[0]
    # (not while traced, by torch.jit.trace too: the trace would keep the shortcut for every
    # later lengths)
    if (lengths.is_cpu and not _checks.tracing() and not torch.jit.is_tracing()
            and not is_fake(lengths)):
        if lengths.numel() == 0 or int(lengths.min()) >= n_steps:
            return x
    # non-blocking only host -> GPU: a GPU -> host copy would be read before it lands
    lens = lengths.to(device=x.device, non_blocking=x.is_cuda)
    keep = torch.arange(n_steps, device=x.device)[:, None] < lens[None, :]
    return x.masked_fill(~keep[..., None], 0)


def _triton_check(x: Tensor) -> Optional[str]:
    if x.dtype not in FLOAT_DTYPES:
        return f"the kernels take float32/float16/bfloat16, got {x.dtype}"
    return None


def _resolve(tensors, backend: Optional[str], extra) -> str:
    return resolve("lstm", tensors, backend, preference=("triton",), extra_check=extra)


def _has_layer_norm(ln) -> bool:
    return any(t is not None for t in ln)


def lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
               b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None,
               w_hr: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None,
               reverse: bool = False, ln_ih_weight: Optional[Tensor] = None,
               ln_hh_weight: Optional[Tensor] = None, ln_cell_weight: Optional[Tensor] = None,
               ln_cell_bias: Optional[Tensor] = None, eps: float = 1e-5,
               backend: Optional[str] = None,
               _padding_zeroed: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction over a padded batch with optional lengths.

    Args:
        x: (T, B, I) float32 / float16 / bfloat16 (float64 on the "torch" backend).
        h0: (B, P) initial hidden state (P = proj_size, or H without projection);
            c0: (B, H) initial cell state. Same dtype as x.
        w_ih: (4H, I), w_hh: (4H, P), b_ih / b_hh: (4H,) or None, w_hr: (P, H) or None;
            gate order (input, forget, cell, output) as in ``torch.nn.LSTM``.
        lengths: (B,) integer tensor with values in [0, T] (any device, any order), or None.
            Steps t >= lengths[b] leave b's state unchanged and output zeros, so h_n / c_n
            are each sequence's state after its last valid step (in both directions). The
            padding's values are never used: NaN there leaves outputs and gradients finite.
            CUDA lengths are read once to check them (a device-side assert while a CUDA graph
            is captured, where CPU lengths are refused); the Triton backend saves int64 lengths
            as they are for the backward (changing them in place before it raises).
        reverse: process time backwards (the reverse direction of a bidirectional LSTM).
        ln_ih_weight, ln_hh_weight (4H,), ln_cell_weight, ln_cell_bias (H,), x's dtype:
            LayerNorm-LSTM parameters (see ``lstm_layer_ref``); the "triton" backend needs
            all four and H <= 2048.
        eps: LayerNorm epsilon.
        backend: "triton", "torch" or None (see ``fastbert.ops``).
        _padding_zeroed: internal (``fastbert.nn.LSTM``): x is already zero past each length
            (a PackedSequence unpacked, an earlier layer's output), so no masked copy of it.

    Returns:
        y (T, B, P), h_n (B, P), c_n (B, H), in x's dtype.

    Under autocast for x's device every floating tensor argument but a float64 one runs in
    the autocast dtype, and so do the results, as torch.nn.LSTM under autocast.
    """
    dt = autocast_dtype(x) if isinstance(x, Tensor) and x.dtype != torch.float64 else None
    if dt is not None:
        dev = x.device.type

        def cast(t):
            return (t.to(dt) if isinstance(t, Tensor) and t.is_floating_point()
                    and t.dtype != torch.float64 else t)
        # the rest without autocast: its F.linear / F.layer_norm would otherwise hand the
        # kernels tensors of another dtype than the cast weights
        with torch.autocast(dev, enabled=False):
            return _lstm_layer(cast(x), cast(h0), cast(c0), cast(w_ih), cast(w_hh), cast(b_ih),
                               cast(b_hh), cast(w_hr), lengths, reverse, cast(ln_ih_weight),
                               cast(ln_hh_weight), cast(ln_cell_weight), cast(ln_cell_bias),
                               eps, backend, _padding_zeroed)
    return _lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, ln_ih_weight,
                       ln_hh_weight, ln_cell_weight, ln_cell_bias, eps, backend,
                       _padding_zeroed)


def _lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, ln_ih_weight,
                ln_hh_weight, ln_cell_weight, ln_cell_bias, eps, backend, _padding_zeroed):
    """``lstm_layer`` once autocast is settled."""
    _check_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    check_eps("lstm_layer", eps)
    if lengths is not None and not _padding_zeroed:
        x = _zero_past_lengths(x, lengths)
    ln = (ln_ih_weight, ln_hh_weight, ln_cell_weight, ln_cell_bias)
    _check_layer_norm_args(x, w_ih.shape[0] // 4, *ln)

    def extra(b):
        if _has_layer_norm(ln):
            from fastbert.kernels.lstm import LN_MAX_HIDDEN
            if not all(t is not None for t in ln):
                return ("the LayerNorm-LSTM kernel needs all of ln_ih_weight, ln_hh_weight, "
                        "ln_cell_weight and ln_cell_bias")
            n_hidden = w_ih.shape[0] // 4
            if n_hidden > LN_MAX_HIDDEN:
                return (f"hidden size {n_hidden} exceeds the LayerNorm-LSTM kernel's "
                        f"limit {LN_MAX_HIDDEN}")
        return _triton_check(x)

    chosen = _resolve((x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), backend, extra)
    if chosen == "torch":
        return lstm_layer_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths=lengths,
                              reverse=reverse, ln_ih_weight=ln_ih_weight,
                              ln_hh_weight=ln_hh_weight, ln_cell_weight=ln_cell_weight,
                              ln_cell_bias=ln_cell_bias, eps=eps)
    n_steps, n_batch = x.shape[:2]
    if b_ih is not None and b_hh is not None:
        bias = b_ih + b_hh
    else:
        bias = b_ih if b_ih is not None else b_hh
    if lengths is None:
        lens = torch.full((n_batch,), n_steps, dtype=torch.int64, device=x.device)
    else:
        # non-blocking only host -> GPU: a GPU -> host copy (CUDA lengths, CPU x) would be
        # read by the kernels before it lands
        lens = lengths.to(device=x.device, dtype=torch.int64, non_blocking=x.is_cuda)
    if _has_layer_norm(ln):
        # every step's input projection and its LayerNorm at once (one GEMM, one LayerNorm)
        xg = F.layer_norm(F.linear(x, w_ih), (w_ih.shape[0],), ln_ih_weight, None, eps)
        if bias is not None:
            xg = xg + bias
        y, h_n, c_n, *_ = _ln_lstm_recurrence_fwd(xg, h0, c0, w_hh, w_hr, ln_hh_weight,
                                                  ln_cell_weight, ln_cell_bias, lens,
                                                  bool(reverse), float(eps))
        return y, h_n, c_n
    xg = F.linear(x, w_ih, bias)  # (T, B, 4H): every step's input projection in one GEMM
    y, h_n, c_n, *_ = _lstm_recurrence_fwd(xg, h0, c0, w_hh, w_hr, lens, bool(reverse))
    return y, h_n, c_n
