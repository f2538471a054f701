"""Shape inference without values: FakeTensorMode (outside torch.compile) and the meta device.

The ops' value checks (cu_seqlens, pad indices, labels, lengths, ids) read tensors on the
host; with fake or meta tensors there is nothing to read, so they are skipped (as torch's own
ops do) and the result has the right shape and dtype. Ops whose output shape depends on the
values (unpad, masked_lm_loss: a nonzero) cannot be inferred, as in torch.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from fastbert import ops


def _cases(mk):
    """op -> (call, output shape); float inputs require grad (a backward must run too)."""
    mk_ = mk
    mk = lambda t: mk_(t).requires_grad_() if t.is_floating_point() else mk_(t)
    x = mk(torch.randn(3, 32))
    w, b = mk(torch.randn(32)), mk(torch.randn(32))
    q = mk(torch.randn(2, 4, 2, 16))
    cu = mk(torch.tensor([0, 3, 8], dtype=torch.int32))
    qv = mk(torch.randn(8, 2, 16))
    logits, target = mk(torch.randn(5, 11)), mk(torch.tensor([1, -100, 10, 0, 3]))
    ids = mk(torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 9]]))
    lstm_args = (mk(torch.randn(3, 2, 4)), mk(torch.randn(2, 8)), mk(torch.randn(2, 8)),
                 mk(torch.randn(32, 4)), mk(torch.randn(32, 8)))
    return {
        "layer_norm": (lambda: ops.layer_norm(x, w, b), (3, 32)),
        "attention": (lambda: ops.attention(
            q, q, q, attention_mask=mk(torch.ones(2, 4, dtype=torch.bool))), (2, 4, 2, 16)),
        "attention_varlen": (lambda: ops.attention_varlen(qv, qv, qv, cu, cu, 5, 5), (8, 2, 16)),
        "pad": (lambda: ops.pad(mk(torch.randn(5, 8)), mk(torch.tensor([0, 1, 4, 5, 6])), 2, 4),
                (2, 4, 8)),
        "cross_entropy": (lambda: ops.cross_entropy(logits, target), ()),
        "embedding_layer_norm": (lambda: ops.embedding_layer_norm(
            ids, mk(torch.randn(10, 32)), mk(torch.randn(8, 32)), w, b), (2, 5, 32)),
        "lstm_layer": (lambda: ops.lstm_layer(*lstm_args, lengths=torch.tensor([3, 1]))[0],
                       (3, 2, 8)),
    }


@pytest.mark.parametrize("op", list(_cases(lambda t: t)))
def test_ops_infer_shapes_under_fake_tensor_mode(op):
    with FakeTensorMode() as mode:
        fn, shape = _cases(mode.from_tensor)[op]
        out = fn()
        assert isinstance(out, FakeTensor) and tuple(out.shape) == shape
        assert out.grad_fn is not None
        out.float().sum().backward()


@pytest.mark.parametrize("op", list(_cases(lambda t: t)))
def test_ops_on_meta_tensors_give_meta_results(op):
    fn, shape = _cases(lambda t: t.to("meta"))[op]
    out = fn()
    assert out.is_meta and tuple(out.shape) == shape
    assert out.grad_fn is not None
    out.float().sum().backward()
