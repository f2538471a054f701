"""The references ``bench_translation`` trains beside fastbert's translation models: the same
weights, run the way a user without fastbert would run them.

- ``cudnn_lstm_seq2seq(model)``: a copy of an ``LSTMSeq2Seq`` whose encoder and decoder are
  ``torch.nn.LSTM`` (cuDNN on CUDA), the ragged source going through torch's
  ``PackedSequence`` path (``pack_padded_sequence`` -> LSTM -> ``pad_packed_sequence``).
- ``TorchTransformerSeq2Seq.from_fastbert(model)``: a ``Seq2SeqTransformer``'s weights in
  torch's own ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (post-LN, GELU,
  batch_first: ``nn.MultiheadAttention`` on SDPA).
- ``hf_loss(model, ...)`` (``TorchTransformerSeq2Seq.loss``): the loss the Hugging Face way,
  every position projected onto the vocabulary, then ``F.cross_entropy`` with ``ignore_index``;
  for the LSTM copy too (a fastbert model's own ``loss`` is the fused, non-pad-only one).

Both compute what the fastbert model computes (tests/test_translation_refs.py checks logits
and gradients in fp64), so a benchmark may start both from the same initial weights and
compare their training speed. Neither checks its inputs (no host reads of ids or lengths
beyond what torch's own path does).
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastbert.models import LSTMSeq2Seq, Seq2SeqTransformer
from fastbert.models.transformer_seq2seq import sinusoidal_positions

# fastbert's Seq2SeqTransformer parameter names -> torch's layers' (tests/models/
# test_transformer_seq2seq.py's _torch_layers): the embeddings and the output layer keep theirs
_TORCH_NAMES = (("ffn.linear1", "linear1"), ("ffn.linear2", "linear2"),
                ("cross_attn", "multihead_attn"), (".norm.", "."))


class CudnnLSTM(torch.nn.LSTM):
    """``torch.nn.LSTM`` whose forward also takes fastbert.nn.LSTM's ``lengths=`` and
    ``enforce_sorted=``: a padded batch with lengths runs torch's PackedSequence path (the
    lengths copied to the CPU, as pack_padded_sequence requires: a host read of CUDA lengths)
    and comes back padded to the input's length, zeros past each length, with h_n / c_n from
    each sequence's last valid step -- what fastbert.nn.LSTM returns. Without lengths it is
    ``torch.nn.LSTM.forward``. Lengths must be >= 1 (pack_padded_sequence refuses 0)."""

    def forward(self, input, hx=None, *, lengths=None, enforce_sorted: bool = True):
        if lengths is None:
            return super().forward(input, hx)
        if not isinstance(input, Tensor) or input.dim() != 3:
            raise ValueError("lengths needs a batched (3-D) padded input")
        total_length = input.shape[1 if self.batch_first else 0]
        lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
        packed = pack_padded_sequence(input, lengths, batch_first=self.batch_first,
                                      enforce_sorted=enforce_sorted)
        output, state = super().forward(packed, hx)
        output, _ = pad_packed_sequence(output, batch_first=self.batch_first,
                                        total_length=total_length)
        return output, state


def cudnn_lstm(lstm: torch.nn.Module) -> CudnnLSTM:
    """A CudnnLSTM with ``lstm``'s constructor arguments, weights (a copy), dtype, device and
    mode. A LayerNormLSTM has no torch counterpart: its extra weights fail the strict load."""
    w = lstm.weight_ih_l0
    ref = CudnnLSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers, bias=lstm.bias,
                    batch_first=lstm.batch_first, dropout=lstm.dropout,
                    bidirectional=lstm.bidirectional, proj_size=lstm.proj_size,
                    device=w.device, dtype=w.dtype)
    ref.load_state_dict(lstm.state_dict())
    return ref.train(lstm.training)


def cudnn_lstm_seq2seq(model: LSTMSeq2Seq) -> LSTMSeq2Seq:
    """A deep copy of ``model`` with its encoder and decoder (fastbert.nn.LSTM) replaced by
    ``CudnnLSTM`` holding the same weights; it shares no parameter with ``model``. The rest of
    the model (embeddings, attention, output layer, decoding) is the model's own code."""
    ref = copy.deepcopy(model)
    ref.encoder = cudnn_lstm(model.encoder)
    ref.decoder = cudnn_lstm(model.decoder)
    return ref


class TorchTransformerSeq2Seq(torch.nn.Module):
    """Seq2SeqTransformer's encoder-decoder on torch's ``nn.TransformerEncoderLayer`` /
    ``nn.TransformerDecoderLayer`` (``activation="gelu"``, ``norm_first=False``,
    ``batch_first=True``), with the model's embeddings (scaled by sqrt(d_model), plus
    ``sinusoidal_positions``, then dropout) and output layer (tied to the target embedding:
    the same Parameter). Build it with ``from_fastbert``; the arguments are the model's.

    The layers are held in ``nn.ModuleList``s named as the model's (``encoder.0.self_attn``...,
    so its state_dict loads after a few renames), not in ``nn.TransformerEncoder`` (whose
    eval-mode nested-tensor path zeroes the padded rows). Each ``nn.MultiheadAttention``'s
    dropout is set to the model's ``attention_dropout``.

    Known difference, not a bug: torch's layers also drop out the feed-forward's GELU output
    (``layer.dropout``); fastbert's, as BERT's, do not. So with dropout > 0 in training mode
    the two compute different functions (the same cost, give or take one dropout); in eval
    mode, or with dropout 0, they agree. In eval mode under ``torch.no_grad`` torch's encoder
    layers take their fused inference path (``torch._transformer_encoder_layer_fwd``): the
    same logits (tested; it does not zero the padded rows, nor would that reach the logits).
    ``loss`` with reduction "mean" on a batch without target tokens is NaN (F.cross_entropy's),
    where the model's is 0.0.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int, heads: int, layers: int,
                 ffn: int, dropout: float, *, attention_dropout: Optional[float] = None,
                 decoder_layers: Optional[int] = None, pad_id: int = 0, bos_id: int = 1,
                 eos_id: int = 2, tie_embeddings: bool = True, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.dropout = d_model, float(dropout)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.src_embed = torch.nn.Embedding(src_vocab, d_model, padding_idx=pad_id, **factory)
        self.tgt_embed = torch.nn.Embedding(tgt_vocab, d_model, padding_idx=pad_id, **factory)
        kw = dict(dim_feedforward=ffn, dropout=dropout, activation="gelu", layer_norm_eps=eps,
                  batch_first=True, norm_first=False, **factory)
        self.encoder = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d_model, heads, **kw) for _ in range(layers))
        self.decoder = torch.nn.ModuleList(
            torch.nn.TransformerDecoderLayer(d_model, heads, **kw)
            for _ in range(layers if decoder_layers is None else decoder_layers))
        p_attn = dropout if attention_dropout is None else attention_dropout
        for layer in list(self.encoder) + list(self.decoder):
            for attn in (layer.self_attn, getattr(layer, "multihead_attn", None)):
                if attn is not None:
                    attn.dropout = float(p_attn)
        self.out = torch.nn.Linear(d_model, tgt_vocab, **factory)
        if tie_embeddings:
            self.out.weight = self.tgt_embed.weight

    @classmethod
    def from_fastbert(cls, model: Seq2SeqTransformer) -> "TorchTransformerSeq2Seq":
        """The reference holding a copy of ``model``'s weights, in its dtype, device and mode."""
        w = model.src_embed.weight
        tied = model.out.weight is model.tgt_embed.weight
        ref = cls(model.src_vocab, model.tgt_vocab, model.d_model, model.heads,
                  len(model.encoder), model.encoder[0].ffn.linear1.out_features, model.dropout,
                  attention_dropout=model.attention_dropout, decoder_layers=len(model.decoder),
                  pad_id=model.pad_id, bos_id=model.bos_id, eos_id=model.eos_id,
                  tie_embeddings=tied, eps=model.encoder[0].norm1.norm.eps,
                  device=w.device, dtype=w.dtype)
        state = {}
        for key, value in model.state_dict().items():
            for ours, theirs in _TORCH_NAMES:
                key = key.replace(ours, theirs)
            state[key] = value
        if tied:   # the model's tied output keeps no weight of its own in its state_dict
            state["out.weight"] = state["tgt_embed.weight"]
        ref.load_state_dict(state)
        return ref.train(model.training)

    def _embed(self, emb: torch.nn.Embedding, ids: Tensor) -> Tensor:
        x = emb(ids) * math.sqrt(self.d_model)
        x = x + sinusoidal_positions(ids.shape[1], self.d_model, x.device, x.dtype)
        return F.dropout(x, self.dropout, self.training)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S) ids, src_lengths (B,) in [1, S], tgt_in (B, T) ids -> logits (B, T, V)."""
        return self.decode(tgt_in, *self.encode(src, src_lengths))

    def encode(self, src: Tensor, src_lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """The encoder's memory (B, S, d_model) and the source padding mask (B, S), True on
        padding (what ``decode`` takes)."""
        lens = src_lengths.to(src.device, non_blocking=src.is_cuda)
        # a bool key padding mask (True = padding), and no attention mask beside it in the
        # same attention: torch warns when the two differ in type
        src_pad = torch.arange(src.shape[1], device=src.device)[None, :] >= lens[:, None]
        memory = self._embed(self.src_embed, src)
        for layer in self.encoder:
            memory = layer(memory, src_key_padding_mask=src_pad)
        return memory, src_pad

    def decode(self, tgt_in: Tensor, memory: Tensor, src_pad: Tensor) -> Tensor:
        """Logits (B, T, V) of the decoder over tgt_in (B, T), attending to ``encode``'s
        memory (no key / value cache: a decoding loop reruns the whole prefix)."""
        y = self._embed(self.tgt_embed, tgt_in)
        # tgt_is_causal is a hint: MultiheadAttention still wants the mask, and without a
        # target padding mask hands SDPA is_causal=True instead of it
        causal = torch.nn.Transformer.generate_square_subsequent_mask(
            tgt_in.shape[1], device=y.device, dtype=y.dtype)
        for layer in self.decoder:
            y = layer(y, memory, tgt_mask=causal, memory_key_padding_mask=src_pad,
                      tgt_is_causal=True)
        return self.out(y)

    def loss(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, tgt_out: Tensor, *,
             label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
        """``hf_loss(self, ...)``: every position projected, then F.cross_entropy."""
        return hf_loss(self, src, src_lengths, tgt_in, tgt_out, label_smoothing=label_smoothing,
                       reduction=reduction)


def hf_loss(model: torch.nn.Module, src: Tensor, src_lengths: Tensor, tgt_in: Tensor,
            tgt_out: Tensor, *, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """The training loss the Hugging Face way, for any of these models (``forward`` -> logits,
    ``pad_id``): every position's logits (B, T, V) kept for the backward, then F.cross_entropy
    with ``ignore_index=pad_id``; reduction "none" gives (B, T). (The fastbert models' ``loss``
    projects only the non-pad positions, fused with the cross-entropy.)"""
    logits = model(src, src_lengths, tgt_in)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1),
                           ignore_index=model.pad_id, label_smoothing=label_smoothing,
                           reduction=reduction)
    return loss.reshape(tgt_out.shape) if reduction == "none" else loss
