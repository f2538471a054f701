"""benchmarks/translation_refs.py: the references bench_translation trains beside fastbert's
models compute what those models compute, from the same weights (fp64, CPU): logits, losses
and every parameter's gradient; the LSTM copy shares nothing with the original; the
Transformer's layers are torch's own, wired with the model's settings."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from benchmarks.translation_refs import (CudnnLSTM, TorchTransformerSeq2Seq, cudnn_lstm,
                                         cudnn_lstm_seq2seq, hf_loss)
from fastbert.models import LSTMSeq2Seq, Seq2SeqTransformer
from fastbert.nn import LSTM

pytestmark = pytest.mark.usefixtures("single_thread")

PAD, BOS, EOS = 0, 1, 2
SRC_VOCAB, TGT_VOCAB = 11, 13
LENGTHS = [6, 1, 4, 6, 3]   # ragged and unsorted: 1 and the maximum included


def _batch(seed):
    """src (B, S) padded with PAD, src_lengths (B,), tgt_in (B, T) starting with BOS and
    right-padded, tgt_out (B, T) = tgt_in shifted left, EOS then PAD."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    src = torch.randint(3, SRC_VOCAB, (len(LENGTHS), max(LENGTHS)), generator=gen)
    src[torch.arange(src.shape[1])[None, :] >= lengths[:, None]] = PAD
    tgt_lengths = torch.tensor([5, 2, 1, 4, 3])
    tgt = torch.randint(3, TGT_VOCAB, (len(LENGTHS), 6), generator=gen)
    tgt[torch.arange(6)[None, :] >= tgt_lengths[:, None]] = PAD
    tgt[torch.arange(len(LENGTHS)), tgt_lengths] = EOS
    tgt_in = torch.cat([torch.full((len(LENGTHS), 1), BOS), tgt[:, :-1]], dim=1)
    tgt_in[tgt_in == EOS] = PAD
    return src, lengths, tgt_in, tgt


def _weighted_sum(logits, seed):
    """A scalar whose gradient reaches every logit with a different weight."""
    gen = torch.Generator().manual_seed(seed)
    return (logits * torch.randn(logits.shape, generator=gen, dtype=logits.dtype)).sum()


def _assert_grads_equal(a, b, names):
    for name, ga, gb in zip(names, a, b):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------
# LSTM


def test_cudnn_lstm_returns_what_fastbert_lstm_returns_with_lengths():
    """Every constructor argument carried over; outputs zero past each length and h_n / c_n
    from each sequence's last valid step, both directions, lengths unsorted."""
    torch.manual_seed(0)
    ours = LSTM(5, 7, 2, bias=False, batch_first=True, dropout=0.25, bidirectional=True,
                proj_size=3, backend="torch", dtype=torch.float64).eval()
    ref = cudnn_lstm(ours)
    assert type(ref) is CudnnLSTM
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size", "training"):
        assert getattr(ref, attr) == getattr(ours, attr), attr
    assert ref.weight_ih_l0.dtype == torch.float64
    # padded past the longest sequence: the output keeps the input's length
    x = torch.randn(len(LENGTHS), max(LENGTHS) + 2, 5, dtype=torch.float64)
    lengths = torch.tensor(LENGTHS)
    out, (h, c) = ours(x, lengths=lengths, enforce_sorted=False)
    out_ref, (h_ref, c_ref) = ref(x, lengths=lengths, enforce_sorted=False)
    assert out_ref.shape == out.shape
    assert (out_ref[1, 1:] == 0).all() and (out_ref[:, max(LENGTHS):] == 0).all()
    for a, b in ((out, out_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    # no lengths: torch.nn.LSTM's own forward
    torch.testing.assert_close(ref(x)[0], ours(x)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention", ["luong", "bahdanau"])
def test_cudnn_lstm_seq2seq_logits_and_gradients_equal_the_models(attention):
    torch.manual_seed(0)
    model = LSTMSeq2Seq(SRC_VOCAB, TGT_VOCAB, emb=8, hidden=12, layers=2, attention=attention,
                        dropout=0.0, backend="torch", dtype=torch.float64)
    ref = cudnn_lstm_seq2seq(model)
    assert isinstance(ref.encoder, torch.nn.LSTM) and isinstance(ref.decoder, torch.nn.LSTM)
    assert ref.encoder.bidirectional and ref.encoder.batch_first and ref.decoder.batch_first
    src, lengths, tgt_in, _ = _batch(0)
    logits = model(src, lengths, tgt_in)
    logits_ref = ref(src, lengths, tgt_in)
    torch.testing.assert_close(logits_ref, logits, rtol=1e-10, atol=1e-10)
    params, params_ref = dict(model.named_parameters()), dict(ref.named_parameters())
    assert params.keys() == params_ref.keys()
    names = list(params)
    g = torch.autograd.grad(_weighted_sum(logits, 1), [params[n] for n in names])
    g_ref = torch.autograd.grad(_weighted_sum(logits_ref, 1), [params_ref[n] for n in names])
    _assert_grads_equal(g, g_ref, names)


def test_hf_loss_of_the_lstm_copy_is_cross_entropy_of_the_models_logits():
    torch.manual_seed(0)
    model = LSTMSeq2Seq(SRC_VOCAB, TGT_VOCAB, emb=8, hidden=12, layers=2, dropout=0.0,
                        backend="torch", dtype=torch.float64)
    src, lengths, tgt_in, tgt_out = _batch(6)
    loss = hf_loss(cudnn_lstm_seq2seq(model), src, lengths, tgt_in, tgt_out,
                   label_smoothing=0.1, reduction="none")
    logits = model(src, lengths, tgt_in)
    ref = F.cross_entropy(logits.reshape(-1, TGT_VOCAB), tgt_out.reshape(-1), ignore_index=PAD,
                          label_smoothing=0.1, reduction="none").reshape(tgt_out.shape)
    assert (loss[tgt_out == PAD] == 0).all()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)


def test_cudnn_lstm_seq2seq_shares_no_parameter_with_the_model():
    torch.manual_seed(0)
    model = LSTMSeq2Seq(SRC_VOCAB, TGT_VOCAB, emb=8, hidden=12, layers=2, dropout=0.0,
                        backend="torch", dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = cudnn_lstm_seq2seq(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(1.0)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert not {p.data_ptr() for p in model.parameters()} & {p.data_ptr()
                                                             for p in ref.parameters()}


# ----------------------------------------------------------------------------------------
# Transformer

D_MODEL, HEADS, FFN = 32, 2, 48
# the model's parameter names -> torch's layers' (written here, not imported, so that a wrong
# map in the module shows)
NAMES = {"ffn.linear1": "linear1", "ffn.linear2": "linear2", "cross_attn": "multihead_attn",
         ".norm.": "."}


def _transformer(tie, **kw):
    args = dict(d_model=D_MODEL, heads=HEADS, layers=2, ffn=FFN, dropout=0.0, backend="torch",
                tie_embeddings=tie, pad_id=PAD, bos_id=BOS, eos_id=EOS, dtype=torch.float64)
    args.update(kw)
    torch.manual_seed(0)
    model = Seq2SeqTransformer(SRC_VOCAB, TGT_VOCAB, **args)
    with torch.no_grad():   # non-zero biases, so that a dropped bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    # training mode: torch's encoder layers take no inference fast path
    return model.train()


def _torch_name(name):
    for a, b in NAMES.items():
        name = name.replace(a, b)
    return name


@pytest.mark.parametrize("tie", [True, False])
def test_torch_transformer_logits_and_gradients_equal_the_models(tie):
    model = _transformer(tie)
    ref = TorchTransformerSeq2Seq.from_fastbert(model)
    assert ref.training
    assert (ref.out.weight is ref.tgt_embed.weight) == tie
    assert (ref.pad_id, ref.bos_id, ref.eos_id) == (PAD, BOS, EOS)
    src, lengths, tgt_in, _ = _batch(2)
    logits = model(src, lengths, tgt_in)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no mask-type (or other) warning from torch's layers
        logits_ref = ref(src, lengths, tgt_in)
    torch.testing.assert_close(logits_ref, logits, rtol=1e-10, atol=1e-10)
    names = [n for n, _ in model.named_parameters()]
    params_ref = dict(ref.named_parameters())
    assert sorted(map(_torch_name, names)) == sorted(params_ref)
    g = torch.autograd.grad(_weighted_sum(logits, 3), list(model.parameters()))
    g_ref = torch.autograd.grad(_weighted_sum(logits_ref, 3),
                                [params_ref[_torch_name(n)] for n in names])
    _assert_grads_equal(g, g_ref, names)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_torch_transformer_loss_is_cross_entropy_of_the_models_logits(reduction, smoothing):
    model = _transformer(True)
    ref = TorchTransformerSeq2Seq.from_fastbert(model)
    src, lengths, tgt_in, tgt_out = _batch(4)
    loss_ref = ref.loss(src, lengths, tgt_in, tgt_out, label_smoothing=smoothing,
                        reduction=reduction)
    logits = model(src, lengths, tgt_in)
    loss = F.cross_entropy(logits.reshape(-1, TGT_VOCAB), tgt_out.reshape(-1), ignore_index=PAD,
                           label_smoothing=smoothing, reduction=reduction)
    if reduction == "none":
        loss = loss.reshape(tgt_out.shape)
        assert (loss_ref[tgt_out == PAD] == 0).all()
    torch.testing.assert_close(loss_ref, loss, rtol=1e-10, atol=1e-10)
    names = [n for n, _ in model.named_parameters()]
    params_ref = dict(ref.named_parameters())
    g = torch.autograd.grad(loss.sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(loss_ref.sum(), [params_ref[_torch_name(n)] for n in names])
    _assert_grads_equal(g, g_ref, names)


def test_torch_transformer_takes_the_models_settings_and_agrees_in_eval_mode(monkeypatch):
    """dropout, attention dropout, eps, ffn width and depths come from the model; with
    dropout on, eval mode agrees (torch's FFN dropout is off there too), also under no_grad
    where torch's encoder layers take their fused inference path."""
    fused = []
    fwd = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd",
                        lambda *a, **k: fused.append(1) or fwd(*a, **k))
    model = _transformer(False, dropout=0.2, attention_dropout=0.3, eps=1e-6, layers=1,
                         decoder_layers=2)
    ref = TorchTransformerSeq2Seq.from_fastbert(model.eval())
    assert not ref.training
    assert len(ref.encoder) == 1 and len(ref.decoder) == 2
    for layer in list(ref.encoder) + list(ref.decoder):
        assert layer.linear1.out_features == FFN
        assert layer.dropout1.p == layer.dropout.p == 0.2
        assert layer.self_attn.dropout == 0.3
        assert layer.norm1.eps == 1e-6
    assert ref.decoder[0].multihead_attn.dropout == 0.3
    src, lengths, tgt_in, _ = _batch(5)
    logits = model(src, lengths, tgt_in)
    torch.testing.assert_close(ref(src, lengths, tgt_in), logits, rtol=1e-10, atol=1e-10)
    assert not fused
    with torch.no_grad():
        torch.testing.assert_close(ref(src, lengths, tgt_in), logits, rtol=1e-10, atol=1e-10)
    assert len(fused) == len(ref.encoder)
    # and in training mode dropout applies
    ref.train()
    assert not torch.allclose(ref(src, lengths, tgt_in), logits)
