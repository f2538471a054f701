"""Helpers shared by the tests: the low-precision error rule and poisoned outputs."""
from __future__ import annotations

from typing import Optional

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
# The Triton interpreter (triton 3.8) casts fp32 -> bf16 by truncation, not round-to-nearest-
# even as the GPU does (measured: 8.185 is stored as 8.125, not 8.1875), so a bf16 output can be
# one ulp off instead of half an ulp: under the interpreter bf16 outputs get twice the factor.
INTERPRETER_BF16_FACTOR = 2.0


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, lowp_ref: Optional[torch.Tensor] = None,
                        *, atol: float = 1e-5, rtol_fp32: float = 1e-5, factor: float = 2.0,
                        name: str = "output") -> None:
    """The house rule for comparing a kernel with its reference.

    ``ref`` is the fp64 (or fp32-upcast) reference. For fp16/bf16 outputs pass ``lowp_ref``:
    PyTorch computing the same thing in that low precision. The kernel's error against ``ref``
    must be at most ``factor`` times PyTorch's own low-precision error, plus ``atol``
    (the flash-attention rule). For fp32 outputs a plain tolerance applies.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all() or not torch.isfinite(ref).all(), f"{name}: non-finite values"
    err = max_err(out, ref)
    if out.dtype in LOW_PRECISION:
        assert lowp_ref is not None, "low-precision comparisons need the PyTorch low-precision result"
        base = max_err(lowp_ref, ref)
        if out.dtype == torch.bfloat16 and out.device.type == "cpu" and _interpreting():
            factor = factor * INTERPRETER_BF16_FACTOR
        bound = factor * base + atol
        assert err <= bound, f"{name}: error {err:.3e} > {factor} x torch's {base:.3e} + {atol:g}"
    else:
        scale = ref.double().abs().max().item() if ref.numel() else 0.0
        bound = atol + rtol_fp32 * scale
        assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or a sentinel (ints) so an element a kernel forgets to write fails."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-12345)
