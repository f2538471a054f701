"""Fused attention: ``attention`` (padded batches with a Hugging Face key mask),
``attention_varlen`` (packed tokens with cu_seqlens), and ``unpad`` / ``pad`` to move a BERT
encoder between the two layouts once per forward.

Layers of this file:
    attention_ref            -- the PyTorch reference: CPU path, "torch" backend, test oracle
    fastbert::attention_fwd / fastbert::attention_bwd
                             -- torch.library custom ops over the Triton launchers (both
                                layouts), with fake implementations and registered autograd,
                                so torch.compile(fullgraph=True) traces through them
    _AttentionFunction       -- the eager autograd of the same launchers, with less host
                                work per call (see its docstring); _run picks it or the op
    attention, attention_varlen, unpad, pad
                             -- the public functions: check arguments, pick the backend

Conventions (the same in the reference and the kernels):
    - ``attention_mask`` is (batch, seqlen_k), True / nonzero = attend; it masks keys only
      (queries at padded positions still get an output, as in Hugging Face models).
    - Causal masking is aligned to the bottom-right corner (FlashAttention-2): with lengths
      (Lq, Lk), query i sees keys j <= i + Lk - Lq. With Lq == Lk that is the usual j <= i.
    - A query that sees no key at all outputs zeros and gets zero gradients (never NaN).
    - Dropout applies to the attention probabilities (inverted scaling by 1 / (1 - p)); its
      seed is drawn from torch's generator, so ``torch.manual_seed`` reproduces a call.
    - The Triton backward is deterministic (no atomics) unless
      ``fastbert.kernels.attention.ATOMIC_DQ_BACKWARD`` is set (opt-in, never under
      ``torch.use_deterministic_algorithms(True)``).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._checks import (REF_DTYPES, check_probability, check_real, check_same_device, check_size,
                      check_tensor, autocast_dtype, has_values, kernel_dtype_reason, dropout_seed)
from . import _checks
from ._fastop import direct_call_ok, fast_op
from ._dispatch import interpreter_enabled, resolve, kernel_module

MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Optional[Tensor] = None,
                  causal: bool = False, dropout_p: float = 0.0,
                  softmax_scale: Optional[float] = None, dropout_mask: Optional[Tensor] = None,
                  cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                  upcast: bool = False, compute_dtype: Optional[torch.dtype] = None,
                  max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None) -> Tensor:
    """softmax(scale * Q K^T + mask) V in PyTorch, materializing the scores.

    Padded layout: q (batch, seqlen_q, heads, head_dim), k/v (batch, seqlen_k, heads_kv,
    head_dim). Varlen layout (``cu_seqlens_q``/``cu_seqlens_k`` given): q (total_q, heads,
    head_dim), k/v (total_k, heads_kv, head_dim); runs each sequence separately (reads the
    lengths on the host).

    Computes in fp32 (fp64 with ``upcast=True`` or fp64 inputs; ``compute_dtype`` overrides
    both, e.g. fp16 for the low-precision baseline of the tests) and returns q's dtype.
    ``dropout_mask`` (bool, (batch, heads, seqlen_q, seqlen_k); for varlen, positions within
    each sequence up to the max lengths) replaces the random draw: tests pass the kernel's.
    While torch.compile traces, the varlen layout given ``max_seqlen_q``/``max_seqlen_k`` is
    computed padded instead (``_varlen_ref_padded``): no host read, no data-dependent shape
    (inductor cannot lower the per-sequence loop's); no check either: every sequence must be
    at most max_seqlen long and ``dropout_mask`` at least max_seqlen wide (attention_varlen
    checks the lengths).
    """
    if cu_seqlens_q is not None:
        if max_seqlen_q is not None and max_seqlen_k is not None and _checks.tracing():
            return _varlen_ref_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, causal=causal, dropout_p=dropout_p,
                                      softmax_scale=softmax_scale, dropout_mask=dropout_mask,
                                      upcast=upcast, compute_dtype=compute_dtype)
        if not (has_values(cu_seqlens_q) and has_values(cu_seqlens_k)):
            # fake or meta (shape inference): the lengths cannot be read; the result has q's
            # shape and dtype, and stays in the graph of q, k and v (a backward through it
            # runs: memory and FLOP estimates see it)
            return q * 0.0 + (k.sum() + v.sum()).to(q.dtype) * 0.0
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = []
        for b in range(len(cq) - 1):
            lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
            dm = dropout_mask[b:b + 1, :, :lq, :lk] if dropout_mask is not None else None
            outs.append(attention_ref(
                q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale,
                dropout_mask=dm, upcast=upcast, compute_dtype=compute_dtype)[0])
        if not outs:
            # no sequence (cu_seqlens = [0], no tokens): an empty output in the graph of q, k
            # and v, as the kernels' and SDPA's (a backward through it runs)
            return q * 0.0 + (k.sum() + v.sum()).to(q.dtype) * 0.0
        return torch.cat(outs, 0)
    batch, seqlen_q = q.shape[:2]
    seqlen_k = k.shape[1]
    valid = torch.ones((batch, 1, seqlen_q, seqlen_k), dtype=torch.bool, device=q.device)
    if attention_mask is not None:
        valid = valid & (attention_mask != 0)[:, None, None, :]
    if causal:
        i = torch.arange(seqlen_q, device=q.device)[:, None]
        j = torch.arange(seqlen_k, device=q.device)[None, :]
        valid = valid & (j <= i + (seqlen_k - seqlen_q))
    return _masked_attention(q, k, v, valid, dropout_p=dropout_p, softmax_scale=softmax_scale,
                             dropout_mask=dropout_mask, upcast=upcast, compute_dtype=compute_dtype)


def _varlen_ref_padded(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                       cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                       causal: bool, dropout_p: float, softmax_scale: Optional[float],
                       dropout_mask: Optional[Tensor], upcast: bool,
                       compute_dtype: Optional[torch.dtype]) -> Tensor:
    """attention_ref's varlen layout without reading the lengths on the host: every sequence
    scattered into a padded batch of width max_seqlen, its keys masked past its length and
    (causal) aligned bottom-right per sequence, the result gathered back. Assumes the checks
    attention_varlen made (no sequence longer than max_seqlen, cu_seqlens[-1] = total)."""
    batch = cu_seqlens_q.shape[0] - 1

    def layout(cu: Tensor, total: int):
        cu = cu.to(torch.int64)
        token = torch.arange(total, device=cu.device)
        seq = torch.searchsorted(cu[1:], token, right=True)   # the sequence of each token
        return seq, token - cu[seq], cu[1:] - cu[:-1]

    seq_q, pos_q, len_q = layout(cu_seqlens_q, q.shape[0])
    seq_k, pos_k, len_k = layout(cu_seqlens_k, k.shape[0])

    def padded(x: Tensor, seq: Tensor, pos: Tensor, width: int) -> Tensor:
        return x.new_zeros((batch, width) + tuple(x.shape[1:])).index_put((seq, pos), x)

    i = torch.arange(max_seqlen_q, device=q.device)[None, :, None]
    j = torch.arange(max_seqlen_k, device=q.device)[None, None, :]
    valid = j < len_k[:, None, None]                                   # (B, Sq, Sk)
    if causal:
        valid = valid & (j <= i + (len_k - len_q)[:, None, None])
    if dropout_mask is not None:
        dropout_mask = dropout_mask[:, :, :max_seqlen_q, :max_seqlen_k]
    out = _masked_attention(padded(q, seq_q, pos_q, max_seqlen_q),
                            padded(k, seq_k, pos_k, max_seqlen_k),
                            padded(v, seq_k, pos_k, max_seqlen_k), valid[:, None],
                            dropout_p=dropout_p, softmax_scale=softmax_scale,
                            dropout_mask=dropout_mask, upcast=upcast, compute_dtype=compute_dtype)
    return out[seq_q, pos_q]


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, *, dropout_p: float,
                      softmax_scale: Optional[float], dropout_mask: Optional[Tensor],
                      upcast: bool, compute_dtype: Optional[torch.dtype]) -> Tensor:
    """attention_ref's padded computation given the (batch, 1, seqlen_q, seqlen_k) mask of the
    keys each query sees."""
    ct = compute_dtype or (torch.float64 if (upcast or q.dtype == torch.float64) else torch.float32)
    heads, head_dim = q.shape[2], q.shape[3]
    heads_kv = k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    qc = q.to(ct)
    kc = k.to(ct).repeat_interleave(heads // heads_kv, dim=2)
    vc = v.to(ct).repeat_interleave(heads // heads_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale       # (B, H, Sq, Sk)
    # rows that see no key: softmax over zeros, then zeroed by `valid` -- finite values and
    # zero gradients instead of softmax's NaN over an all -inf row
    empty = ~valid.any(-1, keepdim=True)
    scores = scores.masked_fill(~valid, float("-inf")).masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1) * valid
    if dropout_p > 0.0:
        if dropout_mask is not None:
            probs = probs * dropout_mask.to(ct) / (1.0 - dropout_p)
        else:
            probs = F.dropout(probs, dropout_p, training=True)
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(ct), vc)
    # contiguous, as the kernels' output (einsum's is (B, H)-major: out.view(B, S, H * D), the
    # usual next step, would fail on this backend only)
    return out.to(q.dtype).contiguous()


# ----------------------------------------------------------------------------------------
# custom ops (Triton backend)

@fast_op("fastbert::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor],
                   cu_seqlens_q: Optional[Tensor],
                   cu_seqlens_k: Optional[Tensor], seed: Optional[Tensor], max_seqlen_q: int,
                   max_seqlen_k: int, causal: bool, dropout_p: float,
                   softmax_scale: float) -> Tuple[Tensor, Tensor]:
    k_ = kernel_module("attention")
    return k_.attention_fwd(q, k, v, attention_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, seed, causal, dropout_p, softmax_scale)


def _lse_shape(q, cu_seqlens_q, max_seqlen_q):
    if cu_seqlens_q is not None:
        return (cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q)
    return (q.shape[0], q.shape[2], q.shape[1])


@_attention_fwd.register_fake
def _(q, k, v, attention_mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q,
      max_seqlen_k, causal, dropout_p, softmax_scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(_lse_shape(q, cu_seqlens_q, max_seqlen_q), dtype=torch.float32))


@fast_op("fastbert::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   attention_mask: Optional[Tensor],
                   cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                   seed: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                   dropout_p: float, softmax_scale: float, need_dq: bool,
                   need_dkv: bool) -> List[Tensor]:
    # need_dq / need_dkv: launch only the kernels whose gradients autograd asked for; the
    # others come back as zeros (and are dropped by the caller)
    k_ = kernel_module("attention")
    dq, dk, dv = k_.attention_bwd(dout, q, k, v, out, lse, attention_mask, cu_seqlens_q,
                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k, seed, causal,
                                  dropout_p, softmax_scale, need_dq=need_dq,
                                  need_dkv=need_dkv)
    return [dq, dk, dv]


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, attention_mask, cu_seqlens_q, cu_seqlens_k, seed,
      max_seqlen_q, max_seqlen_k, causal, dropout_p, softmax_scale, need_dq, need_dkv):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]


def _fwd_setup(ctx, inputs, output):
    (q, k, v, attention_mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q,
     max_seqlen_k, causal, dropout_p, softmax_scale) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attention_mask, cu_seqlens_q, cu_seqlens_k, seed)
    ctx.args = (max_seqlen_q, max_seqlen_k, causal, dropout_p, softmax_scale)
    # lse gets no gradient: no zero tensor made for it at each backward
    ctx.set_materialize_grads(False)


def _grads(ctx, dout: Tensor, bwd) -> Tuple[Optional[Tensor], ...]:
    """(dq, dk, dv) from what _fwd_setup or _AttentionFunction saved; ``bwd`` is
    _attention_bwd or its undecorated function (same arguments, same results)."""
    q, k, v, out, lse, attention_mask, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    dq, dk, dv = bwd(dout, q, k, v, out, lse, attention_mask, cu_seqlens_q, cu_seqlens_k, seed,
                     *ctx.args, need_q, need_k or need_v)
    return dq if need_q else None, dk if need_k else None, dv if need_v else None


def _fwd_backward(ctx, dout, dlse):
    if dout is None:
        return (None,) * 12
    return _grads(ctx, dout, _attention_bwd) + (None,) * 9


_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# FLOPs for torch.utils.flop_counter.FlopCounterMode (MFU estimates), counted as torch counts
# scaled_dot_product_attention: the two matmuls of the forward (4 * B * H * Sq * Sk * D, no
# discount for causal or padding masks), the five of the backward (2.5x that); for packed
# sequences the sum over them (cu_seqlens read on the host; their bound when unreadable).
def _attention_flops(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_k) -> int:
    if cu_seqlens_q is None:
        batch, seqlen_q, heads, head_dim = q.shape
        return 4 * batch * heads * seqlen_q * k.shape[1] * head_dim
    _, heads, head_dim = q.shape
    if _checks.real_values(cu_seqlens_q) and _checks.real_values(cu_seqlens_k):
        lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        pairs = sum(a * b for a, b in zip(lq, lk))
    else:
        pairs = q.shape[0] * max_seqlen_k
    return 4 * heads * head_dim * pairs


try:
    from torch.utils.flop_counter import register_flop_formula as _flops_formula
except ImportError:  # pragma: no cover - a torch without the FLOP counter
    _flops_formula = None
if _flops_formula is not None:
    @_flops_formula(torch.ops.fastbert.attention_fwd, get_raw=True)
    def _(q, k, v, attention_mask, cu_seqlens_q, cu_seqlens_k, *args, out_shape=None,
          **kwargs) -> int:
        return _attention_flops(q, k, cu_seqlens_q, cu_seqlens_k, args[2])

    @_flops_formula(torch.ops.fastbert.attention_bwd, get_raw=True)
    def _(dout, q, k, v, out, lse, attention_mask, cu_seqlens_q, cu_seqlens_k, seed,
          max_seqlen_q, max_seqlen_k, *args, out_shape=None, **kwargs) -> int:
        return 5 * _attention_flops(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_k) // 2


class _AttentionFunction(torch.autograd.Function):
    """fastbert::attention_fwd's autograd for the eager calls that fast_op would send down its
    direct path (no tracing, no mode, plain tensors): the same launchers, saved tensors and
    backward as the registered autograd, with less host work per call. Small BERT shapes are
    host-bound (see _fastop.py), and each of these is a torch op or several microseconds of
    Python, at every layer:
      - one output: lse is saved, not returned, so autograd neither wraps a second output
        nor makes a zero gradient for it at every backward;
      - eight inputs instead of twelve (the python scalars travel as one tuple), and no
        generic scan of them;
      - the backward calls the launcher itself, unless something must see the custom op:
        a graph being recorded (create_graph=True: the op raises that it has no derivative
        rather than give a wrong second derivative) or a mode.
    """

    @staticmethod
    def forward(ctx, q, k, v, attention_mask, cu_seqlens_q, cu_seqlens_k, seed, args):
        out, lse = _attention_fwd.fn(q, k, v, attention_mask, cu_seqlens_q,
                                     cu_seqlens_k, seed, *args)
        ctx.save_for_backward(q, k, v, out, lse, attention_mask, cu_seqlens_q, cu_seqlens_k,
                              seed)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, dout):
        direct = not torch.is_grad_enabled() and direct_call_ok((dout,))
        return _grads(ctx, dout, _attention_bwd.fn if direct else _attention_bwd) + (None,) * 5


def _run(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor],
         cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
         seed: Optional[Tensor], *args) -> Tensor:
    """fastbert::attention_fwd's output (``args``: max_seqlen_q, max_seqlen_k, causal,
    dropout_p, softmax_scale) by the cheapest route with its semantics: _AttentionFunction
    when a gradient is recorded, the launcher alone when none is, the custom op when
    something must see it."""
    if not direct_call_ok((q, k, v, attention_mask, cu_seqlens_q, cu_seqlens_k)):
        return _attention_fwd(q, k, v, attention_mask, cu_seqlens_q, cu_seqlens_k, seed,
                              *args)[0]
    if attention_mask is not None:
        # the int8 form once (a view of a bool mask): the forward and the backward take it as
        # it is (traced calls pass the mask as given; the launchers convert it)
        attention_mask = kernel_module("attention").key_mask(attention_mask)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _AttentionFunction.apply(q, k, v, attention_mask, cu_seqlens_q, cu_seqlens_k,
                                        seed, args)
    return _attention_fwd.fn(q, k, v, attention_mask, cu_seqlens_q, cu_seqlens_k, seed,
                             *args)[0]


# ----------------------------------------------------------------------------------------
# public API

# Mirrors fastbert.kernels.attention.SUPPORTED_HEAD_DIMS (a test checks they agree): this
# module must import without triton.
KERNEL_HEAD_DIMS = (16, 32, 64, 80, 96, 128)


def _kernel_limits(q: Tensor) -> Optional[str]:
    """Why the Triton kernels cannot run this call, or None."""
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return (f"head_dim {q.shape[-1]} is not supported by the kernels "
                f"(supported: {KERNEL_HEAD_DIMS})")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and interpreter_enabled():
        # measured with triton 3.6 and 3.8: a 16 x 16 bf16 tl.dot off by ~1e10 (fp16 exact)
        return ("bfloat16 in the Triton interpreter (TRITON_INTERPRET=1), whose tl.dot is "
                "wrong for bfloat16 operands; use float16 or float32 on the CPU")
    return kernel_dtype_reason(q=q)


def _resolve(op: str, backend: Optional[str], q: Tensor) -> str:
    # the callers checked that every tensor argument is on q's device: q alone decides
    return resolve(op, (q,), backend, preference=("triton",),
                   extra_check=lambda b: _kernel_limits(q))


def _dropout_seed(device: torch.device) -> Tensor:
    """The Philox seed of one call (``_checks.dropout_seed``)."""
    return dropout_seed(device)


def _qkv_ok(q, k, v, ndim: int) -> bool:
    """Whether ``_check_qkv`` passes, tested cheaply (every layer calls attention at every
    step): False only sends the call through ``_check_qkv``, which names what is wrong."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        return False
    qs, ks, dt, dev = q.shape, k.shape, q.dtype, q.device
    return (len(qs) == ndim and len(ks) == ndim and v.shape == ks and dt in REF_DTYPES
            and k.dtype == dt and v.dtype == dt and k.device == dev and v.device == dev
            and qs[-1] == ks[-1] and qs[-1] > 0 and ks[-2] > 0 and qs[-2] % ks[-2] == 0)


def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, ndim: int, layout: str):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=REF_DTYPES, ndim=(ndim,))
    # under autocast for q's device each is cast to the autocast dtype first (_autocast), as
    # SDPA's are: fp32 q and k (rotary embeddings computed in fp32) with a 16-bit v are fine
    # there; autocast leaves float64 alone
    cast = autocast_dtype(q)
    dtypes = [t.dtype if cast is None or t.dtype == torch.float64 else cast for t in (q, k, v)]
    if dtypes[1] != dtypes[0] or dtypes[2] != dtypes[0]:
        raise TypeError(f"{op}: q, k and v must have one dtype"
                        + (" after autocast's cast (which leaves float64 alone)" if cast else "")
                        + f", got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{op}: v must have k's shape {tuple(k.shape)} {layout}, got {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: k and v must have q's head_dim {q.shape[-1]}, got {k.shape[-1]}")
    heads, heads_kv = q.shape[-2], k.shape[-2]
    if heads_kv == 0 or heads % heads_kv != 0:
        raise ValueError(f"{op}: the number of k/v heads ({heads_kv}) must divide the number "
                         f"of q heads ({heads})")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: head_dim must be positive, got shape {tuple(q.shape)}")


def _autocast(q: Tensor, k: Tensor, v: Tensor):
    """Under autocast for q's device, run in the autocast dtype, as torch's
    scaled_dot_product_attention does (custom ops are not autocast-aware by themselves).
    Like autocast, it leaves float64 tensors alone."""
    dt = autocast_dtype(q)
    if dt is not None:
        return tuple(t if t.dtype == torch.float64 else t.to(dt) for t in (q, k, v))
    return q, k, v


def _scale(softmax_scale: Optional[float], head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    check_real("softmax_scale", softmax_scale)
    s = float(softmax_scale)
    if not math.isfinite(s):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return s


def _common_args(op: str, q: Tensor, k: Tensor, v: Tensor, dropout_p: float,
                 softmax_scale: Optional[float], backend: Optional[str]):
    """What attention and attention_varlen settle alike once their own arguments are checked:
    (q, k, v in the autocast dtype, the backend, dropout_p as a float, the softmax scale)."""
    check_probability("dropout_p", dropout_p)
    scale = _scale(softmax_scale, q.shape[-1])
    q, k, v = _autocast(q, k, v)
    return q, k, v, _resolve(op, backend, q), float(dropout_p), scale


def attention(q: Tensor, k: Tensor, v: Tensor, *, attention_mask: Optional[Tensor] = None,
              causal: bool = False, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
              backend: Optional[str] = None) -> Tensor:
    """Multi-head attention over padded batches, without materializing the scores.

    Args:
        q: (batch, seqlen_q, heads, head_dim) float16 / bfloat16 / float32 (float64 runs the
            PyTorch reference only).
        k, v: (batch, seqlen_k, heads_kv, head_dim), q's dtype (under autocast q, k and v
            may mix float16 / bfloat16 / float32: each is cast to the autocast dtype, as SDPA's
            are); heads_kv divides heads
            (multi-query and grouped-query attention).
        attention_mask: (batch, seqlen_k) bool or integers, True / nonzero (1, as Hugging
            Face writes it) = attend (holes allowed), or None. The Triton backend saves it (a
            bool or int8 mask as an int8 view) for the backward: changing it in place before the
            backward raises autograd's "modified by an inplace operation". Masked keys and
            values must still be finite, as with SDPA: a NaN / inf in a masked value reaches
            its rows' output and gradients (0 * NaN), on both backends (padding that must not
            matter is zeroed first, or dropped with ``unpad``).
        causal: mask future keys, aligned to the bottom-right corner when seqlen_q !=
            seqlen_k (query i sees keys j <= i + seqlen_k - seqlen_q, as FlashAttention-2).
        dropout_p: dropout on the attention probabilities, in [0, 1] (pass 0.0 in eval).
        softmax_scale: multiplies QK^T; default 1 / sqrt(head_dim).
        backend: "triton", "torch" or None (see ``fastbert.ops``). The Triton kernels support
            head_dim in (16, 32, 64, 80, 96, 128).

    Returns:
        (batch, seqlen_q, heads, head_dim) in q's dtype (the autocast dtype under autocast
        for q's device). A query that sees no key gets zeros.
        Precision: fp32 accumulation; fp32 inputs run true fp32 matmuls (no TF32), far
        slower than fp16/bf16.
    """
    op = "attention"
    if not (_qkv_ok(q, k, v, 4) and k.shape[0] == q.shape[0]
            and (attention_mask is None or _mask_ok(attention_mask, q, k))):
        _check_attention_args(op, q, k, v, attention_mask)
    q, k, v, chosen, p, scale = _common_args(op, q, k, v, dropout_p, softmax_scale, backend)
    if _checks.drops_everything(p):   # every probability dropped: zeros, zero gradients (as torch)
        return attention(q, k, v, attention_mask=attention_mask, causal=causal,
                         softmax_scale=scale, backend=chosen) * 0.0
    if chosen == "torch":
        return attention_ref(q, k, v, attention_mask=attention_mask, causal=causal,
                             dropout_p=p, softmax_scale=scale)
    seed = _dropout_seed(q.device) if p > 0.0 else None
    return _run(q, k, v, attention_mask, None, None, seed, q.shape[1], k.shape[1], bool(causal),
                p, scale)


def _mask_ok(attention_mask, q: Tensor, k: Tensor) -> bool:
    """Whether attention's mask checks pass, tested cheaply (see _qkv_ok)."""
    return (isinstance(attention_mask, Tensor) and attention_mask.dtype in MASK_DTYPES
            and attention_mask.shape == (q.shape[0], k.shape[1])
            and attention_mask.device == q.device)


def _check_attention_args(op: str, q, k, v, attention_mask) -> None:
    """attention's argument checks, each error naming the argument."""
    _check_qkv(op, q, k, v, 4, "(batch, seqlen_k, heads_kv, head_dim)")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: k and v must have q's batch size {q.shape[0]}, got {k.shape[0]}")
    check_tensor("attention_mask", attention_mask, dtypes=MASK_DTYPES, optional=True)
    if attention_mask is not None:
        want = (q.shape[0], k.shape[1])
        if tuple(attention_mask.shape) != want:
            raise ValueError(f"attention_mask must have shape (batch, seqlen_k) = {want}, "
                             f"got {tuple(attention_mask.shape)}")
        check_same_device(q=q, attention_mask=attention_mask)


# cu_seqlens tensors whose values were validated, each with what it was validated against:
# ((version counter, storage address, total tokens), the smallest max_seqlen that passed). A
# BERT encoder passes the same cu_seqlens to every layer; checking them once instead of at
# every call saves a host sync per layer (a sync drains the GPU queue while Python prepares
# the next launches). An in-place change through torch bumps the version counter and brings
# the check back; a write that bypasses it (through .data, numpy, DLPack, a kernel of one's
# own) is not seen: make new cu_seqlens rather than rewrite validated ones that way.
_VALIDATED_CU_SEQLENS = WeakIdKeyDictionary()


def _assert_cu_seqlens_async(name: str, cu: Tensor, total, max_seqlen, max_name: str) -> None:
    """``_check_cu_seqlens``'s value check without a host read: torch._assert_async (a few
    small kernels, one fused kernel under inductor)."""
    lengths = cu[1:] - cu[:-1]
    ok = ((cu[0] == 0) & (cu[-1] == total)
          & (lengths.clamp(0, max_seqlen) == lengths).all())
    torch._assert_async(ok, f"{name} must start at 0, be non-decreasing, end at the number of "
                            f"tokens and hold no sequence longer than {max_name}")


def _check_cu_seqlens(name: str, cu: Tensor, batch_plus_1: Optional[int], total: int,
                      max_seqlen, max_name: str, device: torch.device):
    # the device first: the value check below reads cu on the host
    check_tensor(name, cu, ndim=(1,), device=device)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (batch + 1,), got {str(cu.dtype).replace('torch.', '')}")
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have shape (batch + 1,): at least one entry (0), got an "
                         "empty tensor")
    if batch_plus_1 is not None and cu.shape[0] != batch_plus_1:
        raise ValueError(f"{name} must have shape (batch + 1,) = ({batch_plus_1},), got {tuple(cu.shape)}")
    if not isinstance(max_seqlen, (int, torch.SymInt)) or isinstance(max_seqlen, bool):
        raise TypeError(f"{max_name} must be a python int (it sizes the launch grid; pass it "
                        f"from the caller to avoid a host sync), got {type(max_seqlen).__name__}")
    tracing = _checks.tracing()
    if tracing:
        # it may be a value read from a tensor (unpad's): no Python branch on it. No message
        # function: torch 2.11's Dynamo cannot trace one that holds a closure, and strict
        # torch.export fails on any (AttributeError 'is_quantized', torch 2.11 - 2.14)
        torch._check(max_seqlen >= 0)
    elif max_seqlen < 0:
        raise ValueError(f"{max_name} must be >= 0, got {max_seqlen}")
    if tracing or _checks.capturing(cu):
        # no host read (a sync under torch.compile, illegal while capturing a CUDA graph): the
        # same check on the device, failing the stream (a device-side assert) rather than
        # letting the kernels read and write past a sequence's rows
        _assert_cu_seqlens_async(name, cu, total, max_seqlen, max_name)
        return
    if not has_values(cu):  # fake (shape inference) or meta: no values to check
        return
    # inference tensors keep no version counter, so they are checked at every call
    # (the storage address too: `.data = other` / set_() swap it without a version bump;
    # a tensor without storage, as torch.func's wrappers, is checked at every call)
    validated = None
    if not cu.is_inference() and not torch._C._functorch.is_functorch_wrapped_tensor(cu):
        validated = (cu._version, cu.data_ptr(), total)
        seen = _VALIDATED_CU_SEQLENS.get(cu)
        # a bound at least the smallest one validated holds too: one tensor passed as both
        # cu_seqlens_q and cu_seqlens_k with two max lengths is read once, not at every call
        if seen is not None and seen[0] == validated and max_seqlen >= seen[1]:
            return
    lengths = cu[1:] - cu[:-1]
    ok = torch.stack([cu[0] == 0, cu[-1] == total, (lengths >= 0).all(),
                      (lengths <= max_seqlen).all()])
    ok = ok.tolist()  # one host sync, eager mode only
    if not (ok[0] and ok[1] and ok[2]):
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at the number of "
                         f"tokens ({total}), got {cu.tolist()}")
    if not ok[3]:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence in "
                         f"{name}: {int(lengths.max())}")
    if validated is not None:
        _VALIDATED_CU_SEQLENS[cu] = (validated, int(max_seqlen))


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                     backend: Optional[str] = None) -> Tensor:
    """Multi-head attention over packed variable-length sequences (no padding computed).

    Args:
        q: (total_q, heads, head_dim) float16 / bfloat16 / float32: the sequences' query
            tokens back to back.
        k, v: (total_k, heads_kv, head_dim), q's dtype (under autocast as in ``attention``);
            heads_kv divides heads.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,): 0, then the running sum of the
            sequence lengths (as returned by ``unpad``).
        max_seqlen_q, max_seqlen_k: python ints, at least the longest sequence; they size the
            launch grid, so passing them from the caller avoids a host sync (under
            torch.compile nothing is read back from the device).
        causal, dropout_p, softmax_scale, backend: as in ``attention``; causal is aligned to
            the bottom-right corner of each sequence.

    Returns:
        (total_q, heads, head_dim) in q's dtype.

    In eager mode the cu_seqlens are validated (non-decreasing, matching the token counts
    and the max lengths) the first time a tensor is seen with these token counts, and again
    only for a max length below the smallest one it passed with; each validation costs a
    host sync. Later calls with the same, unmodified tensors (every layer of an encoder, one
    tensor for q and k) skip it (a write that bypasses torch's version counter, through
    ``.data``, numpy or DLPack, is not seen: make new cu_seqlens instead). Under torch.compile
    and during CUDA graph capture, where the host may not read device values, the same check
    runs on the device at every call: a
    bad cu_seqlens fails the stream with a device-side assert (RuntimeError on the CPU)
    rather than leaving rows past max_seqlen unwritten. The PyTorch reference (backend
    "torch", and auto's choice where the kernels cannot run: float64, other head dims) reads
    cu_seqlens on the host in eager mode and raises while a CUDA graph is captured; under
    torch.compile it runs on a padded batch instead (scores of batch x heads x max_seqlen_q x
    max_seqlen_k elements, as the padded reference).
    """
    op = "attention_varlen"
    if not _qkv_ok(q, k, v, 3):
        _check_qkv(op, q, k, v, 3, "(total_k, heads_kv, head_dim)")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, None, q.shape[0], max_seqlen_q,
                      "max_seqlen_q", q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.shape[0], k.shape[0],
                      max_seqlen_k, "max_seqlen_k", q.device)
    q, k, v, chosen, p, scale = _common_args(op, q, k, v, dropout_p, softmax_scale, backend)
    if _checks.drops_everything(p):   # every probability dropped: zeros, zero gradients (as torch)
        return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                causal=causal, softmax_scale=scale, backend=chosen) * 0.0
    if chosen == "torch":
        if _checks.capturing(q):
            why = _kernel_limits(q)
            raise RuntimeError(
                "attention_varlen on the PyTorch reference (backend 'torch'"
                + (f": {why}" if why else "") + ") reads cu_seqlens on the host, which a CUDA "
                "graph capture does not allow; the Triton kernels run under capture")
        return attention_ref(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                             causal=causal, dropout_p=p, softmax_scale=scale,
                             max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    seed = _dropout_seed(q.device) if p > 0.0 else None
    # the kernels read cu_seqlens[b] at offset b (unit stride): a strided view would be read
    # wrongly, and its bounds would send the kernels outside q, k and v
    return _run(q, k, v, None, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                seed, max_seqlen_q, max_seqlen_k, bool(causal), p, scale)


def unpad(x: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Drop the padding of a batch: keep the tokens where ``attention_mask`` is nonzero.

    Args:
        x: (batch, seqlen, ...) any dtype.
        attention_mask: (batch, seqlen) bool or integers, True / nonzero (1) = a real token.

    Returns:
        x_unpadded (nnz, ...) -- the kept tokens in order (differentiable);
        indices (nnz,) int64 -- their positions in the flattened (batch * seqlen) layout;
        cu_seqlens (batch + 1,) int32 -- for ``attention_varlen``;
        max_seqlen (python int) -- the longest sequence (read from the device once here).
    """
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch, seqlen, ...), got shape "
                         f"{tuple(x.shape)}")
    check_tensor("attention_mask", attention_mask, dtypes=MASK_DTYPES, ndim=(2,))
    if tuple(x.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(f"attention_mask must have shape (batch, seqlen) = "
                         f"{tuple(x.shape[:2])} (x's first two dimensions), "
                         f"got {tuple(attention_mask.shape)}")
    check_same_device(x=x, attention_mask=attention_mask)
    if _checks.capturing(attention_mask):
        raise RuntimeError(
            "unpad cannot be captured in a CUDA graph (torch.cuda.graph, torch.compile "
            "mode='reduce-overhead'): the number of tokens and max_seqlen it returns are read "
            "on the host; call it outside the captured region and pass its results in")
    keep = attention_mask != 0
    seqlens = keep.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten()).flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    x_unpadded = x.flatten(0, 1).index_select(0, indices)
    return x_unpadded, indices, cu_seqlens, max_seqlen


def pad(x_unpadded: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Inverse of ``unpad``: scatter tokens back to (batch, seqlen, ...), zeros elsewhere.

    Args:
        x_unpadded: (nnz, ...) as returned by ``unpad`` (or computed from it).
        indices: (nnz,) int64 distinct positions in [0, batch * seqlen) of the flattened
            (batch * seqlen) layout. CPU indices are range-checked here (no device sync);
            on the GPU a position outside the range trips torch's device-side index check
            (checking it here would cost a host sync per call).
        batch, seqlen: the padded shape (python ints).

    Returns:
        (batch, seqlen, ...) in x_unpadded's dtype (differentiable).
    """
    check_tensor("x_unpadded", x_unpadded)
    if x_unpadded.dim() < 1:
        raise ValueError("x_unpadded must have at least one dimension (nnz, ...), got a scalar")
    check_tensor("indices", indices, dtypes=(torch.int64,), ndim=(1,))
    if indices.shape[0] != x_unpadded.shape[0]:
        raise ValueError(f"indices must have one entry per token of x_unpadded "
                         f"({x_unpadded.shape[0]}), got {indices.shape[0]}")
    check_same_device(x_unpadded=x_unpadded, indices=indices)
    check_size("batch", batch)
    check_size("seqlen", seqlen)
    n = batch * seqlen
    if indices.shape[0] > n:
        raise ValueError(f"x_unpadded has {indices.shape[0]} tokens, more than batch * seqlen = "
                         f"{batch} * {seqlen} positions")
    # tracing first: under torch.compile the token count may be data-dependent (unpad's,
    # from nonzero), which a Python branch on numel() cannot take
    if not _checks.tracing() and indices.numel() and has_values(indices):
        if indices.device.type == "cpu":
            lo, hi = torch.stack(torch.aminmax(indices)).tolist()
            if lo < 0 or hi >= n:
                raise ValueError(f"indices must lie in [0, batch * seqlen) = [0, {n}), got "
                                 f"{lo if lo < 0 else hi}")
        else:
            # index_put would wrap a negative index around silently: move it out of range,
            # where torch's own bounds check catches it
            indices = torch.where(indices < 0, n, indices)
    out = x_unpadded.new_zeros((n, *x_unpadded.shape[1:]))
    out = out.index_put((indices,), x_unpadded)
    return out.view(batch, seqlen, *x_unpadded.shape[1:])
