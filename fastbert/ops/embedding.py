"""``embedding_layer_norm``: BERT's embedding layer,
``dropout(LayerNorm(word[ids] + position[pos] + type[types]))``, on one fused Triton kernel
pair (see kernels/embedding.py).

Layers of this file:
    embedding_layer_norm_ref  -- the PyTorch reference: CPU path, "torch" backend, test oracle
    fastbert::embedding_layer_norm_fwd / fastbert::embedding_layer_norm_bwd
                              -- torch.library custom ops over the Triton launchers, with fake
                                 implementations and registered autograd
    embedding_layer_norm      -- the public function: checks arguments and index bounds,
                                 picks the backend, draws the dropout seed
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import (FLOAT_DTYPES, REF_DTYPES, check_eps, check_probability, check_same_device,
                      check_shape, check_tensor, cuda_autocast_layer_norm_fp32, has_values,
                      kernel_dtype_reason, dropout_seed)
from . import _checks
from ._fastop import direct_call_ok, fast_op
from ._dispatch import kernel_module, resolve

INDEX_DTYPES = (torch.int32, torch.int64)


def embedding_layer_norm_ref(input_ids: Tensor, word_weight: Tensor, position_weight: Tensor,
                             ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                             eps: float = 1e-12, *, token_type_ids: Optional[Tensor] = None,
                             type_weight: Optional[Tensor] = None,
                             position_ids: Optional[Tensor] = None, dropout_p: float = 0.0,
                             padding_idx: Optional[int] = None,
                             dropout_mask: Optional[Tensor] = None, upcast: bool = False,
                             out_dtype: Optional[torch.dtype] = None,
                             zero_out_of_range: bool = False) -> Tensor:
    """dropout(LayerNorm(word[ids] + position[pos] + type[types])) in PyTorch.

    Positions default to 0..S-1 (S = input_ids.shape[-1]); types default to 0 and are left
    out when ``type_weight`` is None. ``padding_idx`` gets no gradient (``F.embedding``).
    Computes in fp32 (fp64 with ``upcast=True`` or fp64 tables) and returns ``out_dtype``
    (default word_weight's dtype). ``dropout_mask`` (bool, the output's shape) replaces the
    random draw: tests pass the kernel's mask. With ``zero_out_of_range`` an id outside its
    table reads a zero row and gives no gradient (as the kernels without their bounds check)
    instead of failing the lookup.
    """
    def lookup(ids, table, padding_idx=None):
        if not zero_out_of_range:
            return F.embedding(ids, table, padding_idx=padding_idx)
        ok = (ids >= 0) & (ids < table.shape[0])
        rows = F.embedding(ids.clamp(0, max(table.shape[0] - 1, 0)), table,
                           padding_idx=padding_idx)
        return torch.where(ok[..., None], rows, rows.new_zeros(()))

    ct = torch.float64 if (upcast or word_weight.dtype == torch.float64) else torch.float32
    out_dtype = out_dtype or word_weight.dtype
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)
    position_ids = torch.broadcast_to(position_ids, input_ids.shape)
    s = lookup(input_ids, word_weight.to(ct), padding_idx)
    s = s + lookup(position_ids, position_weight.to(ct))
    if type_weight is not None:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        s = s + lookup(torch.broadcast_to(token_type_ids, input_ids.shape), type_weight.to(ct))
    y = F.layer_norm(s, s.shape[-1:],
                     ln_weight.to(ct) if ln_weight is not None else None,
                     ln_bias.to(ct) if ln_bias is not None else None, eps)
    if dropout_p > 0.0:
        if dropout_mask is not None:
            y = y * dropout_mask.to(ct) / (1.0 - dropout_p)
        else:
            y = F.dropout(y, dropout_p, training=True)
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------
# custom ops (Triton backend)

@fast_op("fastbert::embedding_layer_norm_fwd", mutates_args=())
def _embedding_layer_norm_fwd(input_ids: Tensor, word_weight: Tensor, position_weight: Tensor,
                              ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                              position_ids: Optional[Tensor], token_type_ids: Optional[Tensor],
                              type_weight: Optional[Tensor], seed: Optional[Tensor], eps: float,
                              dropout_p: float, padding_idx: int, deterministic: bool,
                              out_fp32: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return kernel_module("embedding").embedding_layer_norm_fwd(
        input_ids, word_weight, position_weight, ln_weight, ln_bias, eps, position_ids,
        token_type_ids, type_weight, seed, dropout_p, torch.float32 if out_fp32 else None)


@_embedding_layer_norm_fwd.register_fake
def _(input_ids, word_weight, position_weight, ln_weight, ln_bias, position_ids, token_type_ids,
      type_weight, seed, eps, dropout_p, padding_idx, deterministic, out_fp32):
    n_cols = word_weight.shape[-1]
    rows = input_ids.numel()
    return (word_weight.new_empty((*input_ids.shape, n_cols),
                                  dtype=torch.float32 if out_fp32 else word_weight.dtype),
            word_weight.new_empty((rows,), dtype=torch.float32),
            word_weight.new_empty((rows,), dtype=torch.float32))


@fast_op("fastbert::embedding_layer_norm_bwd", mutates_args=())
def _embedding_layer_norm_bwd(dy: Tensor, input_ids: Tensor, word_weight: Tensor,
                              position_weight: Tensor, ln_weight: Optional[Tensor],
                              ln_bias: Optional[Tensor], position_ids: Optional[Tensor],
                              token_type_ids: Optional[Tensor], type_weight: Optional[Tensor],
                              seed: Optional[Tensor], mean: Tensor, rstd: Tensor,
                              dropout_p: float, padding_idx: int,
                              deterministic: bool) -> List[Tensor]:
    grads = kernel_module("embedding").embedding_layer_norm_bwd(
        dy, input_ids, word_weight, position_weight, ln_weight, ln_bias, mean, rstd,
        position_ids, token_type_ids, type_weight, seed, dropout_p, padding_idx, deterministic)
    return [g if g is not None else word_weight.new_empty(0) for g in grads]


@_embedding_layer_norm_bwd.register_fake
def _(dy, input_ids, word_weight, position_weight, ln_weight, ln_bias, position_ids,
      token_type_ids, type_weight, seed, mean, rstd, dropout_p, padding_idx, deterministic):
    like = lambda t: t.new_empty(t.shape) if t is not None else word_weight.new_empty(0)
    return [like(word_weight), like(position_weight), like(type_weight), like(ln_weight),
            like(ln_bias)]


def _setup(ctx, inputs, output):
    (input_ids, word_weight, position_weight, ln_weight, ln_bias, position_ids, token_type_ids,
     type_weight, seed, eps, dropout_p, padding_idx, deterministic, out_fp32) = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input_ids, word_weight, position_weight, ln_weight, ln_bias,
                          position_ids, token_type_ids, type_weight, seed, mean, rstd)
    ctx.args = (dropout_p, padding_idx, deterministic)
    # mean and rstd get no gradient: no zero tensors made for them at each backward
    ctx.set_materialize_grads(False)


def _grads(ctx, dy: Tensor, direct: bool) -> Tuple[Optional[Tensor], ...]:
    """(dword, dpos, dln_weight, dln_bias, dtype), None where no gradient is needed, from what
    _setup or _EmbeddingLayerNormFunction saved: by fastbert::embedding_layer_norm_bwd, or
    with ``direct`` by its launcher alone (the same results, without the op's placeholders
    for absent parameters)."""
    (input_ids, word_weight, position_weight, ln_weight, ln_bias, position_ids, token_type_ids,
     type_weight, seed, mean, rstd) = ctx.saved_tensors
    if direct:
        dword, dpos, dtyp, dlnw, dlnb = kernel_module("embedding").embedding_layer_norm_bwd(
            dy, input_ids, word_weight, position_weight, ln_weight, ln_bias, mean, rstd,
            position_ids, token_type_ids, type_weight, seed, *ctx.args)
    else:
        dword, dpos, dtyp, dlnw, dlnb = _embedding_layer_norm_bwd(
            dy, input_ids, word_weight, position_weight, ln_weight, ln_bias, position_ids,
            token_type_ids, type_weight, seed, mean, rstd, *ctx.args)
    need = ctx.needs_input_grad
    return (dword if need[1] else None,
            dpos if need[2] else None,
            dlnw if ln_weight is not None and need[3] else None,
            dlnb if ln_bias is not None and need[4] else None,
            dtyp if type_weight is not None and need[7] else None)


def _backward(ctx, dy, dmean, drstd):
    if dy is None:
        return (None,) * 14
    dword, dpos, dlnw, dlnb, dtyp = _grads(ctx, dy, False)
    return (None, dword, dpos, dlnw, dlnb, None, None, dtyp, None, None, None, None, None, None)


_embedding_layer_norm_fwd.register_autograd(_backward, setup_context=_setup)


class _EmbeddingLayerNormFunction(torch.autograd.Function):
    """fastbert::embedding_layer_norm_fwd's autograd for eager calls that fast_op would send
    down its direct path (no tracing, no mode, plain tensors): the same launchers, saved
    tensors and backward as the registered autograd, with less host work (the layer runs
    once per step, at host-bound sizes):
      - one output: mean and rstd are saved, not returned, so autograd neither wraps two more
        outputs nor checks their (absent) gradients at every backward;
      - ten inputs instead of thirteen (the python scalars travel as one tuple), and no
        generic scan of the arguments;
      - the backward calls the launcher itself, unless something must see the custom op: a
        graph being recorded (create_graph=True, where the op raises that it has no
        derivative rather than give wrong second derivatives) or a mode.
    """

    @staticmethod
    def forward(ctx, input_ids, word_weight, position_weight, ln_weight, ln_bias, position_ids,
                token_type_ids, type_weight, seed, args):
        eps, dropout_p, padding_idx, deterministic, out_fp32 = args
        y, mean, rstd = kernel_module("embedding").embedding_layer_norm_fwd(
            input_ids, word_weight, position_weight, ln_weight, ln_bias, eps, position_ids,
            token_type_ids, type_weight, seed, dropout_p, torch.float32 if out_fp32 else None)
        ctx.save_for_backward(input_ids, word_weight, position_weight, ln_weight, ln_bias,
                              position_ids, token_type_ids, type_weight, seed, mean, rstd)
        ctx.args = (dropout_p, padding_idx, deterministic)
        return y

    @staticmethod
    def backward(ctx, dy):
        direct = not torch.is_grad_enabled() and direct_call_ok((dy,))
        dword, dpos, dlnw, dlnb, dtyp = _grads(ctx, dy, direct)
        return None, dword, dpos, dlnw, dlnb, None, None, dtyp, None, None


def _run(input_ids: Tensor, word_weight: Tensor, position_weight: Tensor,
         ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], position_ids: Optional[Tensor],
         token_type_ids: Optional[Tensor], type_weight: Optional[Tensor],
         seed: Optional[Tensor], args: tuple) -> Tensor:
    """fastbert::embedding_layer_norm_fwd's output (``args``: eps, dropout_p, padding_idx,
    deterministic, out_fp32) by the cheapest route with its semantics: _EmbeddingLayerNormFunction when
    a gradient is recorded, the launcher alone when none is, the custom op when something
    must see it."""
    tensors = (input_ids, word_weight, position_weight, ln_weight, ln_bias, position_ids,
               token_type_ids, type_weight)
    if not direct_call_ok(tensors):
        return _embedding_layer_norm_fwd(*tensors, seed, *args)[0]
    if torch.is_grad_enabled() and (word_weight.requires_grad or position_weight.requires_grad
                                    or (ln_weight is not None and ln_weight.requires_grad)
                                    or (ln_bias is not None and ln_bias.requires_grad)
                                    or (type_weight is not None and type_weight.requires_grad)):
        return _EmbeddingLayerNormFunction.apply(*tensors, seed, args)
    return kernel_module("embedding").embedding_layer_norm_fwd(
        input_ids, word_weight, position_weight, ln_weight, ln_bias, args[0], position_ids,
        token_type_ids, type_weight, seed, args[1], torch.float32 if args[4] else None)[0]


# ----------------------------------------------------------------------------------------
# public API

def _autocast_fp32(word_weight: Tensor) -> bool:
    """Whether the output is float32 although the tables are 16-bit: the unfused embedding
    sum + LayerNorm returns what torch's layer_norm returns, float32 under CUDA autocast
    whatever the tables' dtype, as fastbert's layer_norm does."""
    return (word_weight.dtype in (torch.float16, torch.bfloat16)
            and cuda_autocast_layer_norm_fp32(word_weight.dtype, word_weight.is_cuda))


def _width_check(n_cols: int) -> Optional[str]:
    from fastbert.kernels.embedding import MAX_EMBED_COLS
    if n_cols > MAX_EMBED_COLS:
        return f"the hidden size {n_cols} exceeds the fused kernels' limit {MAX_EMBED_COLS}"
    return None


def _resolve(tensors, backend: Optional[str], n_cols: int, dtype_reason: Optional[str]) -> str:
    """``dtype_reason``: why the kernels cannot take the tables' dtypes (float64), or None."""
    return resolve("embedding_layer_norm", tensors, backend, preference=("triton",),
                   extra_check=lambda b: _width_check(n_cols) or dtype_reason)


def _check_index_tensor(name: str, t: Optional[Tensor], ids_shape) -> None:
    check_tensor(name, t, dtypes=INDEX_DTYPES, optional=True)
    if t is None:
        return
    # broadcastable to ids_shape (and not growing it): align from the right, each of t's
    # sizes 1 or equal (torch.broadcast_shapes costs ~60 us a call)
    ok = t.dim() <= len(ids_shape) and all(
        n == 1 or n == m for n, m in zip(reversed(t.shape), reversed(ids_shape)))
    if not ok:
        raise ValueError(f"{name} must be broadcastable to input_ids' shape {tuple(ids_shape)}, "
                         f"got shape {tuple(t.shape)}")


def _args_ok(input_ids, word_weight, position_weight, ln_weight, ln_bias, eps,
             token_type_ids, type_weight, position_ids, dropout_p) -> bool:
    """Whether ``_check_args`` passes, tested cheaply for the usual call (the layer runs at
    every step, at host-bound sizes): False only sends the call through ``_check_args``,
    which names what is wrong (or passes a call this test does not cover, e.g. broadcast
    token type ids)."""
    if not (isinstance(input_ids, Tensor) and isinstance(word_weight, Tensor)
            and isinstance(position_weight, Tensor)):
        return False
    ws, ps, dev, ids_shape = word_weight.shape, position_weight.shape, word_weight.device, \
        input_ids.shape
    if not (input_ids.dtype in INDEX_DTYPES and len(ids_shape) >= 1
            and word_weight.dtype in FLOAT_DTYPES and len(ws) == 2 and ws[1] > 0
            and position_weight.dtype in FLOAT_DTYPES and len(ps) == 2 and ps[1] == ws[1]
            and input_ids.device == dev and position_weight.device == dev
            and type(eps) is float and 0.0 < eps < math.inf
            and type(dropout_p) in (float, int) and 0.0 <= dropout_p < 1.0):
        return False
    if position_ids is not None or ids_shape[-1] > ps[0]:
        return False
    for v in (ln_weight, ln_bias):
        if v is not None and not (isinstance(v, Tensor) and v.dtype in FLOAT_DTYPES
                                  and v.shape == ws[1:] and v.device == dev):
            return False
    if type_weight is None:
        return token_type_ids is None
    if not (isinstance(type_weight, Tensor) and type_weight.dtype in FLOAT_DTYPES
            and type_weight.dim() == 2 and type_weight.shape[1] == ws[1]
            and type_weight.device == dev):
        return False
    return token_type_ids is None or (isinstance(token_type_ids, Tensor)
                                      and token_type_ids.dtype in INDEX_DTYPES
                                      and token_type_ids.shape == ids_shape
                                      and token_type_ids.device == dev)


def _check_args(input_ids, word_weight, position_weight, ln_weight, ln_bias, eps,
                token_type_ids, type_weight, position_ids, dropout_p):
    check_tensor("input_ids", input_ids, dtypes=INDEX_DTYPES)
    if input_ids.dim() < 1:
        raise ValueError("input_ids must have at least one dimension (the sequence), got a scalar")
    check_tensor("word_weight", word_weight, dtypes=REF_DTYPES, ndim=(2,))
    n_cols = word_weight.shape[1]
    if n_cols == 0:
        raise ValueError("word_weight must have a non-empty hidden dimension, got shape "
                         f"{tuple(word_weight.shape)}")
    check_tensor("position_weight", position_weight, dtypes=REF_DTYPES, ndim=(2,))
    check_tensor("type_weight", type_weight, dtypes=REF_DTYPES, ndim=(2,), optional=True)
    for name, t in (("position_weight", position_weight), ("type_weight", type_weight)):
        if t is not None and t.shape[1] != n_cols:
            raise ValueError(f"{name} must have {n_cols} columns (word_weight's hidden size), "
                             f"got shape {tuple(t.shape)}")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_tensor(name, t, dtypes=REF_DTYPES, optional=True)
        check_shape(name, t, (n_cols,), "word_weight's hidden size")
    _check_index_tensor("position_ids", position_ids, input_ids.shape)
    _check_index_tensor("token_type_ids", token_type_ids, input_ids.shape)
    if token_type_ids is not None and type_weight is None:
        raise ValueError("token_type_ids was given but type_weight is None; pass the token type "
                         "embedding table as type_weight")
    check_same_device(input_ids=input_ids, word_weight=word_weight,
                      position_weight=position_weight, ln_weight=ln_weight, ln_bias=ln_bias,
                      position_ids=position_ids, token_type_ids=token_type_ids,
                      type_weight=type_weight)
    check_eps("embedding_layer_norm", eps)
    check_probability("dropout_p", dropout_p)
    seq_len = input_ids.shape[-1]
    if position_ids is None and seq_len > position_weight.shape[0]:
        raise ValueError(f"input_ids: sequence length {seq_len} exceeds "
                         f"max_position_embeddings {position_weight.shape[0]} (position_weight's "
                         "rows); pass position_ids or a larger position table")


def _normalize_padding_idx(padding_idx: Optional[int], vocab_size: int) -> int:
    """nn.Embedding's rule (negative counts from the end); -1 stands for none."""
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral):
        raise TypeError(f"padding_idx must be an int or None, got "
                        f"{type(padding_idx).__name__}")
    padding_idx = int(padding_idx)
    if not -vocab_size <= padding_idx < vocab_size:
        raise ValueError(f"padding_idx must be within [-{vocab_size}, {vocab_size}) "
                         f"(word_weight's rows), got {padding_idx}")
    return padding_idx + vocab_size if padding_idx < 0 else padding_idx


def _check_bounds(input_ids, word_weight, position_weight, position_ids, token_type_ids,
                  type_weight, on_kernels: bool) -> None:
    """Raise when an id lies outside its table. One device sync for all the index tensors;
    none while a CUDA graph is captured (a host read is illegal there). ``on_kernels``: the
    min and max of every index tensor in one Triton launch (the triton backend), else in
    torch (an aminmax, a stack and a cast per tensor)."""
    checks = []
    if input_ids.numel() > 0:
        checks.append(("input_ids", input_ids, word_weight.shape[0], "vocab_size"))
    if position_ids is not None and position_ids.numel() > 0:
        checks.append(("position_ids", position_ids, position_weight.shape[0],
                       "max_position_embeddings"))
    if token_type_ids is not None and token_type_ids.numel() > 0:
        checks.append(("token_type_ids", token_type_ids, type_weight.shape[0], "type_vocab_size"))
    if not checks:
        return
    if _checks.tracing() or _checks.capturing(input_ids):
        # no host read (a sync under torch.compile, illegal while capturing a CUDA graph): the
        # same check on the device, failing the stream (a device-side assert) rather than
        # letting an out-of-range id read as a zero row
        ok = None
        for _, t, n, _ in checks:
            in_range = (t.min() >= 0) & (t.max() < n)
            ok = in_range if ok is None else ok & in_range
        torch._assert_async(ok, "embedding_layer_norm: an id of input_ids, position_ids or "
                                "token_type_ids is out of range of its table")
        return
    if on_kernels:
        bounds = kernel_module("embedding").index_bounds([c[1] for c in checks])
    else:
        bounds = torch.stack([torch.stack(torch.aminmax(c[1])).to(torch.int64)
                              for c in checks]).tolist()
    for (name, _, n, what), (lo, hi) in zip(checks, bounds):
        if lo < 0:
            raise ValueError(f"{name}: id {lo} out of range [0, {n}) (negative)")
        if hi >= n:
            raise ValueError(f"{name}: id {hi} out of range [0, {n}): max {hi} >= {what} {n}")


def embedding_layer_norm(input_ids: Tensor, word_weight: Tensor, position_weight: Tensor,
                         ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                         eps: float = 1e-12, *, token_type_ids: Optional[Tensor] = None,
                         type_weight: Optional[Tensor] = None,
                         position_ids: Optional[Tensor] = None, dropout_p: float = 0.0,
                         padding_idx: Optional[int] = None, deterministic: bool = False,
                         check_bounds: bool = True, backend: Optional[str] = None) -> Tensor:
    """BERT's embedding layer in one pass:
    ``dropout(LayerNorm(word[input_ids] + position[position_ids] + type[token_type_ids]))``.

    Args:
        input_ids: (..., S) int32/int64, usually (B, S); the last dimension is the sequence.
        word_weight: (V, H) float32 / float16 / bfloat16 (float64 on the "torch" backend). The
            output has its dtype (float32 under CUDA autocast: see Returns).
        position_weight: (P, H) float; P is max_position_embeddings.
        ln_weight, ln_bias: (H,) or None (LayerNorm's affine parameters).
        eps: added to the variance (BERT's 1e-12 by default).
        token_type_ids: int tensor broadcastable to input_ids, or None for type 0.
        type_weight: (T, H) float, or None for no token type embedding (then
            token_type_ids must be None).
        position_ids: int tensor broadcastable to input_ids (e.g. (S,) or (1, S)), or None
            for 0..S-1 (S must then be <= P).
        dropout_p: dropout probability on the output, in [0, 1] (pass 0.0 in eval mode); drawn from
            torch's generator, so ``torch.manual_seed`` reproduces it.
        padding_idx: a word id whose row gets no gradient (as ``nn.Embedding``), or None.
        deterministic: bit-identical table gradients run to run (sort-based segmented sums)
            instead of fp32 atomics. fp16/bf16 tables take the segmented sums either way
            (fewer host-side ops, no fp32 buffers); the flag (or
            ``torch.use_deterministic_algorithms(True)``) matters for fp32 tables.
            Forward results are the same either way.
        check_bounds: raise ValueError when an id is outside its table (costs one device
            sync). Off, out-of-range ids read and receive nothing (their row counts as zero)
            and never touch memory out of bounds, on every backend. Under torch.compile and
            during CUDA graph capture, where the host may not read device values, it runs on
            the device: an out-of-range id fails the stream with a device-side assert
            (RuntimeError on the CPU).
        backend: "triton", "cuda", "torch" or None (see ``fastbert.ops``).

    Returns:
        input_ids.shape + (H,), word_weight's dtype (float32 for 16-bit tables under CUDA
        autocast, as torch's LayerNorm returns there); statistics in float32. Gradients flow
        to the three tables and the LayerNorm parameters.
    """
    dtype_reason = None   # _args_ok passes kernel dtypes only: no float64 to look for
    if not _args_ok(input_ids, word_weight, position_weight, ln_weight, ln_bias, eps,
                    token_type_ids, type_weight, position_ids, dropout_p):
        _check_args(input_ids, word_weight, position_weight, ln_weight, ln_bias, eps,
                    token_type_ids, type_weight, position_ids, dropout_p)
        dtype_reason = kernel_dtype_reason(word_weight=word_weight,
                                           position_weight=position_weight,
                                           type_weight=type_weight, ln_weight=ln_weight,
                                           ln_bias=ln_bias)
    pad = -1 if padding_idx is None else _normalize_padding_idx(padding_idx,
                                                                 word_weight.shape[0])
    # the checks put every tensor on word_weight's device: it alone decides
    chosen = _resolve((word_weight,), backend, word_weight.shape[1], dtype_reason)
    if check_bounds and (_checks.tracing() or has_values(input_ids)):
        # fake tensors (FakeTensorMode: shape inference) and meta ones have no values to
        # check; under a mode or with tensor subclasses, torch computes the bounds (what the
        # mode sees); under torch.compile the check runs on the device (see _check_bounds)
        _check_bounds(input_ids, word_weight, position_weight, position_ids, token_type_ids,
                      type_weight, on_kernels=chosen == "triton" and direct_call_ok(
                          (input_ids, position_ids, token_type_ids)))
    p = float(dropout_p)
    out_fp32 = _autocast_fp32(word_weight)
    if _checks.drops_everything(p):
        # everything dropped: zeros (torch's dropout with p = 1 multiplies by 0: zero
        # gradients for every table and parameter)
        return embedding_layer_norm(input_ids, word_weight, position_weight, ln_weight, ln_bias,
                                    eps, token_type_ids=token_type_ids, type_weight=type_weight,
                                    position_ids=position_ids, padding_idx=padding_idx,
                                    deterministic=deterministic, check_bounds=False,
                                    backend=chosen) * 0.0
    if chosen == "torch":
        return embedding_layer_norm_ref(input_ids, word_weight, position_weight, ln_weight,
                                        ln_bias, eps, token_type_ids=token_type_ids,
                                        type_weight=type_weight, position_ids=position_ids,
                                        dropout_p=p, padding_idx=padding_idx,
                                        zero_out_of_range=not check_bounds,
                                        out_dtype=torch.float32 if out_fp32 else None)
    seed = (dropout_seed(word_weight.device)
            if p > 0.0 else None)
    return _run(input_ids, word_weight, position_weight, ln_weight, ln_bias, position_ids,
                token_type_ids if type_weight is not None else None, type_weight, seed,
                (float(eps), p, pad, bool(deterministic), out_fp32))
