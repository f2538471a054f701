"""LayerNorm family: ``layer_norm`` (with residual / bias / dropout epilogue) and
``gelu_layer_norm`` (the MLM head transform), on one fused Triton kernel pair.

Layers of this file:
    layer_norm_ref           -- the PyTorch reference: CPU path, "torch" backend, test oracle
    fastbert::layer_norm_fwd / fastbert::layer_norm_bwd
                             -- torch.library custom ops over the Triton launchers, with fake
                                (meta) implementations and registered autograd, so that
                                torch.compile(fullgraph=True) traces through them
    layer_norm, gelu_layer_norm
                             -- the public functions: check arguments, pick the backend
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import (REF_DTYPES, check_eps, check_probability, check_same_device, check_shape,
                      check_tensor, cuda_autocast_layer_norm_fp32, drops_everything,
                      kernel_dtype_reason, dropout_seed)
from ._fastop import fast_op
from ._dispatch import resolve

ACTIVATIONS = ("none", "gelu", "gelu_tanh")


def layer_norm_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
                   *, residual: Optional[Tensor] = None, x_bias: Optional[Tensor] = None,
                   dropout_p: float = 0.0, training: bool = True, activation: str = "none",
                   dropout_mask: Optional[Tensor] = None, upcast: bool = False,
                   out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """LayerNorm(dropout(act(x + x_bias)) + residual) in PyTorch.

    Computes in fp32 (fp64 when the inputs are fp64, or everything in fp64 with
    ``upcast=True``) and returns ``out_dtype`` (default x.dtype), like the kernels.
    ``dropout_mask`` (bool, x's shape) replaces the random draw: tests pass the kernel's mask.
    """
    out_dtype = out_dtype or x.dtype
    wide = (x.dtype == torch.float64 or out_dtype == torch.float64
            or (residual is not None and residual.dtype == torch.float64))
    ct = torch.float64 if (upcast or wide) else torch.float32
    s = x.to(ct)
    if x_bias is not None:
        s = s + x_bias.to(ct)
    if activation != "none":
        s = F.gelu(s, approximate="tanh" if activation == "gelu_tanh" else "none")
    if dropout_p > 0.0 and training:
        if dropout_mask is not None:
            s = s * dropout_mask.to(ct) / (1.0 - dropout_p)
        else:
            s = F.dropout(s, dropout_p, training=True)
    if residual is not None:
        s = s + residual.to(ct)
    y = F.layer_norm(s, s.shape[-1:],
                     weight.to(ct) if weight is not None else None,
                     bias.to(ct) if bias is not None else None, eps)
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------
# custom ops (Triton backend)

@fast_op("fastbert::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    residual: Optional[Tensor], x_bias: Optional[Tensor], seed: Optional[Tensor],
                    eps: float, dropout_p: float, activation: str,
                    out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    from fastbert.kernels import layer_norm as k
    return k.layer_norm_fwd(x, weight, bias, eps, residual, x_bias, seed, dropout_p,
                            activation, out_dtype)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, residual, x_bias, seed, eps, dropout_p, activation, out_dtype):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.float32))


@fast_op("fastbert::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    residual: Optional[Tensor], x_bias: Optional[Tensor], seed: Optional[Tensor],
                    mean: Tensor, rstd: Tensor, dropout_p: float, activation: str,
                    need_dres: bool) -> List[Tensor]:
    from fastbert.kernels import layer_norm as k
    dx, dres, dw, db, dxb = k.layer_norm_bwd(dy, x, weight, bias, mean, rstd, residual, x_bias,
                                             seed, dropout_p, activation, need_dres)
    # custom ops may not return an input or an alias of another output: dres is dx
    # itself when the residual path has the same gradient
    if dres is dx:
        dres = None
    return [t if t is not None else x.new_empty(0) for t in (dx, dres, dw, db, dxb)]


@_layer_norm_bwd.register_fake
def _(dy, x, weight, bias, residual, x_bias, seed, mean, rstd, dropout_p, activation, need_dres):
    stores_dres = (residual is not None and need_dres
                   and (dropout_p > 0.0 and seed is not None or activation != "none"
                        or residual.dtype != x.dtype))
    like = lambda t, flag=True: t.new_empty(t.shape) if (t is not None and flag) else x.new_empty(0)
    return [x.new_empty(x.shape), like(residual, stores_dres), like(weight), like(bias), like(x_bias)]


def _fwd_setup(ctx, inputs, output):
    x, weight, bias, residual, x_bias, seed, eps, dropout_p, activation, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, residual, x_bias, seed, mean, rstd)
    ctx.dropout_p = dropout_p
    ctx.activation = activation
    # mean and rstd get no gradient: no zero tensors made for them at each backward
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, dy, dmean, drstd):
    if dy is None:
        return (None,) * 10
    x, weight, bias, residual, x_bias, seed, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dres, dw, db, dxb = _layer_norm_bwd(dy, x, weight, bias, residual, x_bias, seed,
                                            mean, rstd, ctx.dropout_p, ctx.activation,
                                            bool(need[3]))
    if residual is not None and need[3] and dres.numel() == 0:
        dres = dx  # same gradient (no dropout or activation on x's path)
    return (dx if need[0] else None,
            dw if weight is not None and need[1] else None,
            db if bias is not None and need[2] else None,
            dres.to(residual.dtype) if residual is not None and need[3] else None,
            dxb if x_bias is not None and need[4] else None,
            None, None, None, None, None)


_layer_norm_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ----------------------------------------------------------------------------------------
# public API

def _max_cols_check(n_cols: int):
    from fastbert.kernels._common import MAX_FUSED_COLS
    if n_cols > MAX_FUSED_COLS:
        return f"the normalized size {n_cols} exceeds the fused kernels' limit {MAX_FUSED_COLS}"
    return None


def _check_args(op, x, weight, bias, residual, x_bias, eps, dropout_p):
    check_tensor("x", x, dtypes=REF_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        check_tensor(name, t, dtypes=REF_DTYPES, optional=True)
        check_shape(name, t, (n,), "the last dimension of x")
    check_tensor("residual", residual, dtypes=REF_DTYPES, optional=True)
    check_shape("residual", residual, x.shape, "the shape of x")
    check_same_device(x=x, weight=weight, bias=bias, residual=residual, x_bias=x_bias)
    check_eps(op, eps)
    check_probability("dropout_p", dropout_p)


def _out_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    # CUDA autocast runs torch's layer_norm in fp32 and returns fp32 (it is on autocast's fp32
    # list there; CPU autocast leaves it in the input dtype): do the same, without
    # materializing fp32 copies of the inputs (the kernel computes in fp32 anyway). Else the
    # dtype of x + residual in PyTorch: a float32 residual stream stays float32 when x (a
    # sublayer's bf16 output, say) is narrower. Autocast leaves float64 alone (torch's rule).
    if residual is None or residual.dtype is x.dtype:
        dtype = x.dtype
    else:
        dtype = torch.promote_types(x.dtype, residual.dtype)
    if cuda_autocast_layer_norm_fp32(dtype, x.device.type == "cuda"):
        return torch.float32
    return dtype


def _layer_norm_impl(op, x, weight, bias, eps, residual, x_bias, dropout_p, training,
                     activation, backend):
    _check_args(op, x, weight, bias, residual, x_bias, eps, dropout_p)
    out_dtype = _out_dtype(x, residual)
    chosen = resolve(op, (x, weight, bias, residual, x_bias), backend, preference=("triton",),
                     extra_check=lambda b: kernel_dtype_reason(
                         x=x, weight=weight, bias=bias, residual=residual, x_bias=x_bias)
                     or _max_cols_check(x.shape[-1]))
    p = float(dropout_p) if training else 0.0
    if drops_everything(p):
        # everything dropped: LayerNorm(residual) (torch's dropout with p = 1 multiplies by 0,
        # so x's and x_bias's gradients are zeros, and a non-finite x gives NaN, as there)
        x = (x if x_bias is None else x + x_bias) * 0.0
        x_bias, p = None, 0.0
    if chosen == "torch":
        return layer_norm_ref(x, weight, bias, eps, residual=residual, x_bias=x_bias,
                              dropout_p=p, activation=activation, out_dtype=out_dtype)
    seed = (dropout_seed(x.device)
            if p > 0.0 else None)
    y, _, _ = _layer_norm_fwd(x, weight, bias, residual, x_bias, seed, float(eps), p,
                              activation, out_dtype)
    return y


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
               *, residual: Optional[Tensor] = None, x_bias: Optional[Tensor] = None,
               dropout_p: float = 0.0, training: bool = True,
               backend: Optional[str] = None) -> Tensor:
    """``LayerNorm(dropout(x + x_bias) + residual)`` over the last dimension, in one pass.

    This is BERT's epilogue after the attention-output and FFN-output projections.

    Args:
        x: (..., N) float32 / float16 / bfloat16 (float64 on the torch backend).
        weight, bias: (N,) or None (LayerNorm's affine parameters).
        eps: added to the variance.
        residual: same shape as x, or None.
        x_bias: (N,) added to x before dropout (the preceding Linear's bias), or None.
        dropout_p: dropout probability applied to ``x + x_bias``, in [0, 1]; drawn from torch's
            generator, so ``torch.manual_seed`` reproduces it.
        training: dropout is applied only when True (pass ``module.training``).
        backend: "triton", "cuda", "torch" or None (see ``fastbert.ops``).

    Returns:
        Tensor of x's shape, in the dtype of ``x + residual`` (x's without a residual; float32
        under CUDA autocast, like torch's layer_norm). Statistics are computed in float32.
    """
    return _layer_norm_impl("layer_norm", x, weight, bias, eps, residual, x_bias, dropout_p,
                            training, "none", backend)


def gelu_layer_norm(x: Tensor, x_bias: Optional[Tensor], weight: Optional[Tensor],
                    bias: Optional[Tensor], eps: float = 1e-5, *, approximate: str = "none",
                    backend: Optional[str] = None) -> Tensor:
    """``LayerNorm(GELU(x + x_bias))`` in one pass: BERT's MLM head transform.

    Args:
        x: (..., N) float32 / float16 / bfloat16 (float64 on the torch backend).
        x_bias: (N,) or None (the dense layer's bias).
        weight, bias: (N,) or None (LayerNorm's affine parameters).
        approximate: "none" (erf GELU, BERT's) or "tanh".

    Returns:
        Tensor of x's shape and dtype (float32 under CUDA autocast, like torch's layer_norm);
        a wider x_bias does not widen it (x_bias stands for the fused Linear's bias, whose
        output is x's dtype). Statistics are computed in float32.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _layer_norm_impl("gelu_layer_norm", x, weight, bias, eps, None, x_bias, 0.0, False,
                            "gelu" if approximate == "none" else "gelu_tanh", backend)
