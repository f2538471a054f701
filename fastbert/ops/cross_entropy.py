"""Softmax cross-entropy: ``cross_entropy`` over rows of logits, and ``masked_lm_loss``, the
BERT MLM head loss with the vocabulary projection fused in (see kernels/cross_entropy.py).

Layers of this file:
    cross_entropy_ref, masked_lm_loss_ref
                             -- the PyTorch references: CPU path, "torch" backend, test oracles
    fastbert::cross_entropy_fwd / fastbert::cross_entropy_bwd
    fastbert::masked_lm_loss_fwd / fastbert::masked_lm_loss_bwd (/ _scale_)
                             -- torch.library custom ops over the Triton launchers, with fake
                                (meta) implementations and registered autograd, so that
                                torch.compile(fullgraph=True) traces through them
    cross_entropy, masked_lm_loss
                             -- the public functions: check arguments, pick the backend

``masked_lm_loss`` on the Triton backend selects the masked rows inside its custom op (one
kernel, and one host sync to read their count, invisible to torch.compile there), so it
compiles with ``fullgraph=True`` and its output shapes never depend on the data. With
``reduction`` "mean" or "sum" its forward also produces the gradients (the logits exist only
one chunk at a time) and the backward scales them by the incoming gradient; with "none" (or in
float16) the backward recomputes the projection of the rows the forward selected, because a
per-token incoming gradient changes dW.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import (REF_DTYPES, autocast_dtype, check_real, check_same_device, check_shape,
                      check_tensor, has_values, kernel_dtype_reason)
from . import _checks
from ._fastop import fast_op
from ._dispatch import resolve, kernel_module

REDUCTIONS = ("none", "mean", "sum")
INDEX_DTYPES = (torch.int64, torch.int32)


def _label_error(name: str, n_classes: int, ignore_index: int, value: int,
                 index: int) -> ValueError:
    return ValueError(f"{name} must hold class indices in [0, {n_classes}) or "
                      f"ignore_index={ignore_index}; found {value} at flat index {index} "
                      f"(pass check_labels=False to skip this check, which syncs the host)")


def _not_capturing(labels: Tensor) -> None:
    """masked_lm_loss's refusal while a CUDA graph is captured (both backends)."""
    if _checks.capturing(labels):
        raise RuntimeError(
            "masked_lm_loss cannot be captured in a CUDA graph (torch.cuda.graph, "
            "torch.compile mode='reduce-overhead'): it reads the number of masked tokens on the "
            "host, which sets the shapes of what follows; call it outside the captured region")


def _check_label_range(name: str, labels: Tensor, n_classes: int, ignore_index: int) -> None:
    """Raise if a label other than ignore_index lies outside [0, n_classes). Syncs the host;
    under torch.compile or CUDA-graph capture the check runs on the device instead (a
    device-side assert: no graph break), and fake / meta labels hold no values to check."""
    flat = labels.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= n_classes))
    if _checks.tracing() or _checks.capturing(labels):
        torch._assert_async(~bad.any(), f"{name} must hold class indices in [0, {n_classes}) "
                                        f"or ignore_index={ignore_index}")
        return
    if not has_values(labels):
        return
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise _label_error(name, n_classes, ignore_index, int(flat[i]), i)


def cross_entropy_ref(logits: Tensor, target: Tensor, *, ignore_index: int = -100,
                      label_smoothing: float = 0.0, reduction: str = "mean",
                      upcast: bool = False, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.nn.functional.cross_entropy`` computed in fp32 (fp64 for fp64 logits, or with
    ``upcast=True``), returned in ``out_dtype`` (default logits.dtype)."""
    ct = torch.float64 if (upcast or logits.dtype == torch.float64) else torch.float32
    loss = F.cross_entropy(logits.to(ct), target.long(), ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    return loss.to(out_dtype or logits.dtype)


def masked_lm_loss_ref(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                       ignore_index: int = -100, label_smoothing: float = 0.0,
                       reduction: str = "mean", upcast: bool = False) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` on the rows whose label is not ignored.

    Projects only those rows, in fp32 (fp64 for fp64 inputs, or with ``upcast=True``), and
    keeps those logits and their softmax for the backward (the kernels keep neither). Returns
    float32 (float64 for fp64 inputs): the mean over the non-ignored rows (0.0 when there are
    none, unlike ``F.cross_entropy``'s NaN), their sum, or with "none" a loss per token of
    labels' shape, 0 on ignored tokens.
    """
    ct = torch.float64 if (upcast or hidden.dtype == torch.float64) else torch.float32
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h2 = hidden.reshape(-1, hidden.shape[-1])
    lab = _wide_enough(labels.reshape(-1), ignore_index)
    rows = (lab != ignore_index).nonzero().squeeze(1)
    logits = F.linear(h2.index_select(0, rows).to(ct), weight.to(ct),
                      bias.to(ct) if bias is not None else None)
    # ignore_index passed on, though no selected row holds it: F.cross_entropy's default
    # (-100) would silently skip a -100 label that is not the ignored one
    per_row = F.cross_entropy(logits, lab.index_select(0, rows).long(), reduction="none",
                              ignore_index=ignore_index, label_smoothing=label_smoothing)
    if reduction == "none":
        out = per_row.new_zeros(lab.shape).index_copy(0, rows, per_row).reshape(labels.shape)
    elif reduction == "sum":
        out = per_row.sum()
    else:
        out = per_row.sum() / max(rows.numel(), 1)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------
# custom ops (Triton backend): cross_entropy

def _n_counted(target: Tensor, ignore_index: int, n_classes: int) -> Tensor:
    """The divisor of a "mean": targets that are neither ignored nor (with check_labels=False)
    out of range, as the torch backend counts them (a device tensor: no sync)."""
    return ((target != ignore_index) & (target >= 0) & (target < n_classes)).sum()


def _rows(logits: Tensor) -> Tensor:
    """Rows with unit column stride, as the kernels read them: ``logits`` itself when it has
    them. One class (V = 1): the column's stride is never stepped, whatever it is (torch calls
    such a tensor contiguous, so .contiguous() keeps it): restrided in place of a copy."""
    if logits.stride(-1) == 1:
        return logits
    if logits.shape[-1] == 1:
        return logits.as_strided(logits.shape, (logits.stride(0), 1))
    return logits.contiguous()


@fast_op("fastbert::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                       reduction: str, check_labels: bool, out_dtype: torch.dtype,
                       store_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, stats, dlogits, count). With ``store_grad`` (reduction "mean" or "sum") dlogits is
    the gradient of the loss itself, written by the forward kernel; otherwise an empty tensor.
    count (int64, on the device): for a reduced loss (a mean's is kept for the backward) or
    ``check_labels``, what the kernels' reduction counted; otherwise an empty tensor. The loss,
    its reduction, the count and the label check are two launches (three above the reduction's
    REDUCE_ONE_PROGRAM_ROWS rows) and a few allocations: no other torch op."""
    k = kernel_module("cross_entropy")
    store_grad = store_grad and reduction != "none"
    scale = dlogits = grad_count = None
    if store_grad:
        # the gradient written before the reduction has counted: 1 / count of a mean, counted
        # here on the device (no host sync); 0 / 0 leaves inf, which only ignored rows (all of
        # them) would meet, and they store exact zeros
        scale = 1.0
        if reduction == "mean":
            grad_count = _n_counted(target, ignore_index, logits.shape[1])
        dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    loss, stats, count = k.cross_entropy_fwd(
        _rows(logits), target, ignore_index, label_smoothing, grad_scale=scale, dlogits=dlogits,
        count=grad_count, reduction=reduction, loss_dtype=out_dtype, check_labels=check_labels)
    if check_labels and _checks.capturing(count):
        # no host read while a CUDA graph is captured: the check runs on the device (a
        # device-side assert, which names no row)
        torch._assert_async(count >= 0, f"target must hold class indices in "
                                         f"[0, {logits.shape[1]}) or ignore_index={ignore_index}")
    elif check_labels:
        # the host's one sync: after the forward's launches, not before them
        found = int(count)
        if found < 0:
            row = -1 - found
            raise _label_error("target", logits.shape[1], ignore_index, int(target[row]), row)
    return (loss, stats, (dlogits if store_grad else logits.new_empty(0)),
            count if count is not None else target.new_empty(0, dtype=torch.int64))


@_cross_entropy_fwd.register_fake
def _(logits, target, ignore_index, label_smoothing, reduction, check_labels, out_dtype,
      store_grad):
    shape = (logits.shape[0],) if reduction == "none" else ()
    stored = store_grad and reduction != "none"
    counted = reduction != "none" or check_labels   # as the launcher: see its Returns
    return (logits.new_empty(shape, dtype=out_dtype),
            logits.new_empty((logits.shape[0], 2), dtype=torch.float32),
            logits.new_empty(logits.shape if stored else (0,)),
            target.new_empty(() if counted else (0,), dtype=torch.int64))


@fast_op("fastbert::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd(grad: Tensor, logits: Tensor, target: Tensor, stats: Tensor,
                       count: Optional[Tensor], ignore_index: int, label_smoothing: float,
                       reduction: str) -> Tensor:
    """The gradient of the logits, recomputed; ``count``: the forward's divisor of a "mean"
    (None: counted here). The kernel reads the incoming gradient and the count on the device
    and divides there: one allocation and one launch."""
    k = kernel_module("cross_entropy")
    if reduction == "mean":
        if count is None:
            count = _n_counted(target, ignore_index, logits.shape[1])
    else:
        count = None
    return k.cross_entropy_bwd(_rows(logits), target, stats, grad, ignore_index, label_smoothing,
                               count=count)


@_cross_entropy_bwd.register_fake
def _(grad, logits, target, stats, count, ignore_index, label_smoothing, reduction):
    return logits.new_empty(logits.shape)


@fast_op("fastbert::cross_entropy_scale_", mutates_args=("dlogits",))
def _cross_entropy_scale_(dlogits: Tensor, grad: Tensor) -> None:
    """dlogits *= grad (a scalar), in place; a no-op decided on the device when grad is 1."""
    k = kernel_module("cross_entropy")
    k.cross_entropy_scale_(dlogits, grad)


@_cross_entropy_scale_.register_fake
def _(dlogits, grad):
    return None


def stores_grads(dtype: torch.dtype, reduction: str) -> bool:
    """Whether the forward of a reduced loss computes its gradients (the incoming gradient
    taken as 1) for the backward to scale. Not in float16: a gradient of the mean over n rows
    is ~p / n, below fp16's smallest subnormal (6e-8) for most classes at n ~ 4096 and V ~ 30k,
    so fp16 training scales the loss (GradScaler, x65536) to lift it into range; stored before
    that scale is known, it would be flushed to zero. bfloat16 has float32's exponent range."""
    return reduction != "none" and dtype != torch.float16


def _no_double_backward(op: str) -> None:
    """Raise in a backward recording a graph (create_graph=True) of a loss whose forward
    stored its gradients: they have no history, so a second derivative through them would
    silently be zero."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fastbert {op} (reduction 'mean' or 'sum') has no double backward "
            f"(create_graph=True): its gradients are computed in the forward; call it with "
            f"reduction='none' and reduce the result, or with backend='torch'")


def _saved_stored_grads(ctx, op: str):
    """ctx.saved_tensors of a loss whose forward stored its gradients, which the backward
    scales in place: a second backward through it would scale them again, so it raises (a flag
    on ctx, and autograd's version check, which saved-tensor hooks turn off)."""
    msg = (f"fastbert {op} (reduction 'mean' or 'sum') computes its gradients in the forward "
           f"and applies the incoming gradient to them in place during backward, so it can be "
           f"backpropagated through only once; for a second backward (retain_graph=True), "
           f"call it with reduction='none' and reduce the result, or with backend='torch'")
    if getattr(ctx, "stored_grads_used", False):
        raise RuntimeError(msg)
    _no_double_backward(op)
    try:
        saved = ctx.saved_tensors
    except RuntimeError as e:
        if "modified by an inplace operation" not in str(e):
            raise
        raise RuntimeError(msg) from e
    ctx.stored_grads_used = True
    return saved


def _scaled(t: Tensor, g: Tensor) -> Tensor:
    """t * g into a new tensor, as ``cross_entropy_scale_`` computes it in place: exact zeros
    (ignored rows) stay zero whatever g is."""
    return torch.where(t == 0, t, t.float() * g.float()).to(t.dtype)


def _ce_setup(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, reduction, _, _, store_grad = inputs
    # no zero-filled gradients for the non-differentiable outputs (three launches); the loss,
    # the one differentiable output, always has one when the backward runs
    ctx.set_materialize_grads(False)
    ctx.stored = store_grad and reduction != "none"
    ctx.mark_non_differentiable(output[1], output[2], output[3])
    if ctx.stored:
        # the logits themselves are not kept: the gradient is all the backward needs
        ctx.save_for_backward(output[2])
    else:
        ctx.save_for_backward(logits, target, output[1],
                              output[3] if reduction == "mean" else None)
    ctx.ignore_index, ctx.label_smoothing, ctx.reduction = ignore_index, label_smoothing, reduction


def _ce_backward(ctx, dloss, dstats, ddlogits, dcount):
    dlogits = None
    if ctx.needs_input_grad[0]:
        if ctx.stored:
            (dlogits,) = _saved_stored_grads(ctx, "cross_entropy")
            _cross_entropy_scale_(dlogits, dloss)
        else:
            logits, target, stats, count = ctx.saved_tensors
            dlogits = _cross_entropy_bwd(dloss, logits, target, stats, count, ctx.ignore_index,
                                         ctx.label_smoothing, ctx.reduction)
    return dlogits, None, None, None, None, None, None, None


_cross_entropy_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


# ----------------------------------------------------------------------------------------
# custom ops (Triton backend): masked_lm_loss

def _select_masked(labels: Tensor, ignore_index: int, n_classes: int, check_labels: bool):
    """(rows, target, sel, info, n_mean): the rows whose label is not ignore_index and their
    labels (int64), views of ``sel``, ``info`` = (their count, first out-of-range row, number
    of out-of-range rows) on the host, and the divisor of a mean (``_n_mean``),
    as ``select_rows`` writes them. One launch and the host's one sync (the count sets the
    shapes of what follows); raises for an out-of-range label with ``check_labels``."""
    _not_capturing(labels)
    k = kernel_module("cross_entropy")
    sel, info = k.select_rows(labels, ignore_index, n_classes, check_labels)
    # the count and the label check in one read; on the host, the backward reads it again
    # without a sync
    info = info.cpu()
    n, bad, n_bad = info.tolist()
    if bad < labels.shape[0]:
        raise _label_error("labels", n_classes, ignore_index, int(labels[bad]), bad)
    return _selected(sel, n) + (sel, info, _n_mean(n, n_bad))


def _n_mean(n: int, n_bad: int) -> int:
    """The divisor of a mean, from ``info``'s n selected rows and n_bad out-of-range labels among
    them: the rows whose label is in range (an out-of-range one, with check_labels=False, makes
    the loss NaN; the others' gradients are divided as the torch backend divides them), at
    least 1."""
    return max(n - n_bad, 1)


def _selected(sel: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """The n selected rows and their labels: views of ``sel``."""
    n_all = sel.shape[0] // 2
    rows, _, target, _ = sel.split_with_sizes((n, n_all - n, n, n_all - n))
    return rows, target


def _flat(t: Tensor, item_dims: int) -> Tensor:
    """t's (B, S) token axes as one, when it has them ahead of its ``item_dims`` others (a
    view where the strides allow)."""
    return t.flatten(0, 1) if t.dim() == item_dims + 2 else t


def _scatter_rows(shape, rows: Tensor, values: Tensor) -> Tensor:
    """A tensor of ``shape`` (tokens first, (B, S) or flat), zero but for values[i] at token
    rows[i]."""
    out = values.new_zeros(shape)
    _flat(out, values.dim() - 1).index_copy_(0, rows, values)
    return out


def _full_grads(hidden, rows, dx, dw, db):
    """(dhidden over all rows, dweight, dbias); an absent one is a fresh empty tensor (custom
    ops may not return None, nor one tensor twice)."""
    dh = _scatter_rows(hidden.shape, rows, dx) if dx is not None else None
    return tuple(t if t is not None else hidden.new_empty(0) for t in (dh, dw, db))


@fast_op("fastbert::masked_lm_loss_fwd", mutates_args=())
def _masked_lm_loss_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                        ignore_index: int, label_smoothing: float, reduction: str,
                        need_dhidden: bool, need_dweight: bool, need_dbias: bool,
                        check_labels: bool, scale_in_place: bool
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, dhidden, dweight, dbias, sel, info); the gradients (of the loss itself) only where
    ``stores_grads`` (reduction "mean" or "sum", not float16). ``scale_in_place``: the backward
    multiplies them by the incoming gradient in place (eager), rather than into new tensors
    (under torch.compile, whose AOTAutograd cannot trace a backward that mutates a saved
    tensor). sel (2 N,) int64 and info (3,) int64 on the host: the masked rows as
    ``_select_masked`` returns them, which a backward that recomputes the projection uses
    again (fixed shapes, so that torch.compile sees none that depends on the data)."""
    k = kernel_module("cross_entropy")
    rows, target, sel, info, n_mean = _select_masked(_flat(labels, 0), ignore_index,
                                                     weight.shape[0], check_labels)
    n = rows.numel()
    x = _flat(hidden, 1).index_select(0, rows)
    grads = (stores_grads(hidden.dtype, reduction)
             and (need_dhidden or need_dweight or need_dbias))
    # the gradient of the loss itself, 1 / (the rows counted) for a mean: a value the kernel
    # takes (no tensor)
    scale = (1.0 / n_mean if reduction == "mean" else 1.0) if grads else None
    loss_rows, dx, dw, db = k.linear_cross_entropy(x, weight, bias, target, ignore_index,
                                                   label_smoothing, scale, need_dhidden,
                                                   need_dweight, need_dbias)
    if reduction == "none":
        loss = _scatter_rows(labels.shape, rows, loss_rows)
    elif reduction == "sum" or n == 0:
        loss = loss_rows.sum()  # no masked token: 0.0 for the mean too, not NaN
    else:
        loss = loss_rows.mean()
    return (loss,) + _full_grads(hidden, rows, dx, dw, db) + (sel, info)


def _mlm_stored_grads(hidden, bias, reduction, need_dhidden, need_dweight, need_dbias):
    """Which gradients the forward returns (otherwise the backward computes them)."""
    on = stores_grads(hidden.dtype, reduction)
    return (on and need_dhidden, on and need_dweight, on and need_dbias and bias is not None)


@_masked_lm_loss_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, need_dhidden,
      need_dweight, need_dbias, check_labels, scale_in_place):
    sh, sw, sb = _mlm_stored_grads(hidden, bias, reduction, need_dhidden, need_dweight,
                                   need_dbias)
    shape = labels.shape if reduction == "none" else ()
    return (hidden.new_empty(shape, dtype=torch.float32),
            hidden.new_empty(hidden.shape) if sh else hidden.new_empty(0),
            weight.new_empty(weight.shape) if sw else hidden.new_empty(0),
            bias.new_empty(bias.shape) if sb else hidden.new_empty(0),
            labels.new_empty((2 * labels.numel(),), dtype=torch.int64),
            torch.empty((3,), dtype=torch.int64, device="cpu"))


@fast_op("fastbert::masked_lm_loss_bwd", mutates_args=())
def _masked_lm_loss_bwd(grad: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                        sel: Tensor, info: Tensor, ignore_index: int, label_smoothing: float,
                        reduction: str, need_dhidden: bool, need_dweight: bool,
                        need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients where the forward stored none (reduction "none": a gradient per token; float16,
    see ``stores_grads``): recomputes the projection of the rows the forward selected (sel,
    info: no second selection, no host sync), the incoming gradient folded into the scale of
    each row before anything is rounded."""
    k = kernel_module("cross_entropy")
    n, _, n_bad = info.tolist()  # info lies on the host: no sync
    rows, target = _selected(sel, n)
    x = _flat(hidden, 1).index_select(0, rows)
    if reduction == "none":
        # read by the kernel in its dtype
        scale = grad.reshape(-1).index_select(0, rows)
    elif reduction == "mean":
        scale = grad / _n_mean(n, n_bad)
    else:
        scale = grad
    _, dx, dw, db = k.linear_cross_entropy(x, weight, bias, target, ignore_index,
                                           label_smoothing, scale, need_dhidden, need_dweight,
                                           need_dbias)
    return _full_grads(hidden, rows, dx, dw, db)


@_masked_lm_loss_bwd.register_fake
def _(grad, hidden, weight, bias, sel, info, ignore_index, label_smoothing, reduction,
      need_dhidden, need_dweight, need_dbias):
    return (hidden.new_empty(hidden.shape) if need_dhidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_dweight else hidden.new_empty(0),
            bias.new_empty(bias.shape) if (need_dbias and bias is not None)
            else hidden.new_empty(0))


@fast_op("fastbert::masked_lm_loss_scale_", mutates_args=("dhidden", "dweight", "dbias"))
def _masked_lm_loss_scale_(dhidden: Tensor, dweight: Tensor, dbias: Tensor, grad: Tensor) -> None:
    """The three stored gradients *= grad (a scalar), in place, in one launch; a no-op decided
    on the device when grad is 1; empty ones (not computed) are skipped."""
    k = kernel_module("cross_entropy")
    k.cross_entropy_scale_(dhidden, grad, dweight, dbias)


@_masked_lm_loss_scale_.register_fake
def _(dhidden, dweight, dbias, grad):
    return None


def _mlm_setup(ctx, inputs, output):
    (hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, need_dhidden,
     need_dweight, need_dbias, _, scale_in_place) = inputs
    # no zero-filled gradients for the non-differentiable outputs (three launches)
    ctx.set_materialize_grads(False)
    ctx.scale_in_place = scale_in_place
    ctx.reduction, ctx.ignore_index, ctx.label_smoothing = reduction, ignore_index, label_smoothing
    ctx.has_bias = bias is not None
    ctx.stored = stores_grads(hidden.dtype, reduction)
    ctx.mark_non_differentiable(*output[1:])
    if ctx.stored:
        ctx.save_for_backward(*output[1:4])
    else:
        # the rows the forward selected (sel, and info on the host): no second selection
        ctx.save_for_backward(hidden, weight, bias, output[4], output[5])


def _mlm_backward(ctx, dloss, ddh, ddw, ddb, dsel, dinfo):
    need = ctx.needs_input_grad
    need_dh, need_dw, need_db = bool(need[0]), bool(need[1]), bool(need[2]) and ctx.has_bias
    if not ctx.stored:
        hidden, weight, bias, sel, info = ctx.saved_tensors
        dh, dw, db = _masked_lm_loss_bwd(dloss, hidden, weight, bias, sel, info,
                                         ctx.ignore_index, ctx.label_smoothing, ctx.reduction,
                                         need_dh, need_dw, need_db)
    else:
        # stored gradients of the loss itself: scale by the incoming (scalar) gradient
        if ctx.scale_in_place:
            dh, dw, db = _saved_stored_grads(ctx, "masked_lm_loss")
            # one launch; on the device, nothing to do for 1.0 (loss.backward()): no pass over
            # dW. The forward stored exactly the gradients needed (the others are empty).
            _masked_lm_loss_scale_(dh, dw, db, dloss)
        else:
            _no_double_backward("masked_lm_loss")
            dh, dw, db = ctx.saved_tensors
            dh = _scaled(dh, dloss) if need_dh else None
            dw = _scaled(dw, dloss) if need_dw else None
            db = _scaled(db, dloss) if need_db else None
    return ((dh if need_dh else None), (dw if need_dw else None), (db if need_db else None),
            None, None, None, None, None, None, None, None, None)


_masked_lm_loss_fwd.register_autograd(_mlm_backward, setup_context=_mlm_setup)


# FLOPs for torch.utils.flop_counter.FlopCounterMode (MFU estimates), counted as torch counts
# the matmuls the op runs inside: the projection of the n masked rows (2 n H V), and each
# gradient GEMM (dhidden, dweight: 2 n H V apiece) where it runs -- in the forward when it
# stores the gradients, else in the backward after recomputing the projection. The
# cross-entropy itself counts 0, as F.cross_entropy does. n is read from the labels (forward;
# a host sync, as FlopCounterMode's own count of packed attention) or the forward's count,
# which lies on the host (backward); its bound, every row, for fake or meta tensors (inductor
# counts FLOPs on fake tensors while it compiles).

def _mlm_gemm_flops(n: int, weight: Tensor, n_gemms: int) -> int:
    vocab, hidden = weight.shape
    return 2 * n * hidden * vocab * n_gemms


try:
    from torch.utils.flop_counter import register_flop_formula as _flops_formula
except ImportError:  # pragma: no cover - a torch without the FLOP counter
    _flops_formula = None
if _flops_formula is not None:
    @_flops_formula(torch.ops.fastbert.masked_lm_loss_fwd, get_raw=True)
    def _(hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, need_dhidden,
          need_dweight, need_dbias, *args, out_shape=None, **kwargs) -> int:
        n = (int((_wide_enough(labels, ignore_index) != ignore_index).sum())
             if _checks.real_values(labels) else labels.numel())
        stored = stores_grads(hidden.dtype, reduction)
        return _mlm_gemm_flops(n, weight, 1 + stored * (bool(need_dhidden) + bool(need_dweight)))

    @_flops_formula(torch.ops.fastbert.masked_lm_loss_bwd, get_raw=True)
    def _(grad, hidden, weight, bias, sel, info, ignore_index, label_smoothing, reduction,
          need_dhidden, need_dweight, *args, out_shape=None, **kwargs) -> int:
        n = int(info[0]) if _checks.real_values(info) else sel.shape[0] // 2
        return _mlm_gemm_flops(n, weight, 1 + bool(need_dhidden) + bool(need_dweight))


# ----------------------------------------------------------------------------------------
# public API

def _check_options(ignore_index, label_smoothing, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_real("label_smoothing", label_smoothing)
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")


def _wide_enough(labels: Tensor, ignore_index: int) -> Tensor:
    """int32 labels as int64 when ignore_index lies outside int32 (no label can equal it):
    the torch path's comparisons with it would wrap it into int32's range, the kernels
    compare in int64."""
    if labels.dtype == torch.int32 and not -2**31 <= ignore_index < 2**31:
        return labels.long()
    return labels


def _unchecked_labels(labels: Tensor, n_classes: int, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """For check_labels=False on the torch backend, which must not index with an
    out-of-range label (an IndexError on the CPU, a device-side assert on the GPU): the
    out-of-range mask, and the labels with those entries set to ignore_index. No host sync."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_classes))
    return bad, labels.masked_fill(bad, ignore_index)


def _nan_where_bad(loss: Tensor, bad: Tensor, reduction: str) -> Tensor:
    """NaN for the out-of-range rows (and for a reduced loss that includes one), as the
    kernels give; their gradient stays zero."""
    if reduction == "none":
        return loss.masked_fill(bad, float("nan"))
    return loss + torch.where(bad.any(), float("nan"), 0.0).to(loss.dtype)


def _check_labels_tensor(name: str, t, shape, what: str):
    if isinstance(t, torch.Tensor) and t.dtype in INDEX_DTYPES and t.shape == shape:
        return  # the common case, without building the messages' arguments
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        raise TypeError(f"{name} must hold class indices (int64 or int32); class-probability "
                        f"targets are not supported, got {str(t.dtype).replace('torch.', '')}")
    check_tensor(name, t, dtypes=INDEX_DTYPES)
    check_shape(name, t, shape, what)


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean",
                  check_labels: bool = True, backend: Optional[str] = None) -> Tensor:
    """Softmax cross-entropy over the rows of ``logits``, fused.

    Same semantics as ``torch.nn.functional.cross_entropy`` with class-index targets: "mean"
    divides by the number of non-ignored targets and so returns NaN when every target is
    ignored (as torch; ``masked_lm_loss`` returns 0.0 there instead); ignored rows get a zero
    gradient (on the Triton backend even of NaN or all -inf logits, where torch's, and so the
    "torch" backend's, is NaN). Logits of +-1e4 are safe (running-max logsumexp in fp32). No
    (N, V) buffer is allocated besides the gradient when the classes are contiguous (logits'
    last stride 1); other logits are copied to rows, once in the forward and once in the
    backward.

    The forward keeps two floats a row (max and log-sum-exp) and the logits; the backward
    recomputes the gradient from them: three passes over (N, V) for forward + backward, which
    an H200 ran faster than the two-pass variant that writes the gradient in the forward (see
    ``fastbert.kernels.cross_entropy.STORE_GRADS``, off by default; with it on, a mean / sum
    loss in float32 / bfloat16 can be backpropagated through only once).

    Args:
        logits: (N, V) or (V,), float32 / float16 / bfloat16 (float64 on the torch backend).
        target: (N,) or () int64 / int32 class indices in [0, V), or ignore_index.
        ignore_index: target value whose rows contribute neither loss nor gradient.
        label_smoothing: in [0, 1], torch's definition (mixes in the uniform distribution).
        reduction: "mean", "sum" or "none" (a loss per row).
        check_labels: raise ValueError when a target is out of range (syncs the host; while a
            CUDA graph is captured, and under torch.compile on the torch backend, the check
            runs on the device instead: a device-side assert, RuntimeError on the CPU). With
            False an out-of-range target is never used as an address: its row's loss is NaN.
        backend: "triton", "torch" or None (see ``fastbert.ops``).

    Returns:
        The loss in logits' dtype (float32 under autocast, as torch), computed in float32.
    """
    check_tensor("logits", logits, dtypes=REF_DTYPES, ndim=(1, 2))
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    _check_labels_tensor("target", target, logits.shape[:-1],
                         "logits' shape without the class dimension")
    check_same_device(logits=logits, target=target)
    _check_options(ignore_index, label_smoothing, reduction)
    # autocast returns float32 (cross_entropy is on its float32 list) and, as autocast, leaves
    # float64 alone
    out_dtype = (torch.float32 if autocast_dtype(logits) is not None
                 and logits.dtype != torch.float64 else logits.dtype)
    chosen = resolve("cross_entropy", (logits, target), backend, preference=("triton",),
                     extra_check=lambda b: kernel_dtype_reason(logits=logits))
    if chosen == "torch":
        target = _wide_enough(target, ignore_index)
        if check_labels:
            _check_label_range("target", target, logits.shape[-1], ignore_index)
            return cross_entropy_ref(logits, target, ignore_index=ignore_index,
                                     label_smoothing=label_smoothing, reduction=reduction,
                                     out_dtype=out_dtype)
        bad, target = _unchecked_labels(target, logits.shape[-1], ignore_index)
        loss = cross_entropy_ref(logits, target, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, reduction=reduction,
                                 out_dtype=out_dtype)
        return _nan_where_bad(loss, bad, reduction)
    unbatched = logits.dim() == 1
    # With a reduced loss and a gradient to come, the forward writes that gradient (for an
    # incoming gradient of 1; the backward scales it in place on the device otherwise). Not
    # under torch.compile: AOTAutograd cannot trace a backward that mutates a tensor saved by
    # the forward, so a compiled graph recomputes the gradient from the logits instead.
    # (the compile test first: Dynamo cannot trace the kernel module's import)
    store_grad = (not _checks.tracing() and torch.is_grad_enabled()
                  and logits.requires_grad and stores_grads(logits.dtype, reduction)
                  and kernel_module("cross_entropy").STORE_GRADS)
    loss, _, _, _ = _cross_entropy_fwd(logits.reshape(1, -1) if unbatched else logits,
                                    target.reshape(1) if unbatched else target, int(ignore_index),
                                    float(label_smoothing), reduction, bool(check_labels),
                                    out_dtype, store_grad)
    return loss.reshape(()) if unbatched and reduction == "none" else loss


def masked_lm_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                   ignore_index: int = -100, label_smoothing: float = 0.0,
                   reduction: str = "mean", check_labels: bool = True,
                   backend: Optional[str] = None) -> Tensor:
    """BERT's masked-LM loss: cross-entropy of ``hidden @ weight.T + bias`` on masked tokens.

    Only the rows whose label is not ``ignore_index`` are projected (about 15% in BERT
    pre-training), in chunks: per chunk cuBLAS computes the logits, one kernel turns them into
    the loss and, in place, the gradient, and cuBLAS folds that into the gradients of hidden,
    weight and bias, so no (n_masked, V) tensor is kept for the backward and memory does not
    grow with the number of masked tokens. (The torch backend, ``masked_lm_loss_ref``: what
    "auto" takes on CPU and for float64, is the plain reference: it keeps its fp32 logits of
    the masked rows and their softmax for the backward.)

    Args:
        hidden: (N, H) or (B, S, H), float32 / float16 / bfloat16 (float64 on the torch
            backend): the MLM head's transformed hidden states.
        weight: (V, H), hidden's dtype: the decoder weight (usually the tied word embeddings).
        bias: (V,) of hidden's dtype, or None.
        labels: (N,) or (B, S) int64 / int32: the token id to predict, or ignore_index.
        ignore_index, label_smoothing: as ``torch.nn.functional.cross_entropy``.
        reduction: "mean" over masked tokens (0.0 when there is none, with zero gradients),
            "sum", or "none" (a loss per token of labels' shape, 0 where ignored).
        check_labels: raise ValueError when a label is out of range (on the Triton backend
            the row selection checks, in the host sync it makes anyway; on the torch backend one
            more sync, or under torch.compile a device-side assert). With False an
            out-of-range label is never used as an address: its loss is NaN.
        backend: "triton", "torch" or None (see ``fastbert.ops``).

    Under autocast, hidden, weight and bias are cast to the autocast dtype first (as
    ``nn.Linear`` would be).

    It reads the number of masked tokens on the host (it sets the shapes of what follows), on
    either backend: it cannot be captured in a CUDA graph (raises RuntimeError).

    With reduction "mean" or "sum" in float32 / bfloat16 the gradients are computed in the
    forward, in hidden's dtype, and the backward multiplies them by the incoming gradient:
    exact for 1.0 or a power of two, one extra rounding of bf16 gradients for other factors.
    Outside torch.compile it does so in place, on the device, and not at all for 1.0 (no pass
    over dW); so such a loss can be backpropagated through only once (a second
    ``backward(retain_graph=True)`` raises), and an in-place change of hidden or weight
    between the forward and the backward is not detected (the gradients are those of the
    forward's values; torch would raise). In float16 (loss scaling: see ``stores_grads``)
    and with "none" the backward recomputes the projection instead, one more GEMM.

    Returns:
        float32 loss (float64 for float64 inputs); gradients flow to hidden, weight and bias.
    """
    check_tensor("hidden", hidden, dtypes=REF_DTYPES, ndim=(2, 3))
    check_tensor("weight", weight, dtypes=REF_DTYPES, ndim=(2,))
    check_tensor("bias", bias, dtypes=REF_DTYPES, optional=True)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    n_hidden = hidden.shape[-1]
    if n_hidden == 0:
        raise ValueError(f"hidden must have a non-empty hidden dimension, got shape "
                         f"{tuple(hidden.shape)}")
    if weight.shape[1] != n_hidden or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, {n_hidden}) with V >= 1 (H = the last "
                         f"dimension of hidden), got {tuple(weight.shape)}")
    check_shape("bias", bias, (weight.shape[0],), "the first dimension of weight")
    _check_labels_tensor("labels", labels, hidden.shape[:-1],
                         "hidden's shape without the hidden dimension")
    _check_options(ignore_index, label_smoothing, reduction)
    dt = autocast_dtype(hidden)
    if dt is not None:
        # as autocast casts nn.Linear's inputs: float64 tensors are left alone
        hidden, weight, bias = (t if t is None or t.dtype == torch.float64 else t.to(dt)
                                for t in (hidden, weight, bias))
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {str(hidden.dtype)[6:]}, "
                            f"got {str(t.dtype)[6:]}")
    chosen = resolve("masked_lm_loss", (hidden, weight, bias, labels), backend,
                     preference=("triton",),
                     extra_check=lambda b: kernel_dtype_reason(hidden=hidden, weight=weight,
                                                               bias=bias))
    if chosen == "torch":
        _not_capturing(labels)
        labels = _wide_enough(labels, ignore_index)
        if check_labels:
            _check_label_range("labels", labels, weight.shape[0], ignore_index)
            return masked_lm_loss_ref(hidden, weight, bias, labels, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing, reduction=reduction)
        bad, labels = _unchecked_labels(labels, weight.shape[0], ignore_index)
        loss = masked_lm_loss_ref(hidden, weight, bias, labels, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing, reduction=reduction)
        return _nan_where_bad(loss, bad, reduction)
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    # (B, S) tokens are flattened inside the op: no reshape nodes for autograd to run
    return _masked_lm_loss_fwd(hidden, weight, bias, labels, int(ignore_index),
                               float(label_smoothing), reduction, *needs, bool(check_labels),
                               not _checks.tracing())[0]
