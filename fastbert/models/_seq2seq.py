"""What the encoder-decoder models share: argument checks, special-token rules, the training
loss, greedy and beam-search decoding.

A model subclasses ``Seq2SeqBase`` and provides

- ``_start(src, src_lengths)`` -> (enc, state): ``enc`` a tuple of tensors with the batch in
  dimension 0 (what every decoder step reads: the encoder's memory, the source mask, ...),
  ``state`` a tuple of tensors with the batch in dimension ``STATE_BATCH_DIM`` (what a step
  updates: an LSTM's (h, c), a Transformer's prefix of tokens);
- ``decode_step(y_prev, state, *enc)`` -> (logits (B, V), state);
- ``decoder_states(src, src_lengths, tgt_in)`` -> the teacher-forced hidden states (B, T, H)
  before the output projection ``out`` (its ``weight`` (V, H) and ``bias`` (V,) or None), which
  ``loss`` projects only where the target is not padding;

and the attributes ``src_embed`` (an nn.Embedding: its device is the model's), ``src_vocab``,
``tgt_vocab``, ``pad_id``, ``bos_id``, ``eos_id``, ``check_ids`` and ``backend`` (the
fastbert backend of the loss).
"""
from __future__ import annotations

import abc
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops import _checks
from ..ops.cross_entropy import masked_lm_loss
from ..ops._checks import check_size, check_tensor
from ..ops.lstm import check_lengths

INDEX_DTYPES = (torch.int64, torch.int32)


def check_special_ids(pad_id, bos_id, eos_id, src_vocab: int, tgt_vocab: int) -> None:
    """pad_id is the padding row of both embeddings; bos_id / eos_id are target tokens; all
    three differ (decoding never generates pad or bos, and stops at eos)."""
    for name, i, n in (("pad_id", pad_id, min(src_vocab, tgt_vocab)),
                       ("bos_id", bos_id, tgt_vocab), ("eos_id", eos_id, tgt_vocab)):
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"{name} must be a token id in [0, {n}), got {i!r}")
    if len({pad_id, bos_id, eos_id}) != 3:
        raise ValueError(f"pad_id, bos_id and eos_id must be three different ids (decoding "
                         f"never generates pad or bos, and stops at eos), got "
                         f"{pad_id}, {bos_id}, {eos_id}")


def check_positive_ints(**sizes) -> None:
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")


class Seq2SeqBase(torch.nn.Module, abc.ABC):
    """Checks, teacher-forced logits, the loss and decoding shared by LSTMSeq2Seq and
    Seq2SeqTransformer (module docstring).
    Abstract: a subclass that lacks ``_start``, ``decode_step`` or ``decoder_states`` cannot be
    instantiated."""

    STATE_BATCH_DIM = 0

    @abc.abstractmethod
    def _start(self, src: Tensor, src_lengths: Tensor) -> Tuple[tuple, tuple]:
        """(enc, state) for ``src``: checked inputs, encoded (module docstring)."""

    @abc.abstractmethod
    def decode_step(self, y_prev: Tensor, state, *enc) -> Tuple[Tensor, tuple]:
        """One decoder step: y_prev (B,) ids -> (logits (B, V), the new state)."""

    @abc.abstractmethod
    def decoder_states(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced: the hidden states (B, T, H) that ``self.out`` projects onto the
        target vocabulary (``forward`` is ``self.out(decoder_states(...))``)."""

    # ------------------------------------------------------------------------------------
    # teacher forcing and the training loss

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits.

        Args:
            src: (B, S) source ids (padded with pad_id); src_lengths: (B,) in [1, S].
            tgt_in: (B, T) decoder inputs (bos_id followed by the target, shifted right).

        Returns:
            logits (B, T, tgt_vocab).
        """
        return self.out(self.decoder_states(src, src_lengths, tgt_in))

    def loss(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, tgt_out: Tensor, *,
             label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
        """Cross-entropy of the next-token predictions, over the positions where tgt_out is
        not pad_id: ``fastbert.ops.masked_lm_loss`` on ``decoder_states``, so only those
        positions are projected onto the vocabulary (``self.out``), fused with the loss: no
        (tokens, V) logits are kept for the backward. Equal to ``F.cross_entropy`` of
        ``forward``'s logits with ``ignore_index=pad_id``, except that a batch without any
        target token gives 0.0 and zero gradients (masked_lm_loss's rule; F.cross_entropy's
        mean would be NaN).

        Args:
            src, src_lengths, tgt_in: as ``forward``.
            tgt_out: (B, T) the targets (tgt_in shifted left: the target then eos_id, padded
                with pad_id).
            label_smoothing, reduction: as ``torch.nn.functional.cross_entropy`` ("mean" over
                the non-pad positions).
        """
        check_tensor("tgt_out", tgt_out, dtypes=INDEX_DTYPES, ndim=(2,))
        check_tensor("tgt_in", tgt_in, dtypes=INDEX_DTYPES, ndim=(2,))
        if tgt_out.shape != tgt_in.shape:
            raise ValueError(f"tgt_out must have tgt_in's shape {tuple(tgt_in.shape)}, got "
                             f"{tuple(tgt_out.shape)}")
        states = self.decoder_states(src, src_lengths, tgt_in)
        labels = tgt_out.masked_fill(tgt_out == self.pad_id, -100)
        return masked_lm_loss(states, self.out.weight, self.out.bias, labels,
                              ignore_index=-100, label_smoothing=label_smoothing,
                              reduction=reduction, backend=self.backend)

    # ------------------------------------------------------------------------------------
    # checks

    def _check_inputs(self, src: Tensor, src_lengths: Tensor,
                      tgt_in: Optional[Tensor] = None) -> None:
        """Shapes, dtypes and devices, and the values: src_lengths in [1, S], ids inside the
        vocabularies (an out-of-range id would be an IndexError deep in nn.Embedding, a
        device-side assert on the GPU). The values cost one host read of CUDA lengths and one
        of the ids (``check_ids``); both are skipped while torch.compile traces, and run on the
        device while a CUDA graph is captured (where src_lengths must be a CUDA tensor: host
        lengths would be replayed as captured)."""
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
            raise RuntimeError(f"{type(self).__name__}: src_lengths on the CPU cannot be "
                               "captured in a CUDA graph (the graph would replay the values "
                               "read at capture); pass src_lengths as a CUDA tensor")
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

    def _check_y_prev(self, y_prev: Tensor, n_batch: int) -> None:
        if not isinstance(y_prev, Tensor) or tuple(y_prev.shape) != (n_batch,):
            got = tuple(y_prev.shape) if isinstance(y_prev, Tensor) else type(y_prev).__name__
            raise ValueError(f"y_prev must be (batch,) = ({n_batch},) token ids (the state's "
                             f"batch), got {got}")

    # ------------------------------------------------------------------------------------
    # decoding

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
        enc, state = self._start(src, src_lengths)
        n_batch = src.shape[0]
        y = torch.full((n_batch,), self.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(n_batch, dtype=torch.bool, device=src.device)
        out = []
        for _ in range(max_len if n_batch else 0):
            logits, state = self.decode_step(y, state, *enc)
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
        enc, state = self._start(src, src_lengths)
        n_batch, k = src.shape[0], int(beam_size)
        dev = src.device
        score_dtype = torch.promote_types(enc[0].dtype, torch.float32)
        if n_batch == 0:
            return (torch.empty((0, 0), dtype=torch.long, device=dev),
                    torch.empty((0,), dtype=score_dtype, device=dev))
        dim = self.STATE_BATCH_DIM
        enc = tuple(t.repeat_interleave(k, dim=0) for t in enc)
        state = tuple(s.repeat_interleave(k, dim=dim) for s in state)
        # only the first beam is live at the start, so the k beams do not start identical
        scores = torch.full((n_batch, k), float("-inf"), dtype=score_dtype, device=dev)
        scores[:, 0] = 0.0
        y = torch.full((n_batch * k,), self.bos_id, dtype=torch.long, device=dev)
        done = torch.zeros(n_batch * k, dtype=torch.bool, device=dev)
        tokens = torch.empty((n_batch * k, 0), dtype=torch.long, device=dev)
        for _ in range(max_len):
            logits, state = self.decode_step(y, state, *enc)
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
            state = tuple(s.index_select(dim, beam) for s in state)
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
