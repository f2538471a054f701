"""dropout_p = 1.0, valid in torch (F.dropout returns zeros): every op with dropout gives
torch's answer and zero gradients where everything is dropped, on both backends, and the
kernels never see p = 1 (a 1 / (1 - p) scale). Nor a p below 1 that the kernels' float32
argument rounds to 1 (1 / (1 - p) = inf there: NaN attention outputs on a GPU; the
interpreter keeps the double): such a p drops everything too, without drawing a seed."""
import pytest
import torch
import torch.nn.functional as F

from fastbert import ops
from fastbert.ops._checks import drops_everything


# p < 1 that float32 rounds to 1.0 (the smallest such double)
P_ROUNDS_TO_ONE = 1.0 - 2.0 ** -25
P_ALL = pytest.mark.parametrize("p", [1.0, P_ROUNDS_TO_ONE])


def _rng_state(device):
    return (torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda"
            else torch.get_rng_state())


def _grads(out, inputs):
    g = torch.randn_like(out)
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


@P_ALL
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_layer_norm_dropout_one_is_layer_norm_of_the_residual(device, backend, p):
    x = torch.randn(5, 32, device=device, requires_grad=True)
    xb = torch.randn(32, device=device, requires_grad=True)
    r = torch.randn(5, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device, requires_grad=True)
    rng = _rng_state(device)
    y = ops.layer_norm(x, w, None, residual=r, x_bias=xb, dropout_p=p, backend=backend)
    assert torch.equal(_rng_state(device), rng)   # no dropout was drawn
    want = F.layer_norm(r, (32,), w, None)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    dx, dxb, dr = _grads(y, (x, xb, r))
    assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(dxb, torch.zeros_like(xb))
    assert dr.abs().sum() > 0
    # no residual: LayerNorm of a zero row is its bias; eval mode ignores p
    b = torch.randn(32, device=device)
    y = ops.layer_norm(x, w, b, dropout_p=p, backend=backend)
    torch.testing.assert_close(y, b.expand(5, 32), rtol=0, atol=1e-6)
    y = ops.layer_norm(x, w, b, dropout_p=p, training=False, backend=backend)
    torch.testing.assert_close(y, F.layer_norm(x, (32,), w, b), rtol=1e-5, atol=1e-5)


@P_ALL
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_embedding_layer_norm_dropout_one_is_zeros(device, backend, p):
    ids = torch.randint(0, 50, (2, 7), device=device)
    ww = torch.randn(50, 16, device=device, requires_grad=True)
    pw = torch.randn(9, 16, device=device, requires_grad=True)
    g = torch.randn(16, device=device, requires_grad=True)
    rng = _rng_state(device)
    y = ops.embedding_layer_norm(ids, ww, pw, g, None, dropout_p=p, backend=backend)
    assert torch.equal(_rng_state(device), rng)
    assert y.shape == (2, 7, 16) and torch.equal(y, torch.zeros_like(y))
    for d in _grads(y, (ww, pw, g)):
        assert d is None or torch.equal(d, torch.zeros_like(d))
    with pytest.raises(ValueError, match="out of range"):   # the bounds are still checked
        ops.embedding_layer_norm(ids + 50, ww, pw, g, None, dropout_p=1.0, backend=backend)


@P_ALL
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_attention_dropout_one_is_zeros(device, backend, p):
    q, k, v = (torch.randn(2, 9, 2, 16, device=device, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[1, 4:] = False
    rng = _rng_state(device)
    out = ops.attention(q, k, v, attention_mask=mask, dropout_p=p, backend=backend)
    assert torch.equal(_rng_state(device), rng)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), dropout_p=1.0).transpose(1, 2)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(out, want)
    for d in _grads(out, (q, k, v)):
        assert torch.equal(d, torch.zeros_like(d))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    qp = q.detach()[0].requires_grad_()
    rng = _rng_state(device)
    out = ops.attention_varlen(qp, qp, qp, cu, cu, 5, 5, dropout_p=p, backend=backend)
    assert torch.equal(_rng_state(device), rng)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(_grads(out, (qp,))[0], torch.zeros_like(qp))


def test_drops_everything_is_exactly_the_float32_rounding_to_one():
    """p drops everything exactly when float32(p) == 1: 1 - 2**-24 (a float32 of its own, whose
    1 / (1 - p) = 2**24 is finite) still draws a mask."""
    below = 1.0 - 2.0 ** -25
    for p in (0.0, 0.5, 1.0 - 2.0 ** -24, float(torch.nextafter(torch.tensor(below, dtype=torch.float64),
                                                              torch.tensor(0.0, dtype=torch.float64)))):
        assert not drops_everything(p), p
        assert torch.tensor(p, dtype=torch.float32).item() < 1.0
    for p in (below, 1.0 - 2.0 ** -30, 1.0):
        assert drops_everything(p), p
        assert torch.tensor(p, dtype=torch.float32).item() == 1.0
