"""``bias_gelu``: GELU(x + bias) on one fused Triton kernel pair (see kernels/bias_gelu.py)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import REF_DTYPES, check_same_device, check_shape, check_tensor, kernel_dtype_reason
from ._fastop import fast_op
from ._dispatch import resolve, kernel_module


def bias_gelu_ref(x: Tensor, bias: Optional[Tensor], approximate: str = "none", *,
                  upcast: bool = False) -> Tensor:
    """GELU(x + bias) in PyTorch; fp32 math (fp64 with ``upcast=True``), returns x.dtype."""
    ct = torch.float64 if (upcast or x.dtype == torch.float64) else torch.float32
    h = x.to(ct)
    if bias is not None:
        h = h + bias.to(ct)
    return F.gelu(h, approximate=approximate).to(x.dtype)


@fast_op("fastbert::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    k = kernel_module("bias_gelu")
    return k.bias_gelu_fwd(x, bias, approximate)


@_bias_gelu_fwd.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@fast_op("fastbert::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor],
                   approximate: str) -> Tuple[Tensor, Tensor]:
    k = kernel_module("bias_gelu")
    dx, db = k.bias_gelu_bwd(dy, x, bias, approximate)
    return dx, (db if db is not None else x.new_empty(0))


@_bias_gelu_bwd.register_fake
def _(dy, x, bias, approximate):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            bias.new_empty(bias.shape) if bias is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = _bias_gelu_bwd(dy, x, bias, ctx.approximate)
    need = ctx.needs_input_grad
    return dx if need[0] else None, db if bias is not None and need[1] else None, None


_bias_gelu_fwd.register_autograd(_backward, setup_context=_setup)


def bias_gelu(x: Tensor, bias: Optional[Tensor], approximate: str = "none", *,
              backend: Optional[str] = None) -> Tensor:
    """``GELU(x + bias)`` in one pass (the FFN's intermediate activation).

    Args:
        x: (..., N) float32 / float16 / bfloat16 (float64 on the torch backend).
        bias: (N,) or None.
        approximate: "none" (exact erf form, BERT's) or "tanh".
        backend: "triton", "cuda", "torch" or None (see ``fastbert.ops``).

    Returns:
        Tensor of x's shape and dtype (math in float32).
    """
    check_tensor("x", x, dtypes=REF_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"bias_gelu: x must have at least one dimension, got shape {tuple(x.shape)}")
    check_tensor("bias", bias, dtypes=REF_DTYPES, optional=True)
    check_shape("bias", bias, (x.shape[-1],), "the last dimension of x")
    check_same_device(x=x, bias=bias)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    chosen = resolve("bias_gelu", (x, bias), backend, preference=("triton",),
                     extra_check=lambda b: kernel_dtype_reason(x=x, bias=bias))
    # an empty last dimension leaves the launchers no row length to flatten by, and nothing
    # to compute: the reference returns the empty result (and its empty gradients)
    if chosen == "torch" or x.shape[-1] == 0:
        return bias_gelu_ref(x, bias, approximate)
    return _bias_gelu_fwd(x, bias, approximate)
