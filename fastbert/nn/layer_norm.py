"""``fastbert.nn.LayerNorm``: a drop-in for ``torch.nn.LayerNorm`` on the fused kernel."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..ops._checks import check_eps
from .lstm import _ShapeError


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
        w = self.weight.reshape(-1) if self.weight is not None else None
        b = self.bias.reshape(-1) if self.bias is not None else None
        lead = input.shape[:input.dim() - nd]
        n = math.prod(self.normalized_shape)  # not -1: a batch of 0 rows leaves it ambiguous
        x = input.reshape(*lead, n)
        res = residual.reshape(*lead, n) if residual is not None else None
        y = ops.layer_norm(x, w, b, self.eps, residual=res, backend=self.backend)
        return y.reshape(input.shape)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", backend={self.backend!r}" if self.backend else "")
