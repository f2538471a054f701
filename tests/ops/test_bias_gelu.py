"""fastbert.ops.bias_gelu against an fp64 reference, forward and gradients."""
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from fastbert import ops
from tests._utils import assert_close_to_ref


@pytest.mark.parametrize("shape", [(1, 100), (7, 384), (3, 5, 768), (33, 1000), (2, 3072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_triton_fwd_bwd_matches_fp64_on_ragged_shapes(shape, dtype, approximate, device):
    n = shape[-1]
    x = (2 * torch.randn(*shape)).to(device=device, dtype=dtype).requires_grad_(True)
    b = torch.randn(n).to(device=device, dtype=dtype).requires_grad_(True)
    y = ops.bias_gelu(x, b, approximate, backend="triton")
    dy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (x, b), dy)

    x64, b64 = (t.detach().double().requires_grad_(True) for t in (x, b))
    y64 = F.gelu(x64 + b64, approximate=approximate)
    dx64, db64 = torch.autograd.grad(y64, (x64, b64), dy.double())
    lowp = dxl = dbl = None
    if dtype != torch.float32:
        xl, bl = (t.detach().clone().requires_grad_(True) for t in (x, b))
        lowp = F.gelu(xl + bl, approximate=approximate)
        dxl, dbl = torch.autograd.grad(lowp, (xl, bl), dy)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close_to_ref(y, y64, lowp, atol=atol, name="y")
    assert_close_to_ref(dx, dx64, dxl, atol=atol, name="dx")
    # dbias sums over rows: fp32 accumulation in the kernel beats torch's low-precision sum
    assert_close_to_ref(db, db64, dbl, atol=atol * shape[0], rtol_fp32=1e-5, name="dbias")


def test_bias_gelu_without_bias_and_non_contiguous(device):
    x = torch.randn(16, 2 * 50, device=device)[:, ::2].requires_grad_(True)
    y = ops.bias_gelu(x, None, backend="triton")
    assert torch.allclose(y, F.gelu(x), atol=1e-6)
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    x2 = x.detach().clone().requires_grad_(True)
    (dx2,) = torch.autograd.grad(F.gelu(x2).sum(), (x2,))
    assert torch.allclose(dx, dx2, atol=1e-6)


def test_bias_gelu_extreme_values_stay_finite(device):
    x = torch.tensor([[-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4, 3.0]], device=device, requires_grad=True)
    for approx in ("none", "tanh"):
        y = ops.bias_gelu(x, None, approx, backend="triton")
        (dx,) = torch.autograd.grad(y.sum(), (x,))
        ref = F.gelu(x.detach().double(), approximate=approx)
        assert torch.isfinite(y).all() and torch.isfinite(dx).all()
        assert torch.allclose(y.double(), ref, atol=1e-5)


def test_bias_gelu_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ops.bias_gelu(x, torch.randn(7))
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.bias_gelu(x.int(), None)
    with pytest.raises(ValueError, match="approximate"):
        ops.bias_gelu(x, None, "erf")


def test_bias_gelu_opcheck_and_compile(device):
    x = torch.randn(6, 40, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastbert.bias_gelu_fwd.default, (x, b, "none"))
    torch.library.opcheck(torch.ops.fastbert.bias_gelu_fwd.default, (x, None, "tanh"))
    torch._dynamo.reset()
    f = torch.compile(lambda x, b: ops.bias_gelu(x, b, backend="triton").sum(), fullgraph=True,
                      backend="aot_eager")
    f(x, b).backward()
    assert b.grad is not None and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_bias_gelu_strided_or_expanded_bias_read_by_its_stride(layout, device):
    # a bias view with stride 2 or 0 (expanded scalar) must be read element by element, not
    # as if contiguous (stride 0 would read past a 1-element storage on the GPU)
    n = 80
    b = (torch.randn(2 * n, device=device)[::2] if layout == "strided"
         else torch.randn(1, device=device).expand(n)).requires_grad_(True)
    x = torch.randn(6, n, device=device, requires_grad=True)
    y = ops.bias_gelu(x, b, backend="triton")
    xc, bc = (t.detach().contiguous().requires_grad_(True) for t in (x, b))
    ref = F.gelu(xc + bc)
    assert_close_to_ref(y, ref, atol=1e-6, name="y")
    dy = torch.randn_like(y)
    for name, g, r in zip(("dx", "dbias"), torch.autograd.grad(y, (x, b), dy),
                          torch.autograd.grad(ref, (xc, bc), dy)):
        assert_close_to_ref(g, r, atol=1e-5, name=name)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_fp32_error_is_within_twice_torchs_over_the_whole_range(device, approximate):
    # the ragged-shape test's plain fp32 tolerance (1e-5) let GELU's cubic coefficient
    # 0.044715 become 0.0447 (error 8.8e-6 here, torch's 4.1e-7); hold fp32 to torch's rule
    x = torch.linspace(-8, 8, 4001, device=device).reshape(1, -1)
    xs = [x.clone().requires_grad_() for _ in range(2)] + [x.double().requires_grad_()]
    ys = [ops.bias_gelu(xs[0], None, approximate, backend="triton"),
          F.gelu(xs[1], approximate=approximate), F.gelu(xs[2], approximate=approximate)]
    ds = [torch.autograd.grad(y.sum(), t)[0] for y, t in zip(ys, xs)]
    for name, (out, torch32, ref) in (("y", ys), ("dx", ds)):
        err = (out.double() - ref).abs().max().item()
        base = (torch32.double() - ref).abs().max().item()
        assert err <= 2 * base + 1e-6, f"{name}: error {err:.3e} > 2 x torch's {base:.3e} + 1e-6"
