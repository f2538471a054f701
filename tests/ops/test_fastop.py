"""fastbert/ops/_fastop.py: eager calls skip the dispatcher, anything that must see the custom
op (a dispatch mode, torch.compile, tensor subclasses) gets it, and both paths agree."""
import contextlib
import sys
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from fastbert.ops import _fastop, layer_norm
from tests._utils import record_ops

# the module (fastbert.ops.layer_norm the attribute is the function of the same name)
ops_layer_norm = sys.modules["fastbert.ops.layer_norm"]


def _inputs(device):
    torch.manual_seed(0)
    x = torch.randn(7, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)
    return x, w, b


def _spy(monkeypatch, fast):
    calls = []
    real = fast.op

    def op(*args):
        calls.append(fast.name)
        return real(*args)
    monkeypatch.setattr(fast, "op", op)
    return calls


def test_eager_call_skips_the_custom_op_and_a_mode_sees_it(device, monkeypatch):
    fwd = _spy(monkeypatch, ops_layer_norm._layer_norm_fwd)
    bwd = _spy(monkeypatch, ops_layer_norm._layer_norm_bwd)
    x, w, b = _inputs(device)
    y = layer_norm(x, w, b, backend="triton")
    g = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert fwd == [] and bwd == []
    rec = record_ops()
    with rec:
        y2 = layer_norm(x, w, b, backend="triton")
        g2 = torch.autograd.grad(y2, (x, w, b), torch.ones_like(y2))
    assert fwd and bwd, "under a dispatch mode the custom ops run"
    assert any("fastbert.layer_norm_fwd" in o for o in rec.ops), rec.ops
    assert any("fastbert.layer_norm_bwd" in o for o in rec.ops), rec.ops
    # the two paths run the same launcher: identical results
    assert torch.equal(y, y2)
    for a, c in zip(g, g2):
        assert torch.equal(a, c)


def test_direct_path_keeps_autograd_semantics(device):
    x, w, b = _inputs(device)
    with torch.no_grad():
        y = layer_norm(x, w, b, backend="triton")
    assert y.grad_fn is None and not y.requires_grad
    y = layer_norm(x.detach(), w, b, backend="triton")
    (dw,) = torch.autograd.grad(y.sum(), (w,))
    assert dw.shape == w.shape
    y = layer_norm(x.detach(), w.detach(), b.detach(), backend="triton")
    assert y.grad_fn is None


def test_direct_call_ok_refuses_subclasses_and_modes():
    t = torch.zeros(2)
    assert _fastop.direct_call_ok((t, 1.0, None, [t]))
    assert _fastop.direct_call_ok((torch.nn.Parameter(t),))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(t)
        assert not _fastop.direct_call_ok((fake,))
    assert not _fastop.direct_call_ok((_Sub(t),))
    with record_ops():
        assert not _fastop.direct_call_ok((t,))


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("fullgraph", [True])
def test_compiled_call_goes_through_the_custom_op(device, monkeypatch, fullgraph):
    fwd = _spy(monkeypatch, ops_layer_norm._layer_norm_fwd)
    x, w, b = _inputs(device)
    f = torch.compile(lambda x, w, b: layer_norm(x, w, b, backend="triton"), fullgraph=fullgraph,
                      backend="aot_eager")
    y = f(x, w, b)
    assert fwd, "torch.compile must trace the custom op"
    torch.testing.assert_close(y, layer_norm(x, w, b, backend="triton"))


def test_attention_mask_modified_in_place_is_seen_again(device):
    from fastbert.ops import attention, attention_ref
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 9, 2, 16, device=device) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[1, 4:] = False
    first = attention(q, k, v, attention_mask=mask, backend="triton")
    torch.testing.assert_close(first, attention_ref(q, k, v, attention_mask=mask))
    mask.data[0, 2:] = False  # no version bump: nothing may be remembered from the first call
    mask.data[1, :] = True
    again = attention(q, k, v, attention_mask=mask, backend="triton")
    torch.testing.assert_close(again, attention_ref(q, k, v, attention_mask=mask))


def test_attention_mask_used_in_inference_mode_then_in_training(device):
    from fastbert.ops import attention
    q, k, v = (torch.randn(2, 5, 2, 16, device=device, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool, device=device)
    with torch.inference_mode():
        attention(q, k, v, attention_mask=mask, backend="triton")
    out = attention(q, k, v, attention_mask=mask, backend="triton")
    out.sum().backward()
    assert q.grad is not None


def test_second_order_gradient_raises_instead_of_dropping_terms(device):
    # the backward ops have no derivative: create_graph must not silently give zeros
    from fastbert.ops import cross_entropy
    x = torch.randn(4, 30, device=device, requires_grad=True)
    t = torch.randint(0, 30, (4,), device=device)
    (g,) = torch.autograd.grad(cross_entropy(x, t, backend="triton"), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula|not implemented|derivative"):
        torch.autograd.grad((g * g).sum(), x)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_vmap_goes_through_the_custom_op(device):
    x = torch.randn(3, 5, 16, device=device)
    w, b = torch.randn(16, device=device), torch.randn(16, device=device)
    out = torch.func.vmap(lambda z: layer_norm(z, w, b, backend="triton"))(x)
    torch.testing.assert_close(out, layer_norm(x, w, b, backend="triton"))


def test_embedding_ids_modified_through_data_are_checked_again(device):
    from fastbert.ops import embedding_layer_norm
    ids = torch.randint(0, 10, (2, 5), device=device)
    word, pos = torch.randn(10, 16, device=device), torch.randn(8, 16, device=device)
    embedding_layer_norm(ids, word, pos, None, None, backend="triton")
    ids.data[1, 3] = 10
    with pytest.raises(ValueError, match="input_ids: id 10 out of range"):
        embedding_layer_norm(ids, word, pos, None, None, backend="triton")


def test_direct_call_of_a_mutating_op_bumps_the_version_counter(device):
    # as the dispatcher does for a custom op with mutates_args: autograd's saved-tensor check
    # sees the in-place write
    ce = sys.modules["fastbert.ops.cross_entropy"]
    d = torch.randn(3, 40, device=device)
    before = d._version
    ce._cross_entropy_scale_(d, torch.tensor(2.0, device=device))
    assert d._version > before
    saved = torch.randn(3, 40, device=device, requires_grad=True)
    y = saved * 1.0
    z = (y * y).sum()  # saves y
    ce._cross_entropy_scale_(y.detach(), torch.tensor(2.0, device=device))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


class _FunctionRecorder(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _guard(name, monkeypatch):
    if name == "dispatch_mode":
        return record_ops()
    if name == "function_mode":
        return _FunctionRecorder()
    # torch.export (and, in recent torch, a whole compile session) runs code for real with
    # this flag set: the flag alone must send calls to the custom op
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
    return contextlib.nullcontext()


@pytest.mark.parametrize("guard", ["dispatch_mode", "function_mode", "compiling_flag"])
def test_each_guard_alone_sends_calls_to_the_custom_op(monkeypatch, guard, device):
    # FastOp.__call__ inlines _modes_active: both must refuse the direct path under each guard
    fwd = _spy(monkeypatch, ops_layer_norm._layer_norm_fwd)
    x, w, b = (t.detach() for t in _inputs(device))
    args = (x, w, b, None, None, None, 1e-5, 0.0, "none", torch.float32)
    assert _fastop.direct_call_ok(args)
    with _guard(guard, monkeypatch):
        assert not _fastop.direct_call_ok(args)
        with torch.no_grad():
            ops_layer_norm._layer_norm_fwd(*args)
    assert fwd == ["fastbert::layer_norm_fwd"]


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_jit_trace_and_functorch_transforms_refuse_the_direct_path():
    seen = []

    def probe(t):
        seen.append(_fastop.direct_call_ok((t,)))
        return t * 2

    probe(torch.randn(3))
    assert seen == [True]
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warning that probe is not pure
        torch.jit.trace(probe, torch.randn(3), check_trace=False)
    torch.func.vmap(probe)(torch.randn(2, 3))
    torch.func.grad(lambda t: probe(t).sum())(torch.randn(3))
    assert seen == [False, False, False]


def test_scan_finds_subclasses_and_grad_inside_lists():
    t, p = torch.zeros(2), torch.nn.Parameter(torch.zeros(2))
    g = torch.zeros(2, requires_grad=True)
    leaves = (None, 1, 2.0, True, "s", torch.float16, torch.device("cpu"))
    assert _fastop._scan((t, p, *leaves), True) is True  # a Parameter requires grad
    assert _fastop._scan((t, *leaves, [t, g]), True) is True
    assert _fastop._scan((t, [t, g]), False) is False  # grad mode off: requires_grad unread
    assert _fastop._scan((t, (t,), [], object()), True) is False
    assert _fastop._scan((t, [t, _Sub(t)]), True) is None
    assert _fastop._scan((t, (_Sub(t),)), False) is None
    assert _fastop._scan((_Sub(t),), False) is None
    assert not _fastop.direct_call_ok((t, [t, _Sub(t)]))


def test_direct_call_under_no_grad_gives_no_graph_and_skips_the_function(monkeypatch, device):
    applied = []
    fwd = ops_layer_norm._layer_norm_fwd
    real = fwd._function.apply
    monkeypatch.setattr(fwd._function, "apply", lambda *a: applied.append(1) or real(*a))
    x, w, b = _inputs(device)
    args = (x, w, b, None, None, None, 1e-5, 0.0, "none", torch.float32)
    with torch.no_grad():
        y, _, _ = fwd(*args)
    assert applied == [] and y.grad_fn is None
    y, _, _ = fwd(*args)
    assert applied == [1] and y.grad_fn is not None



def test_compiling_flag_fallback_asks_the_public_query(monkeypatch):
    """Where a torch lacks torch.compiler._is_compiling_flag (private), _fastop reads
    torch.compiler.is_compiling() through _CompilingFlag instead."""
    import fastbert.ops._fastop as fo
    flag = fo._CompilingFlag()
    assert flag._is_compiling_flag is False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert flag._is_compiling_flag is True
    monkeypatch.setattr(fo, "_compiler", flag)
    assert fo._modes_active()
    assert not fo.direct_call_ok((torch.ones(2),))
