"""LSTMSeq2Seq: shapes, masking of padded source positions, teacher forcing = step-wise
decoding, beam_size=1 = greedy, and a copy task learned in a few hundred CPU steps. The tests
of what the two encoder-decoders share (decoding, checks; fastbert/models/_seq2seq.py) run
Seq2SeqTransformer too ("transformer"); its own are in test_transformer_seq2seq.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastbert.models import LSTMSeq2Seq, Seq2SeqTransformer

PAD, BOS, EOS = 0, 1, 2
VOCAB = 12

# tiny CPU matmuls: see the single_thread fixture in tests/conftest.py
pytestmark = pytest.mark.usefixtures("single_thread")


def copy_batch(n, gen, min_len=2, max_len=6):
    """Random source sequences (padded with PAD) and the target = the source then EOS."""
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    src_len = int(lengths.max())
    src = torch.full((n, src_len), PAD, dtype=torch.long)
    tgt = torch.full((n, src_len + 1), PAD, dtype=torch.long)
    for i, n_tok in enumerate(lengths.tolist()):
        src[i, :n_tok] = torch.randint(3, VOCAB, (n_tok,), generator=gen)
        tgt[i, :n_tok] = src[i, :n_tok]
        tgt[i, n_tok] = EOS
    tgt_in = torch.cat([torch.full((n, 1), BOS), tgt[:, :-1]], dim=1)
    tgt_in[tgt_in == EOS] = PAD
    return src, lengths, tgt_in, tgt


def _model(attention, **kw):
    """An LSTMSeq2Seq with that attention, or ("transformer") a Seq2SeqTransformer."""
    if attention == "transformer":
        args = dict(d_model=32, heads=2, layers=2, ffn=48, dropout=0.0, backend="torch")
        args.update(kw)
        return Seq2SeqTransformer(VOCAB, VOCAB + 3, **args).eval()
    args = dict(emb=16, hidden=24, layers=2, attention=attention, dropout=0.0, backend="torch")
    args.update(kw)
    return LSTMSeq2Seq(VOCAB, VOCAB + 3, **args).eval()


def _set_backend(model, backend):
    model.backend = backend   # the Transformer's ops; the LSTM model's loss
    if isinstance(model, LSTMSeq2Seq):
        for m in (model.encoder, model.decoder):
            m.backend = backend


ALL = ["luong", "bahdanau", "transformer"]


@pytest.mark.parametrize("attention", ["luong", "bahdanau"])
def test_seq2seq_forward_shapes_and_teacher_forcing_equals_stepwise_decoding(attention):
    model = _model(attention)
    src, lengths, tgt_in, _ = copy_batch(3, torch.Generator().manual_seed(0))
    logits = model(src, lengths, tgt_in)
    assert logits.shape == (3, tgt_in.shape[1], VOCAB + 3)
    memory, keys, mask, state = model.encode(src, lengths)
    steps = []
    for t in range(tgt_in.shape[1]):
        step, state = model.decode_step(tgt_in[:, t], state, memory, keys, mask)
        steps.append(step)
    torch.testing.assert_close(logits, torch.stack(steps, dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ALL)
def test_seq2seq_padded_source_positions_do_not_change_the_output(attention):
    model = _model(attention)
    src, lengths, tgt_in, _ = copy_batch(4, torch.Generator().manual_seed(1))
    full = model(src, lengths, tgt_in)
    for i in range(4):
        n = int(lengths[i])
        alone = model(src[i:i + 1, :n], lengths[i:i + 1], tgt_in[i:i + 1])
        torch.testing.assert_close(full[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    garbage = src.clone()
    garbage[garbage == PAD] = 5  # change only the padding
    torch.testing.assert_close(model(garbage, lengths, tgt_in), full)


@pytest.mark.parametrize("attention", ALL)
def test_seq2seq_beam_size_one_equals_greedy(attention):
    model = _model(attention)
    src, lengths, _, _ = copy_batch(5, torch.Generator().manual_seed(2))
    greedy = model.greedy_decode(src, lengths, max_len=8)
    beam, scores = model.beam_search(src, lengths, beam_size=1, max_len=8)
    assert torch.equal(beam, greedy)
    assert scores.shape == (5,) and (scores <= 0).all()
    # the scores are the model's log-probabilities of the tokens, up to and including eos, at
    # any beam width (a wider beam need not score higher: it may prune the greedy prefix)
    for beam_size in (1, 4):
        beam, scores = model.beam_search(src, lengths, beam_size=beam_size, max_len=8)
        tgt_in = torch.cat([torch.full((5, 1), BOS), beam[:, :-1]], dim=1)
        logp = torch.log_softmax(model(src, lengths, tgt_in).float(), -1)
        logp = logp.gather(-1, beam[..., None])[..., 0]
        is_eos = (beam == EOS).long()
        upto_eos = (is_eos.cumsum(1) - is_eos) == 0
        torch.testing.assert_close(scores, (logp * upto_eos).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ALL)
def test_seq2seq_decoding_never_generates_pad_or_bos(attention):
    """pad after eos only: a decoder whose output layer favours pad and bos still emits real
    tokens (a generated pad would read as the end of the output)."""
    model = _model(attention)
    out_bias = model.out.bias
    with torch.no_grad():
        out_bias[PAD] += 100.0
        out_bias[BOS] += 50.0
    src, lengths, _, _ = copy_batch(3, torch.Generator().manual_seed(3))
    for tokens in (model.greedy_decode(src, lengths, max_len=6),
                   model.beam_search(src, lengths, beam_size=3, max_len=6)[0]):
        assert not (tokens == BOS).any()
        for row in tokens.tolist():
            first_pad = row.index(PAD) if PAD in row else len(row)
            assert first_pad > 0 and all(t == PAD for t in row[first_pad:])
            assert first_pad == len(row) or row[first_pad - 1] == EOS


def _train_copy(attention, steps, seed=0):
    torch.manual_seed(seed)
    model = LSTMSeq2Seq(VOCAB, VOCAB, emb=32, hidden=64, layers=1, attention=attention,
                        dropout=0.0, backend="torch")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        src, lengths, tgt_in, tgt = copy_batch(32, gen)
        logits = model(src, lengths, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _exact_matches(tokens, tgt, lengths):
    return sum(bool(torch.equal(tokens[i, :n + 1], tgt[i, :n + 1]))
               for i, n in enumerate(lengths.tolist()) if tokens.shape[1] > n)


def test_seq2seq_learns_the_copy_task_greedy_and_beam():
    model = _train_copy("luong", steps=250)
    src, lengths, _, tgt = copy_batch(64, torch.Generator().manual_seed(123))
    greedy = model.greedy_decode(src, lengths, max_len=10)
    assert _exact_matches(greedy, tgt, lengths) >= 55  # >= 85% of unseen sequences exact
    beam, _ = model.beam_search(src, lengths, beam_size=3, max_len=10)
    assert _exact_matches(beam, tgt, lengths) >= 55


def test_seq2seq_bahdanau_training_reduces_the_loss():
    gen = torch.Generator().manual_seed(7)
    src, lengths, tgt_in, tgt = copy_batch(32, gen)
    before = _train_copy("bahdanau", steps=0)
    after = _train_copy("bahdanau", steps=120)
    loss = lambda m: F.cross_entropy(m(src, lengths, tgt_in).reshape(-1, VOCAB), tgt.reshape(-1),
                                     ignore_index=PAD).item()
    assert loss(after) < 0.1 * loss(before)


@pytest.mark.parametrize("attention", ALL)
def test_seq2seq_triton_backend_matches_torch_backend(attention, device):
    model = _model(attention, layers=1).to(device)
    src, lengths, tgt_in, tgt = copy_batch(3, torch.Generator().manual_seed(4), max_len=4)
    src, tgt_in, tgt = src.to(device), tgt_in.to(device), tgt.to(device)
    grads = {}
    for backend in ("torch", "triton"):
        _set_backend(model, backend)
        logits = model(src, lengths, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        grads[backend] = (logits, *torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ALL)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.1), ("sum", 0.0), ("none", 0.0)])
def test_seq2seq_loss_is_cross_entropy_of_the_logits(attention, backend, reduction, smoothing,
                                                     device):
    """``loss`` (masked_lm_loss on decoder_states: only non-pad targets projected) equals
    F.cross_entropy of forward's logits with pad ignored, and so do the gradients of every
    parameter; forward is the output layer over decoder_states."""
    model = _model(attention, layers=1, backend=backend).to(device)
    _set_backend(model, backend)
    src, lengths, tgt_in, tgt = copy_batch(3, torch.Generator().manual_seed(6), max_len=4)
    src, tgt_in, tgt = src.to(device), tgt_in.to(device), tgt.to(device)
    loss = model.loss(src, lengths, tgt_in, tgt, label_smoothing=smoothing, reduction=reduction)
    logits = model(src, lengths, tgt_in)
    torch.testing.assert_close(model.out(model.decoder_states(src, lengths, tgt_in)), logits)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), tgt.reshape(-1),
                          ignore_index=PAD, label_smoothing=smoothing, reduction=reduction)
    if reduction == "none":
        ref = ref.reshape(tgt.shape)
    assert loss.shape == ref.shape and (tgt == PAD).any()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    g = torch.autograd.grad(loss.sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g, g_ref):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ALL)
def test_seq2seq_loss_without_target_tokens_is_zero(attention):
    """A batch whose targets are all pad: loss 0.0 and zero gradients, not NaN."""
    model = _model(attention)
    src, lengths, tgt_in, tgt = copy_batch(2, torch.Generator().manual_seed(7))
    loss = model.loss(src, lengths, tgt_in, torch.full_like(tgt, PAD))
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    with pytest.raises(ValueError, match="tgt_out must have tgt_in's shape"):
        model.loss(src, lengths, tgt_in, tgt[:, :-1])


@pytest.mark.parametrize("attention", ALL)
def test_seq2seq_trains_and_decodes_under_autocast(attention, device):
    """Mixed precision (fp32 model under autocast, the usual AMP setup): a training step and
    both decoders run on the Triton kernels, the logits in the autocast dtype."""
    model = _model(attention, layers=2).to(device)
    _set_backend(model, "triton")
    src, lengths, tgt_in, tgt = copy_batch(3, torch.Generator().manual_seed(4), max_len=4)
    src, tgt_in, tgt = src.to(device), tgt_in.to(device), tgt.to(device)
    # (the interpreter refuses bfloat16 attention: its tl.dot is wrong there)
    dt = torch.bfloat16 if device.type == "cpu" and attention != "transformer" else torch.float16
    with torch.autocast(device.type, dtype=dt):
        logits = model(src, lengths, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))
    assert logits.dtype == dt
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.autocast(device.type, dtype=dt):   # the fused loss, as the bench trains
        fused = model.loss(src, lengths, tgt_in, tgt)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                      tgt.reshape(-1), ignore_index=PAD),
                               rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(fused, list(model.parameters()), allow_unused=True)
    assert all(g is None or (g.dtype == torch.float32 and torch.isfinite(g).all()) for g in grads)
    with torch.autocast(device.type, dtype=dt):
        assert model.greedy_decode(src, lengths, max_len=4).shape == (3, 4)
        assert model.beam_search(src, lengths, beam_size=2, max_len=4)[0].shape == (3, 4)


def test_seq2seq_bad_arguments_raise():
    with pytest.raises(ValueError, match="attention must be one of"):
        LSTMSeq2Seq(10, 10, attention="dot")
    with pytest.raises(ValueError, match="hidden must be even"):
        LSTMSeq2Seq(10, 10, hidden=15)
    with pytest.raises(ValueError, match="three different ids"):
        LSTMSeq2Seq(10, 10, pad_id=0, bos_id=1, eos_id=0)
    model = _model("luong")
    with pytest.raises(ValueError, match="src_lengths must be >= 1"):
        model(torch.tensor([[3, 4]]), torch.tensor([0]), torch.tensor([[BOS]]))
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        model.beam_search(torch.tensor([[3, 4]]), torch.tensor([2]), beam_size=0)
    with pytest.raises(ValueError, match="beam_size must be >= 1, got -1"):
        model.beam_search(torch.tensor([[3, 4]]), torch.tensor([2]), beam_size=-1)
    with pytest.raises(TypeError, match="beam_size must be an int, got float"):
        model.beam_search(torch.tensor([[3, 4]]), torch.tensor([2]), beam_size=2.0)
    # an integer of another type (numpy's, as range arithmetic gives) is a beam size too,
    # as max_len takes one
    tokens, _ = model.beam_search(torch.tensor([[3, 4]]), torch.tensor([2]),
                                  beam_size=np.int64(2), max_len=np.int64(3))
    assert tokens.shape[0] == 1 and tokens.shape[1] <= 3
    with pytest.raises(ValueError, match=r"y_prev must be \(batch,\)"):
        memory, keys, mask, state = model.encode(torch.tensor([[3, 4]]), torch.tensor([2]))
        model.decode_step(torch.tensor([BOS, BOS]), state, memory, keys, mask)


@pytest.mark.parametrize("dtype,favoured", [(torch.float32, 0.0), (torch.float64, 1e-12)])
def test_seq2seq_beam_size_one_equals_greedy_at_ties(dtype, favoured):
    """At an exact tie (float32) or a gap below float32's resolution (a float64 model), a beam
    of one picks what greedy picks (beam search ranked float32 log-probabilities with topk,
    greedy the raw logits with argmax: they disagreed), and a float64 model's scores stay
    float64."""
    model = _model("luong").to(dtype)
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.bias.fill_(-5.0)
        model.out.bias[3] = 1.0 + favoured   # 3 over 4 when favoured, else an exact tie
        model.out.bias[4] = 1.0
    src, lengths = torch.tensor([[3, 4, 5], [5, 6, 0]]), torch.tensor([3, 2])
    greedy = model.greedy_decode(src, lengths, max_len=2)
    beam, scores = model.beam_search(src, lengths, beam_size=1, max_len=2)
    assert torch.equal(beam, greedy)
    if favoured:
        assert (greedy == 3).all()
    assert scores.dtype == dtype


@pytest.mark.parametrize("attention", ALL)
def test_seq2seq_empty_target_and_empty_batch(attention):
    """An empty target gives (B, 0, V) logits with either attention (Bahdanau raised in
    torch.stack); an empty batch decodes to (0, 0) tokens (one step ran first: (0, 1))."""
    model = _model(attention)
    src, lengths, tgt_in, _ = copy_batch(2, torch.Generator().manual_seed(5))
    assert model(src, lengths, tgt_in[:, :0]).shape == (2, 0, VOCAB + 3)
    assert model.greedy_decode(src[:0], lengths[:0], max_len=3).shape == (0, 0)
    tokens, scores = model.beam_search(src[:0], lengths[:0], beam_size=2, max_len=3)
    assert tokens.shape == (0, 0) and scores.shape == (0,)


def test_seq2seq_beam_search_output_is_no_wider_than_its_longest_row():
    """The k beams run until the last one finishes; the returned best rows are cut to the
    longest of them, not padded to that step (a beam wider than the generable tokens kept
    -inf beams going to max_len)."""
    model = _model("luong")
    with torch.no_grad():
        model.out.bias[EOS] += 100.0   # every hypothesis but eos is far behind
    src, lengths, _, _ = copy_batch(3, torch.Generator().manual_seed(6))
    greedy = model.greedy_decode(src, lengths, max_len=6)
    assert greedy.shape == (3, 1) and (greedy == EOS).all()
    for beam_size in (3, VOCAB + 10):
        tokens, _ = model.beam_search(src, lengths, beam_size=beam_size, max_len=6)
        assert torch.equal(tokens, greedy)


def test_seq2seq_check_ids_false_skips_the_id_check(monkeypatch):
    """check_ids=False: no host read of the ids; an out-of-range id is then nn.Embedding's own
    IndexError (documented), not fastbert's ValueError."""
    model = _model("luong", check_ids=False)
    assert model.check_ids is False
    monkeypatch.setattr(type(model), "_check_ids", lambda *a: pytest.fail("ids checked"))
    with pytest.raises(IndexError):
        model(torch.tensor([[3, VOCAB]]), torch.tensor([2]), torch.tensor([[1]]))


@pytest.mark.parametrize("attention", ALL)
def test_seq2seq_compiles_fullgraph_with_the_checks_on(attention):
    """The id check (a host read in eager) is skipped while torch.compile traces."""
    torch._dynamo.reset()
    model = _model(attention)
    src, lengths, tgt_in, _ = copy_batch(3, torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(src, lengths, tgt_in), model(src, lengths, tgt_in))


def test_seq2seq_infers_shapes_on_meta_and_fake_tensors():
    """Shape inference (meta device, FakeTensorMode) skips the id check, as every other value
    check: it read values there (torch's internal errors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    src, lengths, tgt_in, _ = copy_batch(2, torch.Generator().manual_seed(0))
    with torch.device("meta"):
        model = _model("luong")
    out = model(src.to("meta"), lengths, tgt_in.to("meta"))
    assert out.shape == (*tgt_in.shape, VOCAB + 3) and out.is_meta
    model = _model("bahdanau")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = model(*map(mode.from_tensor, (src, lengths, tgt_in)))
    assert out.shape == (*tgt_in.shape, VOCAB + 3)


@pytest.mark.parametrize("attention", ALL)
def test_seq2seq_takes_torch_factory_keywords(attention):
    """device= / dtype= as every torch.nn layer: every parameter is created there (meta: no
    memory), torch.nn.utils.skip_init works, and a float64 model computes what the float32
    one cast with .double() does."""
    model = _model(attention, device="meta", dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float64)}
    kw = (dict(d_model=32, heads=2, layers=2, ffn=48) if attention == "transformer" else
          dict(emb=16, hidden=24, layers=2, attention=attention))
    skipped = torch.nn.utils.skip_init(type(model), VOCAB, VOCAB + 3, **kw, dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in skipped.parameters()} == {("cpu", torch.float64)}
    reference = _model(attention).double()
    skipped.load_state_dict(reference.state_dict())
    src, lengths, tgt_in, _ = copy_batch(3, torch.Generator().manual_seed(0))
    out = skipped.eval()(src, lengths, tgt_in)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(src, lengths, tgt_in), rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["luong", "bahdanau"])
def test_lstm_seq2seq_dropout_sites_in_decoder_states(attention):
    """Dropout (one shared module) on the source and target embeddings and on the output
    layer's input, once each: decoder_states returns what the output-layer dropout returned."""
    class Rec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = []

        def forward(self, x):
            self.out.append(x)
            return x

    m = LSTMSeq2Seq(11, 13, emb=8, hidden=12, layers=1, attention=attention, backend="torch")
    m.drop = Rec()
    src, lengths = torch.randint(3, 11, (3, 5)), torch.tensor([5, 2, 4])
    tgt_in = torch.randint(3, 13, (3, 4))
    out = m.decoder_states(src, lengths, tgt_in)
    T = tgt_in.shape[1]
    if attention == "luong":
        assert len(m.drop.out) == 3 and out is m.drop.out[-1]
    else:
        assert len(m.drop.out) == 1 + 2 * T
        assert torch.equal(out, torch.cat(m.drop.out[2::2], dim=1))
    m.drop.out.clear()
    y = torch.tensor([4, 5, 6])
    state = m._start(src, lengths)
    m.drop.out.clear()
    logits, _ = m.decode_step(y, state[1], *state[0])
    assert len(m.drop.out) == 2
    torch.testing.assert_close(logits, m.out(m.drop.out[-1])[:, 0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lstm_seq2seq_loss_uses_its_backend(backend, monkeypatch):
    """The constructor's backend reaches the loss (the attribute), not only the LSTMs."""
    import fastbert.models._seq2seq as s2s
    seen = []
    real = s2s.masked_lm_loss
    monkeypatch.setattr(s2s, "masked_lm_loss",
                        lambda *a, **k: seen.append(k["backend"]) or real(*a, **k))
    m = LSTMSeq2Seq(11, 13, emb=8, hidden=12, layers=1, backend=backend)
    assert m.backend == backend
    src, lengths = torch.randint(3, 11, (2, 4)), torch.tensor([4, 2])
    t = torch.randint(3, 13, (2, 3))
    m.loss(src, lengths, t, t)
    assert seen == [backend]




def test_lstm_seq2seq_unpickles_a_model_saved_before_backend_was_an_attribute():
    import io
    model = LSTMSeq2Seq(11, 13, emb=8, hidden=12, layers=1, backend="torch")
    del model.__dict__["backend"]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.backend is None
    src, lengths = torch.randint(3, 11, (2, 4)), torch.tensor([4, 2])
    t = torch.randint(3, 13, (2, 3))
    assert torch.isfinite(loaded.loss(src, lengths, t, t))
