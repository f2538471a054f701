"""kernels/_common.py helpers that are plain PyTorch (the Triton ones are tested through the
ops that launch them)."""
from __future__ import annotations

import pytest
import torch

from fastbert.kernels._common import mm_fp32
from fastbert.ops import masked_lm_loss
from tests._utils import _interpreting


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mm_fp32_is_an_fp32_product_inside_an_autocast_region(dtype):
    """A backward called inside autocast (common in training scripts) runs these products
    under it: they must stay fp32, not be cast to the autocast dtype by torch.mm."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 33, generator=g).to(dtype), torch.randn(33, 7, generator=g).to(dtype)
    want = a.double() @ b.double()
    for region in (torch.autocast("cpu", dtype=torch.bfloat16),
                   torch.autocast("cpu", enabled=False)):
        with region:
            got = mm_fp32(a, b)
            out = torch.empty(9, 7)
            mm_fp32(a, b, out=out)
        assert got.dtype == out.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(out, got, rtol=0, atol=0)


@pytest.mark.skipif(not _interpreting(), reason="CPU autocast and CPU tensors on the Triton "
                    "backend: the interpreter's path (CUDA's fp32 product is aten::mm.dtype, "
                    "which autocast does not cast)")
def test_masked_lm_loss_fp16_backward_inside_autocast_equals_outside():
    """The fp16 masked-LM backward (its products in fp32, kernels/_common.py mm_fp32) gives
    the same gradients whether backward() runs inside the autocast region or after it."""
    labels = torch.full((16,), -100)
    labels[:5] = torch.tensor([1, 5, 7, 3, 9])
    grads = []
    for inside in (False, True):
        g = torch.Generator().manual_seed(0)
        h, w, b = (torch.randn(*s, generator=g).requires_grad_()
                   for s in ((16, 32), (40, 32), (40,)))
        with torch.autocast("cpu", dtype=torch.float16):
            loss = masked_lm_loss(h, w, b, labels, backend="triton")
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append([t.grad for t in (h, w, b)])
    for a, b_ in zip(*grads):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)


@pytest.mark.skipif(not _interpreting(), reason="CPU autocast and CPU tensors on the Triton "
                    "backend (the interpreter's path)")
def test_lstm_dh0_is_an_fp32_product_when_backward_runs_inside_autocast():
    """kernels/lstm.py: dh0's product stays fp32 when backward() is called inside an
    autocast region (mm_fp32), so h0's gradient equals the one computed after leaving it."""
    from fastbert.ops import lstm_layer
    grads = []
    for inside in (False, True):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 3, 6, generator=g)
        h0 = torch.randn(3, 16, generator=g).requires_grad_()
        c0 = torch.randn(3, 16, generator=g)
        w_ih, w_hh = torch.randn(64, 6, generator=g), torch.randn(64, 16, generator=g)
        b = torch.randn(64, generator=g)
        out, h, c = lstm_layer(x, h0, c0, w_ih, w_hh, b, b, backend="triton")
        loss = out.sum() + h.sum()
        if inside:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss.backward()
        else:
            loss.backward()
        grads.append(h0.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
