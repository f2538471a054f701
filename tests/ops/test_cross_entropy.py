"""cross_entropy and masked_lm_loss: kernels against fp64 PyTorch, forward and every gradient.

On CPU the kernels run in the Triton interpreter (tests/conftest.py); the projection GEMMs of
masked_lm_loss are torch matmuls either way.
"""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fastbert  # noqa: F401  (aliases kernels/ as fastbert.kernels)
from fastbert.kernels import cross_entropy as k
from fastbert.ops import cross_entropy, cross_entropy_ref, masked_lm_loss, masked_lm_loss_ref
from fastbert.ops import BackendUnavailable
from tests._utils import _interpreting, assert_close_to_ref, max_err, poison_

# the module (the attribute fastbert.ops.cross_entropy is the function of that name)
ops_ce = sys.modules["fastbert.ops.cross_entropy"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100


def _targets(n, v, device, ignore_frac=0.25, ignore_index=IGNORE):
    t = torch.randint(0, v, (n,), device=device)
    t[torch.rand(n, device=device) < ignore_frac] = ignore_index
    return t


# The upstream gradient of a scalar loss: exactly representable in fp16 and bf16, so that a
# loss returned in those dtypes receives the same gradient as the fp64 reference, and a power
# of two (as 1.0 and loss scaling are): masked_lm_loss stores 16-bit gradients in its forward
# and scales them in the backward, a second rounding for any other factor (documented there).
GRAD_OUT = 2.0
# fp32 results cannot be closer to fp64 than rounding allows: a result of magnitude |r| may be
# off by this many units of eps * |r| (two roundings) whatever torch's own error happened to be.
FP32_ULP_SLACK = 2.0
# masked_lm_loss 16-bit gradients: half an ulp of the largest value on top of 2x torch's error.
LOWP_ULP_FLOOR = 0.5
# GPU test of masked_lm_loss in several chunks: rows a chunk (about 614 masked rows -> 3 chunks)
GPU_CHUNK_ROWS = 256


def _reduce_for_grad(loss, reduction, grad_dtype=None):
    """A scalar whose gradient exercises the upstream gradient: random weights for "none",
    rounded to ``grad_dtype`` (the loss dtype of the low-precision runs) so that every run
    compared receives the same upstream gradient, not one rounded to its own loss dtype."""
    if reduction == "none":
        w = torch.randn(loss.shape, dtype=torch.float64, device=loss.device)
        if grad_dtype is not None:
            w = w.to(grad_dtype).double()
        return (loss.double() * w).sum()
    return loss.double() * GRAD_OUT


def _interpreter_bf16_ulp(out, ref):
    """One bf16 ulp of ref's largest value for a bf16 output of the interpreter, else 0.

    The interpreter stores bf16 by truncation (tests/_utils.py): up to one ulp off where the
    GPU's round-to-nearest is half an ulp, and where torch's own error can be ~0 (a gradient
    -w + p_t w with p_t tiny and w exact in bf16) "4x torch's error" is no bound. On the GPU
    this is 0 and the plain 2x rule applies."""
    if out.dtype != torch.bfloat16 or not _interpreting() or not ref.numel():
        return 0.0
    return torch.finfo(torch.bfloat16).eps * ref.abs().max().item()


def _ce_run(fn, logits, target, reduction, grad_dtype=None, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, target, reduction=reduction, **kw)
    torch.manual_seed(1)
    _reduce_for_grad(loss, reduction, grad_dtype).backward()
    return loss.detach(), x.grad


def _check_ce(logits, target, reduction, *, label_smoothing=0.0, ignore_index=IGNORE,
              like_torch_fp32=False):
    """Loss and dlogits against fp64. fp16/bf16: within 2x torch's own error in that dtype.
    fp32: a plain tolerance, or with ``like_torch_fp32`` (large logits, where fp32 itself
    is coarse) within 2x the error of torch computing in fp32 plus two fp32 roundings."""
    kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing,
              grad_dtype=logits.dtype)
    out, grad = _ce_run(lambda *a, **b: cross_entropy(*a, backend="triton", **b), logits,
                        target, reduction, **kw)
    ref, ref_grad = _ce_run(F.cross_entropy, logits.double(), target, reduction, **kw)
    lowp = lowp_grad = None
    if logits.dtype != torch.float32 or like_torch_fp32:
        lowp, lowp_grad = _ce_run(F.cross_entropy, logits, target, reduction, **kw)
    assert out.dtype == logits.dtype
    for name, o, r, lp, atol in (("loss", out, ref, lowp, 1e-4),
                                 ("dlogits", grad, ref_grad, lowp_grad, 1e-5)):
        atol = atol + _interpreter_bf16_ulp(o, r)
        if like_torch_fp32 and o.dtype == torch.float32:
            assert torch.isfinite(o).all(), name
            err, base = max_err(o, r), max_err(lp, r)
            ulps = FP32_ULP_SLACK * torch.finfo(torch.float32).eps * r.abs().max().item()
            assert err <= 2 * base + atol + ulps, \
                f"{name}: error {err:.3e} > 2 x torch's {base:.3e} + {atol:g} + {ulps:.2e}"
        else:
            if lp is not None and not torch.isfinite(lp[torch.isfinite(r)]).all():
                # torch's fp16 loss with label smoothing sums -log p over every class and row
                # in fp16 and overflows; the yardstick is then the exact result rounded to
                # the dtype, the best any fp16 output can be
                lp = r.to(o.dtype)
            assert_close_to_ref(o, r, lp, name=name, atol=atol)


# ----------------------------------------------------------------------------------------
# cross_entropy

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_fwd_bwd_matches_fp64(device, dtype, reduction, label_smoothing):
    logits = (torch.randn(13, 1237, device=device) * 4).to(dtype)
    target = _targets(13, 1237, device)
    _check_ce(logits, target, reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("n_rows,n_cols", [(1, 1), (1, 7), (113, 100), (3, 30522)])
def test_cross_entropy_ragged_shapes_match_fp64(device, n_rows, n_cols):
    # rows of a wider buffer: the row stride is not the class count
    wide = torch.randn(n_rows, n_cols + 5, device=device) * 3
    logits = wide[:, :n_cols]
    target = _targets(n_rows, n_cols, device, ignore_frac=0.2)
    target[0] = n_cols - 1  # at least one target: the mean over none is NaN (tested below)
    _check_ce(logits, target, "none" if n_rows < 100 else "mean", label_smoothing=0.05)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's 0 / 0
def test_cross_entropy_unbatched_and_custom_ignore_index_match_torch(device):
    logits = torch.randn(50, device=device)
    for reduction in REDUCTIONS:
        for t in (torch.tensor(3, device=device), torch.tensor(7, device=device)):
            out = cross_entropy(logits, t, ignore_index=7, reduction=reduction, backend="triton")
            # the reference on a batch of one row: torch's CUDA kernel for 1-D input returns 0
            # for the mean over an ignored target where its documented value (and its batched
            # and CPU kernels, and ours) is NaN (seen with torch 2.11 on an H200)
            ref = F.cross_entropy(logits.double()[None], t[None], ignore_index=7,
                                  reduction=reduction)
            ref = ref.reshape(()) if reduction == "none" else ref
            assert out.shape == ref.shape
            if ref.isnan():
                assert out.isnan()
            else:
                assert_close_to_ref(out, ref)
    target = _targets(9, 50, device, ignore_index=0)
    _check_ce(torch.randn(9, 50, device=device), target, "mean", ignore_index=0)


@pytest.mark.parametrize("ignore_index", [2**31, -2**40])
def test_int32_targets_with_an_ignore_index_outside_int32_match_torch(device, ignore_index):
    """An int32 target never equals such an ignore_index: every row counts. The kernels' lanes
    past the last row read ignore_index as their fill value, truncated to int32: those lanes
    must not count (they once made the mean's count 2048 for 6 rows, and masked_lm_loss's
    selection count too large)."""
    gen = torch.Generator().manual_seed(0)
    n, v, h = 6, 10, 16
    labels = torch.randint(0, v, (n,), generator=gen, dtype=torch.int32).to(device)
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64)
    for reduction in REDUCTIONS:
        out = cross_entropy(logits.float().to(device), labels, ignore_index=ignore_index,
                            reduction=reduction, backend="triton")
        ref = F.cross_entropy(logits, labels.long().cpu(), ignore_index=ignore_index,
                              reduction=reduction)
        assert_close_to_ref(out, ref.to(device))
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    out = masked_lm_loss(hidden.float().to(device), weight.float().to(device), None, labels,
                         ignore_index=ignore_index, backend="triton")
    ref = F.cross_entropy(hidden @ weight.t(), labels.long().cpu(), ignore_index=ignore_index)
    assert_close_to_ref(out, ref.to(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_logits_of_1e4_are_safe(device, dtype):
    # rows of large logits of both signs, one near-tie at the top; exp() of them would overflow
    logits = (torch.randn(6, 3000, device=device).sign() * 1e4
              + torch.randn(6, 3000, device=device) * 30).to(dtype)
    target = torch.randint(0, 3000, (6,), device=device)
    target[1] = int(logits[1].float().argmax())
    for reduction in ("mean", "none"):
        _check_ce(logits, target, reduction, label_smoothing=0.1, like_torch_fp32=True)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_loss_of_1e4_logits_is_rounded_once(device, label_smoothing):
    # loss_r ~ 2e4: each fp32 step of combining max, target logit, mean and log-sum would add
    # up to half an ulp (1e-3); the kernel combines them in fp64 and rounds once, and the
    # reduction sums the row losses in fp64, so each result is within one fp32 rounding
    eps = torch.finfo(torch.float32).eps
    logits = torch.randn(64, 3000, device=device).sign() * 1e4 + torch.randn(64, 3000,
                                                                            device=device) * 30
    target = torch.randint(0, 3000, (64,), device=device)
    kw = dict(label_smoothing=label_smoothing)
    rows = cross_entropy(logits, target, reduction="none", backend="triton", **kw).double()
    ref = F.cross_entropy(logits.double(), target, reduction="none", **kw)
    # atol: log_s, a sum of exp2 approximations on the GPU, is good to about 1e-6
    assert ((rows - ref).abs() <= eps * ref.abs() + 1e-5).all(), \
        f"max error {(rows - ref).abs().max().item():.3e} over one rounding"
    total = cross_entropy(logits, target, reduction="sum", backend="triton", **kw).double()
    assert (total - ref.sum()).abs() <= eps * ref.abs().sum() + 1e-5 * len(ref)


@pytest.mark.parametrize("store", [False, True])
def test_cross_entropy_smoothing_of_logits_sharing_a_large_offset(device, monkeypatch, store):
    """Label smoothing's mean of logits that all sit near 1e4: taken as deviations from one
    logit of the row, so that its rounding is relative to the spread, not to the offset (a
    plain fp32 mean was off by ~1e-4, 15-80x torch's fp32 error): each row's loss within one
    fp32 rounding of fp64, in the statistics loop (several blocks) and, storing the gradient,
    the row held in registers."""
    monkeypatch.setattr(k, "STORE_GRADS", store)
    eps = torch.finfo(torch.float32).eps
    logits = 1e4 + 5 * torch.randn(8, 5000, device=device)
    target = torch.randint(0, 5000, (8,), device=device)
    kw = dict(label_smoothing=0.1)
    rows = cross_entropy(logits, target, reduction="none", backend="triton", **kw).double()
    ref = F.cross_entropy(logits.double(), target, reduction="none", **kw)
    assert ((rows - ref).abs() <= eps * ref.abs() + 1e-5).all(), \
        f"max error {(rows - ref).abs().max().item():.3e} over one rounding"
    # a mean loss of logits that need gradients: the forward that stores them (STORE_GRADS)
    total = cross_entropy(logits.requires_grad_(), target, backend="triton", **kw).double()
    assert (total - ref.mean()).abs() <= eps * ref.mean().abs() + 1e-5


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's exp2 argument
@pytest.mark.parametrize("n_cols", [5, 5000])
def test_cross_entropy_smoothing_of_logits_whose_sum_overflows(device, n_cols):
    """Label smoothing's mean over the row, of finite fp32 logits whose sum overflows: the loss
    is the fp64 reference's (finite, positive; the row's fp32 sum once made it -inf), the row in
    one pass of the statistics loop and in several."""
    logits = torch.randn(2, n_cols, device=device)
    logits[:, 1] = logits[:, 3] = 3e38
    target = torch.tensor([0, 3], device=device)
    out = cross_entropy(logits, target, reduction="none", label_smoothing=0.1, backend="triton")
    ref = F.cross_entropy(logits.double(), target, reduction="none", label_smoothing=0.1)
    assert torch.isfinite(ref).all() and (ref > 0).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("row, t", [([-3e38, 3e38, 3e38], 1), ([-3e38] + [3e38] * 4, 1),
                                    ([3e38] + [-3e38] * 4, 0)])
def test_cross_entropy_smoothing_of_huge_logits_of_both_signs(device, row, t):
    """Label smoothing's mean as deviations from a reference logit (the first, or the max),
    of finite logits 6e38 apart: the loss is fp64's (finite), in the statistics loop and in
    the stored-gradient forward (a doubled mean deviation overflowed to +-inf)."""
    x = torch.tensor([row], device=device)
    target = torch.tensor([t], device=device)
    ref = F.cross_entropy(x.double(), target, label_smoothing=0.1, reduction="none")
    assert torch.isfinite(ref).all()
    for grad_scale in (None, 1.0):
        out, _, _ = k.cross_entropy_fwd(x.clone(), target, IGNORE, 0.1, grad_scale=grad_scale)
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_stored_cross_entropy_smoothing_of_logits_whose_sum_overflows(device, monkeypatch):
    """The same on the stored-gradient forward (STORE_GRADS on, a reduced loss of logits that
    need gradients), whose one-block row path has its own smoothing mean."""
    monkeypatch.setattr(k, "STORE_GRADS", True)
    logits = torch.randn(2, 5, device=device)
    logits[:, 1] = logits[:, 3] = 3e38
    target = torch.tensor([0, 3], device=device)
    out = cross_entropy(logits.requires_grad_(), target, reduction="mean", label_smoothing=0.1,
                        backend="triton")
    ref = F.cross_entropy(logits.detach().double(), target, label_smoothing=0.1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("logits", [lambda d: torch.randn(1, 5, device=d).t(),
                                    lambda d: torch.randn(0, 1, device=d) * 2.0],
                         ids=["transposed_row", "empty_scaled"])
def test_cross_entropy_one_class_logits_of_any_column_stride(device, logits):
    """(N, 1) logits whose size-1 column has a stride other than 1 (torch calls them
    contiguous): taken as torch takes them (refused as "not unit column stride" once)."""
    x = logits(device).requires_grad_()
    target = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    for reduction in REDUCTIONS:
        out = cross_entropy(x, target, reduction=reduction, backend="triton")
        ref = F.cross_entropy(x.double(), target, reduction=reduction)
        torch.testing.assert_close(out.double(), ref, equal_nan=True)  # an empty mean: NaN
        (g,) = torch.autograd.grad(out.sum(), x)
        (ref_g,) = torch.autograd.grad(ref.sum(), x)
        assert g.shape == x.shape
        torch.testing.assert_close(g, ref_g, equal_nan=True)


@pytest.mark.parametrize("store", [False, True], ids=["recomputed", "stored"])
def test_cross_entropy_grad_of_overlapping_rows(device, monkeypatch, store):
    """Logits whose rows overlap (sliding windows from unfold: strides (1, 1)): the gradient
    is a fresh row-major tensor (empty_like made it column-major, which the backward kernel,
    writing unit column strides, scattered garbage over), as F.cross_entropy's."""
    monkeypatch.setattr(k, "STORE_GRADS", store)
    target = torch.tensor([0, 9, IGNORE, 3, 3, 1], device=device)
    logits = torch.randn(15, device=device).unfold(0, 10, 1)
    assert logits.stride() == (1, 1)
    ref_in = logits.detach().double().requires_grad_()
    (ref_g,) = torch.autograd.grad(F.cross_entropy(ref_in, target), ref_in)
    x = logits.detach().requires_grad_()
    (g,) = torch.autograd.grad(cross_entropy(x, target, backend="triton"), x)
    torch.testing.assert_close(g.double(), ref_g, rtol=1e-5, atol=1e-6)


def test_cross_entropy_masked_vocabulary_of_neg_inf_is_finite(device):
    # the whole first block (4096 classes) is -inf: the running max starts at -inf
    logits = torch.randn(3, 5000, device=device)
    logits[:, :4100] = float("-inf")
    target = torch.tensor([4100, 4999, IGNORE], device=device)
    out, grad = _ce_run(lambda *a, **b: cross_entropy(*a, backend="triton", **b), logits, target,
                        "none")
    ref, ref_grad = _ce_run(F.cross_entropy, logits.double(), target, "none")
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert_close_to_ref(out, ref)
    assert_close_to_ref(grad, ref_grad)
    # with label smoothing a -inf logit makes the loss inf, as torch (the smoothing term's sum
    # over the row includes it; a row looped over in blocks must not drop it)
    smooth = cross_entropy(logits, target, reduction="none", label_smoothing=0.1,
                           backend="triton")
    want = F.cross_entropy(logits.double(), target, reduction="none", label_smoothing=0.1,
                           ignore_index=IGNORE)
    assert torch.equal(torch.isinf(smooth), torch.isinf(want)) and torch.isinf(smooth[:2]).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's 0 / 0
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_all_ignored_matches_torch(device, reduction):
    logits = torch.randn(5, 300, device=device)
    target = torch.full((5,), IGNORE, device=device)
    out, grad = _ce_run(lambda *a, **b: cross_entropy(*a, backend="triton", **b), logits, target,
                        reduction, label_smoothing=0.1)
    ref, ref_grad = _ce_run(F.cross_entropy, logits.double(), target, reduction,
                            label_smoothing=0.1)
    # torch: mean over zero targets is NaN, sum and none are 0; the gradient is 0 either way
    assert torch.equal(out.isnan(), ref.isnan())
    assert (out[~out.isnan()] == 0).all()
    assert torch.equal(ref_grad, torch.zeros_like(ref_grad))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_cross_entropy_kernel_writes_every_gradient_element(device):
    # the backward launcher allocates its output: poison-check by comparing with a buffer that
    # the in-place (STORE_GRAD) forward overwrites, NaN-filled except for the logits it reads
    logits = torch.randn(7, 1500, device=device)
    target = _targets(7, 1500, device, ignore_frac=0.3)
    scale = torch.rand(7, device=device)
    loss, stats, _ = k.cross_entropy_fwd(logits, target, IGNORE, 0.1)
    dlogits = k.cross_entropy_bwd(logits, target, stats, scale, IGNORE, 0.1)
    buf = logits.clone()
    loss2, _, _ = k.cross_entropy_fwd(buf, target, IGNORE, 0.1, grad_scale=scale)
    assert torch.isfinite(dlogits).all()
    torch.testing.assert_close(buf, dlogits, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss2, loss)
    x = logits.double().requires_grad_()
    ref = F.cross_entropy(x, target, ignore_index=IGNORE, label_smoothing=0.1, reduction="none")
    (ref * scale.double()).sum().backward()
    assert_close_to_ref(dlogits, x.grad)


_IN_PLACE_TTIR = """
import fastbert
from fastbert.kernels import cross_entropy as k
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
cfg = next(c for c in k.aot_configs()
           if c.kernel is k._cross_entropy_fwd_kernel and c.constexprs["STORE_GRAD"])
src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs)
print(triton.compile(src, target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": cfg.num_warps}).asm["ttir"])
"""


@pytest.mark.aot
def test_in_place_gradient_waits_for_every_read_of_the_row():
    # With STORE_GRAD the forward overwrites the logits it has just read, and every thread
    # reads the target logit x_t, which one thread's gradient store replaces: the compiled
    # kernel needs a barrier between that (scalar) load and the first gradient store. The
    # interpreter runs a program in lock step, so only the compiled IR can show it.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _IN_PLACE_TTIR], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    x_t = next(i for i, ln in enumerate(lines)
               if "tt.load" in ln and re.search(r":\s*!tt\.ptr<(bf16|f16|f32)>", ln))
    store = next(i for i, ln in enumerate(lines)
                 if i > x_t and "tt.store" in ln and re.search(r"tensor<\d+x!tt\.ptr", ln))
    assert any("barrier" in ln for ln in lines[x_t:store]), "\n".join(lines[x_t:store + 1])


def test_launchers_write_every_element_of_poisoned_outputs(device, monkeypatch):
    # every buffer the launchers allocate starts as NaN: an element a kernel skips stays NaN
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison_(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison_(empty_like(*a, **kw)))
    logits = torch.randn(9, 700, device=device)
    target = _targets(9, 700, device, ignore_frac=0.3)
    loss, stats, _ = k.cross_entropy_fwd(logits, target, IGNORE, 0.1)
    dlogits = k.cross_entropy_bwd(logits, target, stats, torch.ones((), device=device), IGNORE,
                                  0.1)
    x = torch.randn(20, 48, device=device)
    w = torch.randn(700, 48, device=device) * 0.1
    out = k.linear_cross_entropy(x, w, torch.randn(700, device=device),
                                 torch.randint(0, 700, (20,), device=device), IGNORE, 0.0,
                                 torch.ones((), device=device))
    monkeypatch.undo()
    for t in (loss, stats, dlogits, *out):
        assert torch.isfinite(t).all()
    x_ref = logits.double().requires_grad_()
    F.cross_entropy(x_ref, target, label_smoothing=0.1, reduction="sum").backward()
    assert_close_to_ref(dlogits, x_ref.grad)


def test_cross_entropy_out_of_range_target_raises(device):
    logits = torch.randn(4, 10, device=device)
    for bad in (10, -1, 12345):
        target = torch.tensor([1, bad, 2, IGNORE], device=device)
        for backend in ("triton", "torch"):
            with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 10\)"):
                cross_entropy(logits, target, backend=backend)


@pytest.mark.parametrize("n_cols", [40, 5000])  # one block; a row looped over in blocks
def test_cross_entropy_unchecked_bad_target_is_nan_not_an_address(device, n_cols):
    # V itself (one past the end: an off-by-one in the range check read it) and -1 too
    logits = torch.randn(5, n_cols, device=device, requires_grad=True)
    target = torch.tensor([5, 1 << 40, IGNORE, n_cols, -1], device=device)
    out = cross_entropy(logits, target, reduction="none", check_labels=False, backend="triton")
    assert torch.isfinite(out[0]) and out[2] == 0
    assert out[1].isnan() and out[3].isnan() and out[4].isnan()
    (g,) = torch.autograd.grad(out[0] + out[2], logits)
    assert torch.isfinite(g).all() and (g[1:] == 0).all()


@pytest.mark.parametrize("requires_grad", [False, True])
def test_cross_entropy_unchecked_bad_targets_count_as_torch_backend(device, requires_grad):
    # with check_labels=False an out-of-range target makes the loss NaN on both backends;
    # the other rows' gradients are divided by the same count (the valid targets)
    logits = torch.randn(5, 30, device=device)
    target = torch.tensor([3, 99, IGNORE, 7, -5], device=device)
    grads = []
    for backend in ("triton", "torch"):
        x = logits.clone().requires_grad_(requires_grad)
        loss = cross_entropy(x, target, check_labels=False, backend=backend)
        assert loss.isnan()
        if requires_grad:
            (g,) = torch.autograd.grad(loss, x)
            grads.append(g)
    if requires_grad:
        torch.testing.assert_close(grads[0], grads[1])


def test_cross_entropy_rejects_bad_arguments(device):
    logits = torch.randn(4, 10, device=device)
    target = torch.randint(0, 10, (4,), device=device)
    with pytest.raises(TypeError, match="target must hold class indices"):
        cross_entropy(logits, torch.rand(4, 10, device=device))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        cross_entropy(logits, target[:3])
    with pytest.raises(ValueError, match="logits must have 1 or 2 dimensions"):
        cross_entropy(logits[None], target[None])
    with pytest.raises(TypeError, match="logits must have dtype"):
        cross_entropy(logits.to(torch.int64), target)
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        cross_entropy(logits, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="at least one class"):
        cross_entropy(logits[:, :0], target)


def test_cross_entropy_launchers_reject_bad_stats_and_grad_scale(device):
    # the backward kernel addresses stats as contiguous (N, 2) rows: anything else would be
    # read out of bounds on the GPU, so the launcher refuses it by name
    logits = torch.randn(4, 30, device=device)
    target = torch.randint(0, 30, (4,), device=device)
    _, stats, _ = k.cross_entropy_fwd(logits, target, IGNORE, 0.0)
    one = torch.ones((), device=device)
    for bad in (stats[:3], stats.t().contiguous().t(), stats.double(), stats[:, :1]):
        with pytest.raises(ValueError, match="stats must be the contiguous"):
            k.cross_entropy_bwd(logits, target, bad, one, IGNORE, 0.0)
    with pytest.raises(ValueError, match="grad_scale must be a float32"):
        k.cross_entropy_bwd(logits, target, stats, one.double(), IGNORE, 0.0)
    with pytest.raises(ValueError, match="grad_scale must have 4 values"):
        k.cross_entropy_bwd(logits, target, stats, torch.ones(3, device=device), IGNORE, 0.0)


def test_cross_entropy_auto_backend_on_cpu_is_the_reference_and_agrees():
    logits = torch.randn(6, 77)
    target = _targets(6, 77, "cpu")
    auto = cross_entropy(logits, target, label_smoothing=0.2)
    ref = cross_entropy_ref(logits, target, label_smoothing=0.2)
    assert torch.equal(auto, ref)
    if _interpreting():  # the Triton backend runs CPU tensors only in the interpreter
        torch.testing.assert_close(cross_entropy(logits, target, label_smoothing=0.2,
                                                 backend="triton"), ref)
    else:
        with pytest.raises(BackendUnavailable, match="interpreter is off"):
            cross_entropy(logits, target, backend="triton")


@pytest.fixture
def stored_ce(monkeypatch):
    """cross_entropy with the stored-gradient path on (kernels.cross_entropy.STORE_GRADS; off by
    default, measured slower on an H200, but kept and benchmarked)."""
    monkeypatch.setattr(k, "STORE_GRADS", True)


def test_cross_entropy_default_path_saves_the_logits_and_backprops_twice(device):
    # the default (STORE_GRADS off): the forward saves the logits and two floats a row; the
    # backward recomputes the gradient, so a second backward works
    x = torch.randn(4, 50, device=device, requires_grad=True)
    t = _targets(4, 50, device, ignore_frac=0.0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda u: saved.append(u) or u, lambda u: u):
        loss = cross_entropy(x, t, backend="triton")
    assert any(u.data_ptr() == x.data_ptr() for u in saved)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)
    x64 = x.detach().double().requires_grad_()
    F.cross_entropy(x64, t, ignore_index=IGNORE).backward()
    assert_close_to_ref(g1, x64.grad, name="dlogits")


def test_cross_entropy_custom_ops_pass_opcheck(device):
    logits = torch.randn(5, 300, device=device, requires_grad=True)
    target = _targets(5, 300, device)
    for reduction in REDUCTIONS:
        for check_labels in (True, False):
            torch.library.opcheck(torch.ops.fastbert.cross_entropy_fwd.default,
                                  (logits, target, IGNORE, 0.1, reduction, check_labels,
                                   torch.float32, False))
        # with the gradient stored, the backward mutates a tensor the forward saved, which
        # AOTAutograd cannot trace: cross_entropy never asks for it under torch.compile
        torch.library.opcheck(torch.ops.fastbert.cross_entropy_fwd.default,
                              (logits, target, IGNORE, 0.1, reduction, True, torch.float32,
                               True), test_utils=("test_schema", "test_autograd_registration",
                                                  "test_faketensor"))
    _, stats, _ = k.cross_entropy_fwd(logits.detach(), target, IGNORE, 0.1)
    torch.library.opcheck(torch.ops.fastbert.cross_entropy_bwd.default,
                          (torch.rand(5, device=device), logits.detach(), target, stats, None,
                           IGNORE, 0.1, "none"))
    count = (target != IGNORE).sum()
    torch.library.opcheck(torch.ops.fastbert.cross_entropy_bwd.default,
                          (torch.tensor(2.0, device=device), logits.detach(), target, stats,
                           count, IGNORE, 0.1, "mean"))
    for g in (1.0, 0.5):
        torch.library.opcheck(torch.ops.fastbert.cross_entropy_scale_.default,
                              (torch.randn(5, 300, device=device),
                               torch.tensor(g, device=device)))


def test_cross_entropy_compiles_fullgraph(device):
    torch._dynamo.reset()
    logits = torch.randn(9, 321, device=device)
    target = _targets(9, 321, device)

    def f(x, t):
        return cross_entropy(x, t, label_smoothing=0.1, backend="triton") * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    out, ref = compiled(x1, target), f(x2, target)
    out.backward()
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n_cols", [1003, 30522, 50257])
def test_cross_entropy_stored_gradient_with_incoming_one_matches_fp64(stored_ce, device, dtype, reduction,
                                                                      n_cols):
    # loss.backward(): an incoming gradient of exactly 1, where the backward leaves the gradient
    # the forward wrote untouched (the other tests use 2.0, which makes it scale); BERT's
    # vocabulary in one block of registers, GPT-2's looping over blocks
    logits = (torch.randn(37, n_cols, device=device) * 3).to(dtype)
    target = _targets(37, n_cols, device)
    x = logits.clone().requires_grad_()
    cross_entropy(x, target, reduction=reduction, label_smoothing=0.1,
                  backend="triton").backward()
    x64 = logits.double().requires_grad_()
    F.cross_entropy(x64, target, ignore_index=IGNORE, reduction=reduction,
                    label_smoothing=0.1).backward()
    lowp = None
    if dtype != torch.float32:
        x_lp = logits.clone().requires_grad_()
        F.cross_entropy(x_lp, target, ignore_index=IGNORE, reduction=reduction,
                        label_smoothing=0.1).backward()
        lowp = x_lp.grad
    assert_close_to_ref(x.grad, x64.grad, lowp, name="dlogits",
                        atol=1e-5 + _interpreter_bf16_ulp(x.grad, x64.grad))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's inf * 0
@pytest.mark.parametrize("g", [1.0, 0.0, -3.0, float("inf")])
def test_cross_entropy_scale_multiplies_on_the_device_and_keeps_zeros(device, g):
    d = torch.randn(3, 5000, device=device)
    d[1] = 0.0
    want = torch.where(d == 0, 0.0, d * g)
    k.cross_entropy_scale_(d, torch.tensor(g, device=device))
    assert torch.equal(d, want)
    assert (d[1] == 0).all()


def test_cross_entropy_scale_reaches_every_element_of_a_large_gradient(device, monkeypatch):
    # more blocks than programs: each program loops over several blocks
    monkeypatch.setattr(k, "SCALE_PROGRAMS", 3)
    d = torch.randn(7, 1500, device=device, dtype=torch.bfloat16)
    want = (d.float() * 0.5).to(torch.bfloat16)
    k.cross_entropy_scale_(d, torch.tensor(0.5, device=device))
    assert torch.equal(d, want)
    with pytest.raises(ValueError, match="dlogits must be contiguous"):
        k.cross_entropy_scale_(d.t(), torch.tensor(0.5, device=device))
    with pytest.raises(ValueError, match="grad must be a one-element floating tensor"):
        k.cross_entropy_scale_(d, torch.ones(2, device=device))


def _stored_forward_equals_backward_kernel(device, n_rows, n_cols, dtype=torch.float32):
    """The forward that writes the gradient (into a given buffer, and in place) gives the
    loss, statistics and gradient of the forward + backward kernels, every row (in a 16-bit
    ``dtype`` the gradients within an ulp: the two sum exp() in a different order)."""
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-7)
    logits = (torch.randn(n_rows, n_cols, device=device) * 4).to(dtype)
    target = _targets(n_rows, n_cols, device, ignore_frac=0.3)
    target[0] = n_cols - 1
    target[1] = n_cols  # out of range (unchecked): a NaN loss and a zero gradient row
    scale = torch.rand(n_rows, device=device)
    loss, stats, _ = k.cross_entropy_fwd(logits, target, IGNORE, 0.1)
    want = k.cross_entropy_bwd(logits, target, stats, scale, IGNORE, 0.1)
    out = poison_(torch.empty_like(logits))
    kept = logits.clone()
    loss1, stats1, _ = k.cross_entropy_fwd(logits, target, IGNORE, 0.1, grad_scale=scale,
                                           dlogits=out)
    torch.testing.assert_close(out, want, **tol)
    assert (out[1] == 0).all() and loss[1].isnan()
    torch.testing.assert_close(loss1, loss, equal_nan=True)
    torch.testing.assert_close(stats1, stats, equal_nan=True)
    assert torch.equal(logits, kept)  # not overwritten: out was given
    k.cross_entropy_fwd(logits, target, IGNORE, 0.1, grad_scale=scale)
    torch.testing.assert_close(logits, want, **tol)


def _rows_at(n_rows, n_cols, row_stride, offset, device, dtype, fill=None):
    """(n_rows, n_cols) logits whose rows are row_stride elements apart, the first at element
    ``offset`` of its storage (random, or ``fill`` everywhere), and that storage: rows starting
    at every offset modulo the kernels' ALIGN."""
    buf = torch.randn(offset + n_rows * row_stride + 8, device=device).to(dtype) * 3
    if fill is not None:
        buf.fill_(fill)
    return buf[offset:].as_strided((n_rows, n_cols), (row_stride, 1)), buf


def _outside(view, buf):
    """The elements of buf that are not in view (view's own are set to 0 in a copy first)."""
    mark = torch.ones_like(buf, dtype=torch.bool)
    idx = torch.arange(buf.numel(), device=buf.device)
    inside = idx[view.storage_offset() - buf.storage_offset():].as_strided(view.shape,
                                                                            view.stride())
    mark[inside.reshape(-1)] = False
    return buf[mark]


@pytest.mark.parametrize("dtype, n_cols", [(torch.float32, 1), (torch.float32, 5),
                                           (torch.float32, 40), (torch.float32, 77),
                                           (torch.bfloat16, 13), (torch.bfloat16, 77)])
def test_cross_entropy_rows_at_any_alignment_match_fp64(device, monkeypatch, dtype, n_cols):
    """The kernels split each row into head (up to the first ALIGN-aligned element), body
    (whole ALIGN groups, in blocks) and tail: every row stride and storage offset modulo ALIGN,
    gradients in place, in a tensor of the same strides and in one whose rows are offset
    differently from the logits' (ALIGNED_DX off), in the recomputing backward and in both
    forwards that store the gradient (row in registers, and looping over blocks); nothing
    between the rows is written."""
    monkeypatch.setattr(k, "MAX_BLOCK_V", 16)  # several body blocks from 40 classes on
    n_rows = 5
    for row_stride, offset in [(n_cols, 0), (n_cols + 1, 3), (n_cols + 3, 7), (n_cols + 8, 5)]:
        logits, _ = _rows_at(n_rows, n_cols, row_stride, offset, device, dtype)
        target = torch.randint(0, n_cols, (n_rows,), device=device)
        target[0], target[1], target[2] = 0, n_cols - 1, IGNORE  # head, tail, zero row
        # exact in bf16: torch's bf16 gradient (the bound of a bf16 one) gets the same scale
        scale = torch.randint(2, 9, (n_rows,), device=device).float() / 4
        grads = []
        for x in (logits.double(), logits.clone()):
            x.requires_grad_()
            ref = F.cross_entropy(x, target, ignore_index=IGNORE, label_smoothing=0.1,
                                  reduction="none")
            (ref * scale.to(x.dtype)).sum().backward()
            grads.append(x.grad)
        ref = F.cross_entropy(logits.double(), target, ignore_index=IGNORE, label_smoothing=0.1,
                              reduction="none")

        def check_grad(got):
            assert_close_to_ref(got, grads[0], lowp_ref=grads[1] if dtype != torch.float32
                                else None)

        loss, stats, _ = k.cross_entropy_fwd(logits, target, IGNORE, 0.1)
        assert_close_to_ref(loss, ref)
        kept = logits.clone()
        for out_stride, out_offset in ((row_stride, offset),  # the logits' alignment
                                       (row_stride, (offset + 1) % 8),
                                       (row_stride + 1, offset)):
            out, buf = _rows_at(n_rows, n_cols, out_stride, out_offset, device, dtype, fill=7.0)
            got = k.cross_entropy_bwd(logits, target, stats, scale, IGNORE, 0.1, dlogits=out)
            assert got is out
            check_grad(out)
            assert (_outside(out, buf) == 7.0).all()
            for one_block_max in (k.MAX_ONE_BLOCK_V, 16):  # row in registers / in blocks
                monkeypatch.setattr(k, "MAX_ONE_BLOCK_V", one_block_max)
                out.fill_(float("nan"))
                loss1, _, _ = k.cross_entropy_fwd(logits, target, IGNORE, 0.1, grad_scale=scale,
                                                  dlogits=out)
                check_grad(out)
                assert_close_to_ref(loss1, ref)
                assert (_outside(out, buf) == 7.0).all()
        assert torch.equal(logits, kept)
        # in place, over the logits' own rows
        k.cross_entropy_bwd(logits, target, stats, scale, IGNORE, 0.1, dlogits=logits)
        check_grad(logits)


@pytest.mark.parametrize("n_cols", [1, 700, 4097])
def test_cross_entropy_one_block_forward_writes_the_backward_kernels_gradient(device, n_cols):
    # the forward with a gradient holds a row of up to MAX_ONE_BLOCK_V classes in registers
    assert k.ce_block(n_cols, one_block=True)[2]
    _stored_forward_equals_backward_kernel(device, 6, n_cols)


@pytest.mark.parametrize("programs_per_sm", [None, 1, 2])
def test_cross_entropy_looping_forward_on_a_row_looping_grid_writes_the_same_gradient(
        device, monkeypatch, programs_per_sm):
    """The forward that stores the gradient of a row wider than one block (read twice), one
    program a row or (STORE_GRAD_PROGRAMS_PER_SM) a smaller grid looping over the rows."""
    monkeypatch.setattr(k, "MAX_ONE_BLOCK_V", k.MAX_BLOCK_V)
    monkeypatch.setattr(k, "STORE_GRAD_PROGRAMS_PER_SM", programs_per_sm)
    # more rows than the looping grid has programs (4 in the interpreter, SMs x programs_per_sm
    # on a GPU), so that programs loop
    n_rows = 11 if programs_per_sm is None else \
        k.num_programs(torch.device(device), programs_per_sm) + 3
    n_cols = k.MAX_BLOCK_V + 3
    assert not k.ce_block(n_cols, one_block=True)[2]
    _stored_forward_equals_backward_kernel(device, n_rows, n_cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("n_cols", [1, 700, 4097])
def test_cross_entropy_one_block_forward_on_a_pipelined_row_loop_writes_the_same_gradient(
        device, monkeypatch, stages, n_cols, dtype):
    """STORE_GRAD_PIPELINED_WARPS_PER_SM: the one-block forward with a gradient on a grid of
    fewer programs than rows, each looping over rows with the next row's load in flight
    (ROW_STAGES); into a given buffer and in place, rows of odd widths (every row offset
    modulo ALIGN), more rows than programs. Kills: the loop's stride, its start, the
    ROW_STAGES branch skipping rows."""
    _, num_warps, one = k.ce_block(n_cols, one_block=True)
    assert one
    # one program an SM (a program is num_warps warps)
    monkeypatch.setattr(k, "STORE_GRAD_PIPELINED_WARPS_PER_SM", num_warps)
    monkeypatch.setattr(k, "STORE_GRAD_ROW_STAGES", stages)
    launched = []
    real = k.launch
    monkeypatch.setattr(k, "launch", lambda fn, grid, *a, **meta: launched.append(
        (fn, grid, meta.get("ROW_STAGES"))) or real(fn, grid, *a, **meta))
    n_rows = k.num_programs(torch.device(device), 1) * 2 + 3
    _stored_forward_equals_backward_kernel(device, n_rows, n_cols, dtype=dtype)
    stored = [(g, st) for fn, g, st in launched
              if fn is k._cross_entropy_fwd_kernel and st is not None and st > 0]
    assert stored and all(g == ((n_rows - 3) // 2,) and st == stages for g, st in stored)


@pytest.mark.parametrize("optin,want_stages", [(227 * 1024, 3), (99 * 1024, 2), (70 * 1024, 0)])
def test_cross_entropy_pipeline_stages_follow_the_cards_shared_memory(monkeypatch, optin,
                                                                      want_stages):
    """On CUDA the row buffers must also fit the device's opt-in shared memory a block, less
    16 KB of scratch: an H100 takes bf16 rows of 30522 classes (64 KB) with 3 stages, a card
    of ~99 KB a block (sm_86 / sm_89) with 2, a smaller one not at all. (The device is only
    named: its properties are patched.)"""
    monkeypatch.setattr(k, "STORE_GRAD_ROW_STAGES", 3)
    monkeypatch.setattr(k, "_optin_shared", lambda index: optin)
    assert k.pipeline_stages(32768 * 2, torch.device("cuda", 0)) == want_stages
    assert k.pipeline_stages(32768 * 2, torch.device("cpu")) == 3


@pytest.mark.parametrize("dtype,stages,max_bytes,want_stages", [
    (torch.bfloat16, 3, None, 3), (torch.float32, 2, None, 2), (torch.float32, 3, None, 2),
    (torch.bfloat16, 3, 100 * 1024, 2), (torch.bfloat16, 3, 60 * 1024, 0)])
def test_cross_entropy_pipelined_row_loop_only_where_its_row_buffers_fit(
        device, monkeypatch, dtype, stages, max_bytes, want_stages):
    """The pipelined loop keeps stages - 1 rows in shared memory: float32 rows of BERT's 30522
    classes (128 KB each) fit one buffer (2 stages), not two (256 KB, over any GPU's shared
    memory: the compile would fail); a smaller limit (a card with less shared memory) takes
    fewer stages, and none when not one buffer fits: one program a row. One program an SM
    for rows wider than MAX_BLOCK_V, whatever the warps asked. (Launches recorded, not run.)"""
    monkeypatch.setattr(k, "STORE_GRAD_PIPELINED_WARPS_PER_SM", 64)
    monkeypatch.setattr(k, "STORE_GRAD_ROW_STAGES", stages)
    if max_bytes is not None:
        monkeypatch.setattr(k, "STORE_GRAD_PIPELINE_MAX_BYTES", max_bytes)
    launched = []
    monkeypatch.setattr(k, "launch", lambda fn, grid, *a, **meta: launched.append(
        (fn, grid, meta)))
    # a card of 7 SMs (the interpreter's grid ignores programs an SM)
    monkeypatch.setattr(k, "num_programs", lambda dev, per_sm: 7 * per_sm)
    n_rows = 7 * 64 + 5
    logits = torch.zeros(n_rows, 30522, device=device, dtype=dtype)
    target = torch.zeros(n_rows, dtype=torch.long, device=device)
    k.cross_entropy_fwd(logits, target, IGNORE, 0.0, grad_scale=1.0)
    (fn, grid, meta), = [x for x in launched if x[0] is k._cross_entropy_fwd_kernel]
    assert meta["ONE_BLOCK"] and meta["BLOCK_V"] == 32768
    if want_stages:
        assert grid == (7,)   # one program an SM: 64 warps asked, 32 a program
        assert meta["ROW_STAGES"] == want_stages and meta["ROW_LOOP"]
    else:
        assert grid == (n_rows,) and meta["ROW_STAGES"] == 0 and not meta["ROW_LOOP"]


def test_cross_entropy_pipelined_grid_takes_warps_an_sm_for_narrow_rows(device, monkeypatch):
    """Rows up to MAX_BLOCK_V: STORE_GRAD_PIPELINED_WARPS_PER_SM warps an SM in programs of the
    row's num_warps (V = 32: one warp a program)."""
    monkeypatch.setattr(k, "STORE_GRAD_PIPELINED_WARPS_PER_SM", 32)
    launched = []
    monkeypatch.setattr(k, "launch", lambda fn, grid, *a, **meta: launched.append(
        (fn, grid, meta)))
    monkeypatch.setattr(k, "num_programs", lambda dev, per_sm: 7 * per_sm)   # 7 SMs
    for n_cols, per_sm in ((32, 32), (4096, 4)):
        launched.clear()
        n_rows = 7 * per_sm + 1
        k.cross_entropy_fwd(torch.zeros(n_rows, n_cols, device=device), torch.zeros(
            n_rows, dtype=torch.long, device=device), IGNORE, 0.0, grad_scale=1.0)
        (fn, grid, meta), = [x for x in launched if x[0] is k._cross_entropy_fwd_kernel]
        assert k.ce_block(n_cols, one_block=True)[1] == 32 // per_sm
        assert grid == (7 * per_sm,) and meta["ROW_STAGES"] == k.STORE_GRAD_ROW_STAGES


def test_cross_entropy_forward_with_gradient_keeps_the_logits_and_saves_only_the_gradient(
        stored_ce, device):
    logits = torch.randn(8, 300, device=device)
    x = logits.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy(x, _targets(8, 300, device), backend="triton")
    assert torch.equal(x.detach(), logits)
    # the backward needs only the stored gradient: the logits are not kept alive for it
    assert [tuple(t.shape) for t in saved] == [(8, 300)]
    assert saved[0].data_ptr() != x.data_ptr()


def test_cross_entropy_second_backward_through_a_stored_gradient_is_a_clear_error(stored_ce, device):
    x = torch.randn(4, 50, device=device, requires_grad=True)
    loss = cross_entropy(x, _targets(4, 50, device, ignore_frac=0.0), backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can be backpropagated through only once"):
        loss.backward()
    # reduction="none" recomputes from the saved logits: a second backward works
    y = x.detach().clone().requires_grad_()
    t = _targets(4, 50, device, ignore_frac=0.0)
    per_row = cross_entropy(y, t, reduction="none", backend="triton")
    (g1,) = torch.autograd.grad(per_row.sum(), y, retain_graph=True)
    (g2,) = torch.autograd.grad(per_row.sum(), y)
    assert torch.equal(g1, g2)


def test_cross_entropy_second_backward_is_refused_even_with_saved_tensor_hooks(stored_ce, device):
    # saved-tensor hooks turn autograd's version check off: the flag on ctx still refuses a
    # second backward, which would scale the stored gradient twice
    x = torch.randn(4, 50, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss = cross_entropy(x, _targets(4, 50, device, ignore_frac=0.0), backend="triton")
    (loss * 2).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can be backpropagated through only once"):
        (loss * 3).backward()


def test_cross_entropy_backward_with_create_graph_gives_the_first_order_gradient(device):
    logits = torch.randn(5, 40, device=device)
    t = _targets(5, 40, device)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (g1,) = torch.autograd.grad(cross_entropy(x1, t, backend="triton"), x1, create_graph=True)
    (g2,) = torch.autograd.grad(cross_entropy(x2, t, backend="triton"), x2)
    torch.testing.assert_close(g1, g2)


# A loss scale as fp16 training uses (GradScaler starts at 2**16; the gradient that reaches an
# fp16 loss must stay below fp16's largest value, 65504)
FP16_LOSS_SCALE = 2.0 ** 14


def test_cross_entropy_fp16_gradients_survive_loss_scaling(device):
    # The mean's gradient p / n is ~1e-8 here, under fp16's smallest subnormal: fp16 training
    # lifts it with a loss scale, which only the backward sees. A gradient stored by the
    # forward (the incoming gradient taken as 1) would flush to zero; fp16 recomputes instead.
    n, v = 512, 6000
    logits = torch.randn(n, v, device=device).to(torch.float16)
    target = _targets(n, v, device, ignore_frac=0.1)

    def grad(fn, x):
        x = x.clone().requires_grad_()
        (fn(x, target, ignore_index=IGNORE).float() * FP16_LOSS_SCALE).backward()
        return x.grad
    out = grad(lambda *a, **kw: cross_entropy(*a, backend="triton", **kw), logits)
    ref = grad(F.cross_entropy, logits.double())
    lowp = grad(F.cross_entropy, logits)
    assert (out == 0).float().mean() <= (lowp == 0).float().mean() + 1e-3
    assert_close_to_ref(out, ref, lowp, name="dlogits", atol=1e-5)


def test_masked_lm_loss_fp16_gradients_survive_loss_scaling(device):
    # ~1000 masked rows, V = 8000: p / n ~ 1e-7, at fp16's smallest subnormals
    hidden, weight, bias, labels = _mlm_inputs((32, 64), 32, 8000, torch.float16, device,
                                               masked_frac=0.5)

    def grads(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (hidden, weight, bias)]
        (fn(*leaves, labels).float() * FP16_LOSS_SCALE).backward()
        return [t.grad for t in leaves]
    out = grads(lambda *a: masked_lm_loss(*a, backend="triton"), torch.float16)
    ref = grads(lambda *a: _hf_way(*a), torch.float64)
    lowp = grads(lambda *a: _hf_way(*a), torch.float16)
    for name, o, r, lp in zip(("dhidden", "dweight", "dbias"), out, ref, lowp):
        floor = LOWP_ULP_FLOOR * torch.finfo(torch.float16).eps * r.abs().max().item()
        assert_close_to_ref(o, r, lp, name=name, atol=1e-5 + floor)


# masked_lm_loss fp16 gradients without loss scaling: their error relative to the largest
# gradient. One fp16 rounding of a result is up to 2**-11 (4.9e-4) of it. Rounding each entry
# of dlogits = (p - onehot) * 0.5 / n (~1e-7) to fp16 lost 3.3e-3 of max|dbias| in the test
# below (1.3e-2 at BERT's size on an H200): torch's own fp16 backward loses as much, so the
# 2x-torch rule alone does not catch it.
FP16_SMALL_GRAD_REL_ERR = {"dhidden": 1e-3, "dweight": 1e-3, "dbias": 2e-3}


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_masked_lm_loss_fp16_small_incoming_gradient_does_not_underflow(device, reduction):
    # ~600 masked rows, V = 5000: an incoming gradient of 0.5 for the mean (0.5 / n for the
    # sum, per-token gradients of that size for "none") makes the gradient of most logits
    # p * 0.5 / n ~ 1e-7, at fp16's smallest subnormals (6e-8); dbias of a non-target class
    # sums ~600 of them
    shape, hidden_size, vocab = (8, 128), 64, 5000
    hidden = torch.randn(*shape, hidden_size, device=device).half()
    weight = (torch.randn(vocab, hidden_size, device=device) * 0.05).half()
    bias = torch.randn(vocab, device=device).half()
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) >= 0.6] = IGNORE
    n = int((labels != IGNORE).sum())
    if reduction == "none":
        g = torch.randn(shape, device=device) * 0.5 / n
    else:
        g = torch.tensor(0.5 if reduction == "mean" else 0.5 / n, device=device)
    g = g.half().double()  # the same incoming gradient for the fp16 loss of eager torch

    def grads(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (hidden, weight, bias)]
        loss = fn(*leaves, labels, reduction=reduction)
        loss.backward(g.to(loss.dtype))
        return [t.grad for t in leaves]
    out = grads(lambda *a, **kw: masked_lm_loss(*a, backend="triton", **kw), torch.float16)
    ref = grads(masked_lm_loss_ref, torch.float64)
    lowp = grads(_hf_way, torch.float16)
    rel = {}
    for name, o, r, lp in zip(("dhidden", "dweight", "dbias"), out, ref, lowp):
        assert o.dtype == torch.float16, name
        top = r.abs().max().item()
        floor = LOWP_ULP_FLOOR * torch.finfo(torch.float16).eps * top
        assert_close_to_ref(o, r, lp, name=name, atol=1e-5 + floor)
        rel[name] = max_err(o, r) / top
    # all three errors in the message: which gradients lose precision tells where
    assert all(rel[name] <= bound for name, bound in FP16_SMALL_GRAD_REL_ERR.items()), \
        "errors of max|ref|: " + ", ".join(f"{name} {e:.2e}" for name, e in rel.items()) \
        + f" (bounds {FP16_SMALL_GRAD_REL_ERR})"


def test_cross_entropy_without_grad_stores_no_gradient(stored_ce, device, monkeypatch):
    calls = []
    real = k.cross_entropy_fwd
    monkeypatch.setattr(k, "cross_entropy_fwd",
                        lambda *a, **kw: calls.append(kw.get("grad_scale")) or real(*a, **kw))
    x = torch.randn(4, 50, device=device)
    t = _targets(4, 50, device)
    cross_entropy(x, t, backend="triton")
    with torch.no_grad():
        cross_entropy(x.requires_grad_(), t, backend="triton")
    cross_entropy(x, t, backend="triton", reduction="none")
    assert calls == [None, None, None]
    cross_entropy(x, t, backend="triton")
    assert calls[-1] is not None


def test_cross_entropy_compiled_backward_with_incoming_one_matches_eager(device):
    torch._dynamo.reset()
    logits = torch.randn(9, 321, device=device)
    target = _targets(9, 321, device)

    def f(x, t):
        return cross_entropy(x, t, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    compiled(x1, target).backward()
    f(x2, target).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# ----------------------------------------------------------------------------------------
# masked_lm_loss

def _mlm_inputs(shape, hidden_size, vocab, dtype, device, masked_frac=0.3, with_bias=True):
    hidden = (torch.randn(*shape, hidden_size, device=device)).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) * hidden_size ** -0.5).to(dtype)
    bias = (torch.randn(vocab, device=device) * 0.5).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) >= masked_frac] = IGNORE
    return hidden, weight, bias, labels


def _hf_way(hidden, weight, bias, labels, *, reduction="mean", label_smoothing=0.0,
            fp32_logits=False):
    """The Hugging Face BertForMaskedLM loss: project every token, then cross-entropy."""
    logits = F.linear(hidden, weight, bias)
    if fp32_logits:
        logits = logits.float()
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction=reduction,
                           label_smoothing=label_smoothing)
    return loss.reshape(labels.shape) if reduction == "none" else loss


def _mlm_run(fn, hidden, weight, bias, labels, reduction, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    loss = fn(*leaves, labels, reduction=reduction, **kw)
    torch.manual_seed(1)
    _reduce_for_grad(loss, reduction).backward()
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def _check_mlm(hidden, weight, bias, labels, reduction, *, label_smoothing=0.0, fp64_fn=_hf_way):
    kw = dict(label_smoothing=label_smoothing)
    out, grads = _mlm_run(lambda *a, **b: masked_lm_loss(*a, backend="triton", **b),
                          hidden, weight, bias, labels, reduction, **kw)
    d = lambda t: t.double() if t is not None else None
    ref, ref_grads = _mlm_run(fp64_fn, d(hidden), d(weight), d(bias), labels, reduction, **kw)
    lowp, lowp_grads = None, [None] * 3
    if hidden.dtype != torch.float32:
        lowp, lowp_grads = _mlm_run(_hf_way, hidden, weight, bias, labels, reduction, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    if lowp is not None:
        # the loss is float32: hold its error to torch's from the same low-precision logits,
        # before torch rounds the loss itself to the low dtype
        lowp_loss, _ = _mlm_run(lambda *a, **b: _hf_way(*a, fp32_logits=True, **b),
                                hidden, weight, bias, labels, reduction, **kw)
        err, base = max_err(out, ref), max_err(lowp_loss, ref)
        assert err <= 2 * base + 1e-4, f"loss: error {err:.3e} > 2 x torch's {base:.3e} + 1e-4"
    else:
        assert_close_to_ref(out, ref, name="loss", atol=1e-5)
    for name, g, rg, lg in zip(("dhidden", "dweight", "dbias"), grads, ref_grads, lowp_grads):
        if rg is None:
            assert g is None
            continue
        assert g.dtype == hidden.dtype, name
        # plus half an ulp of the largest gradient: dbias and dweight have only a few large
        # elements (the classes that are targets), too few for torch's largest error to reach
        # the half ulp that a correctly rounded result may have; several chunks of dweight are
        # rounded once each before they are summed (kernels/cross_entropy.py)
        floor = LOWP_ULP_FLOOR * torch.finfo(g.dtype).eps * rg.abs().max().item() \
            if g.dtype in (torch.float16, torch.bfloat16) else 0.0
        assert_close_to_ref(g, rg, lg, name=name,
                            atol=1e-5 + floor + _interpreter_bf16_ulp(g, rg))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_masked_lm_loss_matches_fp64_full_projection(device, dtype, reduction):
    inputs = _mlm_inputs((3, 7), 100, 1237, dtype, device)
    _check_mlm(*inputs, reduction, label_smoothing=0.1 if reduction != "sum" else 0.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_masked_lm_loss_2d_without_bias_matches_fp64(device, reduction):
    inputs = _mlm_inputs((29,), 32, 1000, torch.float32, device, with_bias=False)
    _check_mlm(*inputs, reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_lm_loss_several_chunks_match_fp64(device, monkeypatch, dtype, reduction):
    # 16 rows a chunk: 45 or so masked rows run as 3 chunks, the dW partial sums accumulate (in
    # fp16 the prescaled ones: see PRESCALE in kernels/cross_entropy.py)
    monkeypatch.setattr(k, "CHUNK_ELEMENTS", 16 * 1237)
    inputs = _mlm_inputs((4, 20), 100, 1237, dtype, device, masked_frac=0.55)
    assert k.chunk_rows(int((inputs[3] != IGNORE).sum()), 1237) == 16
    _check_mlm(*inputs, reduction, label_smoothing=0.1)


def test_masked_lm_loss_bert_vocab_matches_fp64(device):
    hidden, weight, bias, labels = _mlm_inputs((1, 11), 128, 30522, torch.float32, device,
                                               masked_frac=0.0)
    labels[0, [0, 4, 10]] = torch.tensor([0, 30521, 2024], device=device)
    _check_mlm(hidden, weight, bias, labels, "mean")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_masked_lm_loss_without_masked_tokens_is_zero_with_zero_grads(device, backend, reduction):
    hidden, weight, bias, _ = _mlm_inputs((2, 5), 48, 300, torch.float32, device)
    labels = torch.full((2, 5), IGNORE, device=device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = masked_lm_loss(*leaves, labels, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert loss.shape == (labels.shape if reduction == "none" else ())
    loss.sum().backward()
    for t in leaves:
        assert torch.equal(t.grad, torch.zeros_like(t))
    # a decoder weight that is a transposed view (the zero gradients were made with its
    # strides, which the in-place scaling of the backward refused)
    w_t = weight.t().contiguous().requires_grad_()
    loss = masked_lm_loss(hidden, w_t.t(), bias, labels, reduction=reduction, backend=backend)
    loss.sum().backward()
    assert torch.equal(w_t.grad, torch.zeros_like(w_t))


def test_masked_lm_loss_all_tokens_masked_matches_fp64(device):
    inputs = _mlm_inputs((2, 9), 64, 700, torch.float32, device, masked_frac=1.0)
    assert (inputs[3] != IGNORE).all()
    _check_mlm(*inputs, "mean", label_smoothing=0.1)


def test_masked_lm_loss_reference_equals_full_projection(device):
    # the reference projects only the masked rows; it must equal the full-projection loss
    hidden, weight, bias, labels = _mlm_inputs((3, 7), 40, 333, torch.float64, device)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(
            masked_lm_loss_ref(hidden, weight, bias, labels, reduction=reduction,
                               label_smoothing=0.1),
            _hf_way(hidden, weight, bias, labels, reduction=reduction, label_smoothing=0.1))


def test_masked_lm_loss_frozen_weight_and_no_grad(device):
    hidden, weight, bias, labels = _mlm_inputs((2, 8), 32, 500, torch.float32, device)
    h = hidden.clone().requires_grad_()
    loss = masked_lm_loss(h, weight, bias, labels, backend="triton")
    loss.backward()
    h_ref = hidden.double().requires_grad_()
    _hf_way(h_ref, weight.double(), bias.double(), labels).backward()
    assert_close_to_ref(h.grad, h_ref.grad)
    with torch.no_grad():
        out = masked_lm_loss(hidden, weight, bias, labels, backend="triton")
    assert_close_to_ref(out, masked_lm_loss_ref(hidden, weight, bias, labels, upcast=True).float(),
                        atol=1e-5)


def test_losses_under_autocast_run_in_the_autocast_dtype_and_return_fp32(device):
    hidden, weight, bias, labels = _mlm_inputs((2, 5), 32, 100, torch.float32, device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = masked_lm_loss(*leaves, labels, backend="triton")
        logits = F.linear(*leaves).reshape(-1, 100)
        ce = cross_entropy(logits, labels.reshape(-1), backend="triton")
        ce_torch = F.cross_entropy(logits, labels.reshape(-1))
    assert loss.dtype == ce.dtype == ce_torch.dtype == torch.float32
    # ours computes in fp32 from the bf16 logits; torch's CUDA autocast rounds its result
    # through bf16 (4.859375 against 4.8554 seen on an H200), so it is compared at bf16's
    # precision and ours against fp64
    ce64 = F.cross_entropy(logits.double(), labels.reshape(-1))
    torch.testing.assert_close(ce, ce64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce_torch, ce64.float(), rtol=1e-2, atol=1e-2)
    ref = _hf_way(*[t.bfloat16().float() for t in (hidden, weight, bias)], labels)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    (loss + ce).backward()
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in leaves)


def test_masked_lm_loss_out_of_range_label_raises(device):
    hidden, weight, bias, labels = _mlm_inputs((2, 4), 16, 50, torch.float32, device)
    for bad in (50, -3):
        labels[1, 2] = bad
        for backend in ("triton", "torch"):
            with pytest.raises(ValueError, match=r"labels must hold class indices in \[0, 50\)"):
                masked_lm_loss(hidden, weight, bias, labels, backend=backend)


def test_masked_lm_loss_unchecked_bad_label_is_nan_not_an_address(device):
    hidden, weight, bias, labels = _mlm_inputs((6,), 16, 50, torch.float32, device)
    labels[:] = torch.tensor([3, 1 << 35, IGNORE, 7, IGNORE, 49], device=device)
    out = masked_lm_loss(hidden, weight, bias, labels, reduction="none", check_labels=False,
                         backend="triton")
    assert out[1].isnan()
    assert torch.isfinite(out[[0, 2, 3, 4, 5]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_masked_lm_loss_unchecked_bad_labels_count_as_torch_backend(device, dtype, reduction):
    """check_labels=False with out-of-range labels: the loss is NaN on both backends and the
    other rows' gradients are divided by the same count, the in-range labels (the Triton mean
    divided by every masked row), stored (float32) or recomputed (float16) alike."""
    hidden, weight, bias, labels = _mlm_inputs((6,), 16, 50, dtype, device)
    labels[:] = torch.tensor([3, 50, IGNORE, 7, -2, 49], device=device)
    grads = []
    for backend in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = masked_lm_loss(*leaves, labels, reduction=reduction, check_labels=False,
                              backend=backend)
        assert loss.isnan().any()
        grads.append(torch.autograd.grad(loss.nansum() if reduction == "none" else loss,
                                         leaves))
    good = torch.tensor([0, 3, 5], device=device)
    torch.testing.assert_close(grads[0][0][good].float(), grads[1][0][good].float(),
                               rtol=2e-2 if dtype == torch.float16 else 1e-4, atol=1e-4)


def test_masked_lm_loss_rejects_bad_arguments(device):
    hidden, weight, bias, labels = _mlm_inputs((2, 4), 16, 50, torch.float32, device)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 16\)"):
        masked_lm_loss(hidden, weight[:, :8], bias, labels)
    with pytest.raises(ValueError, match=r"bias must have shape \(50,\)"):
        masked_lm_loss(hidden, weight, bias[:7], labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 4\)"):
        masked_lm_loss(hidden, weight, bias, labels[:, :3])
    with pytest.raises(TypeError, match="labels must hold class indices"):
        masked_lm_loss(hidden, weight, bias, labels.float())
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        masked_lm_loss(hidden, weight.half(), bias, labels)
    with pytest.raises(ValueError, match="hidden must have 2 or 3 dimensions"):
        masked_lm_loss(hidden[0, 0], weight, bias, labels)
    with pytest.raises(ValueError, match="reduction must be one of"):
        masked_lm_loss(hidden, weight, bias, labels, reduction="batchmean")


def test_masked_lm_loss_custom_ops_pass_opcheck(device):
    hidden, weight, bias, labels = _mlm_inputs((10,), 24, 200, torch.float32, device)
    args = [t.requires_grad_() for t in (hidden, weight, bias)]
    for reduction in REDUCTIONS:
        torch.library.opcheck(torch.ops.fastbert.masked_lm_loss_fwd.default,
                              (*args, labels, IGNORE, 0.1, reduction, True, True, True, True,
                               False))
        # scaling the stored gradients in place mutates saved tensors in the backward, which
        # AOTAutograd cannot trace: masked_lm_loss never asks for it under torch.compile
        torch.library.opcheck(torch.ops.fastbert.masked_lm_loss_fwd.default,
                              (*args, labels, IGNORE, 0.1, reduction, True, True, True, True,
                               True), test_utils=("test_schema", "test_autograd_registration",
                                                  "test_faketensor"))
    # the backward takes the rows the forward selected: sel, and their count on the host
    sel, info = k.select_rows(labels, IGNORE, 200)
    info = info.cpu()
    for grad, reduction in ((torch.randn(10, device=device), "none"),
                            (torch.tensor(3.0, device=device), "mean")):
        torch.library.opcheck(torch.ops.fastbert.masked_lm_loss_bwd.default,
                              (grad, hidden.detach(), weight.detach(), bias.detach(), sel, info,
                               IGNORE, 0.1, reduction, True, True, True))


@pytest.mark.parametrize("g", [1.0, 0.75])
def test_masked_lm_loss_backward_scales_stored_gradients_once(device, g):
    # eager: the stored gradients are scaled in place (not at all for 1.0); compare with the
    # fp64 reference under the same incoming gradient, and a second backward is refused
    hidden, weight, bias, labels = _mlm_inputs((3, 5), 16, 90, torch.float32, device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = masked_lm_loss(*leaves, labels, backend="triton")
    (loss * g).backward(retain_graph=True)
    ref_leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    (masked_lm_loss_ref(*ref_leaves, labels) * g).backward()
    for name, a, r in zip(("dhidden", "dweight", "dbias"), leaves, ref_leaves):
        assert_close_to_ref(a.grad, r.grad, name=name, atol=1e-6)
    with pytest.raises(RuntimeError, match="masked_lm_loss .* backpropagated through only once"):
        loss.backward()


def test_stored_gradient_losses_refuse_create_graph_instead_of_a_zero_second_derivative(
        stored_ce, device):
    # gradients computed in the forward have no history: a gradient penalty through them would
    # silently lose its second-order term, so create_graph=True raises
    hidden, weight, bias, labels = _mlm_inputs((3, 5), 16, 90, torch.float32, device)
    h = hidden.clone().requires_grad_()
    loss = masked_lm_loss(h, weight, bias, labels, backend="triton")
    with pytest.raises(RuntimeError, match="masked_lm_loss .* no double backward"):
        torch.autograd.grad(loss, h, create_graph=True)
    x = torch.randn(4, 50, device=device, requires_grad=True)
    loss = cross_entropy(x, _targets(4, 50, device), backend="triton")
    with pytest.raises(RuntimeError, match="cross_entropy .* no double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    # without create_graph, as before
    loss = masked_lm_loss(h, weight, bias, labels, backend="triton")
    torch.autograd.grad(loss, h)


@pytest.mark.parametrize("op", ["cross_entropy", "masked_lm_loss"])
def test_losses_on_the_torch_backend_compile_fullgraph_with_the_label_check(op):
    """The torch backend (the default on CPU) checked labels with a host read, which broke
    torch.compile(fullgraph=True); under compile the check is a device-side assert, which
    still fails on a bad label."""
    torch._dynamo.reset()
    labels = torch.tensor([3, -100, 10, 0, 7])
    if op == "cross_entropy":
        x = torch.randn(5, 11)

        def f(x, t):
            return cross_entropy(x, t, backend="torch")
    else:
        x = torch.randn(5, 16)
        w = torch.randn(11, 16)

        def f(x, t):
            return masked_lm_loss(x, w, None, t, backend="torch")
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, labels), f(x, labels))
    bad = labels.clone()
    bad[2] = 11
    with pytest.raises(RuntimeError, match="class indices in \\[0, 11\\)"):
        compiled(x, bad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_lm_loss_compiles_fullgraph(device, reduction):
    torch._dynamo.reset()
    hidden, weight, bias, labels = _mlm_inputs((2, 6), 32, 300, torch.float32, device)

    def f(h, w, b, lab):
        loss = masked_lm_loss(h, w, b, lab, reduction=reduction, backend="triton")
        return loss.sum() * 3.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    b = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out, ref = compiled(*a, labels), f(*b, labels)
    out.backward()
    ref.backward()
    torch.testing.assert_close(out, ref)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


# ----------------------------------------------------------------------------------------
# GPU: real sizes, compiled kernels

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cross_entropy_bert_batch_on_gpu(dtype):
    logits = (torch.randn(4096, 30522, device="cuda") * 4).to(dtype)
    target = _targets(4096, 30522, "cuda")
    _check_ce(logits, target, "mean", label_smoothing=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("stages", [2, 3])
def test_cross_entropy_stored_gradient_on_the_pipelined_row_loop_on_gpu(monkeypatch, stages):
    """STORE_GRAD_PIPELINED_WARPS_PER_SM on the GPU: the compiled, software-pipelined row loop
    (cp.async row loads, no barrier) writes the recomputing kernels' loss, statistics and
    gradient at BERT's vocabulary, rows of every alignment, more rows than programs, into a
    given buffer and in place (float32: one row buffer of 128 KB, so 2 stages whichever is
    asked; bf16: 2 or 3)."""
    monkeypatch.setattr(k, "STORE_GRAD_PIPELINED_WARPS_PER_SM", 32)
    monkeypatch.setattr(k, "STORE_GRAD_ROW_STAGES", stages)
    _stored_forward_equals_backward_kernel("cuda", k.num_programs(torch.device("cuda"), 1) * 3
                                           + 5, 30522)
    # bf16 in place and into a buffer, against the recomputing kernels (an ulp of bf16 apart
    # at most: the two compute log-sum-exp in a different order)
    _stored_forward_equals_backward_kernel("cuda", k.num_programs(torch.device("cuda"), 1) * 3
                                           + 5, 30522, dtype=torch.bfloat16)
    # bf16, through the op (STORE_GRADS): the gradient of the stored path against the
    # default path's, which the bert-batch test checks against fp64. Compared times the count
    # of the mean (a probability minus the one-hot, 1e-5 .. 1): the mean's gradient itself is
    # ~1e-9, below any useful absolute tolerance
    monkeypatch.setattr(k, "STORE_GRADS", True)
    logits = (torch.randn(4096, 30522, device="cuda") * 4).to(torch.bfloat16)
    target = _targets(4096, 30522, "cuda")
    n = int((target != IGNORE).sum())
    x = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(cross_entropy(x, target, ignore_index=IGNORE,
                                             label_smoothing=0.1), x)
    monkeypatch.setattr(k, "STORE_GRADS", False)
    y = logits.clone().requires_grad_()
    (want,) = torch.autograd.grad(cross_entropy(y, target, ignore_index=IGNORE,
                                                label_smoothing=0.1), y)
    torch.testing.assert_close(g.float() * n, want.float() * n, rtol=1.6e-2, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab,hidden_size", [(30522, 768), (50257, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunks", ["one", "several"])
def test_masked_lm_loss_bert_sizes_on_gpu(monkeypatch, vocab, hidden_size, dtype, chunks):
    # 32 x 128 tokens at 15% masked (about 614 rows): one chunk with the default budget at
    # both vocabularies; with a budget of GPU_CHUNK_ROWS rows, several (fp32 dW accumulation)
    if chunks == "several":
        monkeypatch.setattr(k, "CHUNK_ELEMENTS", GPU_CHUNK_ROWS * vocab)
    inputs = _mlm_inputs((32, 128), hidden_size, vocab, dtype, "cuda", masked_frac=0.15)
    n_masked = int((inputs[3] != IGNORE).sum())
    assert (k.chunk_rows(n_masked, vocab) < n_masked) == (chunks == "several")
    _check_mlm(*inputs, "mean")


def test_cross_entropy_mean_is_counted_by_the_kernels_not_by_torch(device, monkeypatch):
    # the forward's reduction kernel counts the divisor, saved for the backward, whose kernel
    # divides by it on the device: no torch op counts targets (each count was six launches)
    calls = []
    real = ops_ce._n_counted
    monkeypatch.setattr(ops_ce, "_n_counted", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(6, 40, device=device, requires_grad=True)
    t = _targets(6, 40, device, ignore_frac=0.3)
    t[0] = 3
    loss = cross_entropy(x, t, backend="triton")
    (g,) = torch.autograd.grad(loss * 3.0, x)
    assert calls == []
    x64 = x.detach().double().requires_grad_()
    (F.cross_entropy(x64, t, ignore_index=IGNORE) * 3.0).backward()
    assert_close_to_ref(g, x64.grad, name="dlogits")


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's 0 / 0
@pytest.mark.parametrize("tt", [torch.int64, torch.int32])
def test_cross_entropy_reduction_kernel_sums_counts_and_finds_the_first_bad_target(
        device, monkeypatch, tt):
    # more rows than REDUCE_BLOCK (the reduction loops over blocks), a strided target
    monkeypatch.setattr(k, "REDUCE_BLOCK", 16)
    n, v = 3 * 16 + 5, 30
    logits = torch.randn(n, v, device=device) * 3
    target = _targets(2 * n, v, device, ignore_frac=0.3).to(tt)[::2]
    ref = F.cross_entropy(logits.double(), target.long(), ignore_index=IGNORE, reduction="none")
    n_valid = int((target != IGNORE).sum())
    for reduction, want in (("sum", ref.sum()), ("mean", ref.sum() / n_valid)):
        for dtype in (torch.float32, torch.bfloat16):
            loss, _, count = k.cross_entropy_fwd(logits, target, IGNORE, 0.0,
                                                 reduction=reduction, loss_dtype=dtype)
            assert loss.shape == () and loss.dtype == dtype and count.item() == n_valid
            # fp64 sum, one rounding: within one ulp of the dtype (the interpreter truncates
            # to bf16)
            ulp = torch.finfo(dtype).eps * want.abs().item()
            assert (loss.double() - want).abs().item() <= ulp, (reduction, dtype)
    rows, _, count = k.cross_entropy_fwd(logits, target, IGNORE, 0.0, check_labels=True,
                                         loss_dtype=torch.bfloat16)
    assert rows.dtype == torch.bfloat16 and count.item() == n_valid
    # out of range at rows 3 (high) and 40 (negative): the first is reported as -1 - row;
    # unchecked, both are left out of the count and their losses are NaN
    target[3], target[40] = v, -2
    _, _, count = k.cross_entropy_fwd(logits, target, IGNORE, 0.0, reduction="mean",
                                      check_labels=True)
    assert count.item() == -1 - 3
    loss, _, count = k.cross_entropy_fwd(logits, target, IGNORE, 0.0, reduction="mean")
    in_range = (target != IGNORE) & (target >= 0) & (target < v)
    assert loss.isnan() and count.item() == int(in_range.sum()) < n_valid
    # no row: sum 0, mean 0 / 0 = NaN (as torch), count 0
    empty = logits[:0]
    for reduction in ("sum", "mean"):
        loss, _, count = k.cross_entropy_fwd(empty, target[:0], IGNORE, 0.0, reduction=reduction,
                                             check_labels=True)
        assert count.item() == 0 and (loss.isnan() if reduction == "mean" else loss == 0)


@pytest.mark.parametrize("tt", [torch.int64, torch.int32])
@pytest.mark.parametrize("n", [0, 1, 16, 3 * 16 + 5])
def test_select_rows_matches_nonzero_and_writes_every_element(device, monkeypatch, tt, n):
    # 16 labels a step: several blocks, the running offset carried between them; strided
    # labels; every element of both outputs written (poisoned allocations)
    monkeypatch.setattr(k, "SELECT_BLOCK", 16)
    labels = _targets(2 * n, 50, device, ignore_frac=0.6).to(tt)[::2]
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison_(empty(*a, **kw)))
    sel, info = k.select_rows(labels, IGNORE, 50)
    monkeypatch.undo()
    rows = (labels != IGNORE).nonzero().squeeze(1)
    others = (labels == IGNORE).nonzero().squeeze(1).flip(0)
    m = rows.numel()
    assert sel.dtype == info.dtype == torch.int64 and sel.shape == (2 * n,)
    assert info.tolist() == [m, n, 0]
    assert torch.equal(sel[:m], rows) and torch.equal(sel[m:n], others)
    assert torch.equal(sel[n:], labels.long()[sel[:n]])


def test_select_rows_reports_the_first_out_of_range_label(device, monkeypatch):
    monkeypatch.setattr(k, "SELECT_BLOCK", 16)
    labels = _targets(40, 50, device, ignore_frac=0.3)
    labels[[5, 9, 33]] = torch.tensor([IGNORE, 50, -1], device=device)
    for check, want in ((True, 9), (False, 40)):
        sel, info = k.select_rows(labels, IGNORE, 50, check_labels=check)
        rows = (labels != IGNORE).nonzero().squeeze(1)
        # the count of out-of-range labels either way (the divisor of a mean leaves them out)
        assert info.tolist() == [rows.numel(), want, 2]
        # out-of-range labels are selected either way (their loss is NaN when unchecked)
        assert torch.equal(sel[:rows.numel()], rows)
    labels[9] = 1 << 40   # beyond int32: still out of range, not wrapped into it
    assert k.select_rows(labels, IGNORE, 50)[1].tolist()[1] == 9


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's 0 / 0
@pytest.mark.parametrize("n", [45, 16 * 6 + 3, 16 * 40 + 7])
def test_cross_entropy_two_stage_reduction_matches_fp64_and_one_program(device, monkeypatch, n):
    # above REDUCE_ONE_PROGRAM_ROWS rows the reduction is a grid of partials and a second pass:
    # thresholds lowered so that the interpreter runs both paths on small inputs: several
    # programs of one block, of several blocks (REDUCE_PARTS reached), a ragged last one
    monkeypatch.setattr(k, "REDUCE_BLOCK", 16)
    monkeypatch.setattr(k, "REDUCE_PARTS", 8)
    v = 30
    logits = torch.randn(n, v, device=device) * 3
    target = _targets(2 * n, v, device, ignore_frac=0.3)[::2]
    ref = F.cross_entropy(logits.double(), target, ignore_index=IGNORE, reduction="none")
    n_valid = int((target != IGNORE).sum())
    results = {}
    for one_program_rows in (1 << 30, 16):
        monkeypatch.setattr(k, "REDUCE_ONE_PROGRAM_ROWS", one_program_rows)
        for reduction, want in (("sum", ref.sum()), ("mean", ref.sum() / n_valid)):
            loss, _, count = k.cross_entropy_fwd(logits, target, IGNORE, 0.0,
                                                 reduction=reduction, check_labels=True)
            assert count.item() == n_valid
            ulp = torch.finfo(torch.float32).eps * want.abs().item()
            assert (loss.double() - want).abs().item() <= ulp, (reduction, one_program_rows)
            results.setdefault(reduction, []).append(loss)
            # the same bits run to run
            again, _, _ = k.cross_entropy_fwd(logits, target, IGNORE, 0.0, reduction=reduction,
                                              check_labels=True)
            assert torch.equal(again, loss)
        # out of range at rows 13 and the last: the first is reported as -1 - row, in any part
        bad = target.clone()
        bad[13], bad[n - 1] = v, -2
        _, _, count = k.cross_entropy_fwd(logits, bad, IGNORE, 0.0, reduction="mean",
                                          check_labels=True)
        assert count.item() == -1 - 13
        _, _, count = k.cross_entropy_fwd(logits, bad, IGNORE, 0.0, check_labels=True)
        assert count.item() == -1 - 13
        loss, _, count = k.cross_entropy_fwd(logits, bad, IGNORE, 0.0, reduction="mean")
        assert loss.isnan() and count.item() == int(((bad >= 0) & (bad < v)).sum())
    for reduction, (one, two) in results.items():
        torch.testing.assert_close(one, two, rtol=0, atol=torch.finfo(torch.float32).eps
                                   * one.abs().item())


@pytest.mark.skipif(not _interpreting(), reason="counts launches of the Triton interpreter")
def test_cross_entropy_reduction_adds_a_launch_only_above_its_row_threshold(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    real = InterpretedFunction.__getitem__
    launches = []

    def launch(self, grid):
        launches.append((self.fn.__name__, tuple(grid)))
        return real(self, grid)
    monkeypatch.setattr(InterpretedFunction, "__getitem__", launch)
    monkeypatch.setattr(k, "REDUCE_BLOCK", 16)
    for n, grids in ((16 * 4, [(1,)]), (16 * 4 + 1, [(5,), (1,)])):
        monkeypatch.setattr(k, "REDUCE_ONE_PROGRAM_ROWS", 16 * 4)
        launches.clear()
        k.cross_entropy_fwd(torch.randn(n, 20), _targets(n, 20, "cpu"), IGNORE, 0.0,
                            reduction="mean")
        reduce = [g for name, g in launches if name.startswith("_cross_entropy_reduce")]
        assert reduce == grids, launches


def test_label_errors_name_the_first_bad_label_and_its_flat_index(device):
    logits = torch.randn(5, 10, device=device)
    target = torch.tensor([1, IGNORE, 10, -5, 2], device=device)
    hidden, weight, bias, labels = _mlm_inputs((2, 4), 16, 50, torch.float32, device)
    labels[1, 1], labels[1, 3] = 77, -1
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match=r"found 10 at flat index 2 "):
            cross_entropy(logits, target, backend=backend)
        with pytest.raises(ValueError, match=r"found 77 at flat index 5 "):
            masked_lm_loss(hidden, weight, bias, labels, backend=backend)


@pytest.mark.parametrize("g", [1.0, -0.5])
def test_cross_entropy_scale_multiplies_three_tensors_in_one_launch(device, g):
    # masked_lm_loss's dhidden, dweight, dbias: different sizes and dtypes, an empty one skipped
    a = torch.randn(3, 5000, device=device)
    a[1] = 0.0
    b = torch.empty(0, device=device)
    c = torch.randn(4097, device=device).to(torch.bfloat16)
    want = [torch.where(t == 0, 0.0, t.float() * g).to(t.dtype) for t in (a, b, c)]
    k.cross_entropy_scale_(a, torch.tensor(g, device=device), b, c)
    for t, w in zip((a, b, c), want):
        assert torch.equal(t, w)
    with pytest.raises(ValueError, match="at most 3 tensors"):
        k.cross_entropy_scale_(a, torch.tensor(g, device=device), a, a, a)


def test_cross_entropy_bwd_reads_the_incoming_gradient_and_count_on_the_device(device):
    # a bf16 incoming gradient a row, expanded (stride 0) as the backward of .sum() gives it,
    # divided by an int64 count in the kernel: the same bits as torch's fp32 grad / count first
    logits = torch.randn(7, 300, device=device) * 3
    target = _targets(7, 300, device, ignore_frac=0.3)
    _, stats, _ = k.cross_entropy_fwd(logits, target, IGNORE, 0.1)
    count = torch.tensor(5, device=device)
    grad = torch.tensor(0.7, device=device).to(torch.bfloat16)
    want = k.cross_entropy_bwd(logits, target, stats, grad.float() / count, IGNORE, 0.1)
    for scale in (grad, grad.expand(7)):
        got = k.cross_entropy_bwd(logits, target, stats, scale, IGNORE, 0.1, count=count)
        assert torch.equal(got, want)
    # a Python float is passed by value: the same gradient as the fp32 tensor holding it
    third = torch.tensor(1 / 3, device=device)
    assert torch.equal(k.cross_entropy_bwd(logits, target, stats, 1 / 3, IGNORE, 0.1),
                       k.cross_entropy_bwd(logits, target, stats, third, IGNORE, 0.1))
    with pytest.raises(ValueError, match="count must be a one-element int64"):
        k.cross_entropy_bwd(logits, target, stats, grad, IGNORE, 0.1, count=count.float())


# Kernels whose outputs the host reads (masked_lm_loss's row count): _host_calls runs them.
_READ_BY_HOST = ("_cross_entropy_select_kernel",)


def _host_calls(fn, monkeypatch):
    """The torch ops (aten calls not inside another aten call) and the kernel launches of fn(),
    the kernels themselves not run (but those in _READ_BY_HOST, whose interpreter work is not
    counted): the host work of an op, as benchmarks/ measure it."""
    from triton.runtime.interpreter import InterpretedFunction
    launches = []
    real = InterpretedFunction.__getitem__

    def launch(self, grid):
        def run(*a, **kw):
            launches.append(self.fn.__name__)
            if self.fn.__name__ in _READ_BY_HOST:
                with torch.profiler.record_function("interpreter"):
                    real(self, grid)(*a, **kw)
        return run
    monkeypatch.setattr(InterpretedFunction, "__getitem__", launch)

    def outer(e):
        while e.cpu_parent is not None:
            e = e.cpu_parent
            if e.name.startswith("aten::") or e.name == "interpreter":
                return False
        return True
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    monkeypatch.undo()
    return [e.name[6:] for e in prof.events() if e.name.startswith("aten::") and outer(e)], \
        launches


@pytest.mark.skipif(not _interpreting(), reason="counts launches of the Triton interpreter")
def test_cross_entropy_and_masked_lm_loss_host_work_stays_small(monkeypatch):
    # small BERT shapes are host-bound (~13 us a torch op, ~20 us a launch on an H200
    # machine): a mean cross-entropy, forward and backward, is its outputs' allocations and
    # three launches (the mean, its count and the label check are the reduction kernel's);
    # masked_lm_loss adds only the row selection, the check, the GEMMs and the scatter of dh
    x = torch.randn(64, 1000, requires_grad=True)
    t = _targets(64, 1000, "cpu")
    ops, launches = _host_calls(lambda: torch.autograd.grad(
        cross_entropy(x, t, check_labels=False, backend="triton"), x), monkeypatch)
    assert launches == ["_cross_entropy_fwd_kernel", "_cross_entropy_reduce_kernel",
                        "_cross_entropy_bwd_kernel"]
    # loss rows, stats, loss, count, the empty stored-gradient output; ones_like (autograd's
    # incoming gradient); the gradient
    assert sorted(ops) == sorted(["empty"] * 4 + ["new_empty", "ones_like", "empty_like"]), ops
    hidden, weight, bias, labels = _mlm_inputs((4, 32), 64, 1000, torch.float32, "cpu")
    leaves = [u.requires_grad_() for u in (hidden, weight, bias)]
    ops, launches = _host_calls(lambda: torch.autograd.grad(
        masked_lm_loss(*leaves, labels, backend="triton"), leaves), monkeypatch)
    assert launches == ["_cross_entropy_select_kernel", "_cross_entropy_fwd_kernel",
                        "_cross_entropy_bwd_kernel", "_cross_entropy_scale_kernel"]
    # the selection and the label check are the select kernel and one read of its count
    # (aten::to, to the host): not torch's ne, nonzero, index_select, div, any and a second
    # read (seven ops, two syncs); the rest is allocations, views, the gathered rows, the GEMMs,
    # the mean and the scatter of dh (the eager gathered-rows version: 22 ops, ~4 more kernels)
    assert not {"ne", "nonzero", "any", "is_nonzero", "item", "div"} & set(ops), ops
    assert ops.count("to") == 1 and len(ops) <= 21, ops


@pytest.mark.skipif(not _interpreting(), reason="counts launches of the Triton interpreter")
@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "none"), (torch.float16, "mean")])
def test_masked_lm_loss_recomputing_backward_reuses_the_forwards_rows(monkeypatch, dtype,
                                                                      reduction):
    # the backward that recomputes the projection ("none"; float16) takes the rows the forward
    # selected: no second selection launch, no second read of the count
    hidden, weight, bias, labels = _mlm_inputs((4, 8), 16, 100, torch.float32, "cpu")
    leaves = [u.to(dtype).requires_grad_() for u in (hidden, weight, bias)]
    grad = torch.ones(labels.shape) if reduction == "none" else None
    ops, launches = _host_calls(lambda: torch.autograd.grad(
        masked_lm_loss(*leaves, labels, reduction=reduction, backend="triton"), leaves, grad),
        monkeypatch)
    assert launches.count("_cross_entropy_select_kernel") == 1, launches
    assert "nonzero" not in ops and "item" not in ops, ops
    if dtype == torch.float32:
        assert ops.count("to") == 1, ops   # the forward's one read of the count


@pytest.mark.parametrize("n_cols", [50, 5000])
def test_cross_entropy_bwd_writes_over_the_logits_as_into_a_new_tensor(device, n_cols):
    # linear_cross_entropy overwrites each chunk's logits with their gradient
    logits = torch.randn(7, n_cols, device=device) * 3
    target = _targets(7, n_cols, device, ignore_frac=0.3)
    target[0] = 1
    _, stats, _ = k.cross_entropy_fwd(logits, target, IGNORE, 0.1)
    scale = torch.rand(7, device=device)
    want = k.cross_entropy_bwd(logits, target, stats, scale, IGNORE, 0.1)
    same = logits.clone()
    out = k.cross_entropy_bwd(same, target, stats, scale, IGNORE, 0.1, dlogits=same)
    assert out.data_ptr() == same.data_ptr()
    torch.testing.assert_close(same, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dlogits must be"):
        k.cross_entropy_bwd(logits, target, stats, scale, IGNORE, 0.1, dlogits=logits.double())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_losses_take_float64_on_the_torch_backend_and_gradcheck(reduction, device):
    """float64 (a .double() model, gradcheck) runs on the PyTorch reference, as torch's own
    cross_entropy; the kernels refuse it by name."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 6, -100, 3, 3])
    got = cross_entropy(logits, target, label_smoothing=0.1, reduction=reduction, backend="torch")
    want = F.cross_entropy(logits, target, label_smoothing=0.1, reduction=reduction)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy(x, target, reduction=reduction, backend="torch"), (logits,))
    hidden = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -100, 6], [-100, -100, 0]])
    assert torch.autograd.gradcheck(
        lambda h, w, b: masked_lm_loss(h, w, b, labels, reduction=reduction, backend="torch"),
        (hidden, weight, bias))
    # the kernels' refusal, on the device they run on (CPU tensors on a GPU machine are
    # refused first for their device)
    on = lambda *ts: [t.detach().to(device) for t in ts]
    with pytest.raises(BackendUnavailable, match="logits is float64; the kernels take"):
        cross_entropy(*on(logits, target), backend="triton")
    with pytest.raises(BackendUnavailable, match="hidden is float64; the kernels take"):
        masked_lm_loss(*on(hidden, weight, bias, labels), backend="triton")


def test_losses_leave_float64_alone_under_autocast():
    """Autocast never casts float64 (torch's rule): the losses stay float64 under it."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    target = torch.tensor([0, 6, -100, 3, 3])
    hidden = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce = cross_entropy(logits, target, backend="torch")
        want_ce = F.cross_entropy(logits, target)
        mlm = masked_lm_loss(hidden, weight, None, target, backend="torch")
        want_mlm = F.cross_entropy(F.linear(hidden, weight), target)
    assert ce.dtype == want_ce.dtype == torch.float64
    torch.testing.assert_close(ce, want_ce, rtol=1e-12, atol=1e-12)
    assert mlm.dtype == torch.float64
    torch.testing.assert_close(mlm, want_mlm.to(mlm.dtype), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("one_block", [True, False])
def test_cross_entropy_stored_gradient_with_an_in_range_ignore_index(stored_ce, device,
                                                                     monkeypatch, one_block):
    """The stored-gradient forward with an ignore_index that is a real class (0): ignored rows
    get no loss and no gradient, whether the row is held whole or read in blocks."""
    if not one_block:
        monkeypatch.setattr(k, "MAX_ONE_BLOCK_V", k.MAX_BLOCK_V)
    v = 50 if one_block else k.MAX_BLOCK_V + 7
    torch.manual_seed(0)
    x = torch.randn(6, v, device=device)
    t = torch.tensor([0, 3, 0, 5, 1, 0], device=device)
    a = x.clone().requires_grad_()
    loss = cross_entropy(a, t, ignore_index=0, label_smoothing=0.1, backend="triton")
    loss.backward()
    r = x.double().requires_grad_()
    want = F.cross_entropy(r, t, ignore_index=0, label_smoothing=0.1)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    assert a.grad[t == 0].abs().max() == 0
    torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "mean"), (torch.float32, "none"),
                                             (torch.float16, "sum")])
def test_masked_lm_loss_flop_counter_mode_counts_its_gemms(device, dtype, reduction):
    """FlopCounterMode (MFU estimates) counts masked_lm_loss's matmuls, which run inside its
    custom ops (it counted 0): the projection of the n masked rows and the dhidden and dweight
    GEMMs, 2 n H V each, in the forward where it stores the gradients (float32 "mean" / "sum"),
    else in the backward after recomputing the projection (2 n H V more)."""
    from torch.utils.flop_counter import FlopCounterMode
    from fastbert.ops.cross_entropy import stores_grads
    hidden = torch.randn(2, 6, 16, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(40, 16, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(40, device=device, dtype=dtype, requires_grad=True)
    labels = torch.full((2, 6), -100, device=device)
    labels[0, 1], labels[1, 4], labels[1, 5] = 3, 7, 0
    gemm = 2 * 3 * 16 * 40
    with FlopCounterMode(display=False) as fc:
        loss = masked_lm_loss(hidden, weight, bias, labels, reduction=reduction,
                              backend="triton")
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        loss.sum().backward()
    if stores_grads(dtype, reduction):
        assert (fwd, fc.get_total_flops()) == (3 * gemm, 0)
    else:
        assert (fwd, fc.get_total_flops()) == (gemm, 3 * gemm)
    # without a weight gradient, one GEMM fewer
    weight.requires_grad_(False)
    with FlopCounterMode(display=False) as fc:
        masked_lm_loss(hidden, weight, bias, labels, reduction=reduction,
                       backend="triton").sum().backward()
    assert fc.get_total_flops() == (2 if stores_grads(dtype, reduction) else 3) * gemm


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_label_check_reads_nothing_while_a_cuda_graph_is_captured(
        device, monkeypatch, reduction):
    """While a CUDA graph is captured (torch.cuda.graph, torch.compile's reduce-overhead) a host
    read is illegal, and the kernels' label check read the count (CUDA's "operation not
    permitted when stream is capturing"): it asserts on the device there instead. masked_lm_loss,
    whose shapes come from a host read, says it cannot be captured."""
    monkeypatch.setattr(fastbert.ops._checks, "capturing", lambda t: True)
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: pytest.fail("read on the host"))
    asserted = []
    real_assert = torch._assert_async
    monkeypatch.setattr(torch, "_assert_async",
                        lambda cond, msg: asserted.append(msg) or real_assert(cond, msg))
    logits = torch.randn(6, 11, device=device, requires_grad=True)
    target = torch.tensor([0, 10, IGNORE, 3, 3, 7], device=device)
    loss = cross_entropy(logits, target, reduction=reduction, backend="triton")
    loss.sum().backward()
    assert asserted and "target must hold class indices in [0, 11)" in asserted[0]
    monkeypatch.undo()
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach(), target,
                                                     reduction=reduction, ignore_index=IGNORE))
    monkeypatch.setattr(fastbert.ops._checks, "capturing", lambda t: True)
    if device.type == "cpu":   # the device assert of an out-of-range target raises at once
        with pytest.raises(RuntimeError):
            cross_entropy(logits, target.masked_fill(target == 7, 11), backend="triton")
    hidden, weight, bias, labels = _mlm_inputs((2, 5), 8, 11, torch.float32, device)
    with pytest.raises(RuntimeError, match="masked_lm_loss cannot be captured in a CUDA graph"):
        masked_lm_loss(hidden, weight, bias, labels, backend="triton")


@pytest.mark.gpu
def test_cross_entropy_captured_in_a_cuda_graph_replays_like_eager():
    """The default call (check_labels=True, auto backend: the kernels on CUDA), forward and
    backward, captured in a CUDA graph and replayed on new logits, equals eager."""
    logits = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 1000, (64,), device="cuda")
    target[::7] = IGNORE
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm up (compiles) outside the capture
        cross_entropy(logits, target).backward()
    torch.cuda.current_stream().wait_stream(side)
    logits.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = cross_entropy(logits, target)
        loss.backward()
    with torch.no_grad():
        logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.cuda.synchronize()
    ref = logits.detach().clone().requires_grad_()
    want = cross_entropy(ref, target)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(logits.grad, ref.grad)


def test_masked_lm_loss_flop_formulas_take_fake_tensors_while_tracing(monkeypatch):
    """Inductor counts an extern op's FLOPs on fake tensors inside the compile's
    TracingContext: the formulas must not read the labels' values there (they tried to, on
    fake tensors) but take their bound, every row."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import flop_registry
    fwd = flop_registry[torch.ops.fastbert.masked_lm_loss_fwd]
    bwd = flop_registry[torch.ops.fastbert.masked_lm_loss_bwd]
    mode = FakeTensorMode()
    with mode:
        hidden, weight = torch.empty(2, 6, 16), torch.empty(40, 16)
        labels = torch.empty(2, 6, dtype=torch.long)
        sel, info = torch.empty(24, dtype=torch.long), torch.empty(2, dtype=torch.long)
        grad = torch.empty(())
    gemm = 2 * 12 * 16 * 40
    # a compile session, as inductor's: the flag and this thread's tracing context
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True, raising=False)
    with torch._guards.tracing(torch._guards.TracingContext(mode)):
        assert fwd(hidden, weight, None, labels, IGNORE, 0.0, "mean", True, True, False, True,
                   True) == 3 * gemm
        assert bwd(grad, hidden, weight, None, sel, info, IGNORE, 0.0, "mean", True, True,
                   False) == 3 * gemm


# ---- ignore_index at the ends of the label dtypes (mutation review s14 L)

@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_int32_labels_with_ignore_index_2_pow_31_do_not_ignore_int32_min(device, backend):
    """2**31 is outside int32 (labels widened: none equals it); int32's -2**31 would equal it
    after a wrap, and must be reported as out of range, as F.cross_entropy reports it."""
    logits = torch.randn(3, 10, device=device)
    bad = torch.tensor([1, -2**31, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="found -2147483648"):
        cross_entropy(logits, bad, ignore_index=2**31, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ignore_index_int64_min_is_accepted_like_torch(device, backend):
    logits = torch.randn(3, 10, device=device)
    target = torch.tensor([1, 4, 2], device=device)
    want = F.cross_entropy(logits, target, ignore_index=-2**63)
    got = cross_entropy(logits, target, ignore_index=-2**63, backend=backend)
    torch.testing.assert_close(got, want)


def test_masked_lm_flop_count_of_int32_labels_with_a_wrapping_ignore_index(device):
    """ignore_index 2**32 + 5 is outside int32: no int32 label 5 is ignored, in the loss nor
    in the FLOP count (an int32 compare would wrap it to 5)."""
    from torch.utils.flop_counter import FlopCounterMode
    hidden, weight = torch.randn(4, 16, device=device), torch.randn(40, 16, device=device)
    counts = []
    for dt in (torch.int64, torch.int32):
        labels = torch.tensor([5, 5, 1, 2], dtype=dt, device=device)
        with FlopCounterMode(display=False) as fc:
            masked_lm_loss(hidden, weight, None, labels, ignore_index=2**32 + 5,
                           backend="triton")
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] == 2 * 4 * 16 * 40


@triton.jit
def _row_parts_kernel(off_ptr, out_ptr, n_cols):
    i = tl.program_id(0)
    lead, n_body = k._row_parts(tl.load(off_ptr + i), n_cols)
    tl.store(out_ptr + 2 * i, lead.to(tl.int64))
    tl.store(out_ptr + 2 * i + 1, n_body.to(tl.int64))


@pytest.mark.parametrize("n_cols", [1, 5, 8, 9, 23, 77])
def test_row_parts_split_at_the_first_aligned_element(device, n_cols):
    """The body starts at the row's first element offset that is a multiple of ALIGN and is
    whole groups of ALIGN. The interpreter ignores tl.multiple_of, so a wrong lead (0, the
    remainder, one more) still computed the right loss there; on a GPU the body's vector loads
    would be misaligned."""
    align = k.ALIGN.value
    offs = torch.arange(0, 2 * align, dtype=torch.int64, device=device) + 8 * 1000
    out = torch.empty(offs.numel(), 2, dtype=torch.int64, device=device)
    _row_parts_kernel[(offs.numel(),)](offs, out, n_cols)
    for off, (lead, n_body) in zip(offs.tolist(), out.tolist()):
        want_lead = -off % align   # not clipped to the row: row_off + lead stays aligned
        assert lead == want_lead, (off, lead, want_lead)
        assert n_body == max(n_cols - want_lead, 0) // align * align, (off, n_body)


def test_aligned_dx_compares_the_row_offsets_modulo_align(device, monkeypatch):
    """ALIGNED_DX (a multiple_of hint on the gradient's body offsets: only a GPU shows a wrong
    one) is on exactly when every gradient row starts at the logits row's offset modulo ALIGN,
    and the launchers pass it."""
    x = torch.randn(4, 30, device=device)
    assert k._aligned_dx(x, torch.empty_like(x))
    assert k._aligned_dx(x, torch.empty(4, 38, device=device)[:, :30])      # stride 38 = 30 + 8
    assert not k._aligned_dx(x, torch.empty(4, 31, device=device)[:, :30])
    assert not k._aligned_dx(x, torch.empty(4, 34, device=device)[:, :30])
    seen = []
    real = k.launch

    def spy(fn, grid, *args, **meta):
        if "ALIGNED_DX" in meta:
            seen.append(meta["ALIGNED_DX"])
        return real(fn, grid, *args, **meta)

    monkeypatch.setattr(k, "launch", spy)
    t = torch.randint(0, 30, (4,), device=device)
    loss, stats, _ = k.cross_entropy_fwd(x, t, -100, 0.0)
    for width, want in ((30, True), (31, False)):
        out = torch.empty(4, width, device=device)[:, :30]
        k.cross_entropy_bwd(x, t, stats, torch.ones(4, device=device), -100, 0.0, dlogits=out)
        k.cross_entropy_fwd(x, t, -100, 0.0, grad_scale=torch.ones(4, device=device),
                            dlogits=out)
        assert seen[-2:] == [want, want]


def test_one_block_forward_smoothing_of_a_large_offset_row_by_row(device):
    """The forward that holds the row in registers (a gradient stored: ONE_BLOCK) takes the
    smoothing mean as deviations from the row's max: each row's loss within one fp32 rounding
    of fp64 (ref = 0 there was ~1e-4 off; the existing test's mean over rows of the
    cross_entropy op passed with it)."""
    eps = torch.finfo(torch.float32).eps
    logits = 1e4 + 5 * torch.randn(8, 5000, device=device)
    target = torch.randint(0, 5000, (8,), device=device)
    ref = F.cross_entropy(logits.double(), target, reduction="none", label_smoothing=0.1)
    loss, _, _ = k.cross_entropy_fwd(logits, target, -100, 0.1,
                                     grad_scale=torch.ones(8, device=device),
                                     dlogits=torch.empty_like(logits))
    # atol: log_s, a sum of exp2 approximations on the GPU, is good to about 1e-6
    assert ((loss.double() - ref).abs() <= eps * ref.abs() + 1e-5).all()


@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "mean"), (torch.float32, "sum"),
                                             (torch.float32, "none"), (torch.float16, "mean")])
def test_masked_lm_loss_keeps_no_logits_sized_tensor_for_backward(device, dtype, reduction):
    """#4: no (n_masked, V) logits (nor their probabilities, nor a chunk buffer) is kept for the
    backward, whichever path the kernels take (the gradients stored in the forward for a
    reduced fp32 loss, or recomputed in the backward for "none" and fp16): every tensor saved
    for backward or held by a node of the graph is checked for a vocabulary-sized row."""
    vocab, hidden_size = 1237, 32
    hidden, weight, bias, labels = _mlm_inputs((3, 7), hidden_size, vocab, dtype, device,
                                               masked_frac=0.6)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    n_masked = int((labels != IGNORE).sum())
    assert n_masked > 1
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda u: saved.append(u) or u, lambda u: u):
        loss = masked_lm_loss(*leaves, labels, reduction=reduction, backend="triton")
    held, seen, todo = list(saved), set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in dir(node):
            if not name.startswith("__"):
                v = getattr(node, name, None)
                held.extend(v if isinstance(v, (tuple, list)) else [v])
        todo.extend(n for n, _ in node.next_functions)
    tensors = [t for t in held if isinstance(t, torch.Tensor)]
    assert tensors   # the walk reached what the graph holds
    big = [tuple(t.shape) for t in tensors
           if (t.dim() >= 2 and t.shape[-1] == vocab) or (t.dim() == 1 and t.numel() > vocab)
           or t.numel() >= n_masked * vocab and t.shape[-1] != hidden_size]
    assert not big, f"vocabulary-sized tensors kept for the backward: {big}"
    _reduce_for_grad(loss, reduction).backward()
    assert all(t.grad is not None for t in leaves)


def test_cross_entropy_fp16_gradients_survive_loss_scaling_with_stored_gradients_on(
        device, monkeypatch):
    # stores_grads' float16 exclusion was pinned by no test: with STORE_GRADS off (the
    # default) fp16 never reaches it. The same check as the existing loss-scaling test, with
    # the stored-gradient path on
    monkeypatch.setattr(k, "STORE_GRADS", True)
    test_cross_entropy_fp16_gradients_survive_loss_scaling(device)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_stored_gradient_is_scaled_by_the_incoming_gradient(device, monkeypatch,
                                                                          reduction):
    # every stored-gradient test backpropagated an incoming gradient of exactly 1, where the
    # in-place scale is a no-op: dropping _cross_entropy_scale_ from the backward went unseen
    monkeypatch.setattr(k, "STORE_GRADS", True)
    logits = torch.randn(9, 70, device=device) * 3
    target = torch.randint(0, 70, (9,), device=device)
    target[2] = -100
    x = logits.clone().requires_grad_()
    (cross_entropy(x, target, reduction=reduction, label_smoothing=0.1, backend="triton")
     * 0.75).backward()
    r = logits.double().requires_grad_()
    (F.cross_entropy(r, target, reduction=reduction, label_smoothing=0.1) * 0.75).backward()
    torch.testing.assert_close(x.grad.double(), r.grad, rtol=1e-5, atol=1e-7)
