"""kernels/_common.py helpers that are plain PyTorch, and the kernels' tanh (the other Triton
ones are tested through the ops that launch them)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fastbert.kernels._common import _tanh, dropout_mask, mm_fp32
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


@triton.jit
def _tanh_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, _tanh(tl.load(x_ptr + i, mask=i < n)), mask=i < n)


def test_tanh_is_accurate_near_zero_and_saturates(device):
    """The kernels' tanh (LSTM cells, the GELU tanh form): relative error within a few fp32
    ulps from 1e-9 to saturation, where 1 - 2 / (exp(2x) + 1) alone was 19% off at 1e-7 and
    0.14% at 1e-5; +-1 beyond, NaN kept."""
    mags = torch.logspace(-9, 1.5, 500, dtype=torch.float64)
    x = torch.cat([mags, -mags, torch.tensor([0.0, 0.25, -0.25, 1e30, float("inf"),
                                              -float("inf"), float("nan")],
                                             dtype=torch.float64)]).float().to(device)
    out = torch.empty_like(x)
    _tanh_kernel[(1,)](x, out, x.numel(), BLOCK=2048)
    ref = torch.tanh(x.double())
    finite = torch.isfinite(ref)
    assert torch.equal(out.isnan(), ref.isnan())
    rel = (out[finite].double() - ref[finite]).abs() / ref[finite].abs().clamp_min(1e-300)
    # exp2 and the fp32 division are approximations on the GPU (a couple of ulps each)
    assert rel.max().item() <= 8 * torch.finfo(torch.float32).eps, rel.max().item()
    assert (out[finite & (x.abs() > 10)].abs() == 1.0).all()


def test_tanh_series_branch_is_within_one_rounding(device):
    """Below TANH_SERIES_BELOW the kernels' tanh is a polynomial (multiplies and adds only, no
    approximate exp2 / division on any device): within ~1 fp32 rounding of tanh, densely
    sampled. The 500-point, 8-ulp check of test_common passed with the series cut at 0.1 or
    0.2 (the exp form reaches 8.5 ulps at 0.1-0.2) or without its x^9 term (2.9 ulps)."""
    x = torch.linspace(-0.2499, 0.2499, 8001, dtype=torch.float64).float().to(device)
    out = torch.empty_like(x)
    _tanh_kernel[(1,)](x, out, x.numel(), BLOCK=8192)
    ref = torch.tanh(x.double())
    nz = ref != 0
    rel = (out.double()[nz] - ref[nz]).abs() / ref[nz].abs()
    assert rel.max().item() <= 1.5 * torch.finfo(torch.float32).eps, rel.max().item()


@triton.jit
def _philox_uniform_kernel(seed_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    """The documented layout, element by element: element (r, c) of rows of n_cols takes
    output c % 4 of tl.randint4x at counter r * ceil(n_cols / 4) + c // 4."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK).to(tl.int64)
    ctr = r * ((n_cols + 3) // 4) + c // 4
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), ctr)
    j = c % 4
    x = tl.where(j == 0, r0, tl.where(j == 1, r1, tl.where(j == 2, r2, r3)))
    tl.store(out_ptr + r * n_cols + c, tl.random.uint_to_uniform_float(x), mask=c < n_cols)


def _documented_keep(seed, n_rows, n_cols, p):
    u = torch.empty(n_rows, n_cols, device=seed.device)
    _philox_uniform_kernel[(n_rows,)](seed, u, n_cols, BLOCK=triton.next_power_of_2(n_cols))
    return u >= p


@pytest.mark.parametrize("n_cols", [4, 5, 7, 30, 4100])  # 4100: two blocks of the mask kernel
def test_row_dropout_mask_is_the_documented_philox_layout(device, n_cols):
    """dropout_keep_row (LayerNorm / embedding; dropout_mask replays it): element (r, c) is
    output c % 4 of Philox at counter r * ceil(n_cols / 4) + c // 4. The other tests compare
    kernels with masks drawn by this same helper, so a wrong stride (rows overlapping: one
    draw shared by two rows), a swapped output order or one output for four elements passed."""
    seed = torch.tensor([123456789], dtype=torch.int64, device=device)
    n_rows = 3
    got = dropout_mask(seed, n_rows, n_cols, 0.4)
    assert torch.equal(got, _documented_keep(seed, n_rows, n_cols, 0.4))


def test_dropout_seeds_are_63_bits_and_the_kernels_use_the_high_ones(device):
    """A call's seed has 63 random bits (31 repeated a mask every ~1e4 pairs of calls over a
    long training run), torch.manual_seed reproduces it, and Philox (64-bit counters, the seed
    its 64-bit key) gives other masks for seeds that differ only above bit 31."""
    from fastbert.ops._checks import dropout_seed
    torch.manual_seed(7)
    seeds = torch.cat([dropout_seed(device) for _ in range(64)])
    assert seeds.dtype == torch.int64 and (seeds >= 0).all()
    assert (seeds >= 2**32).float().mean().item() > 0.9
    torch.manual_seed(7)
    assert torch.equal(dropout_seed(device), seeds[:1])
    low = torch.tensor([12345], dtype=torch.int64, device=device)
    a = dropout_mask(low, 3, 40, 0.5)
    b = dropout_mask(low + 2**40, 3, 40, 0.5)
    assert not torch.equal(a, b)


def test_dropout_seeds_differ_between_calls(device):
    """(kills C03: a constant seed, every call the same mask)"""
    from fastbert.ops._checks import dropout_seed
    seeds = torch.cat([dropout_seed(device) for _ in range(64)])
    assert len(set(seeds.tolist())) == 64


@pytest.mark.gpu
def test_dropout_seed_comes_from_the_device_generator():
    """Drawn from the CUDA generator (no host sync): torch.cuda.manual_seed alone reproduces
    it, whatever the CPU generator did in between. (kills C02: drawn on the CPU and copied)"""
    from fastbert.ops._checks import dropout_seed
    torch.cuda.manual_seed(7)
    a = dropout_seed(torch.device("cuda"))
    torch.rand(3)   # the CPU generator moves on
    torch.cuda.manual_seed(7)
    assert torch.equal(dropout_seed(torch.device("cuda")), a)
