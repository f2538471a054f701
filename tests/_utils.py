"""Helpers shared by the tests: the low-precision error rule, poisoned outputs and an
independent eager LayerNorm-LSTM."""
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
    finite = torch.isfinite(ref)
    if not finite.all():
        # the reference's NaN / +-inf must stand at the same places in out; the finite rest
        # is measured as usual
        assert (torch.equal(torch.isnan(out), torch.isnan(ref))
                and torch.equal(torch.isposinf(out), torch.isposinf(ref))
                and torch.equal(torch.isneginf(out), torch.isneginf(ref))), \
            f"{name}: non-finite values differ from the reference's"
        out, ref = out[finite], ref[finite]
        lowp_ref = lowp_ref[finite] if lowp_ref is not None else None
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_err(out, ref)
    if out.dtype in LOW_PRECISION:
        assert lowp_ref is not None, "low-precision comparisons need the PyTorch low-precision result"
        # an overflow in torch's own low-precision result would make the bound infinite
        assert torch.isfinite(lowp_ref).all(), (
            f"{name}: PyTorch's low-precision result is not finite where the reference is: "
            "no bound to compare against (choose inputs in range)")
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


def ln_lstm_eager(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ln_ih_weight, ln_hh_weight,
                  ln_cell_weight, ln_cell_bias, lengths, *, reverse=False, eps=1e-5):
    """One LayerNorm-LSTM layer and direction (haste's formulation), one cell step at a time,
    written independently of ``fastbert.ops.lstm_layer_ref``, computed in the inputs' dtype
    and device: in fp64 a second oracle, in fp16 / bf16 PyTorch's own low-precision error
    for ``assert_close_to_ref``.

    x: (T, B, I) padded; h0: (B, P); c0: (B, H); weights as ``lstm_layer`` (b_ih, b_hh,
    w_hr may be None); lengths: (B,). Returns y (T, B, P), h_n (B, P), c_n (B, H).
    """
    def ln(v, w, b=None):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        out = (v - mu) / torch.sqrt(var + eps) * w
        return out + b if b is not None else out

    n_steps, n_batch = x.shape[:2]
    lengths = lengths.to(x.device)
    h, c = h0, c0
    y = x.new_zeros(n_steps, n_batch, h0.shape[-1])
    for t in (reversed(range(n_steps)) if reverse else range(n_steps)):
        gates = ln(x[t] @ w_ih.t(), ln_ih_weight)
        if b_ih is not None:
            gates = gates + b_ih
        gates = gates + ln(h @ w_hh.t(), ln_hh_weight)
        if b_hh is not None:
            gates = gates + b_hh
        i, f, g, o = gates.chunk(4, -1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(ln(c_new, ln_cell_weight, ln_cell_bias))
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        m = (t < lengths)[:, None]
        y[t] = torch.where(m, h_new, 0.0)
        h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
    return y, h, c


def record_ops():
    """A TorchDispatchMode that records the name of every op dispatched inside it (``.ops``)
    and runs it: under it fastbert's ops take their custom-op (dispatcher) path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    return RecordOps()
