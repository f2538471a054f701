"""Seq2SeqTransformer: the same computation as torch's nn.TransformerEncoderLayer /
nn.TransformerDecoderLayer stack with its weights (fp64 on the torch backend, fp32 on the
kernels), teacher forcing = step-wise decoding, the fused loss = cross-entropy of the logits,
dropout, bad arguments, and a copy task learned on the CPU. The decoding and checks it shares
with LSTMSeq2Seq are tested in test_lstm_seq2seq.py (the "transformer" cases)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastbert.ops
from fastbert.models import LSTMSeq2Seq, Seq2SeqTransformer
from fastbert.models._seq2seq import Seq2SeqBase
from fastbert.models.transformer_seq2seq import sinusoidal_positions
from tests.models.test_lstm_seq2seq import BOS, EOS, PAD, VOCAB, _exact_matches, copy_batch

pytestmark = pytest.mark.usefixtures("single_thread")

D_MODEL, HEADS, FFN = 32, 2, 48   # head dim 16: the kernels take it


def _model(**kw):
    args = dict(d_model=D_MODEL, heads=HEADS, layers=2, ffn=FFN, dropout=0.0, backend="torch",
                tie_embeddings=False)
    args.update(kw)
    torch.manual_seed(0)
    model = Seq2SeqTransformer(VOCAB, VOCAB + 3, **args).eval()
    with torch.no_grad():   # non-zero biases, so that a dropped bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


def _torch_layers(model):
    """torch's own layers (post-LN, GELU, batch_first) holding the model's weights, and
    {our parameter name: the torch layer's parameter holding it}."""
    kw = dict(dim_feedforward=FFN, dropout=0.0, activation="gelu", batch_first=True,
              dtype=next(model.parameters()).dtype)
    enc = [torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, **kw) for _ in model.encoder]
    dec = [torch.nn.TransformerDecoderLayer(D_MODEL, HEADS, **kw) for _ in model.decoder]
    names = {"ffn.linear1": "linear1", "ffn.linear2": "linear2", "cross_attn": "multihead_attn",
             ".norm.": "."}
    params = dict(model.named_parameters())   # embeddings, output layer: the model's own
    prefixes = [f"encoder.{i}." for i in range(len(enc))] + [f"decoder.{i}."
                                                               for i in range(len(dec))]
    for prefix, ours, theirs in zip(prefixes, list(model.encoder) + list(model.decoder),
                                    enc + dec):
        state, theirs_params = {}, dict(theirs.named_parameters())
        for key, value in ours.state_dict().items():
            name = key
            for a, b in names.items():
                key = key.replace(a, b)
            state[key] = value
            params[prefix + name] = theirs_params[key]
        theirs.load_state_dict(state)
        theirs.train()   # no inference fast path (it zeroes padded positions)
    return enc, dec, params


def _torch_forward(model, src, lengths, tgt_in):
    """torch's layers' logits, and their parameters by our names."""
    enc, dec, params = _torch_layers(model)
    pad = torch.arange(src.shape[1])[None, :] >= lengths[:, None]
    embed = lambda e, ids: e(ids) * math.sqrt(D_MODEL) + sinusoidal_positions(
        ids.shape[1], D_MODEL, dtype=e.weight.dtype)
    x = embed(model.src_embed, src)
    for layer in enc:
        x = layer(x, src_key_padding_mask=pad)
    y = embed(model.tgt_embed, tgt_in)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1],
                                                                  dtype=y.dtype)
    for layer in dec:
        y = layer(y, x, tgt_mask=causal, memory_key_padding_mask=pad.to(y.dtype).masked_fill(
            pad, float("-inf")), tgt_is_causal=True)
    return model.out(y), params


def test_sinusoidal_positions_are_the_papers():
    pe = sinusoidal_positions(7, 6, dtype=torch.float64)
    for pos in range(7):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-15)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-15)
    assert sinusoidal_positions(4, 5).shape == (4, 5)   # an odd width


def test_transformer_matches_torch_layers_fp64():
    """fp64 on the torch backend: logits and every gradient equal torch's layers' to
    rounding (the fused epilogues, bias_gelu and attention compute the same thing)."""
    model = _model().double()
    src, lengths, tgt_in, tgt = copy_batch(4, torch.Generator().manual_seed(0))
    ours = model(src, lengths, tgt_in)
    ref, ref_params = _torch_forward(model, src, lengths, tgt_in)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    names = [n for n, _ in model.named_parameters()]
    g_ours = torch.autograd.grad(ours.square().sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(ref.square().sum(), [ref_params[n] for n in names])
    for name, a, b in zip(names, g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_transformer_kernels_match_torch_layers(device):
    """The Triton kernels (attention with the source mask and causal, the fused LayerNorm
    epilogues, bias_gelu) in fp32: logits and gradients against torch's layers in fp64."""
    model = _model(backend="triton").to(device)
    src, lengths, tgt_in, _ = copy_batch(3, torch.Generator().manual_seed(1))
    ours = model(src.to(device), lengths, tgt_in.to(device))
    ref_model = _model().double()
    ref, ref_params = _torch_forward(ref_model, src, lengths, tgt_in)
    torch.testing.assert_close(ours.double().cpu(), ref, rtol=1e-4, atol=1e-5)
    names = [n for n, _ in model.named_parameters()]
    g_ours = torch.autograd.grad(ours.square().sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(ref.square().sum(), [ref_params[n] for n in names])
    for name, a, b in zip(names, g_ours, g_ref):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_transformer_teacher_forcing_equals_stepwise_decoding(device, backend):
    """Decoding a position a step with the key / value cache (one query over the cached keys)
    gives the teacher-forced (causal) logits."""
    model = _model(tie_embeddings=True, backend=backend).to(device)
    src, lengths, tgt_in, _ = copy_batch(3, torch.Generator().manual_seed(2))
    src, tgt_in = src.to(device), tgt_in.to(device)
    logits = model(src, lengths, tgt_in)
    assert logits.shape == (3, tgt_in.shape[1], VOCAB + 3)
    memory, mask = model.encode(src, lengths)
    state = model.empty_cache(memory)
    assert len(state) == 4 and state[0].shape == (3, 0, HEADS, D_MODEL // HEADS)
    steps = []
    for t in range(tgt_in.shape[1]):
        step, state = model.decode_step(tgt_in[:, t], state, memory, mask)
        steps.append(step)
    assert state[0].shape == (3, tgt_in.shape[1], HEADS, D_MODEL // HEADS)
    torch.testing.assert_close(logits, torch.stack(steps, dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.1), ("sum", 0.0), ("none", 0.0)])
def test_transformer_loss_is_cross_entropy_of_the_logits(device, backend, reduction, smoothing):
    """``loss`` (masked_lm_loss on the decoder states: only non-pad targets projected) equals
    F.cross_entropy of forward's logits with pad ignored, and so do the gradients."""
    model = _model(backend=backend, tie_embeddings=True).to(device)
    src, lengths, tgt_in, tgt = (t.to(device) if t.dim() == 2 else t
                                 for t in copy_batch(3, torch.Generator().manual_seed(3)))
    loss = model.loss(src, lengths, tgt_in, tgt, label_smoothing=smoothing, reduction=reduction)
    logits = model(src, lengths, tgt_in)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), tgt.reshape(-1),
                          ignore_index=PAD, label_smoothing=smoothing, reduction=reduction)
    if reduction == "none":
        ref = ref.reshape(tgt.shape)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    g = torch.autograd.grad(loss.sum(), params)
    g_ref = torch.autograd.grad(ref.sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_transformer_dropout_applies_in_training_only():
    model = _model(dropout=0.3)
    src, lengths, tgt_in, _ = copy_batch(3, torch.Generator().manual_seed(4))
    ref = model(src, lengths, tgt_in)
    assert torch.equal(model(src, lengths, tgt_in), ref)   # eval: no dropout
    model.train()
    torch.manual_seed(5)
    a = model(src, lengths, tgt_in)
    torch.manual_seed(5)
    assert torch.equal(model(src, lengths, tgt_in), a)     # the seed reproduces it
    assert not torch.allclose(a, ref)
    # attention_dropout alone (residual dropout off) also changes the output
    model = _model(dropout=0.0, attention_dropout=0.5).train()
    assert not torch.allclose(model(src, lengths, tgt_in), ref)


def test_transformer_bad_arguments_raise():
    with pytest.raises(ValueError, match="heads must divide d_model"):
        Seq2SeqTransformer(10, 10, d_model=30, heads=4)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        Seq2SeqTransformer(10, 10, d_model=32, heads=2, dropout=1.5)
    with pytest.raises(ValueError, match="ffn must be a positive int"):
        Seq2SeqTransformer(10, 10, d_model=32, heads=2, ffn=0)
    with pytest.raises(ValueError, match="three different ids"):
        Seq2SeqTransformer(10, 10, d_model=32, heads=2, pad_id=0, bos_id=1, eos_id=0)
    model = _model()
    src, lengths, tgt_in, tgt = copy_batch(2, torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="tgt_out must have tgt_in's shape"):
        model.loss(src, lengths, tgt_in, tgt[:, :-1])
    with pytest.raises(ValueError, match="src_lengths has a length .* longer than the sequence"):
        model(src, lengths + 10, tgt_in)
    with pytest.raises(ValueError, match=r"tgt_in must hold token ids in \[0, 15\)"):
        model(src, lengths, tgt_in + 100)
    with pytest.raises(ValueError, match=r"y_prev must be \(batch,\)"):
        memory, mask = model.encode(src, lengths)
        model.decode_step(torch.tensor([BOS]), model.empty_cache(memory), memory, mask)
    with pytest.raises(ValueError, match="state must hold 4 tensors"):
        model.decode_step(torch.tensor([BOS, BOS]), (), memory, mask)


def test_transformer_learns_the_copy_task():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(VOCAB, VOCAB, d_model=32, heads=2, layers=1, ffn=64,
                               dropout=0.0, backend="torch")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        src, lengths, tgt_in, tgt = copy_batch(32, gen)
        loss = model.loss(src, lengths, tgt_in, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    src, lengths, _, tgt = copy_batch(64, torch.Generator().manual_seed(123))
    greedy = model.greedy_decode(src, lengths, max_len=10)
    assert _exact_matches(greedy, tgt, lengths) >= 55   # >= 85% of unseen sequences exact
    beam, _ = model.beam_search(src, lengths, beam_size=3, max_len=10)
    assert _exact_matches(beam, tgt, lengths) >= 55
    assert (greedy[lengths == 2][:, 2] == EOS).all()


def test_transformer_tied_output_stays_tied_however_the_model_is_built():
    """tie_embeddings: the output weight IS the target embedding's, also after skip_init,
    meta construction + to_empty, .to(dtype), deepcopy and pickle (a shared Parameter was
    untied by to_empty / skip_init: two weights that drifted apart at the first step);
    state_dict has one copy of it."""
    import copy
    import io
    kw = dict(d_model=D_MODEL, heads=HEADS, layers=1, ffn=FFN, dropout=0.0, backend="torch")
    built = {
        "plain": Seq2SeqTransformer(VOCAB, VOCAB + 3, **kw),
        "skip_init": torch.nn.utils.skip_init(Seq2SeqTransformer, VOCAB, VOCAB + 3, **kw),
        "meta": Seq2SeqTransformer(VOCAB, VOCAB + 3, device="meta", **kw).to_empty(
            device="cpu"),
    }
    built["double"] = copy.deepcopy(built["plain"]).double()
    built["deepcopy"] = copy.deepcopy(built["plain"])
    buf = io.BytesIO()
    torch.save(built["plain"], buf)
    buf.seek(0)
    built["pickle"] = torch.load(buf, weights_only=False)
    n_params = sum(p.numel() for p in built["plain"].parameters())
    for name, model in built.items():
        assert model.out.weight is model.tgt_embed.weight, name
        assert sum(p.numel() for p in model.parameters()) == n_params, name
        assert "out.weight" not in model.state_dict(), name
    model = built["skip_init"]
    model.load_state_dict(built["plain"].state_dict())
    src, lengths, tgt_in, tgt = copy_batch(4, torch.Generator().manual_seed(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.loss(src, lengths, tgt_in, tgt).backward()
    opt.step()
    assert model.out.weight is model.tgt_embed.weight
    logits = model(src, lengths, tgt_in)
    torch.testing.assert_close(logits, F.linear(model.decoder_states(src, lengths, tgt_in),
                                                model.tgt_embed.weight, model.out.bias))


# gaps found by mutation testing this session's models (review s16 R2)

def test_transformer_dropout_reaches_each_site(monkeypatch):
    """dropout on the embeddings and in every epilogue, attention_dropout on the attention
    probabilities only; none in eval; attention_dropout defaults to dropout.
    (kills T19-T24: epilogue dropout dropped, p / p_attn swapped in the encoder, the decoder
    or the attributes, the default attention_dropout, the embedding dropout dropped)"""
    calls = {"attention": [], "layer_norm": [], "dropout": []}
    att, ln, drop = fastbert.ops.attention, fastbert.ops.layer_norm, F.dropout

    def spy_att(*a, **kw):
        calls["attention"].append(kw["dropout_p"])
        return att(*a, **kw)

    def spy_ln(*a, **kw):
        calls["layer_norm"].append((kw["dropout_p"], kw["training"]))
        return ln(*a, **kw)

    def spy_drop(x, p=0.5, training=True, inplace=False):
        calls["dropout"].append((p, training))
        return drop(x, p, training, inplace)

    monkeypatch.setattr(fastbert.ops, "attention", spy_att)
    monkeypatch.setattr(fastbert.ops, "layer_norm", spy_ln)
    from fastbert.models import transformer_seq2seq as tsm

    class _F:   # the model's own F.dropout calls only (the torch references call F.dropout)
        dropout = staticmethod(spy_drop)

        def __getattr__(self, name):
            return getattr(F, name)

    monkeypatch.setattr(tsm, "F", _F())
    model = _model(dropout=0.3, attention_dropout=0.1, layers=2, decoder_layers=1)
    src, lengths, tgt_in, _ = copy_batch(2, torch.Generator().manual_seed(0))
    model.train()
    model(src, lengths, tgt_in)
    assert calls["attention"] == [0.1] * (2 + 2 * 1)
    assert calls["layer_norm"] == [(0.3, True)] * (2 * 2 + 3 * 1)
    assert calls["dropout"] == [(0.3, True)] * 2          # source and target embeddings
    for v in calls.values():
        v.clear()
    model.eval()
    model(src, lengths, tgt_in)
    assert set(calls["attention"]) == {0.0}
    assert {p for p, _ in calls["layer_norm"]} == {0.0}
    assert {p for p, _ in calls["dropout"]} == {0.0}
    m = Seq2SeqTransformer(VOCAB, VOCAB, d_model=32, heads=2, layers=1, dropout=0.2)
    assert (m.dropout, m.attention_dropout) == (0.2, 0.2)


def test_transformer_loss_ignores_a_nonzero_pad_id():
    """(kills T27: the loss's pad -> ignore mapping hard-coding 0)"""
    pad = VOCAB   # a pad id other than 0: ids 0 .. VOCAB - 1 stay tokens
    model = Seq2SeqTransformer(VOCAB + 1, VOCAB + 3, d_model=32, heads=2, layers=2, ffn=48,
                               dropout=0.0, pad_id=pad, backend="torch").eval()
    src, lengths, tgt_in, tgt = copy_batch(3, torch.Generator().manual_seed(3))
    src, tgt_in, tgt = (t.masked_fill(t == PAD, pad) for t in (src, tgt_in, tgt))
    assert (tgt == pad).any()
    loss = model.loss(src, lengths, tgt_in, tgt)
    logits = model(src, lengths, tgt_in)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                          ignore_index=pad)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_transformer_constructor_wiring():
    """(kills T29 / T30 tie_embeddings ignored / default flipped, T42 decoder_layers ignored,
    T43 the ffn default, T33 a bool dropout accepted, S23 / S29 the special-id ranges)"""
    m = Seq2SeqTransformer(VOCAB, VOCAB + 3, d_model=32, heads=2, layers=2, decoder_layers=1)
    assert m.out.weight is m.tgt_embed.weight
    assert (m.out.bias == 0).all()
    assert len(m.encoder) == 2 and len(m.decoder) == 1
    assert m.encoder[0].ffn.linear1.out_features == 4 * 32
    m = Seq2SeqTransformer(VOCAB, VOCAB + 3, d_model=32, heads=2, layers=1,
                           tie_embeddings=False)
    assert m.out.weight is not m.tgt_embed.weight
    with pytest.raises(ValueError, match="dropout must be a probability"):
        Seq2SeqTransformer(10, 10, d_model=32, heads=2, dropout=True)
    with pytest.raises(ValueError, match="pad_id must be a token id"):
        Seq2SeqTransformer(10, 20, d_model=32, heads=2, pad_id=15)   # not a source id
    with pytest.raises(ValueError, match="bos_id must be a token id"):
        Seq2SeqTransformer(10, 20, d_model=32, heads=2, bos_id=20)


def test_transformer_input_checks():
    """(kills T36 / T37 tgt_out / tgt_in type checks off, S19 the batch check, S20 the device
    check, S24 the id check's upper bound off by one)"""
    model = _model()
    src, lengths, tgt_in, tgt = copy_batch(2, torch.Generator().manual_seed(6))
    with pytest.raises(TypeError, match="tgt_out must have dtype"):
        model.loss(src, lengths, tgt_in, tgt.float())
    with pytest.raises(TypeError, match="tgt_in must be a tensor"):
        model(src, lengths, None)
    with pytest.raises(ValueError, match="tgt_in must have src's batch size"):
        model(src, lengths, tgt_in[:1])
    with pytest.raises(ValueError, match=r"src must hold token ids in \[0, 12\), got 12"):
        model(src.masked_fill(src == PAD, VOCAB), lengths, tgt_in)
    meta = _model(device="meta")
    with pytest.raises(ValueError, match="src is on cpu, expected meta"):
        meta(src, lengths, tgt_in)


def test_transformer_pad_rows_get_no_embedding_gradient():
    """nn.Embedding(padding_idx=pad_id), as documented by the zeroed pad rows.
    (kills T39 padding_idx dropped)"""
    model = _model(tie_embeddings=False)
    src, lengths, tgt_in, tgt = copy_batch(3, torch.Generator().manual_seed(1))
    assert (tgt_in == PAD).any() and (src == PAD).any()
    # every output position (the loss alone would not reach the pad inputs: they sit after
    # eos, and no earlier position attends to them)
    model(src, lengths, tgt_in).square().sum().backward()
    assert model.src_embed.weight.grad[PAD].abs().max() == 0
    assert model.tgt_embed.weight.grad[PAD].abs().max() == 0


@pytest.mark.parametrize("attention", ["luong", "transformer"])
def test_beam_search_is_exact_over_two_steps_with_a_full_beam(attention):
    """A beam as wide as the vocabulary is exhaustive over two steps: its score is the best
    two-token (or eos-only) continuation. (kills S05: every beam live at the start, so the k
    beams start identical and the first step keeps k copies of the greedy token)"""
    torch.manual_seed(0)
    if attention == "transformer":
        model = Seq2SeqTransformer(VOCAB, VOCAB + 3, d_model=32, heads=2, layers=2, ffn=48,
                                   dropout=0.0, backend="torch").eval()
    else:
        model = LSTMSeq2Seq(VOCAB, VOCAB + 3, emb=16, hidden=24, layers=2, attention=attention,
                            dropout=0.0, backend="torch").eval()
    n_vocab = VOCAB + 3
    src, lengths, _, _ = copy_batch(6, torch.Generator().manual_seed(2))
    _, scores = model.beam_search(src, lengths, beam_size=n_vocab, max_len=2)
    ok = torch.ones(n_vocab, dtype=torch.bool)
    ok[[PAD, BOS]] = False

    def logp(tgt_in):
        with torch.no_grad():
            lp = torch.log_softmax(model(src, lengths, tgt_in)[:, -1].float(), -1)
        return lp.masked_fill(~ok, float("-inf"))

    first = logp(torch.full((6, 1), BOS))
    best = first[:, EOS].clone()
    for a in range(n_vocab):
        if not ok[a] or a == EOS:
            continue
        tgt_in = torch.tensor([[BOS, a]] * 6)
        best = torch.maximum(best, first[:, a] + logp(tgt_in).max(-1).values)
    torch.testing.assert_close(scores, best, rtol=1e-5, atol=1e-5)


class _Scripted(Seq2SeqBase):
    """A decoder whose step t favours token 3 + t % 5, and eos at step lengths[b]: rows finish
    at their source lengths. The state is the step count, (B, 1)."""
    src_vocab = tgt_vocab = VOCAB
    pad_id, bos_id, eos_id, check_ids = PAD, BOS, EOS, True

    def __init__(self):
        super().__init__()
        self.src_embed = torch.nn.Embedding(VOCAB, 4)

    def _start(self, src, src_lengths):
        return (src_lengths.double()[:, None],), (torch.zeros(src.shape[0], 1),)

    def decode_step(self, y_prev, state, lens):
        t = state[0]
        logits = torch.zeros(y_prev.shape[0], VOCAB)
        logits.scatter_(1, (3 + t.long() % 5), 5.0)
        logits[:, EOS] = torch.where(t[:, 0] == lens[:, 0].float(), 10.0, 0.0)
        return logits, (t + 1,)

    def decoder_states(self, src, src_lengths, tgt_in):
        raise AssertionError("teacher forcing is not used by these tests")


def test_greedy_pads_rows_that_finished_before_the_others():
    """Rows that emit eos at different steps: after its eos a row is pad only, and greedy
    equals a beam of one. (kills S12: greedy kept generating after a row's eos)"""
    model = _Scripted()
    lengths = torch.tensor([1, 4, 2])
    src = torch.full((3, 4), 3)
    want = torch.tensor([[3, EOS, PAD, PAD, PAD], [3, 4, 5, 6, EOS], [3, 4, EOS, PAD, PAD]])
    assert torch.equal(model.greedy_decode(src, lengths, max_len=8), want)
    assert torch.equal(model.beam_search(src, lengths, beam_size=1, max_len=8)[0], want)


def test_log_probs_are_at_least_float32():
    """(kills S17: log_softmax in a half-precision model's dtype)"""
    model = _model()
    logits = (torch.randn(3, VOCAB + 3) * 4).half()
    lp = model._log_probs(logits)
    assert lp.dtype == torch.float32
    want = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(lp[:, 3:], want[:, 3:])
