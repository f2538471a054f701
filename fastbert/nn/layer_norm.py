"""``fastbert.nn.LayerNorm``: a drop-in for ``torch.nn.LayerNorm`` on the fused kernel."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..ops._checks import check_eps
from .lstm import _ShapeError


class _OwnGrad(torch.autograd.Function):
    """Identity whose backward copies the gradient, so that it is no view of another input's."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.clone()


class LayerNorm(torch.nn.LayerNorm):
    """Same constructor, defaults, parameters and state_dict as ``torch.nn.LayerNorm``.

    Runs ``fastbert.ops.layer_norm`` when ``normalized_shape`` is one dimension (the
    transformer case); a multi-dimensional ``normalized_shape`` is flattened into the last
    dimension, which is the same computation.

    Extra (keyword-only) argument:
        backend: "triton", "cuda", "torch" or None (auto), passed to the op.

    ``eps`` must be positive and finite (checked here, as every forward would refuse it); a
    shape mismatch raises an error that is both a ValueError and torch's RuntimeError.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: Optional[str] = None):
        check_eps("LayerNorm", eps)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                         bias=bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """LayerNorm(input [+ residual]); the residual add is fused into the kernel."""
        if not isinstance(input, Tensor):   # torch.nn.LayerNorm's error type
            raise TypeError(f"LayerNorm: input must be a Tensor, got {type(input).__name__}")
        nd = len(self.normalized_shape)
        if tuple(input.shape[input.dim() - nd:]) != tuple(self.normalized_shape):
            raise _ShapeError(f"input's trailing dimensions {tuple(input.shape[input.dim() - nd:])} "
                             f"do not match normalized_shape {tuple(self.normalized_shape)}")
        if residual is not None and (not isinstance(residual, Tensor)
                                     or tuple(residual.shape) != tuple(input.shape)):
            got = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
            raise _ShapeError(f"residual must have input's shape {tuple(input.shape)}, got {got}")
        if nd == 0:   # torch's F.layer_norm refuses it too (a group of one element: the bias)
            raise _ShapeError("LayerNorm: normalized_shape must have at least one dimension, "
                              "got ()")
        if nd == 1:
            # no reshape: a view in front of each of two leaves (input and residual get the
            # same gradient tensor) would make their .grad two views of one buffer, which a
            # second backward (accumulation) or clip_grad_norm_ would then update twice
            return ops.layer_norm(input, self.weight, self.bias, self.eps, residual=residual,
                                  backend=self.backend)
        w = self.weight.reshape(-1) if self.weight is not None else None
        b = self.bias.reshape(-1) if self.bias is not None else None
        lead = input.shape[:input.dim() - nd]
        n = math.prod(self.normalized_shape)  # not -1: a batch of 0 rows leaves it ambiguous
        x = input.reshape(*lead, n)
        res = None
        if residual is not None:
            # the residual's gradient a tensor of its own (the aliasing above; rare shapes only)
            res = _OwnGrad.apply(residual).reshape(*lead, n)
        y = ops.layer_norm(x, w, b, self.eps, residual=res, backend=self.backend)
        return y.reshape(input.shape)

    def __setstate__(self, state):
        # a LayerNorm pickled by torch (or before backend existed) unpickles with the default
        state.setdefault("backend", None)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", backend={self.backend!r}" if self.backend else "")
