"""``Seq2SeqTransformer``: the Transformer encoder-decoder, on fastbert's fused ops.

The model of "Attention Is All You Need" (post-LayerNorm, as the paper and BERT), with GELU
in the feed-forward blocks (BERT's; the paper used ReLU) and the same interface as
``LSTMSeq2Seq`` (``forward(src, src_lengths, tgt_in)`` -> logits, ``greedy_decode``,
``beam_search``), so the two can be trained and compared on the same data.

Per layer, every piece is a fastbert op:
- self-attention and (decoder) cross-attention: ``fastbert.ops.attention`` with the source's
  padding mask on the keys (and ``causal=True`` in the decoder's self-attention); the
  attention-probability dropout happens inside the kernel;
- the epilogue after each attention and feed-forward output projection,
  ``LayerNorm(dropout(x W^T + b) + residual)``: one ``fastbert.ops.layer_norm`` (the projection
  bias, dropout, residual add and LayerNorm fused);
- the feed-forward activation ``GELU(x W1^T + b1)``: ``fastbert.ops.bias_gelu``.
The projections themselves are cuBLAS GEMMs. A layer computes what torch's
``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (``activation="gelu"``,
``norm_first=False``, ``batch_first=True``) compute with the same weights (the tests load
them) without dropout (torch's layers also drop out the feed-forward's GELU output; these, as
BERT's, do not); ``attn_in_proj_*`` holds the query, key and value projections stacked as
``nn.MultiheadAttention``'s ``in_proj_weight``.

Token embeddings are scaled by sqrt(d_model) and summed with sinusoidal positions (computed
for any length: there is no position table to outgrow). The output projection is tied to the
target embedding by default (``tie_embeddings``). ``loss`` computes the training loss through
``fastbert.ops.masked_lm_loss``: only the target's non-pad positions are projected onto the
vocabulary, fused with the cross-entropy, so no (tokens, V) logits are kept.

Decoding runs one position a step with a key / value cache: each decoder layer's
self-attention keys and values of the positions so far (the decoding state, reordered with the
beams), and its cross-attention keys and values of the encoder's memory, computed once. The
tests check that step-wise decoding gives the teacher-forced logits.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..ops._checks import check_tensor
from ._seq2seq import INDEX_DTYPES, Seq2SeqBase, check_positive_ints, check_special_ids


def sinusoidal_positions(n: int, d_model: int, device=None, dtype=None, start: int = 0) -> Tensor:
    """(n, d_model) sinusoidal position encodings of positions start .. start + n - 1
    (Vaswani et al.: sin on even dimensions, cos on odd ones, wavelengths 2 pi to
    10000 * 2 pi), computed in float64."""
    pos = torch.arange(start, start + n, dtype=torch.float64, device=device)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
                    * (-math.log(10000.0) / d_model))
    pe = torch.zeros(n, d_model, dtype=torch.float64, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
    return pe.to(dtype or torch.get_default_dtype())


class _Attention(torch.nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameters (``in_proj_weight`` /
    ``in_proj_bias`` stacking q, k, v; ``out_proj``), whose output projection's bias is left
    to the fused epilogue that follows."""

    def __init__(self, d_model: int, heads: int, factory: dict):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = torch.nn.Parameter(torch.empty(3 * d_model, d_model, **factory))
        self.in_proj_bias = torch.nn.Parameter(torch.empty(3 * d_model, **factory))
        self.out_proj = torch.nn.Linear(d_model, d_model, **factory)
        torch.nn.init.xavier_uniform_(self.in_proj_weight)
        torch.nn.init.zeros_(self.in_proj_bias)
        torch.nn.init.zeros_(self.out_proj.bias)

    def _split(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.heads, t.shape[2] // self.heads)

    def qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Self-attention's q, k, v of x (B, T, D), each (B, T, heads, D / heads)."""
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self._split(q), self._split(k), self._split(v)

    def q(self, x: Tensor) -> Tensor:
        d_model = x.shape[-1]
        return self._split(F.linear(x, self.in_proj_weight[:d_model],
                                    self.in_proj_bias[:d_model]))

    def kv(self, memory: Tensor) -> Tuple[Tensor, Tensor]:
        """Cross-attention's keys and values of memory (B, S, D), each (B, S, heads, D / heads)."""
        d_model = memory.shape[-1]
        k, v = F.linear(memory, self.in_proj_weight[d_model:],
                        self.in_proj_bias[d_model:]).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool,
               dropout_p: float, backend: Optional[str]) -> Tensor:
        """Attention of q (B, T, heads, Dh) over k, v (B, S, heads, Dh); key_mask (B, S) bool,
        True = attend. Returns the output projection without its bias, (B, T, heads * Dh)."""
        out = ops.attention(q, k, v, attention_mask=key_mask, causal=causal,
                            dropout_p=dropout_p, backend=backend)
        return F.linear(out.flatten(2), self.out_proj.weight)


class _Epilogue(torch.nn.Module):
    """LayerNorm(dropout(x + bias) + residual) as one fastbert.ops.layer_norm."""

    def __init__(self, d_model: int, eps: float, factory: dict):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d_model, eps=eps, **factory)

    def forward(self, x: Tensor, bias: Tensor, residual: Tensor, dropout_p: float,
                backend: Optional[str]) -> Tensor:
        return ops.layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps,
                              residual=residual, x_bias=bias, dropout_p=dropout_p,
                              training=dropout_p > 0.0, backend=backend)


class _FeedForward(torch.nn.Module):
    def __init__(self, d_model: int, ffn: int, factory: dict):
        super().__init__()
        self.linear1 = torch.nn.Linear(d_model, ffn, **factory)
        self.linear2 = torch.nn.Linear(ffn, d_model, **factory)

    def forward(self, x: Tensor, backend: Optional[str]) -> Tensor:
        """GELU(x W1^T + b1) W2^T, without the second bias (the epilogue adds it)."""
        h = ops.bias_gelu(F.linear(x, self.linear1.weight), self.linear1.bias, backend=backend)
        return F.linear(h, self.linear2.weight)


class _TiedOutput(torch.nn.Module):
    """The output projection whose weight is the target embedding's (read through the
    embedding module at every call, not a shared Parameter object: ``to_empty``,
    ``skip_init`` and ``_apply`` replace parameters one by one and would untie a shared one).
    Its own parameter is the bias; ``weight`` is the embedding's."""

    def __init__(self, embedding: torch.nn.Embedding, factory: dict):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)   # not a submodule: no second key
        self.bias = torch.nn.Parameter(torch.zeros(embedding.num_embeddings, **factory))

    @property
    def weight(self) -> Tensor:
        return self._embedding.weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class _EncoderLayer(torch.nn.Module):
    def __init__(self, d_model, heads, ffn, eps, factory):
        super().__init__()
        self.self_attn = _Attention(d_model, heads, factory)
        self.ffn = _FeedForward(d_model, ffn, factory)
        self.norm1 = _Epilogue(d_model, eps, factory)
        self.norm2 = _Epilogue(d_model, eps, factory)

    def forward(self, x, src_mask, p_attn, p, backend):
        a = self.self_attn.attend(*self.self_attn.qkv(x), src_mask, False, p_attn, backend)
        x = self.norm1(a, self.self_attn.out_proj.bias, x, p, backend)
        return self.norm2(self.ffn(x, backend), self.ffn.linear2.bias, x, p, backend)


class _DecoderLayer(torch.nn.Module):
    def __init__(self, d_model, heads, ffn, eps, factory):
        super().__init__()
        self.self_attn = _Attention(d_model, heads, factory)
        self.cross_attn = _Attention(d_model, heads, factory)
        self.ffn = _FeedForward(d_model, ffn, factory)
        self.norm1 = _Epilogue(d_model, eps, factory)
        self.norm2 = _Epilogue(d_model, eps, factory)
        self.norm3 = _Epilogue(d_model, eps, factory)

    def forward(self, y, cross_kv, src_mask, p_attn, p, backend, cache=None):
        """y (B, T, D) -> (B, T, D). ``cross_kv``: the cross-attention's keys and values of
        the encoder's memory. ``cache``: the self-attention's keys and values of the earlier
        positions (decoding one position at a time, T = 1), returned extended with y's;
        without it the positions of y attend causally among themselves."""
        q, k, v = self.self_attn.qkv(y)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=1), torch.cat([cache[1], v], dim=1)
        # causal self-attention: a target position sees itself and those before it (right
        # padding is never seen by a real position, so no target mask is needed); with a
        # cache the one query sees every cached key
        a = self.self_attn.attend(q, k, v, None, cache is None, p_attn, backend)
        y = self.norm1(a, self.self_attn.out_proj.bias, y, p, backend)
        a = self.cross_attn.attend(self.cross_attn.q(y), *cross_kv, src_mask, False, p_attn,
                                   backend)
        y = self.norm2(a, self.cross_attn.out_proj.bias, y, p, backend)
        y = self.norm3(self.ffn(y, backend), self.ffn.linear2.bias, y, p, backend)
        return y, (k, v)


class Seq2SeqTransformer(Seq2SeqBase):
    """Transformer encoder-decoder (module docstring).

    Args:
        src_vocab, tgt_vocab: vocabulary sizes.
        d_model: model width; heads: attention heads (d_model / heads must be a head size the
            attention kernels take: 16, 32, 64, 80, 96 or 128; the torch backend takes any).
        layers: encoder and decoder depth (``decoder_layers`` sets the decoder's apart).
        ffn: feed-forward width (default 4 * d_model).
        dropout: on the embeddings and in every epilogue (residual dropout);
            ``attention_dropout`` (default ``dropout``) on the attention probabilities.
        pad_id, bos_id, eos_id: special token ids of the target (pad_id also of the source).
        tie_embeddings: the output projection's weight is the target embedding.
        eps: the LayerNorms' epsilon.
        backend: passed to every fastbert op ("triton", "torch" or None for auto).
        check_ids: check that src / tgt_in hold ids inside the vocabularies at every call (one
            host read of the ids on the GPU). An attribute too.
        device, dtype: where and in which floating dtype the parameters are created.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int = 512, heads: int = 8,
                 layers: int = 6, ffn: Optional[int] = None, dropout: float = 0.1, *,
                 attention_dropout: Optional[float] = None,
                 decoder_layers: Optional[int] = None, pad_id: int = 0, bos_id: int = 1,
                 eos_id: int = 2, tie_embeddings: bool = True, eps: float = 1e-5,
                 backend: Optional[str] = None, check_ids: bool = True, device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        ffn = 4 * d_model if ffn is None else ffn
        decoder_layers = layers if decoder_layers is None else decoder_layers
        check_positive_ints(src_vocab=src_vocab, tgt_vocab=tgt_vocab, d_model=d_model,
                            heads=heads, layers=layers, decoder_layers=decoder_layers, ffn=ffn)
        if d_model % heads:
            raise ValueError(f"heads must divide d_model, got d_model={d_model}, heads={heads}")
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        for name, p in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        check_special_ids(pad_id, bos_id, eos_id, src_vocab, tgt_vocab)
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.d_model, self.heads = d_model, heads
        self.dropout, self.attention_dropout = float(dropout), float(attention_dropout)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.backend = backend
        self.check_ids = bool(check_ids)
        self.src_embed = torch.nn.Embedding(src_vocab, d_model, padding_idx=pad_id, **factory)
        self.tgt_embed = torch.nn.Embedding(tgt_vocab, d_model, padding_idx=pad_id, **factory)
        for emb in (self.src_embed, self.tgt_embed):
            torch.nn.init.normal_(emb.weight, std=d_model ** -0.5)
            with torch.no_grad():
                emb.weight[pad_id].zero_()
        self.encoder = torch.nn.ModuleList(
            _EncoderLayer(d_model, heads, ffn, eps, factory) for _ in range(layers))
        self.decoder = torch.nn.ModuleList(
            _DecoderLayer(d_model, heads, ffn, eps, factory) for _ in range(decoder_layers))
        if tie_embeddings:
            self.out = _TiedOutput(self.tgt_embed, factory)
        else:
            self.out = torch.nn.Linear(d_model, tgt_vocab, **factory)
            torch.nn.init.zeros_(self.out.bias)

    # ------------------------------------------------------------------------------------
    # building blocks

    def _p(self, p: float) -> float:
        return p if self.training else 0.0

    def _embed(self, emb: torch.nn.Embedding, ids: Tensor, start: int = 0) -> Tensor:
        x = emb(ids) * math.sqrt(self.d_model)
        x = x + sinusoidal_positions(ids.shape[1], self.d_model, x.device, x.dtype, start)
        return F.dropout(x, self._p(self.dropout), self.training)

    def _src_mask(self, src: Tensor, src_lengths: Tensor) -> Tensor:
        lens = src_lengths.to(src.device, non_blocking=src.is_cuda)
        return torch.arange(src.shape[1], device=src.device)[None, :] < lens[:, None]

    def _encode(self, src: Tensor, src_lengths: Tensor) -> Tuple[Tensor, Tensor]:
        mask = self._src_mask(src, src_lengths)
        x = self._embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, mask, self._p(self.attention_dropout), self._p(self.dropout),
                      self.backend)
        return x, mask

    def _decode(self, tgt_in: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        y = self._embed(self.tgt_embed, tgt_in)
        for layer in self.decoder:
            y, _ = layer(y, layer.cross_attn.kv(memory), mask, self._p(self.attention_dropout),
                         self._p(self.dropout), self.backend)
        return y

    def encode(self, src: Tensor, src_lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """src (B, S) ids, src_lengths (B,) in [1, S] -> memory (B, S, d_model) and the
        source mask (B, S) bool (True on real tokens)."""
        self._check_inputs(src, src_lengths)
        return self._encode(src, src_lengths)

    def _start(self, src: Tensor, src_lengths: Tensor):
        memory, mask = self.encode(src, src_lengths)
        cross = [t for layer in self.decoder for t in layer.cross_attn.kv(memory)]
        return (memory, mask, *cross), self.empty_cache(memory)

    def empty_cache(self, memory: Tensor) -> Tuple[Tensor, ...]:
        """The decoding state before the first step: per decoder layer, its self-attention's
        keys and values of no position yet, (B, 0, heads, d_model / heads) each."""
        shape = (memory.shape[0], 0, self.heads, self.d_model // self.heads)
        return tuple(memory.new_empty(shape) for _ in range(2 * len(self.decoder)))

    def decode_step(self, y_prev: Tensor, state: Tuple[Tensor, ...], memory: Tensor,
                    mask: Tensor, *cross: Tensor) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """One decoding step with a key / value cache: y_prev (B,) ids at the next position
        (the cache's length) -> logits (B, V) of the token after it, and the cache extended
        by that position. ``state``: ``empty_cache(memory)`` at the first step, then what the
        previous step returned; ``cross``: each decoder layer's cross-attention keys and
        values of memory (computed here when not given). The ids are not range-checked
        here."""
        self._check_y_prev(y_prev, memory.shape[0])
        if len(state) != 2 * len(self.decoder):
            raise ValueError(f"state must hold {2 * len(self.decoder)} tensors (keys and values "
                             f"of each decoder layer: empty_cache), got {len(state)}")
        if not cross:
            cross = [t for layer in self.decoder for t in layer.cross_attn.kv(memory)]
        y = self._embed(self.tgt_embed, y_prev[:, None], start=state[0].shape[1])
        new_state = []
        for i, layer in enumerate(self.decoder):
            y, kv = layer(y, cross[2 * i: 2 * i + 2], mask, self._p(self.attention_dropout),
                          self._p(self.dropout), self.backend, cache=state[2 * i: 2 * i + 2])
            new_state += kv
        return self.out(y[:, 0]), tuple(new_state)

    # ------------------------------------------------------------------------------------
    # public API

    def decoder_states(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """The decoder's last hidden states (B, T, d_model), before the output projection."""
        check_tensor("tgt_in", tgt_in, dtypes=INDEX_DTYPES, ndim=(2,))   # required here
        self._check_inputs(src, src_lengths, tgt_in)
        memory, mask = self._encode(src, src_lengths)
        return self._decode(tgt_in, memory, mask)
