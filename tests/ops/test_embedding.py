"""fastbert.ops.embedding_layer_norm: BERT's embedding sum + LayerNorm (+ dropout), forward
and every gradient against the fp64 reference, both table-gradient modes (fp32 atomics and
the deterministic sort + segmented sum), repeated and out-of-range ids, edge cases,
registration (opcheck, torch.compile).

On CPU the kernels run in the Triton interpreter: shapes are small but ragged.
"""
import pytest
import torch

from fastbert.kernels import embedding as k
from fastbert.kernels._common import dropout_mask
from fastbert.ops._checks import dropout_seed
from fastbert.ops import BackendUnavailable, embedding_layer_norm, embedding_layer_norm_ref
from fastbert.ops import embedding as ops_embedding
from tests._utils import assert_close_to_ref, max_err, poison_, record_ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_NAMES = ("word_weight", "position_weight", "type_weight", "ln_weight", "ln_bias")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty the launchers allocate (outputs, statistics, d(sum) rows, chunk
    partials) starts as NaN / a sentinel, so an element a kernel forgets to write fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        return poison_(real_empty(*args, **kwargs))

    monkeypatch.setattr(k.torch, "empty", empty)
    yield


def make_inputs(device, batch, seq, hidden, vocab=11, n_pos=None, n_types=2,
                dtype=torch.float32, with_types=True, pad_runs=True):
    """Random tables and ids. A small vocabulary makes repeated ids the rule; trailing
    [PAD] (id 0) runs mimic padded batches."""
    n_pos = n_pos or seq + 3
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    if pad_runs and seq > 2:
        lengths = torch.randint(1, seq + 1, (batch,), device=device)
        ids = torch.where(torch.arange(seq, device=device)[None, :] < lengths[:, None], ids, 0)
    mk = lambda *s: torch.randn(*s, device=device, dtype=torch.float32).to(dtype).requires_grad_()
    inp = dict(input_ids=ids, word_weight=mk(vocab, hidden), position_weight=mk(n_pos, hidden),
               ln_weight=(1 + 0.5 * torch.randn(hidden, device=device)).to(dtype).requires_grad_(),
               ln_bias=mk(hidden))
    if with_types:
        inp["type_weight"] = mk(n_types, hidden)
        # types are runs: segment A then segment B, as in BERT's sentence pairs
        split = torch.randint(0, seq + 1, (batch, 1), device=device)
        inp["token_type_ids"] = (torch.arange(seq, device=device)[None, :] >= split).long()
        inp["token_type_ids"] = inp["token_type_ids"].clamp(max=n_types - 1)
    return inp


def _params(inp):
    return [inp.get(n) for n in GRAD_NAMES]


def _grads(y, inp, dy):
    params = [p for p in _params(inp) if p is not None]
    gs = torch.autograd.grad(y, params, dy)
    it = iter(gs)
    return [next(it) if p is not None else None for p in _params(inp)]


def _call(inp, **kw):
    args = {k_: v for k_, v in inp.items()
            if k_ not in ("input_ids", "word_weight", "position_weight", "ln_weight", "ln_bias")}
    return embedding_layer_norm(inp["input_ids"], inp["word_weight"], inp["position_weight"],
                                inp["ln_weight"], inp["ln_bias"], **args, **kw)


def _ref(inp, **kw):
    args = {k_: v for k_, v in inp.items()
            if k_ not in ("input_ids", "word_weight", "position_weight", "ln_weight", "ln_bias")}
    return embedding_layer_norm_ref(inp["input_ids"], inp["word_weight"], inp["position_weight"],
                                    inp["ln_weight"], inp["ln_bias"], **args, **kw)


def _torch_lowp(inp, eps=1e-12, padding_idx=None):
    """What eager PyTorch computes in the tables' low precision (the error yardstick): given
    position ids and token types, or the defaults (positions 0..S-1, types 0)."""
    ids = inp["input_ids"]
    s = torch.nn.functional.embedding(ids, inp["word_weight"], padding_idx=padding_idx)
    pos = inp.get("position_ids")
    if pos is None:
        pos = torch.arange(ids.shape[-1], device=ids.device)
    s = s + torch.nn.functional.embedding(pos, inp["position_weight"])
    if inp.get("type_weight") is not None:
        types = inp.get("token_type_ids")
        if types is None:
            types = torch.zeros_like(ids)
        s = s + torch.nn.functional.embedding(types, inp["type_weight"])
    return torch.nn.functional.layer_norm(s, s.shape[-1:], inp["ln_weight"], inp["ln_bias"], eps)


def _check_against_ref(inp, y, grads, dy, padding_idx=None, dropout_p=0.0, mask=None):
    # the reference on float64 copies: called on the 16-bit tables (even with upcast=True)
    # it returns, and backpropagates into, their dtype, which rounded away the error measured
    inp64 = {n: (t.detach().double().requires_grad_()
                 if t is not None and t.is_floating_point() else t) for n, t in inp.items()}
    yr = _ref(inp64, padding_idx=padding_idx, dropout_p=dropout_p, dropout_mask=mask)
    gr = _grads(yr, inp64, dy.double())
    assert yr.dtype == torch.float64 and all(r is None or r.dtype == torch.float64 for r in gr)
    dtype = y.dtype
    if dtype == torch.float32:
        assert_close_to_ref(y, yr, atol=1e-5, name="y")
        for name, g, r in zip(GRAD_NAMES, grads, gr):
            if r is not None:
                assert_close_to_ref(g, r, atol=1e-5, name=name)
        return
    assert dropout_p == 0.0
    yl = _torch_lowp(inp, padding_idx=padding_idx)
    gl = _grads(yl, inp, dy)
    assert_close_to_ref(y, yr, yl, atol=1e-3, name="y")
    for name, g, r, l in zip(GRAD_NAMES, grads, gr, gl):
        if r is not None:
            assert_close_to_ref(g, r, l, atol=1e-3 * max(1.0, r.abs().max().item()), name=name)


# ----------------------------------------------------------------------------------------
# numerics

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("batch,seq,hidden", [(2, 7, 100), (1, 1, 384), (3, 41, 48)])
def test_embedding_layer_norm_fwd_bwd_match_fp64_on_ragged_shapes(
        device, poisoned_empty, dtype, deterministic, batch, seq, hidden):
    inp = make_inputs(device, batch, seq, hidden, vocab=7, dtype=dtype)
    y = _call(inp, backend="triton", deterministic=deterministic)
    assert y.shape == (batch, seq, hidden) and y.dtype == dtype
    dy = torch.randn_like(y)
    _check_against_ref(inp, y, _grads(y, inp, dy), dy)


@pytest.mark.parametrize("eps", [1e-5, 0.05])
def test_embedding_layer_norm_eps_reaches_the_kernels(device, eps):
    """A non-default eps (RoBERTa's 1e-5; 0.05, of the order of the sum's variance, where it
    changes every output) in the forward and the backward."""
    inp = make_inputs(device, 2, 7, 48, vocab=7)
    y = _call(inp, eps=eps, backend="triton")
    dy = torch.randn_like(y)
    grads = _grads(y, inp, dy)
    yr = _ref(inp, eps=eps, upcast=True)
    gr = _grads(yr, inp, dy.double())
    assert_close_to_ref(y, yr, name="y")
    for name, g, r in zip(GRAD_NAMES, grads, gr):
        assert_close_to_ref(g, r, name=name)
    if eps == 0.05:   # the check can fail: eps changes the result by far more than the bound
        assert max_err(yr, _ref(inp, upcast=True)) > 1e-2


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_embedding_layer_norm_default_positions_types_and_no_type_table(device, deterministic):
    # explicit (1, S) position ids, int32 ids, no type table, no LayerNorm affine
    inp = make_inputs(device, 2, 9, 64, vocab=5, n_pos=20, with_types=False)
    inp["input_ids"] = inp["input_ids"].int()
    inp["ln_weight"] = inp["ln_bias"] = None
    inp["position_ids"] = (torch.arange(9, device=device) + 4).flip(0)[None, :].int()
    y = _call(inp, backend="triton", deterministic=deterministic)
    dy = torch.randn_like(y)
    _check_against_ref(inp, y, _grads(y, inp, dy), dy)
    # a type table without token_type_ids: every token has type 0
    inp = make_inputs(device, 2, 9, 64, vocab=5, n_types=3)
    del inp["token_type_ids"]
    y = _call(inp, backend="triton", deterministic=deterministic)
    dy = torch.randn_like(y)
    grads = _grads(y, inp, dy)
    _check_against_ref(inp, y, grads, dy)
    assert torch.count_nonzero(grads[2][1:]) == 0


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_embedding_layer_norm_repeated_ids_sum_gradients(device, deterministic):
    # every token the same word, position table indexed with heavy repeats
    inp = make_inputs(device, 3, 13, 32, vocab=4, n_pos=5, pad_runs=False)
    inp["input_ids"] = torch.full_like(inp["input_ids"], 2)
    inp["position_ids"] = torch.randint(0, 5, (3, 13), device=device)
    y = _call(inp, backend="triton", deterministic=deterministic)
    dy = torch.randn_like(y)
    grads = _grads(y, inp, dy)
    _check_against_ref(inp, y, grads, dy)
    assert torch.count_nonzero(grads[0][[0, 1, 3]]) == 0


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("padding_idx", [0, -4])
def test_embedding_layer_norm_padding_idx_gets_no_gradient(device, deterministic, padding_idx):
    inp = make_inputs(device, 2, 11, 40, vocab=4)
    y = _call(inp, backend="triton", deterministic=deterministic, padding_idx=padding_idx)
    dy = torch.randn_like(y)
    grads = _grads(y, inp, dy)
    _check_against_ref(inp, y, grads, dy, padding_idx=padding_idx)
    assert torch.count_nonzero(grads[0][padding_idx % 4]) == 0
    assert torch.count_nonzero(grads[0]) > 0


def test_embedding_layer_norm_deterministic_grads_bit_identical_and_close_to_atomic(device):
    inp = make_inputs(device, 2, 37, 48, vocab=6)
    dy = torch.randn(2, 37, 48, device=device)

    def run(det):
        y = _call(inp, backend="triton", deterministic=det)
        return [y] + [g for g in _grads(y, inp, dy) if g is not None]

    a, b, c = run(True), run(True), run(False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(a, c):
        assert max_err(x, y) <= 1e-5 * max(1.0, y.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segmented_backward_sums_three_tables_in_one_key_space_across_many_chunks(
        device, poisoned_empty, dtype):
    # the segmented backward sorts the word, position and type keys together (offset key
    # spaces) and sums them in one launch pair; a tiny chunk makes runs cross many chunk
    # boundaries, and table boundaries fall inside chunks. A large vocabulary leaves most word
    # rows unreached: the backward kernel must zero them (the tables start poisoned)
    inp = make_inputs(device, 3, 13, 40, vocab=50, n_pos=16, n_types=3, dtype=dtype)
    ids, types = inp["input_ids"], inp["token_type_ids"]
    args = (inp["word_weight"], inp["position_weight"], inp["ln_weight"], inp["ln_bias"])
    y, mean, rstd = k.embedding_layer_norm_fwd(ids, *args, 1e-12, None, types,
                                               inp["type_weight"])
    dy = torch.randn_like(y)
    grads = k.embedding_layer_norm_bwd(dy, ids, *args, mean, rstd, None, types,
                                       inp["type_weight"], padding_idx=0, deterministic=True,
                                       chunk=4)
    dword, dpos, dtyp, dlnw, dlnb = grads
    _check_against_ref(inp, y, [dword, dpos, dtyp, dlnw, dlnb], dy, padding_idx=0)
    assert torch.count_nonzero(dword[0]) == 0
    assert torch.count_nonzero(dword.float().abs().sum(1) == 0) >= 10
    again = k.embedding_layer_norm_bwd(dy, ids, *args, mean, rstd, None, types,
                                       inp["type_weight"], padding_idx=0, deterministic=True,
                                       chunk=4)
    for a, b in zip(grads, again):
        assert torch.equal(a, b)


def test_embedding_layer_norm_16bit_default_grads_are_bit_identical(device):
    # fp16/bf16 tables take the segmented sums without deterministic=True too
    inp = make_inputs(device, 2, 23, 40, vocab=6, dtype=torch.bfloat16)
    dy = torch.randn(2, 23, 40, device=device, dtype=torch.bfloat16)

    def run():
        y = _call(inp, backend="triton")
        return [g for g in _grads(y, inp, dy) if g is not None]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("key_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("n_rows,n_keys,chunk", [(1, 3, 4), (70, 3, 4), (97, 13, 8), (150, 1, 4)])
def test_segment_sum_matches_index_add_across_many_chunks(device, poisoned_empty, n_rows, n_keys,
                                                          chunk, key_dtype):
    # runs that span many chunks (the merge kernel's multi-tile walk), out-of-range keys and
    # a skipped key, with a tiny chunk so that a short input crosses many boundaries; int32
    # keys as the backward writes them, int64 as a caller may pass them
    keys = torch.randint(-1, n_keys + 1, (n_rows,), device=device, dtype=key_dtype)
    if n_keys == 1:
        keys.zero_()
    ds = torch.randn(n_rows, 20, device=device)
    skip = 1 if n_keys > 2 else -1
    g = k._segment_sum(keys, ds, n_keys, skip, torch.float32, chunk)
    ok = (keys >= 0) & (keys < n_keys) & (keys != skip)
    ref = torch.zeros(n_keys, 20, dtype=torch.float64, device=device)
    ref.index_add_(0, keys[ok], ds[ok].double())
    assert_close_to_ref(g, ref, atol=1e-5, name="segment sum")
    assert torch.equal(g, k._segment_sum(keys, ds, n_keys, skip, torch.float32, chunk))


def test_embedding_layer_norm_dropout_matches_ref_with_kernel_mask(device):
    inp = make_inputs(device, 2, 7, 100, vocab=5)
    p = 0.3
    torch.manual_seed(123)
    y = _call(inp, backend="triton", dropout_p=p)
    torch.manual_seed(123)
    seed = dropout_seed(device)
    mask = dropout_mask(seed, 14, 100, p).reshape(2, 7, 100)
    assert 0.5 < mask.float().mean().item() < 0.9
    dy = torch.randn_like(y)
    _check_against_ref(inp, y, _grads(y, inp, dy), dy, dropout_p=p, mask=mask)
    # torch.manual_seed reproduces the draw
    torch.manual_seed(123)
    assert torch.equal(y, _call(inp, backend="triton", dropout_p=p))


# ----------------------------------------------------------------------------------------
# index tensors: broadcast and strided layouts, the bound check

def test_index_arg_reads_broadcast_and_strided_index_tensors_without_a_copy():
    shape = (4, 6)
    cases = [
        (torch.arange(6), (0, 1)),                         # (S,): broadcast over the batch
        (torch.arange(6)[None, :], (0, 1)),                # (1, S)
        (torch.zeros(4, 1, dtype=torch.int64), (1, 0)),    # (B, 1): one type per sequence
        (torch.zeros(6, 4, dtype=torch.int64).t(), (1, 4)),  # transposed storage
        (torch.zeros(4, 12, dtype=torch.int64)[:, ::2], (12, 2)),  # every other column
        (torch.tensor(3), (0, 0)),                         # a scalar
    ]
    for t, strides in cases:
        got, sb, ss = k._index_arg(t, shape)
        assert got is t and (sb, ss) == strides, (tuple(t.shape), t.stride())
    # leading dimensions that flatten to one stride: still no copy
    t = torch.zeros(2, 3, 6, dtype=torch.int64)
    assert k._index_arg(t, (2, 3, 6)) == (t, 6, 1)
    assert k._index_arg(t[:, :1], (2, 3, 6))[0] is not t  # broadcast over one of two: a copy
    got, sb, ss = k._index_arg(t[:, :1], (2, 3, 6))
    assert got.shape == (36,) and (sb, ss) == (6, 1)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("layout", ["positions_1d", "positions_transposed", "types_per_sequence",
                                    "ids_3d_partial_broadcast", "ids_strided"])
def test_embedding_layer_norm_broadcast_and_strided_index_tensors_match_fp64(
        device, poisoned_empty, layout, deterministic):
    inp = make_inputs(device, 3, 7, 40, vocab=6, n_pos=12)
    if layout == "positions_1d":
        inp["position_ids"] = torch.randint(0, 12, (7,), device=device)
    elif layout == "positions_transposed":
        inp["position_ids"] = torch.randint(0, 12, (7, 3), device=device).t()
    elif layout == "types_per_sequence":
        inp["token_type_ids"] = torch.tensor([[1], [0], [1]], device=device)
    elif layout == "ids_3d_partial_broadcast":
        inp["input_ids"] = torch.randint(0, 6, (2, 3, 7), device=device)
        inp["token_type_ids"] = torch.randint(0, 2, (2, 1, 7), device=device)
        inp["position_ids"] = torch.randint(0, 12, (3, 7), device=device).int()
    else:
        inp["input_ids"] = torch.randint(0, 6, (3, 14), device=device)[:, ::2]
        inp["token_type_ids"] = torch.randint(0, 2, (7, 3), device=device).t()
        assert not inp["input_ids"].is_contiguous()
    y = _call(inp, backend="triton", deterministic=deterministic)
    dy = torch.randn_like(y)
    _check_against_ref(inp, y, _grads(y, inp, dy), dy)


def test_index_bounds_match_torch_min_and_max(device, poisoned_empty):
    # more blocks than programs (each program walks several), extremes beyond int32, a
    # transposed and an expanded (stride 0) tensor, int32 and int64
    a = torch.randint(-5, 30522, (70 * k.BOUNDS_BLOCK + 5,), device=device)
    a[12345], a[-1] = -2**40, 2**40
    b = torch.randint(3, 512, (7, 9), device=device, dtype=torch.int32).t()
    c = torch.randint(0, 2, (1, 5), device=device).expand(300, 5)
    # views whose reshape(-1) is itself strided (not a copy): a 1-D step, a 1-D expand, a
    # (B, 1) column of a wider batch
    big = torch.randint(0, 100, (6, 9), device=device)
    big[2, 0], big[0, 1] = 500, 900
    d, e, f = torch.arange(10, device=device)[::2], torch.tensor([5], device=device).expand(4), big[:, :1]
    for ts in ([a], [b, c], [a, b, c], [c], [b], [d], [e], [f], [d, e, f]):
        assert k.index_bounds(ts) == [(t.min().item(), t.max().item()) for t in ts]
    for bad in ([], [a, b, c, a], [a.float()], [a[:0]]):
        with pytest.raises(ValueError, match="index_bounds"):
            k.index_bounds(bad)


# ----------------------------------------------------------------------------------------
# edge cases and errors

@pytest.mark.parametrize("shape", [(2, 0), (0, 5), (0,)])
def test_embedding_layer_norm_empty_batch_gives_empty_output_and_zero_grads(device, shape,
                                                                           poisoned_empty):
    # no tokens: no backward program runs; the LayerNorm parameter gradients (a column sum
    # over zero partial rows) and the tables must still come out as zeros
    inp = make_inputs(device, 1, 3, 24, vocab=5)
    inp["input_ids"] = torch.zeros(shape, dtype=torch.int64, device=device)
    inp["token_type_ids"] = torch.zeros(shape, dtype=torch.int64, device=device)
    for det in (False, True):
        y = _call(inp, backend="triton", deterministic=det)
        assert y.shape == shape + (24,)
        grads = _grads(y.sum(), inp, torch.tensor(1.0, device=device))
        for g in grads:
            assert g is not None and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("word,pos", [(0.25, -0.5), (0.1, -7.33)])
@pytest.mark.parametrize("hidden", [16, 768])
def test_embedding_layer_norm_constant_row_is_finite(device, word, pos, hidden):
    # every row sums to a constant vector: variance 0, eps (BERT's 1e-12, the default) keeps
    # it finite and y = ln_bias exactly; with (0.1, -7.33) a plain sum / n mean is off by an
    # ulp of the value, which 1 / sqrt(1e-12) made an output of up to +-1
    inp = make_inputs(device, 1, 2, hidden, vocab=3, with_types=False)
    with torch.no_grad():
        inp["word_weight"].fill_(word)
        inp["position_weight"].fill_(pos)
    y = _call(inp, backend="triton")
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, inp["ln_bias"].detach().expand_as(y), atol=1e-6, rtol=0)
    g = _grads(y, inp, torch.randn_like(y))
    assert all(torch.isfinite(t).all() for t in g if t is not None)


@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_embedding_layer_norm_nan_table_rows_give_nan_also_where_dropped(device, dropout_p):
    # torch's dropout is a product (NaN * 0 = NaN); the kernel wrote 0 at dropped positions
    inp = make_inputs(device, 2, 4, 16, vocab=3, with_types=False)
    with torch.no_grad():
        inp["word_weight"][1:] = float("nan")
        inp["input_ids"][:, 1] = 1
    y = _call(inp, backend="triton", dropout_p=dropout_p)
    assert torch.isnan(y[:, 1]).all()
    g = torch.autograd.grad(y, inp["position_weight"], torch.randn_like(y))[0]
    assert torch.isnan(g[1]).all()
    # a NaN in the incoming gradient reaches every row's gradient, dropped there or not
    clean = make_inputs(device, 2, 4, 16, vocab=3, with_types=False)
    y = _call(clean, backend="triton", dropout_p=dropout_p)
    dy = torch.randn_like(y)
    dy[..., 3] = float("nan")
    g = torch.autograd.grad(y, clean["position_weight"], dy)[0]
    assert torch.isnan(g[:4]).all()
    big = make_inputs(device, 1, 2, 16, vocab=3, with_types=False)
    with torch.no_grad():
        big["word_weight"].mul_(1e20)  # the variance overflows fp32: NaN, as torch
    assert torch.isnan(_call(big, backend="triton")).all()


@pytest.mark.parametrize("what,match", [
    ("ids_high", r"input_ids: id 7 out of range \[0, 7\)"),
    ("ids_negative", r"input_ids: id -1 out of range \[0, 7\)"),
    ("positions", r"position_ids: id 9 out of range \[0, 9\): max 9 >= max_position_embeddings 9"),
    ("types", r"token_type_ids: id 2 out of range \[0, 2\)"),
    ("too_long", r"input_ids: sequence length 12 exceeds max_position_embeddings 9"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_embedding_layer_norm_out_of_range_ids_raise_naming_the_argument(device, what, match,
                                                                       backend):
    inp = make_inputs(device, 2, 6, 16, vocab=7, n_pos=9)
    if what == "ids_high":
        inp["input_ids"][1, 2] = 7
    elif what == "ids_negative":
        inp["input_ids"][0, 0] = -1
    elif what == "positions":
        inp["position_ids"] = torch.arange(6, device=device) + 4
    elif what == "types":
        inp["token_type_ids"][0, 3] = 2
    else:
        inp["input_ids"] = torch.zeros(2, 12, dtype=torch.int64, device=device)
        inp["token_type_ids"] = torch.zeros(2, 12, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=match):
        _call(inp, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_embedding_layer_norm_unchecked_out_of_range_id_ignores_the_edge_rows(device, backend):
    # an out-of-range id reads nothing: not even the table's last (or first) row it may be
    # clamped to, whose inf must not turn it into NaN (0 * inf)
    inp = make_inputs(device, 1, 4, 16, vocab=5, n_pos=9, with_types=False)
    with torch.no_grad():
        inp["word_weight"][4] = float("inf")
        inp["word_weight"][0] = float("inf")
    inp["input_ids"] = torch.tensor([[1, 5, -2, 3]], device=device)
    y = _call(inp, backend=backend, check_bounds=False)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("deterministic,backend", [(False, "triton"), (True, "triton"),
                                                   (False, "torch")],
                         ids=["atomic", "deterministic", "torch"])
def test_embedding_layer_norm_unchecked_out_of_range_ids_read_and_write_nothing(device,
                                                                               deterministic,
                                                                               backend):
    # the torch backend too (auto's choice on CPU): it failed the lookup (IndexError on the
    # CPU, a device-side assert on a GPU) where the kernels read a zero row
    inp = make_inputs(device, 2, 6, 16, vocab=5, n_pos=9)
    inp["input_ids"][0, 1] = 5
    inp["input_ids"][1, 4] = -3
    inp["input_ids"][1, 5] = 1000
    inp["token_type_ids"][1, 0] = 7
    y = _call(inp, backend=backend, check_bounds=False, deterministic=deterministic)
    dy = torch.randn_like(y)
    grads = _grads(y, inp, dy)
    # the reference: each table grows zero rows that the bad ids are mapped to
    ref_inp = {name: t.detach().double() if t.is_floating_point() else t.clone()
               for name, t in inp.items()}
    for table, ids, n in (("word_weight", "input_ids", 5), ("type_weight", "token_type_ids", 2)):
        w = ref_inp[table]
        ref_inp[table] = torch.cat([w, w.new_zeros(1, w.shape[1])]).requires_grad_()
        bad = (ref_inp[ids] < 0) | (ref_inp[ids] >= n)
        ref_inp[ids] = torch.where(bad, n, ref_inp[ids])
    for name in ("position_weight", "ln_weight", "ln_bias"):
        ref_inp[name].requires_grad_()
    yr = _ref(ref_inp)
    gr = _grads(yr, ref_inp, dy.double())
    assert_close_to_ref(y, yr, atol=1e-5, name="y")
    for name, g, r in zip(GRAD_NAMES, grads, gr):
        if name in ("word_weight", "type_weight"):
            r = r[:-1]
        assert_close_to_ref(g, r, atol=1e-5, name=name)


def test_embedding_layer_norm_bad_arguments_raise_clear_errors(device):
    inp = make_inputs(device, 2, 5, 16, vocab=5)
    bad = [
        (dict(input_ids=inp["input_ids"].float()), TypeError, "input_ids must have dtype"),
        (dict(position_weight=torch.randn(9, 8, device=device)), ValueError,
         r"position_weight must have 16 columns"),
        (dict(type_weight=torch.randn(2, 8, device=device)), ValueError,
         "type_weight must have 16"),
        (dict(ln_weight=torch.randn(8, device=device)), ValueError, r"ln_weight must have shape"),
        (dict(word_weight=torch.randn(5, 16, 1, device=device)), ValueError,
         "word_weight must have 2 dimensions"),
        (dict(type_weight=None), ValueError, "token_type_ids was given but type_weight is None"),
        (dict(position_ids=torch.zeros(3, 5, dtype=torch.int64, device=device)), ValueError,
         "position_ids must be broadcastable"),
        (dict(eps=0.0), ValueError, "eps must be positive"),
        (dict(dropout_p=1.01), ValueError, r"dropout_p must be in \[0, 1\]"),
        (dict(padding_idx=5), ValueError, "padding_idx must be within"),
        (dict(padding_idx=1.5), TypeError, "padding_idx must be an int"),
        (dict(padding_idx=True), TypeError, "padding_idx must be an int"),
        (dict(input_ids=torch.tensor(3, device=device)), ValueError,
         "input_ids must have at least"),
    ]
    for change, exc, match in bad:
        args = {**inp, **change}
        with pytest.raises(exc, match=match):
            _call(args, backend="triton")


def test_embedding_layer_norm_explicit_triton_too_wide_raises(device):
    w = torch.randn(3, k.MAX_EMBED_COLS + 1, device=device)
    ids = torch.zeros(1, 2, dtype=torch.int64, device=device)
    with pytest.raises(BackendUnavailable, match="hidden size"):
        embedding_layer_norm(ids, w, w, None, None, backend="triton")


def test_embedding_layer_norm_float64_runs_on_the_torch_backend_only(device):
    """float64 tables (gradcheck, fp64 CPU runs): the reference computes them, an explicit
    kernel backend says why it cannot, auto falls back."""
    inp = make_inputs(device, 2, 5, 16, vocab=5)
    inp64 = {n: t.double() if t.is_floating_point() else t for n, t in inp.items()}
    y = _call(inp64, backend="torch")
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _ref(inp64), rtol=0, atol=0)
    torch.testing.assert_close(_call(inp64), y, rtol=0, atol=0)
    with pytest.raises(BackendUnavailable, match="word_weight is float64"):
        _call(inp64, backend="triton")


def test_embedding_layer_norm_torch_backend_is_the_reference(device):
    inp = make_inputs(device, 2, 5, 16, vocab=5)
    y = _call(inp, backend="torch", padding_idx=0)
    torch.testing.assert_close(y, _ref(inp, padding_idx=0), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# registration

@pytest.mark.parametrize("out_fp32", [False, True])
def test_embedding_layer_norm_opcheck(device, out_fp32):
    inp = make_inputs(device, 2, 5, 24, vocab=5,
                      dtype=torch.float16 if out_fp32 else torch.float32)
    d = {n: (t.detach().requires_grad_() if t.is_floating_point() else t) for n, t in inp.items()}
    seed = torch.tensor([7], dtype=torch.int64, device=device)
    fwd_args = (d["input_ids"], d["word_weight"], d["position_weight"], d["ln_weight"],
                d["ln_bias"], None, d["token_type_ids"], d["type_weight"], seed, 1e-12, 0.1,
                0, False, out_fp32)
    torch.library.opcheck(ops_embedding._embedding_layer_norm_fwd.op, fwd_args)
    y, mean, rstd = ops_embedding._embedding_layer_norm_fwd(*fwd_args)
    bwd_args = (torch.randn_like(y).detach(), d["input_ids"], d["word_weight"].detach(),
                d["position_weight"].detach(), d["ln_weight"].detach(), d["ln_bias"].detach(),
                None, d["token_type_ids"], d["type_weight"].detach(), seed, mean.detach(),
                rstd.detach(), 0.1, 0, True)
    torch.library.opcheck(ops_embedding._embedding_layer_norm_bwd.op, bwd_args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_embedding_layer_norm_fp32_output_of_16bit_tables_matches_fp64(device, monkeypatch,
                                                                       backend):
    """The output dtype CUDA autocast asks of 16-bit tables (float32, as torch's LayerNorm
    returns there): stored in float32 from the fp32 statistics (not rounded to the tables'
    dtype first), on both backends; gradients in the tables' dtypes. The CUDA autocast
    query is stood in for (no GPU here); test_..._follows_cuda_autocast checks it."""
    monkeypatch.setattr(ops_embedding, "_autocast_fp32", lambda w: w.dtype != torch.float64)
    inp = make_inputs(device, 2, 7, 48, vocab=9, dtype=torch.float16)
    y = _call(inp, backend=backend)
    assert y.dtype == torch.float32
    ref = _ref({n: (t.detach().double() if t.is_floating_point() else t) for n, t in inp.items()})
    assert max_err(y, ref) < 2e-5   # fp32 rounding of the output, not fp16's ~5e-4
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [inp["word_weight"], inp["ln_weight"]], dy)
    assert [g.dtype for g in grads] == [torch.float16, torch.float16]
    leaves = {n: (t.detach().double().requires_grad_() if t.is_floating_point() else t)
              for n, t in inp.items()}
    want = torch.autograd.grad(_ref(leaves), [leaves["word_weight"], leaves["ln_weight"]],
                               dy.double())
    for g, w in zip(grads, want):
        assert max_err(g, w) <= 2e-3 * max(1.0, w.abs().max().item())


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32])
def test_embedding_layer_norm_follows_autocast_like_torch_layer_norm(device, monkeypatch, dt):
    """The unfused embedding sum + F.layer_norm under autocast: float32 under CUDA autocast
    whatever the tables' dtype (layer_norm is on autocast's fp32 list there, and fastbert's
    layer_norm does the same), the tables' dtype under CPU autocast; so does
    embedding_layer_norm, on both backends. The CUDA rule is also checked on its own, on any
    machine."""
    import torch.nn.functional as F
    ids = torch.randint(0, 50, (2, 8), device=device)
    word = torch.randn(50, 32, device=device).to(dt)
    pos = torch.randn(16, 32, device=device).to(dt)
    w, b = (torch.randn(32, device=device).to(dt) for _ in range(2))
    low = torch.bfloat16 if dt == torch.bfloat16 else torch.float16
    for on in (True, False):
        with torch.autocast(device.type, dtype=low, enabled=on):
            s_ = F.embedding(ids, word) + F.embedding(torch.arange(8, device=device), pos)
            want = F.layer_norm(s_, (32,), w, b).dtype
            for backend in ("torch", "triton"):
                got = embedding_layer_norm(ids, word, pos, w, b, backend=backend).dtype
                assert got == want, (on, backend)
    from types import SimpleNamespace
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: True)
    table = lambda dt_: SimpleNamespace(dtype=dt_, is_cuda=True)
    assert ops_embedding._autocast_fp32(table(dt)) == (dt != torch.float32)
    assert not ops_embedding._autocast_fp32(table(torch.float64))
    assert not ops_embedding._autocast_fp32(SimpleNamespace(dtype=dt, is_cuda=False))


def test_embedding_layer_norm_eager_paths_agree_and_second_order_raises(device):
    # the eager autograd.Function (gradients recorded), the launcher alone (no_grad) and the
    # custom op (under a dispatch mode) give one output; create_graph must not silently
    # give zero second derivatives
    inp = make_inputs(device, 2, 5, 24, vocab=5)
    y = _call(inp, backend="triton")
    assert y.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(_call(inp, backend="triton"), y)
    with record_ops():
        assert torch.equal(_call(inp, backend="triton", check_bounds=False), y)
    w = inp["word_weight"]
    (g,) = torch.autograd.grad(y.pow(2).sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula|not implemented|derivative"):
        torch.autograd.grad(g.sum(), w)


def test_embedding_layer_norm_torch_compile_fullgraph(device):
    inp = make_inputs(device, 2, 6, 32, vocab=5)

    def f(ids, types, word, pos, typ, w, b):
        return embedding_layer_norm(ids, word, pos, w, b, token_type_ids=types, type_weight=typ,
                                    padding_idx=0, backend="triton")

    args = (inp["input_ids"], inp["token_type_ids"], inp["word_weight"], inp["position_weight"],
            inp["type_weight"], inp["ln_weight"], inp["ln_bias"])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(*args)
    dy = torch.randn_like(y)
    grads = _grads(y, inp, dy)
    _check_against_ref(inp, y, grads, dy, padding_idx=0)
    # no host read under compile, but the ids are still checked, on the device (a RuntimeError
    # at once on the CPU; on a GPU a device-side assert, which ends the process's CUDA context:
    # CPU only)
    if device.type != "cpu":
        return
    bad_ids = inp["input_ids"].clone()
    bad_ids[1, 3] = 5
    with pytest.raises(RuntimeError, match="out of range of its table"):
        compiled(bad_ids, *args[1:])
    bad_types = inp["token_type_ids"].clone()
    bad_types[0, 0] = -1
    with pytest.raises(RuntimeError, match="out of range of its table"):
        compiled(args[0], bad_types, *args[2:])


# ----------------------------------------------------------------------------------------
# GPU only: BERT shapes, compiled kernels

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_embedding_layer_norm_gpu_bert_base_shapes(dtype):
    inp = make_inputs(torch.device("cuda"), 8, 512, 768, vocab=30522, n_pos=512, dtype=dtype)
    for det in (False, True):
        y = _call(inp, backend="triton", deterministic=det, padding_idx=0)
        dy = torch.randn_like(y)
        _check_against_ref(inp, y, _grads(y, inp, dy), dy, padding_idx=0)


@pytest.mark.gpu
def test_embedding_layer_norm_gpu_deterministic_is_bit_identical():
    inp = make_inputs(torch.device("cuda"), 16, 128, 1024, vocab=100, n_pos=512,
                      dtype=torch.bfloat16)
    dy = torch.randn(16, 128, 1024, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        y = _call(inp, backend="triton", deterministic=True)
        runs.append([g for g in _grads(y, inp, dy) if g is not None])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_embedding_layer_norm_atomic_word_grad_on_16bit_tables(device, monkeypatch, dtype):
    # 16-bit word tables take the segmented word gradient by default; the fp32-atomic
    # alternative (forced here) must agree with the reference too
    monkeypatch.setattr(k, "SEGMENTED_WORD_GRAD_DTYPES", ())
    inp = make_inputs(device, 2, 7, 100, vocab=5, dtype=dtype)
    y = _call(inp, backend="triton")
    dy = torch.randn_like(y)
    _check_against_ref(inp, y, _grads(y, inp, dy), dy)


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_embedding_layer_norm_strided_or_expanded_ln_params_read_by_their_strides(device,
                                                                                layout):
    # LayerNorm weight / bias views with stride 2 or 0 (an expanded scalar) must be read by
    # element, not as if contiguous (stride 0 would read past a 1-element storage on the GPU)
    inp = make_inputs(device, 2, 7, 48, vocab=5)
    for name in ("ln_weight", "ln_bias"):
        if layout == "strided":
            v = torch.randn(96, device=device)[::2]
        else:
            v = torch.randn(1, device=device).expand(48)
        inp[name] = v.requires_grad_()
    y = _call(inp, backend="triton")
    dy = torch.randn_like(y)
    _check_against_ref(inp, y, _grads(y, inp, dy), dy)


def test_embedding_layer_norm_under_fake_tensor_mode_gives_shapes(device):
    """Under FakeTensorMode (shape inference, torch.compile's tracing) nothing may launch a
    Triton kernel on fake tensors, the bound check included (on by default): fake ids have
    no values to check."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        ids = torch.randint(0, 5, (2, 4), device=device)
        w = torch.randn(5, 8, device=device, dtype=torch.bfloat16, requires_grad=True)
        p = torch.randn(6, 8, device=device, dtype=torch.bfloat16, requires_grad=True)
        y = embedding_layer_norm(ids, w, p, None, None, backend="triton")
        assert y.shape == (2, 4, 8) and y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert w.grad.shape == w.shape and p.grad.shape == p.shape


def test_embedding_layer_norm_bound_check_under_a_dispatch_mode(device):
    """A mode sees every op: the bound check still runs (in torch) and raises."""
    ids = torch.tensor([[0, 7]], device=device)
    w = torch.randn(5, 8, device=device)
    p = torch.randn(6, 8, device=device)
    with record_ops(), pytest.raises(ValueError, match="input_ids: id 7 out of range"):
        embedding_layer_norm(ids, w, p, None, None, backend="triton")


def test_embedding_dropout_backward_with_a_row_strided_incoming_gradient(device):
    """y feeding torch.cat gives a dy whose row stride is 2H: the backward regenerates the
    dropout mask by element position (row * H + col), not by dy's memory offset."""
    torch.manual_seed(0)
    V, H, B, S, p = 5, 32, 2, 7, 0.3
    ids = torch.randint(0, V, (B, S), device=device)
    w, pos = torch.randn(V, H, device=device), torch.randn(S, H, device=device)
    g, b = 1 + 0.5 * torch.randn(H, device=device), torch.randn(H, device=device)
    params = [t.clone().requires_grad_() for t in (w, pos, g, b)]
    torch.manual_seed(123)
    y = embedding_layer_norm(ids, *params[:2], *params[2:], dropout_p=p, backend="triton")
    torch.manual_seed(123)
    seed = dropout_seed(device)
    mask = dropout_mask(seed, B * S, H, p).reshape(B, S, H)
    dz = torch.randn(B, S, 2 * H, device=device)
    got = torch.autograd.grad((torch.cat([y, y.detach()], -1) * dz).sum(), params)
    ref_params = [t.double().requires_grad_() for t in (w, pos, g, b)]
    yr = embedding_layer_norm_ref(ids, *ref_params[:2], *ref_params[2:], dropout_p=p,
                                  dropout_mask=mask)
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad((yr * dz[..., :H].double()).sum(), ref_params)
    for name, a, r in zip(("word", "position", "ln_weight", "ln_bias"), got, want):
        assert (a.double() - r).abs().max() < 1e-4, name


def test_embedding_deterministic_takes_the_segmented_sums_for_fp32_tables(device, monkeypatch):
    """deterministic=True: the fp32 table gradients come from the sort-based segmented sums
    (bit-identical run to run), not the atomics (the interpreter runs programs one at a time,
    so only the path taken tells them apart on CPU)."""
    calls = []
    real = k._launch_segment_sum
    monkeypatch.setattr(k, "_launch_segment_sum",
                        lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (2, 5), device=device)
    w = torch.randn(7, 16, device=device, requires_grad=True)
    p = torch.randn(8, 16, device=device, requires_grad=True)
    for deterministic in (False, True):
        calls.clear()
        y = embedding_layer_norm(ids, w, p, None, None, backend="triton",
                                 deterministic=deterministic)
        y.square().sum().backward()
        assert bool(calls) == deterministic, deterministic
    # torch.use_deterministic_algorithms(True) asks for the same (torch's embedding honours it)
    calls.clear()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        embedding_layer_norm(ids, w, p, None, None, backend="triton").square().sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert calls


def test_autocast_fp32_asks_about_cuda_autocast_only(monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda dev=None: dev == "cuda")
    assert ops_embedding._autocast_fp32(SimpleNamespace(dtype=torch.float16, is_cuda=True))
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda dev=None: dev == "cpu")
    assert not ops_embedding._autocast_fp32(SimpleNamespace(dtype=torch.float16, is_cuda=True))


def test_embedding_fp32_output_without_a_gradient_recorded(device, monkeypatch):
    """The launcher-alone route (no gradient recorded) honours the fp32 output too."""
    monkeypatch.setattr(ops_embedding, "_autocast_fp32", lambda w: w.dtype != torch.float64)
    inp = make_inputs(device, 2, 7, 48, vocab=9, dtype=torch.float16)
    with torch.no_grad():
        y = _call(inp, backend="triton")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, _call(inp, backend="triton").detach(), rtol=0, atol=0)


# gaps found by mutation testing (review s16 C)

@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("affine", ["weight_only", "bias_only"])
def test_embedding_layer_norm_one_affine_parameter_matches_fp64(device, poisoned_empty,
                                                               deterministic, affine):
    # ln_weight or ln_bias alone: the partial-sum slice and the segmented key of dbias sit
    # where dweight's would be (HAS_WEIGHT * stride), only when there is no weight
    inp = make_inputs(device, 2, 9, 40, vocab=6)
    inp["ln_bias" if affine == "weight_only" else "ln_weight"] = None
    y = _call(inp, backend="triton", deterministic=deterministic)
    dy = torch.randn_like(y)
    _check_against_ref(inp, y, _grads(y, inp, dy), dy)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_embedding_layer_norm_unchecked_ids_one_past_each_table_read_nothing(device,
                                                                          deterministic):
    # check_bounds=False with ids equal to each table's row count (the strict bound) and out
    # of range position ids (the unchecked test had only far-out word and type ids). Each
    # table is a view of a buffer whose next row is NaN: a read one past a table shows
    inp = make_inputs(device, 2, 6, 16, vocab=5, n_pos=9)
    sizes = {"word_weight": 5, "position_weight": 9, "type_weight": 2}
    for name, n in sizes.items():
        big = torch.randn(n + 1, 16, device=device)
        big[n] = float("nan")
        inp[name] = big.requires_grad_()[:n]
    ids, types = inp["input_ids"], inp["token_type_ids"]
    pos = torch.arange(6, device=device).repeat(2, 1)
    ids[0, 4], types[1, 1] = 5, 2
    pos[0, 2], pos[1, 3], pos[1, 5] = 9, -1, 1000
    inp["position_ids"] = pos
    y = _call(inp, backend="triton", check_bounds=False, deterministic=deterministic)
    dy = torch.randn_like(y)
    grads = _grads(y, inp, dy)
    assert torch.isfinite(y).all()
    # the reference: each table grows a zero row that its bad ids are mapped to
    ref = {n: (t.detach().double() if t.is_floating_point() else t.clone())
           for n, t in inp.items()}
    for (name, n), key in zip(sizes.items(), ("input_ids", "position_ids", "token_type_ids")):
        ref[name] = torch.cat([ref[name], ref[name].new_zeros(1, 16)])
        ref[key] = torch.where((ref[key] < 0) | (ref[key] >= n), n, ref[key])
    for n in ("word_weight", "position_weight", "type_weight", "ln_weight", "ln_bias"):
        ref[n].requires_grad_()
    yr = _ref(ref)
    gr = _grads(yr, ref, dy.double())
    assert_close_to_ref(y, yr, atol=1e-5, name="y")
    for n, g, r in zip(("word_weight", "position_weight", "type_weight", "ln_weight", "ln_bias"),
                       grads, gr):
        assert_close_to_ref(g, r[:-1] if n in sizes else r, atol=1e-5, name=n)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_embedding_layer_norm_sequence_as_long_as_the_position_table_on_the_full_check(
        device, backend):
    # S == max_position_embeddings is allowed; (1, S) token types send the call through
    # _check_args (the fast _args_ok test only covers same-shape ids), whose bound was untested
    inp = make_inputs(device, 2, 9, 16, vocab=5, n_pos=9)
    inp["token_type_ids"] = inp["token_type_ids"][:1]
    y = _call(inp, backend=backend)
    torch.testing.assert_close(y, _ref(inp), atol=1e-5, rtol=1e-5)
