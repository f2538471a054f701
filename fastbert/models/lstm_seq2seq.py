"""``LSTMSeq2Seq``: the attention LSTM translation model the Transformer replaced.

Bidirectional LSTM encoder, LSTM decoder with Luong ("general" score) or Bahdanau (additive)
attention, teacher-forced ``forward``, the training ``loss`` (fastbert.ops.masked_lm_loss:
only non-pad targets projected onto the vocabulary) and greedy / beam-search decoding; both
LSTMs are ``fastbert.nn.LSTM`` (fused Triton recurrence on CUDA, variable source lengths
inside the kernel).

- Luong attention without input feeding: the decoder LSTM does not see the attention
  output, so under teacher forcing the whole target runs through the fused LSTM in one call
  and attention is two batched matmuls.
- Bahdanau attention: the additive score, with the context computed from the previous
  decoder state (top layer) as part of the decoder input, so teacher forcing runs step by
  step. The rest of the model is the Luong one shared by both: the output layer is
  ``tanh(W_c [context; state])`` (not Bahdanau's deep output from the state, the previous
  token and the context) and the decoder starts from the encoder's final states below (not
  ``tanh(W_s h_backward)``).

The encoder has ``hidden // 2`` units per direction; its final forward and backward states
are concatenated per layer to initialize the decoder (``hidden`` units, same depth).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..nn import LSTM
from ..ops._checks import check_tensor
from ._seq2seq import INDEX_DTYPES, Seq2SeqBase, check_positive_ints, check_special_ids

ATTENTIONS = ("luong", "bahdanau")

State = Tuple[Tensor, Tensor]


class LSTMSeq2Seq(Seq2SeqBase):
    """Attention LSTM encoder-decoder.

    Args:
        src_vocab, tgt_vocab: vocabulary sizes.
        emb: embedding size; hidden: decoder size (the encoder has hidden // 2 per direction).
        layers: depth of encoder and decoder.
        attention: "luong" or "bahdanau".
        dropout: on embeddings, between LSTM layers and before the output projection.
        pad_id, bos_id, eos_id: special token ids of the target (pad_id also of the source).
        backend: passed to the LSTMs and to ``loss``'s masked_lm_loss ("triton", "torch" or
            None for auto). The attribute ``backend`` is the loss's; each LSTM keeps its own.
        check_ids: check that src / tgt_in hold ids inside the vocabularies at every call (a
            clear ValueError; one host read of the ids per call on the GPU, a device-side
            assert while a CUDA graph is captured). False skips it: an out-of-range id is
            then nn.Embedding's error (a device-side assert on the GPU). An attribute too.
        device, dtype: where and in which floating dtype the parameters are created (torch's
            factory keywords, as every torch.nn layer: ``torch.nn.utils.skip_init`` and
            ``device="meta"`` construction take them).
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, emb: int = 256, hidden: int = 512,
                 layers: int = 2, attention: str = "luong", dropout: float = 0.1, *,
                 pad_id: int = 0, bos_id: int = 1, eos_id: int = 2,
                 backend: Optional[str] = None, check_ids: bool = True,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        check_positive_ints(src_vocab=src_vocab, tgt_vocab=tgt_vocab, emb=emb, hidden=hidden,
                            layers=layers)
        if hidden % 2:
            raise ValueError(f"hidden must be even (the encoder has hidden // 2 units per "
                             f"direction), got {hidden}")
        check_special_ids(pad_id, bos_id, eos_id, src_vocab, tgt_vocab)
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.attention = attention
        self.hidden = hidden
        self.layers = layers
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.backend = backend
        self.check_ids = bool(check_ids)
        self.src_embed = torch.nn.Embedding(src_vocab, emb, padding_idx=pad_id, **factory)
        self.tgt_embed = torch.nn.Embedding(tgt_vocab, emb, padding_idx=pad_id, **factory)
        between = dropout if layers > 1 else 0.0  # LSTM dropout acts between layers only
        self.encoder = LSTM(emb, hidden // 2, layers, batch_first=True, dropout=between,
                            bidirectional=True, backend=backend, **factory)
        dec_in = emb + (hidden if attention == "bahdanau" else 0)
        self.decoder = LSTM(dec_in, hidden, layers, batch_first=True, dropout=between,
                            backend=backend, **factory)
        if attention == "luong":
            self.attn_w = torch.nn.Linear(hidden, hidden, bias=False, **factory)  # s^T W h
        else:
            self.attn_query = torch.nn.Linear(hidden, hidden, bias=False, **factory)
            self.attn_key = torch.nn.Linear(hidden, hidden, bias=True, **factory)
            # score = v^T tanh(Ws + Uh)
            self.attn_v = torch.nn.Linear(hidden, 1, bias=False, **factory)
        self.combine = torch.nn.Linear(2 * hidden, hidden, bias=False, **factory)
        self.out = torch.nn.Linear(hidden, tgt_vocab, **factory)
        self.drop = torch.nn.Dropout(dropout)

    def __setstate__(self, state) -> None:
        """Unpickling a model saved before ``backend`` was an attribute (the loss's): None,
        the auto backend."""
        super().__setstate__(state)
        self.__dict__.setdefault("backend", None)

    # ------------------------------------------------------------------------------------
    # building blocks

    def encode(self, src: Tensor, src_lengths: Tensor):
        """src (B, S) ids, src_lengths (B,) in [1, S] -> memory (B, S, H), keys, mask (B, S),
        and the decoder's initial state ((layers, B, H), (layers, B, H))."""
        self._check_inputs(src, src_lengths)
        return self._encode(src, src_lengths)

    STATE_BATCH_DIM = 1   # (h, c): (layers, B, H)

    def _start(self, src: Tensor, src_lengths: Tensor):
        memory, keys, mask, state = self.encode(src, src_lengths)
        return (memory, keys, mask), state

    def _encode(self, src: Tensor, src_lengths: Tensor):
        n_batch, src_len = src.shape
        x = self.drop(self.src_embed(src))
        memory, (h, c) = self.encoder(x, lengths=src_lengths, enforce_sorted=False)
        # (2 * layers, B, H/2) -> (layers, B, H): concatenate the two directions per layer
        join = lambda s: s.view(self.layers, 2, n_batch, self.hidden // 2).transpose(1, 2).reshape(
            self.layers, n_batch, self.hidden)
        # host -> GPU without waiting (CPU lengths are refused by the encoder while a CUDA
        # graph is captured)
        lens = src_lengths.to(src.device, non_blocking=src.is_cuda)
        mask = torch.arange(src_len, device=src.device)[None, :] < lens[:, None]
        if self.attention == "luong":
            keys = self.attn_w(memory)
        else:
            keys = self.attn_key(memory)
        return memory, keys, mask, (join(h), join(c))

    def _attend(self, query: Tensor, memory: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """query (B, T, H) -> context (B, T, H) over the valid source positions."""
        if self.attention == "luong":
            scores = query @ keys.transpose(1, 2)  # (B, T, S)
        else:
            q = self.attn_query(query)  # (B, T, H)
            scores = self.attn_v(torch.tanh(q[:, :, None, :] + keys[:, None, :, :])).squeeze(-1)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1) @ memory

    def _hidden(self, dec: Tensor, ctx: Tensor) -> Tensor:
        """The output layer's input: dropout(tanh(W_c [context; state]))."""
        return self.drop(torch.tanh(self.combine(torch.cat([ctx, dec], dim=-1))))

    def _step(self, y_prev: Tensor, state: State, memory: Tensor, keys: Tensor,
              mask: Tensor) -> Tuple[Tensor, State]:
        """One decoder step: y_prev (B,) ids -> the output layer's input (B, 1, H), state."""
        e = self.drop(self.tgt_embed(y_prev))[:, None, :]  # (B, 1, E)
        if self.attention == "bahdanau":
            ctx = self._attend(state[0][-1][:, None, :], memory, keys, mask)
            out, state = self.decoder(torch.cat([e, ctx], dim=-1), state)
        else:
            out, state = self.decoder(e, state)
            ctx = self._attend(out, memory, keys, mask)
        return self._hidden(out, ctx), state

    def decode_step(self, y_prev: Tensor, state: State, memory: Tensor, keys: Tensor,
                    mask: Tensor) -> Tuple[Tensor, State]:
        """One decoder step: y_prev (B,) ids -> logits (B, V) and the new state.

        The ids are not range-checked here (the decoding loops call this at every step, and a
        check costs a host read): an id outside the target vocabulary raises nn.Embedding's
        IndexError (a device-side assert on CUDA). ``forward`` and the decoders check theirs."""
        self._check_y_prev(y_prev, state[0].shape[1])
        hidden, state = self._step(y_prev, state, memory, keys, mask)
        return self.out(hidden)[:, 0], state

    # ------------------------------------------------------------------------------------
    # public API

    def decoder_states(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """The output layer's inputs (B, T, hidden), dropout applied: ``forward`` without the
        projection onto the vocabulary (``loss`` projects only the non-pad positions)."""
        check_tensor("tgt_in", tgt_in, dtypes=INDEX_DTYPES, ndim=(2,))   # required here
        self._check_inputs(src, src_lengths, tgt_in)
        memory, keys, mask, state = self._encode(src, src_lengths)
        if self.attention == "luong":
            dec, _ = self.decoder(self.drop(self.tgt_embed(tgt_in)), state)  # (B, T, H)
            return self._hidden(dec, self._attend(dec, memory, keys, mask))
        steps = []
        for t in range(tgt_in.shape[1]):
            hidden, state = self._step(tgt_in[:, t], state, memory, keys, mask)
            steps.append(hidden)
        if not steps:   # an empty target: (B, 0, hidden), as the Luong path returns
            return self._hidden(memory[:, :0], memory[:, :0])
        return torch.cat(steps, dim=1)
