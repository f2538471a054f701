"""``LSTMSeq2Seq``: the attention LSTM translation model the Transformer replaced.

Bidirectional LSTM encoder, LSTM decoder with Luong ("general" score) or Bahdanau (additive)
attention, teacher-forced ``forward`` and greedy / beam-search decoding; both LSTMs are
``fastbert.nn.LSTM`` (fused Triton recurrence on CUDA, variable source lengths inside the
kernel).

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

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..nn import LSTM
from ..ops import _checks
from ..ops._checks import check_size, check_tensor
from ..ops.lstm import check_lengths

INDEX_DTYPES = (torch.int64, torch.int32)

ATTENTIONS = ("luong", "bahdanau")

State = Tuple[Tensor, Tensor]


class LSTMSeq2Seq(torch.nn.Module):
    """Attention LSTM encoder-decoder.

    Args:
        src_vocab, tgt_vocab: vocabulary sizes.
        emb: embedding size; hidden: decoder size (the encoder has hidden // 2 per direction).
        layers: depth of encoder and decoder.
        attention: "luong" or "bahdanau".
        dropout: on embeddings, between LSTM layers and before the output projection.
        pad_id, bos_id, eos_id: special token ids of the target (pad_id also of the source).
        backend: passed to the LSTMs ("triton", "torch" or None for auto).
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
        for name, n in (("src_vocab", src_vocab), ("tgt_vocab", tgt_vocab), ("emb", emb),
                        ("hidden", hidden), ("layers", layers)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if hidden % 2:
            raise ValueError(f"hidden must be even (the encoder has hidden // 2 units per "
                             f"direction), got {hidden}")
        # pad_id is the padding row of both embeddings; bos_id / eos_id are target tokens
        for name, i, n in (("pad_id", pad_id, min(src_vocab, tgt_vocab)),
                           ("bos_id", bos_id, tgt_vocab), ("eos_id", eos_id, tgt_vocab)):
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise ValueError(f"{name} must be a token id in [0, {n}), got {i!r}")
        if len({pad_id, bos_id, eos_id}) != 3:
            raise ValueError(f"pad_id, bos_id and eos_id must be three different ids (decoding "
                             f"never generates pad or bos, and stops at eos), got "
                             f"{pad_id}, {bos_id}, {eos_id}")
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.attention = attention
        self.hidden = hidden
        self.layers = layers
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
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

    # ------------------------------------------------------------------------------------
    # building blocks

    def _check_inputs(self, src: Tensor, src_lengths: Tensor,
                      tgt_in: Optional[Tensor] = None) -> None:
        """Shapes, dtypes and devices, and the values: src_lengths in [1, S], ids inside the
        vocabularies (an out-of-range id would be an IndexError deep in nn.Embedding, a
        device-side assert on the GPU). The values cost one host read of CUDA lengths and one
        of the ids (``check_ids``); both are skipped while torch.compile traces, and run on the
        device while a CUDA graph is captured (where src_lengths must be a CUDA tensor: host
        lengths would be replayed as captured). The encoder reads CUDA lengths once more (to
        pack the sequences); lengths on the CPU, as pack_padded_sequence takes them, cost no
        host read in eager mode."""
        device = self.src_embed.weight.device
        for name, t in (("src", src), ("tgt_in", tgt_in)):
            check_tensor(name, t, dtypes=INDEX_DTYPES, ndim=(2,), optional=name == "tgt_in")
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device}, expected {device} (the model's device)")
        n_batch, src_len = src.shape
        if tgt_in is not None:
            if tgt_in.shape[0] != n_batch:
                raise ValueError(f"tgt_in must have src's batch size {n_batch}, got shape "
                                 f"{tuple(tgt_in.shape)}")
        # src_lengths may live on the CPU (as pack_padded_sequence wants), but not in a capture
        if isinstance(src_lengths, Tensor) and src_lengths.is_cpu and _checks.capturing(src):
            raise RuntimeError("LSTMSeq2Seq: src_lengths on the CPU cannot be captured in a CUDA "
                               "graph (the graph would replay the values read at capture); "
                               "pass src_lengths as a CUDA tensor")
        check_lengths(src_lengths, n_batch, src_len, allow_zero=False, name="src_lengths")
        # skipped while torch.compile traces, and for meta / fake tensors (shape inference)
        if self.check_ids and not _checks.tracing() and _checks.has_values(src):
            self._check_ids(src, tgt_in)

    def _check_ids(self, src: Tensor, tgt_in: Optional[Tensor]) -> None:
        """src / tgt_in ids inside the vocabularies: one host read, or a device-side assert
        while a CUDA graph is captured."""
        ids = [("src", src, self.src_vocab)]
        if tgt_in is not None:
            ids.append(("tgt_in", tgt_in, self.tgt_vocab))
        ids = [c for c in ids if c[1].numel()]
        if not ids:
            return
        if _checks.capturing(src):
            for name, t, n in ids:
                torch._assert_async(((t >= 0) & (t < n)).all(),
                                    f"{name} must hold token ids in [0, {n})")
            return
        stats = torch.stack([torch.stack(torch.aminmax(t)).long() for _, t, _ in ids]).tolist()
        for (name, _, n), (lo, hi) in zip(ids, stats):
            if lo < 0 or hi >= n:
                raise ValueError(f"{name} must hold token ids in [0, {n}), got "
                                 f"{lo if lo < 0 else hi}")

    def encode(self, src: Tensor, src_lengths: Tensor):
        """src (B, S) ids, src_lengths (B,) in [1, S] -> memory (B, S, H), keys, mask (B, S),
        and the decoder's initial state ((layers, B, H), (layers, B, H))."""
        self._check_inputs(src, src_lengths)
        return self._encode(src, src_lengths)

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

    def _logits(self, dec: Tensor, ctx: Tensor) -> Tensor:
        h = torch.tanh(self.combine(torch.cat([ctx, dec], dim=-1)))
        return self.out(self.drop(h))

    def decode_step(self, y_prev: Tensor, state: State, memory: Tensor, keys: Tensor,
                    mask: Tensor) -> Tuple[Tensor, State]:
        """One decoder step: y_prev (B,) ids -> logits (B, V) and the new state.

        The ids are not range-checked here (the decoding loops call this at every step, and a
        check costs a host read): an id outside the target vocabulary raises nn.Embedding's
        IndexError (a device-side assert on CUDA). ``forward`` and the decoders check theirs."""
        n_batch = state[0].shape[1]
        if not isinstance(y_prev, Tensor) or tuple(y_prev.shape) != (n_batch,):
            got = tuple(y_prev.shape) if isinstance(y_prev, Tensor) else type(y_prev).__name__
            raise ValueError(f"y_prev must be (batch,) = ({n_batch},) token ids (the state's "
                             f"batch), got {got}")
        e = self.drop(self.tgt_embed(y_prev))[:, None, :]  # (B, 1, E)
        if self.attention == "bahdanau":
            ctx = self._attend(state[0][-1][:, None, :], memory, keys, mask)
            out, state = self.decoder(torch.cat([e, ctx], dim=-1), state)
        else:
            out, state = self.decoder(e, state)
            ctx = self._attend(out, memory, keys, mask)
        return self._logits(out, ctx)[:, 0], state

    # ------------------------------------------------------------------------------------
    # public API

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits.

        Args:
            src: (B, S) source ids (padded with pad_id); src_lengths: (B,) in [1, S].
            tgt_in: (B, T) decoder inputs (bos_id followed by the target, shifted right).

        Returns:
            logits (B, T, tgt_vocab).
        """
        check_tensor("tgt_in", tgt_in, dtypes=INDEX_DTYPES, ndim=(2,))   # required here
        self._check_inputs(src, src_lengths, tgt_in)
        memory, keys, mask, state = self._encode(src, src_lengths)
        if self.attention == "luong":
            dec, _ = self.decoder(self.drop(self.tgt_embed(tgt_in)), state)  # (B, T, H)
            return self._logits(dec, self._attend(dec, memory, keys, mask))
        steps = []
        for t in range(tgt_in.shape[1]):
            logits, state = self.decode_step(tgt_in[:, t], state, memory, keys, mask)
            steps.append(logits)
        if not steps:   # an empty target: (B, 0, V), as the Luong path returns
            return self._logits(memory[:, :0], memory[:, :0])
        return torch.stack(steps, dim=1)

    def _log_probs(self, logits: Tensor) -> Tensor:
        """The decoders' log-probabilities, in at least float32 (float64 stays float64), with
        pad_id and bos_id at -inf: a decoder never generates them (a generated pad would read
        as the end of the output, a bos as a restart). Greedy and beam search both rank
        these, so that a beam of one picks what greedy picks."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logp = torch.log_softmax(logits.to(dtype), dim=-1)
        logp[:, [self.pad_id, self.bos_id]] = float("-inf")
        return logp

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, src_lengths: Tensor, max_len: int = 100) -> Tensor:
        """Argmax decoding: (B, L) ids, L <= max_len. Each row ends with eos_id then pad_id,
        or is cut at max_len without an eos_id. The argmax is taken over the float32 (float64)
        log-probabilities with ``topk(1)``, as beam search ranks, so that a beam of one decodes
        the same (exact ties may resolve otherwise than ``argmax`` over the logits).

        Runs in the model's current mode, as ``forward``: call ``model.eval()`` first (in
        training mode dropout applies, and each call decodes differently)."""
        check_size("max_len", max_len)
        memory, keys, mask, state = self.encode(src, src_lengths)
        n_batch = src.shape[0]
        y = torch.full((n_batch,), self.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(n_batch, dtype=torch.bool, device=src.device)
        out = []
        for _ in range(max_len if n_batch else 0):
            logits, state = self.decode_step(y, state, memory, keys, mask)
            # topk(1) rather than argmax: the op beam search ranks with (ties broken alike)
            y = self._log_probs(logits).topk(1, dim=-1).indices[:, 0]
            y = torch.where(done, torch.full_like(y, self.pad_id), y)
            out.append(y)
            done |= y == self.eos_id
            if bool(done.all()):
                break
        if not out:
            return torch.empty((n_batch, 0), dtype=torch.long, device=src.device)
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def beam_search(self, src: Tensor, src_lengths: Tensor, beam_size: int = 4,
                    max_len: int = 100) -> Tuple[Tensor, Tensor]:
        """Beam search by total log-probability (no length penalty, so beam_size=1 is greedy,
        up to exact ties of the summed scores).

        Hypotheses cut at max_len without an eos_id compete with the finished ones by their
        score so far. A wider beam is not guaranteed a better score than a narrower one (it
        may prune the prefix the narrow beam would have completed). Runs in the model's
        current mode: call ``model.eval()`` first (dropout applies in training mode).

        Returns:
            tokens (B, L) ids of the best hypothesis, ending with eos_id then pad_id (or cut
            at max_len without one), no wider than its longest row; scores (B,) their
            log-probabilities, in float32 (float64 for a float64 model).
        """
        if isinstance(beam_size, numbers.Integral) and not isinstance(beam_size, bool) \
                and beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        check_size("beam_size", beam_size)
        check_size("max_len", max_len)
        memory, keys, mask, (h, c) = self.encode(src, src_lengths)
        n_batch, k = src.shape[0], int(beam_size)
        dev = src.device
        score_dtype = torch.promote_types(memory.dtype, torch.float32)
        if n_batch == 0:
            return (torch.empty((0, 0), dtype=torch.long, device=dev),
                    torch.empty((0,), dtype=score_dtype, device=dev))
        rep = lambda t, dim: t.repeat_interleave(k, dim=dim)
        memory, keys, mask = rep(memory, 0), rep(keys, 0), rep(mask, 0)
        state = (rep(h, 1), rep(c, 1))
        # only the first beam is live at the start, so the k beams do not start identical
        scores = torch.full((n_batch, k), float("-inf"), dtype=score_dtype, device=dev)
        scores[:, 0] = 0.0
        y = torch.full((n_batch * k,), self.bos_id, dtype=torch.long, device=dev)
        done = torch.zeros(n_batch * k, dtype=torch.bool, device=dev)
        tokens = torch.empty((n_batch * k, 0), dtype=torch.long, device=dev)
        for _ in range(max_len):
            logits, state = self.decode_step(y, state, memory, keys, mask)
            # the model's log-probabilities (the scores returned), pad and bos then ruled out
            logp = self._log_probs(logits).to(score_dtype)  # (B*k, V)
            n_vocab = logp.shape[-1]
            # a finished hypothesis extends only with pad at no cost
            fin = torch.full_like(logp, float("-inf"))
            fin[:, self.pad_id] = 0.0
            logp = torch.where(done[:, None], fin, logp)
            cand = (scores.view(-1, 1) + logp).view(n_batch, k * n_vocab)
            scores, idx = cand.topk(k, dim=-1)  # (B, k)
            beam = idx // n_vocab + torch.arange(n_batch, device=dev)[:, None] * k
            beam = beam.view(-1)
            y = (idx % n_vocab).view(-1)
            tokens = torch.cat([tokens[beam], y[:, None]], dim=1)
            state = (state[0][:, beam], state[1][:, beam])
            done = done[beam] | (y == self.eos_id)
            if bool(done.all()):
                break
        best = scores.argmax(-1)  # (B,)
        rows = torch.arange(n_batch, device=dev) * k + best
        tokens = tokens[rows]
        # the k beams ran until the last of them finished: drop the columns past the longest
        # returned row (pad only; pad is never generated)
        width = int((tokens != self.pad_id).sum(1).max()) if tokens.numel() else 0
        return tokens[:, :width], scores.gather(1, best[:, None])[:, 0]
