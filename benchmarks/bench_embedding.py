"""Benchmark: BERT's embedding layer, dropout(LayerNorm(word[ids] + position + type)),
forward + backward (gradients of all three tables and the LayerNorm parameters).

Implementations:
    eager          -- the PyTorch code of Hugging Face's BertEmbeddings (three lookups, add,
                      LayerNorm, dropout)
    torch.compile  -- the same code under torch.compile (it fuses the elementwise work; the
                      target is to beat this by >= 1.2x)
    fastbert       -- fastbert.ops.embedding_layer_norm, fp32-atomic table gradients, with
                      check_bounds=False (the id range check syncs the host; the issue allows
                      skipping it for speed, it is on by default)
    fastbert_checked -- the same with the default check_bounds=True
    fastbert_det   -- the same with deterministic=True (sort + segmented sums)
    fastbert_atomic_word -- fastbert with fp32-atomic word gradients forced for bf16 tables
                      (checks the kernels' choice of segmented word gradients for 16-bit)

    python -m benchmarks.bench_embedding [--quick] [--device cuda]

On CPU (quick mode) only the eager PyTorch path runs, on a tiny shape, as a smoke test.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from benchmarks._harness import Case, main_for

# BERT's vocabulary, position table, token types and training dropout.
VOCAB = 30522
MAX_POSITIONS = 512
TYPE_VOCAB = 2
DROPOUT_P = 0.1
EPS = 1e-12
PAD_ID = 0


def _eager(ids, types, word, pos, typ, w, b):
    positions = torch.arange(ids.shape[-1], device=ids.device)
    s = F.embedding(ids, word, padding_idx=PAD_ID) + F.embedding(positions, pos)[None]
    s = s + F.embedding(types, typ)
    return F.dropout(F.layer_norm(s, s.shape[-1:], w, b, EPS), DROPOUT_P, training=True)


def _fastbert(deterministic, check_bounds=False):
    from fastbert.ops import embedding_layer_norm

    def f(ids, types, word, pos, typ, w, b):
        return embedding_layer_norm(ids, word, pos, w, b, EPS, token_type_ids=types,
                                    type_weight=typ, dropout_p=DROPOUT_P, padding_idx=PAD_ID,
                                    deterministic=deterministic, check_bounds=check_bounds,
                                    backend="triton")
    return f


def _atomic_word_grad(run):
    """``run`` with fp32-atomic word-table gradients also for 16-bit tables: the alternative
    that the kernels' ``SEGMENTED_WORD_GRAD_DTYPES`` rule decides against, timed to check it."""
    from fastbert.kernels import embedding as k

    def f():
        saved = k.SEGMENTED_WORD_GRAD_DTYPES
        k.SEGMENTED_WORD_GRAD_DTYPES = ()
        try:
            return run()
        finally:
            k.SEGMENTED_WORD_GRAD_DTYPES = saved
    return f


def _inputs(device, batch, seq, hidden, vocab, dtype):
    ids = torch.randint(1, vocab, (batch, seq), device=device)
    # padded batches: a [PAD] tail on each sequence
    lengths = torch.randint(seq // 2, seq + 1, (batch,), device=device)
    ids = torch.where(torch.arange(seq, device=device)[None, :] < lengths[:, None], ids, PAD_ID)
    types = (torch.arange(seq, device=device)[None, :] >= lengths[:, None] // 2).long()
    mk = lambda *s: (0.02 * torch.randn(*s, device=device)).to(dtype).requires_grad_()
    params = [mk(vocab, hidden), mk(MAX_POSITIONS, hidden), mk(TYPE_VOCAB, hidden),
              torch.ones(hidden, device=device, dtype=dtype, requires_grad=True),
              torch.zeros(hidden, device=device, dtype=dtype, requires_grad=True)]
    return ids, types, params


def _fwd_bwd(fn, ids, types, params, dy):
    def run():
        y = fn(ids, types, *params)
        return torch.autograd.grad(y, params, dy)
    return run


def cases(device: torch.device, quick: bool) -> List[Case]:
    on_gpu = device.type == "cuda"
    if quick:
        shapes = [("tiny", 2, 16, 64, 100)]
    else:
        shapes = [("bert-base", 32, 128, 768, VOCAB), ("bert-base", 16, 512, 768, VOCAB),
                  ("bert-large", 16, 512, 1024, VOCAB)]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    out = []
    for model, batch, seq, hidden, vocab in shapes:
        ids, types, params = _inputs(device, batch, seq, hidden, vocab, dtype)
        dy = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
        impls = {"eager": _fwd_bwd(_eager, ids, types, params, dy)}
        if on_gpu:
            compiled = torch.compile(_eager, dynamic=False)
            impls["torch.compile"] = _fwd_bwd(compiled, ids, types, params, dy)
            impls["fastbert"] = _fwd_bwd(_fastbert(False), ids, types, params, dy)
            impls["fastbert_checked"] = _fwd_bwd(_fastbert(False, check_bounds=True), ids,
                                                 types, params, dy)
            impls["fastbert_det"] = _fwd_bwd(_fastbert(True), ids, types, params, dy)
            impls["fastbert_atomic_word"] = _atomic_word_grad(
                _fwd_bwd(_fastbert(False), ids, types, params, dy))
        es = torch.finfo(dtype).bits // 8
        tokens = batch * seq
        # a perfect implementation: fwd reads a word row and writes y per token; bwd reads
        # dy and the word row again and writes the dense word-table gradient
        moved = es * (4 * tokens * hidden + vocab * hidden + MAX_POSITIONS * hidden)
        out.append(Case(name="embedding_layer_norm fwd+bwd",
                        params={"model": model, "batch": batch, "seq": seq, "hidden": hidden,
                                "vocab": vocab, "dtype": str(dtype).replace("torch.", "")},
                        impls=impls, bytes=moved,
                        baseline="torch.compile" if on_gpu else "eager"))
    return out


def main(argv=None):
    main_for("embedding", cases, "embedding_layer_norm forward + backward vs eager and torch.compile", argv)


if __name__ == "__main__":
    main()
