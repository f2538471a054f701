"""fastbert.ops.layer_norm / gelu_layer_norm: the Triton kernels (interpreter on CPU, compiled
on GPU) and the torch reference against an fp64 reference, forward and every gradient."""
import sys

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from fastbert import ops
from fastbert.kernels._common import dropout_mask, sum_param_parts
from fastbert.ops._checks import dropout_seed
from tests._utils import assert_close_to_ref, max_err, poison_

SHAPES = [(1, 100), (7, 384), (3, 5, 768), (2, 1024), (13, 16)]


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty the launchers allocate (outputs, statistics, partial sums, the
    parameter gradients) starts as NaN, so an element a kernel forgets to write fails."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison_(real_empty(*a, **kw)))


def _inputs(shape, dtype, device, *, residual=False, x_bias=False, weight=True, bias=True):
    n = shape[-1]
    mk = lambda *s: (torch.randn(*s, dtype=torch.float32) * 1.5 + 0.3).to(device=device, dtype=dtype)
    t = {"x": mk(*shape)}
    t["weight"] = (1 + 0.5 * torch.randn(n)).to(device=device, dtype=dtype) if weight else None
    t["bias"] = (0.5 * torch.randn(n)).to(device=device, dtype=dtype) if bias else None
    t["residual"] = mk(*shape) if residual else None
    t["x_bias"] = (0.5 * torch.randn(n)).to(device=device, dtype=dtype) if x_bias else None
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    return t


def _grads(out, tensors, dy):
    names = [k for k, v in tensors.items() if v is not None]
    gs = torch.autograd.grad(out, [tensors[k] for k in names], dy)
    return dict(zip(names, gs))


def _detached(t, dtype):
    return {k: (v.detach().to(dtype).requires_grad_(True) if v is not None else None)
            for k, v in t.items()}


def _check_against_fp64(fn_kernel, fn_ref, t, dtype, device, atol):
    """kernel (in dtype) vs fp64 reference vs torch in dtype, forward and all gradients."""
    y = fn_kernel(**t)
    dy = torch.randn_like(y)
    g = _grads(y, t, dy)
    t64 = _detached(t, torch.float64)
    y64 = fn_ref(**t64)
    g64 = _grads(y64, t64, dy.double())
    lowp = None
    glow = {}
    if dtype in (torch.float16, torch.bfloat16):
        tl_ = _detached(t, dtype)
        lowp = fn_ref(**tl_, lowp=True)
        glow = _grads(lowp, tl_, dy)
    assert y.dtype == dtype
    assert_close_to_ref(y, y64, lowp, atol=atol, name="y")
    for k in g:
        assert g[k].dtype == t[k].dtype and g[k].shape == t[k].shape
        assert_close_to_ref(g[k], g64[k], glow.get(k), atol=atol, rtol_fp32=2e-5, name=f"d{k}")


def _ln_torch_lowp(x, weight, bias, residual=None, x_bias=None, eps=1e-5, activation="none"):
    """What PyTorch computes in low precision: each op in x's dtype."""
    s = x
    if x_bias is not None:
        s = s + x_bias
    if activation != "none":
        s = F.gelu(s, approximate="tanh" if activation == "gelu_tanh" else "none")
    if residual is not None:
        s = s + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, eps)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extras", ["plain", "residual+x_bias", "no_affine"])
def test_layer_norm_triton_fwd_bwd_matches_fp64_on_ragged_rows(shape, dtype, extras, device,
                                                                poisoned_empty):
    t = _inputs(shape, dtype, device, residual="residual" in extras, x_bias="x_bias" in extras,
                weight=extras != "no_affine", bias=extras != "no_affine")

    def kern(x, weight, bias, residual, x_bias):
        return ops.layer_norm(x, weight, bias, 1e-5, residual=residual, x_bias=x_bias,
                              backend="triton")

    def ref(x, weight, bias, residual, x_bias, lowp=False):
        if lowp:
            return _ln_torch_lowp(x, weight, bias, residual, x_bias)
        return ops.layer_norm_ref(x, weight, bias, 1e-5, residual=residual, x_bias=x_bias)

    _check_against_fp64(kern, ref, t, dtype, device, atol=1e-5 if dtype == torch.float32 else 2e-3)



# one affine parameter without the other: the backward's partial-sum buffer then holds one
# slice, and its slice index must not assume the weight's (a mutant that did wrote the bias
# partials past the buffer and gave a NaN dbias, and no other case saw it)
@pytest.mark.parametrize("shape", [(7, 384), (13, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("extras", ["weight_only", "bias_only+x_bias"])
def test_layer_norm_one_affine_parameter_fwd_bwd_matches_fp64(shape, dtype, extras, device,
                                                              poisoned_empty):
    t = _inputs(shape, dtype, device, x_bias="x_bias" in extras,
                weight=extras == "weight_only", bias=extras != "weight_only")

    def kern(x, weight, bias, residual, x_bias):
        return ops.layer_norm(x, weight, bias, 1e-5, x_bias=x_bias, backend="triton")

    def ref(x, weight, bias, residual, x_bias, lowp=False):
        if lowp:
            return _ln_torch_lowp(x, weight, bias, residual, x_bias)
        return ops.layer_norm_ref(x, weight, bias, 1e-5, x_bias=x_bias)

    _check_against_fp64(kern, ref, t, dtype, device, atol=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("shape", [(5, 100), (2, 3, 384), (1, 768)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_layer_norm_triton_fwd_bwd_matches_fp64(shape, dtype, approximate, device):
    t = _inputs(shape, dtype, device, x_bias=True)
    t.pop("residual")
    act = "gelu" if approximate == "none" else "gelu_tanh"

    def kern(x, weight, bias, x_bias):
        return ops.gelu_layer_norm(x, x_bias, weight, bias, 1e-5, approximate=approximate,
                                   backend="triton")

    def ref(x, weight, bias, x_bias, lowp=False):
        if lowp:
            return _ln_torch_lowp(x, weight, bias, None, x_bias, activation=act)
        return ops.layer_norm_ref(x, weight, bias, 1e-5, x_bias=x_bias, activation=act)

    _check_against_fp64(kern, ref, t, dtype, device, atol=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(9, 100), (4, 768)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided_rows"])
def test_layer_norm_dropout_fwd_bwd_match_reference_with_kernel_mask(shape, dtype, device,
                                                                     strided):
    # strided rows (x a column slice of a wider tensor): the mask is indexed by the (row,
    # column) of a contiguous (rows, n) layout, not by memory offsets, in the forward and the
    # backward alike
    p = 0.3
    t = _inputs(shape, dtype, device, residual=True, x_bias=True)
    if strided:
        wide = torch.randn(*shape[:-1], 2, shape[-1], device=device).to(dtype)
        wide[..., 0, :] = t["x"].detach()
        t["x"] = wide[..., 0, :].requires_grad_()
        assert not t["x"].is_contiguous()
    torch.manual_seed(123)
    y = ops.layer_norm(t["x"], t["weight"], t["bias"], residual=t["residual"], x_bias=t["x_bias"],
                       dropout_p=p, backend="triton")
    # the seed the op drew: replay the same draw
    torch.manual_seed(123)
    seed = dropout_seed(device)
    n = shape[-1]
    keep = dropout_mask(seed, t["x"].numel() // n, n, p).reshape(shape)
    dy = torch.randn_like(y)
    g = _grads(y, t, dy)
    t64 = _detached(t, torch.float64)
    y64 = ops.layer_norm_ref(t64["x"], t64["weight"], t64["bias"], residual=t64["residual"],
                             x_bias=t64["x_bias"], dropout_p=p, dropout_mask=keep)
    g64 = _grads(y64, t64, dy.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (y.double() - y64).abs().max() < tol
    for k in g:
        assert (g[k].double() - g64[k]).abs().max() < tol * max(1.0, g64[k].abs().max().item()), k


def test_layer_norm_dropout_reproducible_and_kept_fraction(device):
    x = torch.randn(256, 1024, device=device)
    torch.manual_seed(7)
    y1 = ops.layer_norm(x, None, None, x_bias=torch.zeros(1024, device=device), dropout_p=0.25,
                        backend="triton")
    torch.manual_seed(7)
    y2 = ops.layer_norm(x, None, None, x_bias=torch.zeros(1024, device=device), dropout_p=0.25,
                        backend="triton")
    assert torch.equal(y1, y2)
    seed = torch.tensor([987654321], dtype=torch.int64, device=device)
    keep = dropout_mask(seed, 512, 1024, 0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    # eval: training=False means no dropout at all
    y_eval = ops.layer_norm(x, None, None, dropout_p=0.25, training=False, backend="triton")
    assert torch.allclose(y_eval, ops.layer_norm_ref(x, None, None), atol=1e-5)


def test_layer_norm_residual_grad_is_dx_without_dropout(device):
    x = torch.randn(3, 64, device=device, requires_grad=True)
    r = torch.randn(3, 64, device=device, requires_grad=True)
    y = ops.layer_norm(x, None, None, residual=r, backend="triton")
    y.square().sum().backward()
    assert torch.equal(x.grad, r.grad)


def test_layer_norm_torch_backend_matches_fp64():
    x = torch.randn(6, 100, dtype=torch.float64, requires_grad=True)
    w = torch.randn(100, dtype=torch.float64, requires_grad=True)
    y = ops.layer_norm(x, w, None, backend="torch")
    ref = F.layer_norm(x, (100,), w, None, 1e-5)
    assert torch.allclose(y, ref, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_layer_norm_non_contiguous_input_handled(backend, device):
    base = torch.randn(8, 2 * 96, device=device)
    x = base[:, ::2]  # column stride 2
    assert not x.is_contiguous()
    xt = torch.randn(96, 8, device=device).t()  # transposed
    w = torch.randn(96, device=device)
    for inp in (x, xt, base[:, :96]):
        y = ops.layer_norm(inp, w, None, backend=backend)
        assert torch.allclose(y, ops.layer_norm_ref(inp.contiguous(), w, None), atol=1e-5)


def test_layer_norm_autocast_output_dtype_like_torch(device):
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=device)
    w = torch.randn(64, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ref = F.layer_norm(x, (64,), w, None)
        y = ops.layer_norm(x, w, None, backend="triton")
    # CUDA autocast: layer_norm runs in and returns fp32; CPU autocast keeps bf16
    assert y.dtype == ref.dtype == (torch.float32 if device.type == "cuda" else torch.bfloat16)
    assert_close_to_ref(y, ops.layer_norm_ref(x.double(), w.double(), None), ref, atol=1e-3)


def test_layer_norm_autocast_leaves_float64_alone(device, monkeypatch):
    """Autocast never casts float64 (torch's rule): F.layer_norm of a .double() model stays
    float64 under autocast; fastbert's returned float32 under CUDA autocast."""
    x = torch.randn(4, 64, dtype=torch.float64, device=device)
    w = torch.randn(64, dtype=torch.float64, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ref = F.layer_norm(x, (64,), w, None)
        y = ops.layer_norm(x, w, None)
        y_res = ops.layer_norm(x.float(), w, None, residual=x)
    assert y.dtype == ref.dtype == y_res.dtype == torch.float64
    torch.testing.assert_close(y, ref)
    # the CUDA rule itself, on any machine: float32 unless x + residual is float64
    from types import SimpleNamespace
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: True)
    cuda = lambda dt: SimpleNamespace(dtype=dt, device=torch.device("cuda"))
    out_dtype = sys.modules["fastbert.ops.layer_norm"]._out_dtype
    assert out_dtype(cuda(torch.float64), None) == torch.float64
    assert out_dtype(cuda(torch.float32), cuda(torch.float64)) == torch.float64
    assert out_dtype(cuda(torch.bfloat16), None) == torch.float32
    assert out_dtype(cuda(torch.bfloat16), cuda(torch.float32)) == torch.float32


def test_layer_norm_empty_rows_give_zero_parameter_grads(device, poisoned_empty):
    # no rows: the backward launches no program, its partial sums stay unwritten (NaN here)
    # and the column sum must still write zeros
    x = torch.randn(0, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device, requires_grad=True)
    b = torch.randn(32, device=device, dtype=torch.bfloat16, requires_grad=True)
    xb = torch.randn(32, device=device, requires_grad=True)
    y = ops.layer_norm(x, w, b, x_bias=xb, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 32)
    for p in (w, b, xb):
        assert p.grad.dtype == p.dtype and torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("bad,match", [
    (lambda x, w: ops.layer_norm(x.long(), w, None), "x must have dtype"),
    (lambda x, w: ops.layer_norm(x.double(), w.double(), None, backend="triton"), "the kernels take float32"),
    (lambda x, w: ops.layer_norm(x, w[:10], None), r"weight must have shape \(32,\)"),
    (lambda x, w: ops.layer_norm(x, w, None, residual=x[:, :16]), "residual must have shape"),
    (lambda x, w: ops.layer_norm(x, w, None, x_bias=w.unsqueeze(0)), "x_bias must have shape"),
    (lambda x, w: ops.layer_norm(x, w, None, dropout_p=-0.1), r"dropout_p must be in \[0, 1\]"),
    (lambda x, w: ops.layer_norm(x, w, None, eps=0.0), "eps must be positive"),
    (lambda x, w: ops.layer_norm(x, w.to("meta"), None), "weight is on meta"),
    (lambda x, w: ops.layer_norm(x, w, None, backend="cuda"), "has no CUDA C\\+\\+ kernel"),
    (lambda x, w: ops.layer_norm(x, w, None, backend="tpu"), "unknown backend"),
    (lambda x, w: ops.gelu_layer_norm(x, None, w, None, approximate="fast"), "approximate"),
])
def test_layer_norm_bad_inputs_raise_clear_errors(bad, match, device):
    x = torch.randn(4, 32, device=device)
    w = torch.randn(32, device=device)
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        bad(x, w)


def test_layer_norm_too_wide_row_explicit_triton_raises(device):
    x = torch.randn(1, 8193, device=device)
    with pytest.raises(RuntimeError, match="exceeds the fused kernels' limit"):
        ops.layer_norm(x, None, None, backend="triton")


def test_layer_norm_opcheck(device):
    x = torch.randn(5, 48, device=device, requires_grad=True)
    w = torch.randn(48, device=device, requires_grad=True)
    b = torch.randn(48, device=device, requires_grad=True)
    r = torch.randn(5, 48, device=device, requires_grad=True)
    xb = torch.randn(48, device=device, requires_grad=True)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    fwd = torch.ops.fastbert.layer_norm_fwd.default
    torch.library.opcheck(fwd, (x, w, b, r, xb, None, 1e-5, 0.0, "none", torch.float32))
    torch.library.opcheck(fwd, (x, w, b, r, xb, seed, 1e-5, 0.2, "gelu", torch.float32))
    torch.library.opcheck(fwd, (x, None, None, None, None, None, 1e-5, 0.0, "gelu_tanh", torch.float32))


@pytest.mark.parametrize("hidden", [16, 1000, 2048, 4096, 8192])
@pytest.mark.parametrize("eps", [1e-12, 1e-5, 0.1])
def test_layer_norm_constant_and_near_constant_rows_where_eps_decides(device, poisoned_empty,
                                                                      hidden, eps):
    """Rows of variance 0 (y = bias exactly, finite gradients), ~1e-6 (eps 1e-5 sets the
    result) and ~2: forward and every gradient against fp64 with the same eps; widths past
    1024 take the wide row blocks (checked here on the CPU too). eps = 1e-12 is BERT's: there
    a mean off by one ulp of the value (plain sum / n) made the constant row's y up to +-1
    instead of the bias."""
    x = torch.randn(4, hidden, dtype=torch.float64) * 1.5
    x[0] = 0.7                                                    # constant
    x[1] = 0.25 + 1e-3 * torch.randn(hidden, dtype=torch.float64)  # variance ~1e-6
    x[3] = -7.3                                                   # constant, not a dyadic
    t = {"x": x.float().to(device).requires_grad_(),
         "weight": (1 + 0.5 * torch.randn(hidden)).to(device).requires_grad_(),
         "bias": (0.5 * torch.randn(hidden)).to(device).requires_grad_()}
    y = ops.layer_norm(t["x"], t["weight"], t["bias"], eps, backend="triton")
    dy = torch.randn_like(y)
    g = _grads(y, t, dy)
    t64 = _detached(t, torch.float64)
    y64 = ops.layer_norm_ref(t64["x"], t64["weight"], t64["bias"], eps)
    g64 = _grads(y64, t64, dy.double())
    assert_close_to_ref(y, y64, atol=1e-5, name="y")
    for row in (0, 3):  # y = bias: the mean is exact there, x_hat is 0
        torch.testing.assert_close(y[row], t["bias"].detach(), rtol=0, atol=1e-6)
    for k in g:
        assert_close_to_ref(g[k], g64[k], atol=1e-5, rtol_fp32=2e-5, name=f"d{k}")
    # the check can fail: on the near-constant row eps moves the output far past the bound
    other = ops.layer_norm_ref(t64["x"], t64["weight"], t64["bias"], 1e-5 if eps == 0.1 else 0.1)
    assert max_err(other[1], y64[1]) > 1e-2


def test_layer_norm_non_finite_values_give_nan_as_torch(device):
    """A NaN / inf in x gives NaN rows also where dropout drops it (torch's dropout is a product:
    NaN * 0 is NaN; the kernels wrote 0 there, so which backend ran decided whether an fp16
    overflow was seen), forward and backward; and a row whose variance overflows fp32 gives
    NaN, as torch, not y = bias with zero gradients."""
    x = torch.randn(6, 64, device=device)
    x[:, 5] = float("nan")
    x[0, 7] = float("inf")
    x = x.requires_grad_()
    for p in (0.0, 0.5):
        y = ops.layer_norm(x, None, None, dropout_p=p, backend="triton")
        assert torch.isnan(y).all()
        (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
        assert torch.isnan(dx).all()
    # a NaN in the incoming gradient reaches every row's dx, dropped there or not
    x2 = torch.randn(6, 64, device=device, requires_grad=True)
    y = ops.layer_norm(x2, None, None, dropout_p=0.5, backend="triton")
    dy = torch.randn_like(y)
    dy[:, 9] = float("nan")
    (dx,) = torch.autograd.grad(y, x2, dy)
    assert torch.isnan(dx).all()
    big = torch.randn(2, 64, device=device) * 1e20
    big[1] = torch.randn(64) * 1e3
    y = ops.layer_norm(big, None, torch.arange(64.0, device=device), backend="triton")
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


def test_layer_norm_compiles_fullgraph(device):
    torch._dynamo.reset()

    def f(x, w, b, r, xb):
        h = ops.layer_norm(x, w, b, residual=r, x_bias=xb, dropout_p=0.1, backend="triton")
        return ops.gelu_layer_norm(h, xb, w, b, backend="triton").sum()

    args = [torch.randn(4, 64, device=device, requires_grad=True) for _ in range(1)]
    w, b, xb = (torch.randn(64, device=device, requires_grad=True) for _ in range(3))
    r = torch.randn(4, 64, device=device, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    out = compiled(args[0], w, b, r, xb)
    leaves = [args[0], w, b, r, xb]
    grads = torch.autograd.grad(out, leaves)
    # the same values and gradients as eager (same seed: the same dropout mask)
    torch.manual_seed(3)
    out_e = f(args[0], w, b, r, xb)
    grads_e = torch.autograd.grad(out_e, leaves)
    torch.testing.assert_close(out, out_e)
    for a, e in zip(grads, grads_e):
        torch.testing.assert_close(a, e)


def test_layer_norm_gradcheck_fp64_reference_path():
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, r: ops.layer_norm(x, w, None, residual=r, backend="torch"), (x, w, r))


@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden", [(8192, 768), (4097, 1024), (1000, 4096), (333, 8192)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_gpu_large_shapes_low_precision_rule(rows, hidden, dtype):
    t = _inputs((rows, hidden), dtype, torch.device("cuda"), residual=True, x_bias=True)

    def kern(x, weight, bias, residual, x_bias):
        return ops.layer_norm(x, weight, bias, residual=residual, x_bias=x_bias)  # auto: triton

    def ref(x, weight, bias, residual, x_bias, lowp=False):
        if lowp:
            return _ln_torch_lowp(x, weight, bias, residual, x_bias)
        return ops.layer_norm_ref(x, weight, bias, residual=residual, x_bias=x_bias)

    _check_against_fp64(kern, ref, t, dtype, torch.device("cuda"), atol=2e-3)


@pytest.mark.gpu
def test_layer_norm_gpu_dropout_kept_fraction_and_mask_replay():
    p = 0.1
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(3)
    y = ops.layer_norm(x, None, None, x_bias=torch.zeros(1024, device="cuda", dtype=torch.bfloat16),
                       dropout_p=p)
    torch.manual_seed(3)
    seed = dropout_seed(torch.device("cuda"))
    keep = dropout_mask(seed, 4096, 1024, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    ref = ops.layer_norm_ref(x, None, None, dropout_p=p, dropout_mask=keep)
    assert (y.float() - ref.float()).abs().max() < 0.05


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_layer_norm_strided_or_expanded_vectors_read_by_their_strides(layout, device):
    # weight / bias / x_bias views with column stride 2 (slices of a fused parameter) or 0
    # (an expanded scalar): the kernels index them by column, so the launchers must hand
    # them over with unit stride (stride 0 would read past a 1-element storage on the GPU)
    n = 96
    if layout == "strided":
        vec = lambda: torch.randn(2 * n, device=device)[::2]
    else:
        vec = lambda: torch.randn(1, device=device).expand(n)
    x = torch.randn(5, n, device=device, requires_grad=True)
    w, b, xb = (vec().requires_grad_(True) for _ in range(3))
    for act in ("none", "gelu"):
        if act == "none":
            y = ops.layer_norm(x, w, b, x_bias=xb, backend="triton")
        else:
            y = ops.gelu_layer_norm(x, xb, w, b, backend="triton")
        wc, bc, xbc = (t.detach().contiguous().requires_grad_(True) for t in (w, b, xb))
        xc = x.detach().clone().requires_grad_(True)
        ref = ops.layer_norm_ref(xc, wc, bc, x_bias=xbc, activation=act)
        assert_close_to_ref(y, ref, atol=1e-5, name=f"y ({act})")
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, w, b, xb), dy)
        want = torch.autograd.grad(ref, (xc, wc, bc, xbc), dy)
        for name, g, r in zip(("dx", "dweight", "dbias", "dx_bias"), got, want):
            assert_close_to_ref(g, r, atol=1e-5, name=f"{name} ({act})")


def test_bench_layer_norm_cases_run_their_own_shapes(monkeypatch):
    # every timed callable must run its own case's shape: closures built in the shape loop
    # and called after it once saw only the last shape's tensors (the fwd timed the wrong
    # size, fwd+bwd raised on a shape mismatch)
    from benchmarks import bench_layer_norm as bench
    monkeypatch.setattr(bench, "HIDDEN", (32, 48))
    monkeypatch.setattr(bench, "ROWS", (3, 5))
    # inductor on CPU takes seconds per shape: the binding is what is under test
    monkeypatch.setattr(bench.torch, "compile", lambda fn, **kw: fn)
    cases = bench.cases(torch.device("cpu"), quick=False)
    assert len({(c.name, tuple(c.params.items())) for c in cases}) == len(cases) == 20
    for case in cases:
        rows, hidden = case.params["rows"], case.params["hidden"]
        for impl, fn in case.impls.items():
            out = fn()
            first = out if torch.is_tensor(out) else out[0]
            assert tuple(first.shape) == (rows, hidden), (case.name, case.params, impl)


# ----------------------------------------------------------------------------------------
# the column sum of the backward's partial rows (kernels/_common.py sum_param_parts)

@pytest.mark.parametrize("n_rows,n_cols", [(1, 16), (5, 33), (37, 100), (130, 768)])
@pytest.mark.parametrize("present", ["weight,bias", "weight", "bias", "weight,bias,x_bias",
                                     "bias,x_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_sum_param_parts_matches_fp64_column_sums_on_ragged_shapes(
        device, poisoned_empty, n_rows, n_cols, present, dtype):
    names = ("weight", "bias", "x_bias")
    params = [torch.randn(n_cols, device=device).to(dtype) if n in present.split(",") else None
              for n in names]
    k = sum(p is not None for p in params)
    # more part rows than are added: the rows past n_rows are NaN and must not be read
    parts = torch.randn(k, n_rows + 3, n_cols, device=device) * 4 + 1
    parts[:, n_rows:] = float("nan")
    got = sum_param_parts(parts, n_rows, params)
    ref = parts[:, :n_rows].double().sum(1)
    # each output is one rounding of an fp32 sum: within one ulp of its dtype (one, not half:
    # the interpreter truncates to bf16) plus the fp32 summation error
    fp32_err = 1e-6 * n_rows * parts[:, :n_rows].abs().max().item()
    i = 0
    for name, p, g in zip(names, params, got):
        if p is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == (n_cols,), name
        bound = torch.finfo(dtype).eps * ref[i].abs() + fp32_err
        assert ((g.double() - ref[i]).abs() <= bound).all(), \
            f"d{name}: error {max_err(g, ref[i]):.3e}"
        i += 1
    # a fixed order of additions: the same bits at every run
    for g, h in zip(got, sum_param_parts(parts, n_rows, params)):
        assert (g is None and h is None) or torch.equal(g, h)


def test_sum_param_parts_mixed_dtypes_and_zero_rows(device, poisoned_empty):
    w = torch.randn(50, device=device)
    b = torch.randn(50, device=device, dtype=torch.float16)
    parts = torch.full((2, 4, 50), float("nan"), device=device)
    dw, db = sum_param_parts(parts, 0, (w, b))
    assert dw.dtype == torch.float32 and db.dtype == torch.float16
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))
    parts = torch.randn(2, 4, 50, device=device)
    dw, db = sum_param_parts(parts, 3, (w, b))
    assert_close_to_ref(dw, parts[0, :3].double().sum(0), atol=1e-6, name="dw")
    ref = parts[1, :3].double().sum(0)
    assert ((db.double() - ref).abs() <= torch.finfo(torch.float16).eps * ref.abs() + 1e-6).all()
    assert sum_param_parts(None, 5, (None, None)) == [None, None]


@pytest.mark.parametrize("bad,match", [
    (lambda p, w: sum_param_parts(p, 2, (w, None, None)),
     r"k = 1 <= 3 \(the parameters given\), got torch.float32 \(2, 4, 8\)"),
    (lambda p, w: sum_param_parts(p.double(), 2, (w, w)), "must be float32"),
    (lambda p, w: sum_param_parts(p.transpose(1, 2), 2, (w, w)), "unit column stride"),
    (lambda p, w: sum_param_parts(None, 2, (w, w)), "parts is None but a parameter is given"),
    (lambda p, w: sum_param_parts(p, 9, (w, w)), r"n_rows 9 outside \[0, 4\]"),
    # tables beyond what the launch's grid axis 1 holds (CUDA: 65535 blocks of rows)
    (lambda p, w: sum_param_parts(None, 0, (), tables=[(
        torch.zeros(65536 * 64, 1, device=p.device),
        torch.zeros(65536 * 64, 1, dtype=torch.bfloat16, device=p.device))]),
     "exceed the .* this launch can convert"),
])
def test_sum_param_parts_bad_arguments_raise(device, bad, match):
    parts = torch.randn(2, 4, 8, device=device)
    with pytest.raises(ValueError, match=match):
        bad(parts, torch.randn(8, device=device))


@pytest.mark.parametrize("with_params", [True, False], ids=["with_params", "tables_only"])
def test_sum_param_parts_converts_fp32_tables_in_the_same_launch(device, poisoned_empty,
                                                                 monkeypatch, with_params):
    # the embedding's position (70 rows: two row blocks) and type (2 rows) gradient tables,
    # summed by fp32 atomics, come back in their parameters' dtypes from the launch that
    # sums the LayerNorm parameter parts; an fp32 table is returned as it is
    from fastbert.kernels import _common
    launches = []
    kernel = _common._sum_parts_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(_common, "_sum_parts_kernel", Counting())
    n_cols = 100
    pos_acc, typ_acc = torch.randn(70, n_cols, device=device), torch.randn(2, n_cols, device=device)
    f32_acc = torch.randn(3, n_cols, device=device)
    params = (torch.randn(n_cols, device=device).half(), torch.randn(n_cols, device=device))
    parts = torch.randn(2, 5, n_cols, device=device)
    for dtypes in ((torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)):
        launches.clear()
        tables = [(pos_acc, torch.empty(70, n_cols, dtype=dtypes[0], device=device)),
                  (typ_acc if dtypes[1] != torch.float32 else f32_acc,
                   torch.empty(2 if dtypes[1] != torch.float32 else 3, n_cols, dtype=dtypes[1],
                               device=device))]
        out = sum_param_parts(parts if with_params else None, 5,
                              params if with_params else (None, None), tables)
        assert len(launches) == 1
        if with_params:
            for i, (p, g) in enumerate(zip(params, out[:2])):
                ref = parts[i].double().sum(0)
                assert g.dtype == p.dtype and ((g.double() - ref).abs() <= 1e-3 * ref.abs()
                                               + 1e-5).all()
        else:
            assert out[:2] == [None, None]
        for (acc, p), g in zip(tables, out[2:]):
            assert g.dtype == p.dtype and g.shape == acc.shape
            if p.dtype == torch.float32:
                assert g is acc
            elif p.dtype == torch.float16:
                assert torch.equal(g, acc.half())
            else:  # one ulp: the interpreter truncates to bf16, the GPU rounds
                assert ((g.double() - acc.double()).abs()
                        <= torch.finfo(torch.bfloat16).eps * acc.double().abs()).all()
    # fp32 tables only: nothing to launch
    launches.clear()
    assert sum_param_parts(None, 0, (None,), [(f32_acc, f32_acc)])[1] is f32_acc
    assert not launches
    with pytest.raises(ValueError, match="a table must be a contiguous float32"):
        sum_param_parts(None, 0, (), [(pos_acc.half(), pos_acc.half())])
    with pytest.raises(ValueError, match="N = 100"):
        sum_param_parts(parts, 5, params, [(pos_acc[:, :50].contiguous(), pos_acc[:, :50])])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("x_dtype, res_dtype", [(torch.float16, torch.float32),
                                                (torch.float32, torch.bfloat16),
                                                (torch.bfloat16, torch.float16)])
def test_layer_norm_output_takes_the_dtype_of_x_plus_residual(device, backend, x_dtype, res_dtype):
    """A float32 residual stream with a narrower sublayer output stays float32, as
    ``F.layer_norm(x + residual)`` in PyTorch (type promotion); gradients come back in each
    input's own dtype."""
    x = torch.randn(6, 48, device=device).to(x_dtype).requires_grad_()
    r = torch.randn(6, 48, device=device).to(res_dtype).requires_grad_()
    w = torch.randn(48, device=device, requires_grad=True)
    y = ops.layer_norm(x, w, None, residual=r, backend=backend)
    want_dtype = torch.promote_types(x_dtype, res_dtype)
    assert y.dtype == want_dtype
    ref = F.layer_norm(x.double() + r.double(), (48,), w.double(), None).to(want_dtype)
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    g = torch.randn(y.shape, device=device).to(y.dtype)
    dx, dr, dw = torch.autograd.grad(y, (x, r, w), g)
    assert (dx.dtype, dr.dtype, dw.dtype) == (x_dtype, res_dtype, torch.float32)
    # the residual's gradient rounded once, to its own dtype (not through x's narrower one)
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    y64 = F.layer_norm(x64 + r64, (48,), w.detach().double(), None)
    want_dx, want_dr = torch.autograd.grad(y64, (x64, r64), g.double())
    for got, want in ((dx, want_dx), (dr, want_dr)):
        err = (got.double() - want).abs().max().item()
        assert err <= 4 * torch.finfo(got.dtype).eps * want.abs().max().item() + 1e-6, (got.dtype, err)


def test_layer_norm_torch_backend_computes_in_float64_when_the_residual_is():
    x = torch.randn(4, 40)
    r = torch.randn(4, 40, dtype=torch.float64)
    y = ops.layer_norm(x, None, None, residual=r, backend="torch")
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.layer_norm(x.double() + r, (40,)), rtol=1e-12, atol=1e-12)


def test_sum_param_parts_refuses_one_row_past_the_parts(device):
    # the bound is inclusive: n_rows == P is fine, P + 1 must raise (only 9 of 4 was tested)
    parts = torch.randn(2, 4, 8, device=device)
    w = torch.randn(8, device=device)
    sum_param_parts(parts, 4, (w, w))
    with pytest.raises(ValueError, match=r"n_rows 5 outside \[0, 4\]"):
        sum_param_parts(parts, 5, (w, w))
