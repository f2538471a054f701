"""fastbert.nn.LayerNorm is a drop-in for torch.nn.LayerNorm."""
import inspect

import pytest
import torch

from fastbert import nn as fnn


def test_same_constructor_defaults_and_parameters():
    t_sig = inspect.signature(torch.nn.LayerNorm.__init__).parameters
    f_sig = inspect.signature(fnn.LayerNorm.__init__).parameters
    for name, p in t_sig.items():
        assert name in f_sig and f_sig[name].default == p.default, name
    ref = torch.nn.LayerNorm(384)
    ours = fnn.LayerNorm(384)
    assert ours.eps == ref.eps == 1e-5
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert isinstance(ours, torch.nn.LayerNorm)


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-12}])
def test_state_dict_round_trip_and_same_outputs(kwargs, device):
    torch.manual_seed(1)
    ref = torch.nn.LayerNorm(100, **kwargs).to(device)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours = fnn.LayerNorm(100, **kwargs, device=device, backend="triton")
    ours.load_state_dict(ref.state_dict())
    ref2 = torch.nn.LayerNorm(100, **kwargs).to(device)
    ref2.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 100, device=device, requires_grad=True)
    y_ref = ref(x)
    y = ours(x)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(ref2(x), y_ref)
    g = torch.randn_like(y)
    gx_ref, *gp_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
    gx, *gp = torch.autograd.grad(y, [x, *ours.parameters()], g)
    assert torch.allclose(gx, gx_ref, atol=1e-5)
    for a, b in zip(gp, gp_ref):
        assert torch.allclose(a, b, atol=1e-4)


def test_multidim_normalized_shape_and_residual(device):
    ref = torch.nn.LayerNorm((4, 25)).to(device)
    ours = fnn.LayerNorm((4, 25), device=device, backend="triton")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 25, device=device)
    r = torch.randn(6, 4, 25, device=device)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
    assert torch.allclose(ours(x, r), ref(x + r), atol=1e-5)
    with pytest.raises(ValueError, match="normalized_shape"):
        ours(torch.randn(6, 25, 4, device=device))
    # torch's type for the same mistake too (code written against torch.nn.LayerNorm catches it)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        ours(torch.randn(6, 25, 4, device=device))
    with pytest.raises(RuntimeError, match="residual"):
        ours(x, r[:, :, :5])


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("inf")])
def test_bad_eps_is_refused_at_construction(eps):
    """Every forward would refuse it: the constructor says so first."""
    with pytest.raises(ValueError, match="eps must be positive and finite"):
        fnn.LayerNorm(8, eps=eps)


def test_factory_kwargs_and_repr():
    m = fnn.LayerNorm(16, dtype=torch.float16, backend="torch")
    assert m.weight.dtype == torch.float16 and "backend='torch'" in repr(m)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(16, dtype=torch.float16))


@pytest.mark.parametrize("shape", [(6,), (2, 3)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_residual_and_input_leaves_get_gradients_of_their_own(device, backend, shape):
    """input and residual get the same gradient; each leaf's .grad must be a tensor of its own
    (a view in front of each made them two views of one buffer: a second backward then added
    every gradient twice, 3 g instead of 2 g, and clip_grad_norm_ scaled it twice), as
    torch.nn.LayerNorm(x + r) gives."""
    ln = fnn.LayerNorm(shape, device=device, backend=backend)
    x = torch.nn.Parameter(torch.randn(4, *shape, device=device))
    r = torch.nn.Parameter(torch.randn(4, *shape, device=device))
    g = torch.randn(4, *shape, device=device)
    ln(x, r).backward(g)
    once = x.grad.clone()
    assert torch.equal(r.grad, once)
    ln(x, r).backward(g)
    assert torch.allclose(x.grad, 2 * once) and torch.allclose(r.grad, 2 * once)
    x.grad.zero_()
    assert torch.allclose(r.grad, 2 * once)


def test_empty_normalized_shape_is_refused_as_torch():
    """torch's layer_norm refuses normalized_shape (); over groups of one element the result
    would be the bias everywhere."""
    with pytest.raises(RuntimeError, match="at least one dimension"):
        fnn.LayerNorm(())(torch.randn(2, 3))


def test_a_torch_layer_norm_unpickled_as_ours_runs():
    """A torch.nn.LayerNorm pickled and loaded as this class (a checkpoint of a model whose
    norms were swapped by class) has no backend attribute: the default is filled in."""
    import io
    import pickle

    class Swap(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch.nn.modules.normalization", "LayerNorm"):
                return fnn.LayerNorm
            return super().find_class(module, name)

    m = Swap(io.BytesIO(pickle.dumps(torch.nn.LayerNorm(8)))).load()
    assert isinstance(m, fnn.LayerNorm) and m.backend is None
    x = torch.randn(3, 8)
    assert torch.allclose(m(x), torch.nn.functional.layer_norm(x, (8,)), atol=1e-6)


def test_layer_norm_pickle_round_trip_keeps_its_backend():
    """__setstate__ fills in a missing backend only: one that was set survives pickling and
    deepcopy."""
    import copy
    import pickle
    m = fnn.LayerNorm(8, backend="torch")
    assert pickle.loads(pickle.dumps(m)).backend == "torch"
    assert copy.deepcopy(m).backend == "torch"
