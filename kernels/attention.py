"""Fused multi-head attention (FlashAttention-2 style), forward and backward.

One kernel set serves both layouts:
    padded  -- q (batch, seqlen_q, heads, head_dim), k/v (batch, seqlen_k, heads_kv, head_dim),
               optionally with a key-padding mask (batch, seqlen_k) loaded per key block, so
               Hugging Face masks with holes work, not only right padding. Each program first
               scans its mask row for kv_end, one past the row's last attended key
               (``_key_bound``), and key blocks at or past kv_end are skipped (BERT batches
               are right-padded, so that is often most of the padding): the forward and dQ
               loops stop there, and the dK/dV programs of those blocks only write zeros
               (keys past kv_end within a block are not loaded);
    varlen  -- packed tokens q (total_q, heads, head_dim), k/v (total_k, heads_kv, head_dim)
               with int32 cu_seqlens (batch + 1,); each program reads its sequence's bounds
               from cu_seqlens on the device, so no host sync is needed to launch (the grid
               uses the caller's max_seqlen).

What is fused and why:
- Forward: QK^T, masking (key padding, bounds, causal), online softmax (running max and sum in
  fp32, base-2 exponentials), dropout on the probabilities and PV, tile by tile. Nothing of
  size seqlen_q x seqlen_k is written; the forward stores O and the log-sum-exp per row.
- Dropout draws its keep-mask with Philox (``tl.randint4x``) from a seed held in a device
  tensor: probability (i, j) of (batch x head) bh takes output j % 4 of the counter
  (bh * max_seqlen_q + i) * ceil(max_seqlen_k / 4) + j // 4 (int64; ``_dropout_keep_tile``),
  so the backward regenerates exactly the same mask and nothing of it is stored.
- Backward: a small kernel computes delta = rowsum(dO * O); then two kernels recompute the
  probabilities from the stored log-sum-exp. ``_attention_bwd_dkdv_kernel`` owns a block of
  keys of one (batch, kv head) and loops over every query block of every query head sharing
  that kv head (grouped-query attention) to accumulate dK and dV in registers;
  ``_attention_bwd_dq_kernel`` owns a block of queries and loops over the keys for dQ. No
  atomics by default, so the backward is deterministic (bit-identical run to run) at the cost
  of computing QK^T and dO V^T twice (the FlashAttention-2 paper's atomic-free variant, as in
  the Triton fused-attention tutorial). Opt-in ``ATOMIC_DQ_BACKWARD``: the dK/dV kernel adds
  dQ with fp32 atomics instead (FlashAttention-2's own backward; not deterministic, so never
  under ``torch.use_deterministic_algorithms(True)``).
- Backward in one launch when every key fits in one key block (``bwd_fused``: seqlen_k <= 128
  at head dim <= 64 in fp16/bf16, BERT's seq 128): the dK/dV program then sees every key of
  its queries, so it also computes their delta and writes their dQ (FUSED_DQ). That drops two
  launches (host time dominated BERT seq-128 calls on the H200), the delta and dQ kernels'
  re-reads of Q, dO, K, V and the second QK^T / dO V^T; still no atomics.
- Block configs (``fwd_config``, ``bwd_configs``) were chosen from ptxas register and shared
  memory counts; the 16-bit backward's num_warps / num_stages are the tuner's picks on an H200
  (see ``bwd_configs``). With the opt-in run-time tuner (``kernels/_tune.py``,
  ``FASTBERT_AUTOTUNE=1``) each kernel's num_warps / num_stages are instead timed at the first
  call of a variant and shape class among ``fwd_candidates`` / ``bwd_candidates``.
- Causal masking is aligned to the bottom-right corner, as in FlashAttention-2: query i of a
  sequence with lengths (Lq, Lk) sees keys j <= i + Lk - Lq. A query row that sees no key
  (fully padded, or i < Lq - Lk under causal) outputs zeros, its log-sum-exp is +inf and its
  gradients are zero; no NaN is produced.
- Precision: the matmuls accumulate in fp32; P and dS are rounded to the input dtype before
  their matmuls (fp16/bf16 tensor cores). fp32 inputs use ``input_precision="ieee"`` (true
  fp32 FMA, no TF32), so the fp32 path matches an fp64 reference to about 1e-6 relative at
  the default scale (more with large scores: the error of exp grows with its argument, up to
  tens of times torch's own fp32 error at a softmax_scale near 1 and head dim 128; and dV of
  a row with one dominating key was 4-6x torch's fp32 error in the interpreter) but runs
  far slower than fp16/bf16.

References: Dao, "FlashAttention-2" (2023); the Triton fused-attention tutorial (06);
flash-attention's ``flash_attn_triton.py``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (AotConfig, LOG2E, cdiv, next_power_of_2, num_programs,
                      on_tensor_device)
from ._launch import launch
from . import _tune

# Head dims the kernels support; each is loaded into a power-of-two tile (80 and 96 in 128).
SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
# exp(x) = exp2(x * LOG2E): the kernels keep scores premultiplied by softmax_scale * LOG2E
# and store the log-sum-exp in base 2.
_SCORE_LOG2E = LOG2E.value


@triton.jit
def _mm(a, b):
    # fp32 operands: true fp32 (no TF32) so the fp32 path is as accurate as documented
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _seq_bounds(cu_ptr, b, seqlen, IS_VARLEN: tl.constexpr):
    """(first token row, length) of sequence b: from cu_seqlens, or (0, seqlen) when padded."""
    if IS_VARLEN:
        start = tl.load(cu_ptr + b)
        end = tl.load(cu_ptr + b + 1)
        return start, end - start
    else:
        # b * 0: a tensor like the varlen branch's start, so callers can widen it to int64
        return b * 0, seqlen


@triton.jit
def _head_base(ptr, b, start, h, stride_b, stride_t, stride_h):
    """Pointer to token ``start`` of sequence ``b``, head ``h``; int64 offsets, since
    batch * stride passes 2**31 on large activations."""
    return ptr + b.to(tl.int64) * stride_b + start.to(tl.int64) * stride_t + h * stride_h


@triton.jit
def _block_and_head(n_blocks, REVERSE: tl.constexpr = False):
    """(block index, (batch, head) index) of this program in a flat 1-D grid of
    n_blocks * batch * heads programs. Flat because CUDA caps grid dims 1 and 2 at 65535, which
    batch * heads passes (e.g. 8192 short sequences x 12 heads in a varlen batch), while dim
    0 takes 2**31 - 1; the blocks of one head stay adjacent, so they run together and share
    that head's K/V (or Q/dO) in L2. REVERSE: each head's blocks in the opposite order, the
    last first (the causal forward's heaviest query blocks: CAUSAL_HEAVY_FIRST)."""
    pid = tl.program_id(0)
    blk = pid % n_blocks
    if REVERSE:
        blk = n_blocks - 1 - blk
    return blk, pid // n_blocks


@triton.jit
def _score_valid(offs_m, offs_n, len_q, len_k, mask_ptr, stride_mask_b, b,
                 HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: query row offs_m may attend key offs_n."""
    n_in = offs_n < len_k
    valid = (offs_m[:, None] < len_q) & n_in[None, :]
    if HAS_MASK:
        km = tl.load(mask_ptr + b.to(tl.int64) * stride_mask_b + offs_n, mask=n_in, other=0)
        valid = valid & (km != 0)[None, :]
    if IS_CAUSAL:
        # bottom-right alignment (FlashAttention-2)
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (len_k - len_q))
    return valid


@triton.jit
def _key_bound(mask_ptr, stride_mask_b, b, len_k, HAS_MASK: tl.constexpr,
               KEY_BLOCK: tl.constexpr):
    """One past the last key of sequence b that any query may attend: with a key-padding
    mask, one past its row's last nonzero (0 for a row with none; keys past it are all
    padding); else len_k. Every program scans its row itself (len_k bytes, against the
    len_k x head_dim elements of K it would otherwise read), which saves each call a launch
    computing the bounds beforehand.

    The scan reads KEY_BLOCK entries a step as KEY_BLOCK // 32 independent loads of 32: a
    32-entry tensor sits in one warp (replicated across the others), so its max is warp
    shuffles only. A wider tensor spreads over the warps, and its max then goes through
    shared memory and a barrier, which made ptxas give the kernels 5-60 more registers a
    thread (sm_90, 16-bit) and spill ~1 KB in the fp32 head-dim-128 forward."""
    if HAS_MASK:
        row = mask_ptr + b.to(tl.int64) * stride_mask_b
        tl.static_assert(KEY_BLOCK % 32 == 0, "KEY_BLOCK must be a multiple of 32")
        lanes = tl.arange(0, 32)
        end = tl.zeros((32,), dtype=tl.int32)
        for start in range(0, len_k, KEY_BLOCK):
            for part in tl.static_range(KEY_BLOCK // 32):
                offs = start + part * 32 + lanes
                m = tl.load(row + offs, mask=offs < len_k, other=0)
                end = tl.maximum(end, tl.where(m != 0, offs + 1, 0))
        return tl.max(end, axis=0)
    else:
        return len_k


@triton.jit
def _causal_key_end(start_m, len_q, len_k, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """One past the last key any query of block [start_m, start_m + BLOCK_M) may see."""
    if IS_CAUSAL:
        return tl.maximum(tl.minimum(len_k, start_m + BLOCK_M + len_k - len_q), 0)
    else:
        return len_k


@triton.jit
def _load_tile(ptrs, rows_in, d_in, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr,
               TRANSPOSED: tl.constexpr):
    """Load a (rows, BLOCK_D) tile ((BLOCK_D, rows) when TRANSPOSED), zero-filling rows out of
    bounds (when CHECK_ROWS) and head-dim columns past head_dim. EVEN_D (head_dim fills the
    tile) drops the head-dim mask: a mask that varies along the contiguous dimension would
    stop the loads from being vectorized."""
    if TRANSPOSED:
        r = rows_in[None, :]
        d = d_in[:, None]
    else:
        r = rows_in[:, None]
        d = d_in[None, :]
    if CHECK_ROWS:
        if EVEN_D:
            return tl.load(ptrs, mask=r, other=0.0)
        else:
            return tl.load(ptrs, mask=r & d, other=0.0)
    else:
        if EVEN_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=d, other=0.0)


@triton.jit
def _store_tile(ptrs, value, rows_in, d_in, EVEN_D: tl.constexpr):
    """Store a (rows, BLOCK_D) tile, rows in bounds only (and head_dim columns)."""
    if EVEN_D:
        tl.store(ptrs, value, mask=rows_in[:, None])
    else:
        tl.store(ptrs, value, mask=rows_in[:, None] & d_in[None, :])


@triton.jit
def _dropout_row_counter(bh, seqlen_q, seqlen_k, offs_m):
    """The Philox counter of key 0 of each query row offs_m of (batch x head) bh:
    (bh * seqlen_q + i) * ceil(seqlen_k / 4), int64 (seqlen: the max_seqlen of varlen)."""
    return (bh.to(tl.int64) * seqlen_q + offs_m) * ((seqlen_k + 3) // 4)


@triton.jit
def _dropout_keep_tile(seed, row_ctr, start_n, dropout_p, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) keep-mask of inverted dropout (True with probability 1 - p) of the
    query rows with counters row_ctr and the keys start_n + arange(BLOCK_N) (start_n a
    multiple of 4). Key j of a row takes output j % 4 of Philox (tl.randint4x) at counter
    row_ctr + j // 4: one Philox evaluation (10 rounds of 32-bit multiplies) for four
    probabilities, where tl.rand runs one per probability and keeps one output (the sm_90 loop
    of the forward with dropout was ~3x the instructions of the one without). Every kernel that
    applies or recovers the mask calls this, so they agree."""
    ctr = row_ctr[:, None] + (start_n // 4 + tl.arange(0, BLOCK_N // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, ctr)
    # key 4 g + 2 a + b <- output 2 a + b of counter g (join stacks on a new last axis)
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return tl.random.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _attention_fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, d_in,
    key_lo, key_hi, len_q, len_k, mask_ptr, stride_mask_b, b, seed, row_ctr, qk_scale,
    dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, BOUNDARY: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """Online softmax over the key blocks [key_lo, key_hi). BOUNDARY=False is the fast path
    for blocks wholly inside the sequence and below the causal diagonal: no bounds or causal
    mask (only the key-padding mask, when there is one)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_in = offs_n < len_k
        kt = _load_tile(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], n_in, d_in,
                        BOUNDARY, EVEN_D, True)
        qk = _mm(q, kt) * qk_scale
        if BOUNDARY:
            valid = _score_valid(offs_m, offs_n, len_q, len_k, mask_ptr, stride_mask_b, b,
                                 HAS_MASK, IS_CAUSAL)
            qk = tl.where(valid, qk, float("-inf"))
        elif HAS_MASK:
            km = tl.load(mask_ptr + b.to(tl.int64) * stride_mask_b + offs_n)
            qk = tl.where((km != 0)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row with no visible key so far keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - (-inf)) never makes a NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep_tile(seed, row_ctr, start_n, dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], n_in, d_in,
                       BOUNDARY, EVEN_D, False)
        acc += _mm(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr, cu_q_ptr, cu_k_ptr, seed_ptr,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_mask_b,
    n_heads, n_groups, seqlen_q, seqlen_k, head_dim, qk_scale, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, KEY_BLOCK: tl.constexpr, HEAVY_FIRST: tl.constexpr = False,
):
    # each program owns BLOCK_M query rows of one (batch, head); HEAVY_FIRST (causal only, see
    # CAUSAL_HEAVY_FIRST): a head's last query block, which sees the most keys, is its first
    # program
    pid_m, pid_bh = _block_and_head(tl.cdiv(seqlen_q, BLOCK_M), HEAVY_FIRST)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    h_kv = h // n_groups
    q_start, len_q = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _seq_bounds(cu_k_ptr, b, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    # rows past this sequence's end (varlen: up to max_seqlen_q) get lse = +inf, so that
    # every element of lse is written
    lse = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    if start_m < len_q:
        offs_d = tl.arange(0, BLOCK_D)
        d_in = offs_d < head_dim
        m_in = offs_m < len_q
        q_base = _head_base(q_ptr, b, q_start, h, stride_qb, stride_qm, stride_qh)
        k_base = _head_base(k_ptr, b, k_start, h_kv, stride_kb, stride_kn, stride_kh)
        v_base = _head_base(v_ptr, b, k_start, h_kv, stride_vb, stride_vn, stride_vh)
        q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], m_in, d_in,
                       True, EVEN_D, False)
        seed = 0
        row_ctr = offs_m
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
            row_ctr = _dropout_row_counter(pid_bh, seqlen_q, seqlen_k, offs_m)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        # keys past the mask row's last attended one (kv_hi) are padding: their blocks are
        # skipped (holes before it are masked per block); the causal alignment uses len_k
        kv_hi = _key_bound(mask_ptr, stride_mask_b, b, len_k, HAS_MASK, KEY_BLOCK)
        hi = tl.minimum(_causal_key_end(start_m, len_q, len_k, BLOCK_M, IS_CAUSAL), kv_hi)
        # keys [0, full_end) are inside the sequence and visible to every row of the block
        full_end = len_k
        if IS_CAUSAL:
            full_end = tl.minimum(full_end, start_m + 1 + len_k - len_q)
        full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
        # the whole block holding kv_hi may still take the fast path (its keys are in
        # bounds and the padding mask hides those past kv_hi); the boundary loop below is
        # then empty, as full_end >= kv_hi >= hi
        full_end = tl.minimum(full_end, tl.cdiv(kv_hi, BLOCK_N) * BLOCK_N)
        acc, l_i, m_i = _attention_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, d_in,
            0, full_end, len_q, len_k, mask_ptr, stride_mask_b, b, seed, row_ctr, qk_scale,
            dropout_p, BLOCK_M, BLOCK_N, EVEN_D, False, IS_CAUSAL, HAS_MASK, HAS_DROPOUT)
        acc, l_i, m_i = _attention_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, d_in,
            full_end, hi, len_q, len_k, mask_ptr, stride_mask_b, b, seed, row_ctr, qk_scale,
            dropout_p, BLOCK_M, BLOCK_N, EVEN_D, True, IS_CAUSAL, HAS_MASK, HAS_DROPOUT)
        empty = l_i == 0.0
        inv_l = 1.0 / tl.where(empty, 1.0, l_i)
        if HAS_DROPOUT:
            inv_l = inv_l / (1.0 - dropout_p)
        out = acc * inv_l[:, None]
        o_base = _head_base(o_ptr, b, q_start, h, stride_ob, stride_om, stride_oh)
        _store_tile(o_base + offs_m[:, None] * stride_om + offs_d[None, :],
                    out.to(o_ptr.dtype.element_ty), m_in, d_in, EVEN_D)
        # base-2 log-sum-exp of the scaled scores; +inf marks a row that sees no key, so the
        # backward's exp2(score - lse) is 0 there
        lse = tl.where(empty | (offs_m >= len_q), float("inf"),
                       m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(lse_ptr + pid_bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)


@triton.jit
def _attention_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, cu_q_ptr, dq_ptr,
    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    n_heads, seqlen_q, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, ZERO_DQ: tl.constexpr,
):
    # each program owns BLOCK_M query rows of one (batch, head): delta = rowsum(dO * O).
    # ZERO_DQ (the atomic-dQ backward): it also zeroes those rows of the fp32 dQ accumulator
    # (dq_ptr) that the dK/dV kernel adds into, saving the launch of a separate fill. The
    # programs cover every query row of every head (cu_seqlens_q ends at the token count).
    pid_m, pid_bh = _block_and_head(tl.cdiv(seqlen_q, BLOCK_M))
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    q_start, len_q = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < len_q
    d_in = offs_d < head_dim
    o_base = _head_base(o_ptr, b, q_start, h, stride_ob, stride_om, stride_oh)
    do_base = _head_base(do_ptr, b, q_start, h, stride_dob, stride_dom, stride_doh)
    o = _load_tile(o_base + offs_m[:, None] * stride_om + offs_d[None, :], m_in, d_in,
                   True, EVEN_D, False)
    do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], m_in, d_in,
                    True, EVEN_D, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * seqlen_q + offs_m, delta, mask=m_in)
    if ZERO_DQ:
        dq_base = _head_base(dq_ptr, b, q_start, h, stride_dqb, stride_dqm, stride_dqh)
        _store_tile(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :],
                    tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), m_in, d_in, EVEN_D)


@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, o_ptr, dq_ptr,
    mask_ptr, cu_q_ptr, cu_k_ptr, seed_ptr,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_ob, stride_om, stride_oh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_mask_b,
    n_heads, n_heads_kv, n_groups, seqlen_q, seqlen_k, head_dim, qk_scale, sm_scale, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, FUSED_DQ: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    KEY_BLOCK: tl.constexpr,
):
    # each program owns BLOCK_N keys of one (batch, kv head) and accumulates their dK, dV over
    # all query heads of the group and all query blocks (no atomics).
    # ATOMIC_DQ (FlashAttention-2's backward): each program also adds its keys' share of dQ,
    # dS K * sm_scale, into a zeroed fp32 dQ (dq_ptr) with atomic adds, so the dQ kernel and
    # its second recomputation of P and dP are skipped (5 matmuls a block pair instead of 7);
    # the sum's order varies run to run (not deterministic).
    # FUSED_DQ (every sequence's keys fit in one block, seqlen_k <= BLOCK_N): the program sees
    # every key of its queries, so it also finishes their dQ, and computes delta =
    # rowsum(dO * O) itself: the whole backward is this one launch (o_ptr, dq_ptr are read /
    # written; delta_ptr is not). It then visits every query block, even with no key to
    # attend (len_k 0, a mask row with none, causal rows before the first key), so each dQ
    # row is written.
    pid_n, pid_bh = _block_and_head(tl.cdiv(seqlen_k, BLOCK_N))
    b = pid_bh // n_heads_kv
    h_kv = pid_bh % n_heads_kv
    q_start, len_q = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _seq_bounds(cu_k_ptr, b, seqlen_k, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    # with FUSED_DQ, start_n is 0: "+ 1" makes the skip tests below always pass
    skip_off = 1 if FUSED_DQ else 0
    # FUSED_DQ too: nothing to skip there, but its keys past key_end (padding) are not
    # loaded, so that non-finite padding K / V cannot reach dQ (a block-wide load mask from
    # the mask row instead spilled ~150 bytes a thread on sm_80)
    key_end = _key_bound(mask_ptr, stride_mask_b, b, len_k, HAS_MASK, KEY_BLOCK)
    if start_n < len_k + skip_off:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_in = offs_d < head_dim
        n_in = offs_n < len_k
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        # a block wholly past the last attended key (padding) gets zero gradients: write
        # them without loading anything. Keys past it in this block are padding too: not
        # loaded (zeros), their gradients are zero
        if start_n < key_end + skip_off:
            kv_in = offs_n < key_end
            offs_m0 = tl.arange(0, BLOCK_M)
            k_base = _head_base(k_ptr, b, k_start, h_kv, stride_kb, stride_kn, stride_kh)
            v_base = _head_base(v_ptr, b, k_start, h_kv, stride_vb, stride_vn, stride_vh)
            k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], kv_in, d_in,
                           True, EVEN_D, False)
            v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], kv_in, d_in,
                           True, EVEN_D, False)
            # the keys' own validity (bounds, padding mask) is the same for every query block
            key_ok = kv_in
            if HAS_MASK:
                km = tl.load(mask_ptr + b.to(tl.int64) * stride_mask_b + offs_n, mask=kv_in,
                             other=0)
                key_ok = key_ok & (km != 0)
            if HAS_DROPOUT:
                seed = tl.load(seed_ptr)
            # causal: the first query that sees key start_n is start_n - (len_k - len_q)
            lo = 0
            if IS_CAUSAL and not FUSED_DQ:
                lo = tl.maximum(start_n - (len_k - len_q), 0) // BLOCK_M * BLOCK_M
            for g in range(0, n_groups):
                h = h_kv * n_groups + g
                bh = b * n_heads + h
                q_base = _head_base(q_ptr, b, q_start, h, stride_qb, stride_qm, stride_qh)
                do_base = _head_base(do_ptr, b, q_start, h, stride_dob, stride_dom,
                                     stride_doh)
                if FUSED_DQ:
                    o_base = _head_base(o_ptr, b, q_start, h, stride_ob, stride_om, stride_oh)
                if FUSED_DQ or ATOMIC_DQ:
                    dq_base = _head_base(dq_ptr, b, q_start, h, stride_dqb, stride_dqm,
                                         stride_dqh)
                for start_m in range(lo, len_q, BLOCK_M):
                    offs_m = start_m + offs_m0
                    m_in = offs_m < len_q
                    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                                   m_in, d_in, True, EVEN_D, False)
                    do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_d[None, :],
                                    m_in, d_in, True, EVEN_D, False)
                    lse = tl.load(lse_ptr + bh.to(tl.int64) * seqlen_q + offs_m, mask=m_in,
                                  other=float("inf"))
                    if FUSED_DQ:
                        o = _load_tile(o_base + offs_m[:, None] * stride_om + offs_d[None, :],
                                       m_in, d_in, True, EVEN_D, False)
                        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
                    else:
                        delta = tl.load(delta_ptr + bh.to(tl.int64) * seqlen_q + offs_m,
                                        mask=m_in, other=0.0)
                    # transposed scores (keys x queries): dK and dV come out untransposed
                    qkt = _mm(k, tl.trans(q))
                    valid = key_ok[:, None] & m_in[None, :]
                    if IS_CAUSAL:
                        valid = valid & (offs_n[:, None]
                                         <= offs_m[None, :] + (len_k - len_q))
                    pt = tl.where(valid, tl.math.exp2(qkt * qk_scale - lse[None, :]), 0.0)
                    dpt = _mm(v, tl.trans(do))
                    if HAS_DROPOUT:
                        keep = tl.trans(_dropout_keep_tile(
                            seed, _dropout_row_counter(bh, seqlen_q, seqlen_k, offs_m), start_n,
                            dropout_p, BLOCK_M, BLOCK_N))
                        scale_keep = 1.0 / (1.0 - dropout_p)
                        dv += _mm(tl.where(keep, pt * scale_keep, 0.0).to(do.dtype), do)
                        dpt = tl.where(keep, dpt * scale_keep, 0.0)
                    else:
                        dv += _mm(pt.to(do.dtype), do)
                    dst = pt * (dpt - delta[None, :])
                    dk += _mm(dst.to(q.dtype), q)
                    if FUSED_DQ or ATOMIC_DQ:
                        dq = _mm(tl.trans(dst.to(k.dtype)), k) * sm_scale
                        dq_tile = dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :]
                        if FUSED_DQ:
                            _store_tile(dq_tile, dq.to(dq_ptr.dtype.element_ty), m_in, d_in,
                                        EVEN_D)
                        else:
                            # a mask constant along the head dim keeps the adds vectorized
                            # (v4 on sm_90), as in _store_tile
                            dq_mask = m_in[:, None]
                            if not EVEN_D:
                                dq_mask = dq_mask & d_in[None, :]
                            tl.atomic_add(dq_tile, dq, mask=dq_mask, sem="relaxed")
        dk = dk * sm_scale
        dk_base = _head_base(dk_ptr, b, k_start, h_kv, stride_dkb, stride_dkn, stride_dkh)
        dv_base = _head_base(dv_ptr, b, k_start, h_kv, stride_dvb, stride_dvn, stride_dvh)
        _store_tile(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :],
                    dk.to(dk_ptr.dtype.element_ty), n_in, d_in, EVEN_D)
        _store_tile(dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :],
                    dv.to(dv_ptr.dtype.element_ty), n_in, d_in, EVEN_D)


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    mask_ptr, cu_q_ptr, cu_k_ptr, seed_ptr,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_mask_b,
    n_heads, n_groups, seqlen_q, seqlen_k, head_dim, qk_scale, sm_scale, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, KEY_BLOCK: tl.constexpr,
):
    # each program owns BLOCK_M query rows of one (batch, head) and their dQ
    pid_m, pid_bh = _block_and_head(tl.cdiv(seqlen_q, BLOCK_M))
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    h_kv = h // n_groups
    q_start, len_q = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _seq_bounds(cu_k_ptr, b, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < len_q:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_in = offs_d < head_dim
        m_in = offs_m < len_q
        q_base = _head_base(q_ptr, b, q_start, h, stride_qb, stride_qm, stride_qh)
        do_base = _head_base(do_ptr, b, q_start, h, stride_dob, stride_dom, stride_doh)
        q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], m_in, d_in,
                       True, EVEN_D, False)
        do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], m_in, d_in,
                        True, EVEN_D, False)
        lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * seqlen_q + offs_m, mask=m_in,
                      other=float("inf"))
        delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * seqlen_q + offs_m, mask=m_in, other=0.0)
        k_base = _head_base(k_ptr, b, k_start, h_kv, stride_kb, stride_kn, stride_kh)
        v_base = _head_base(v_ptr, b, k_start, h_kv, stride_vb, stride_vn, stride_vh)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
            row_ctr = _dropout_row_counter(pid_bh, seqlen_q, seqlen_k, offs_m)
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        # key blocks past the mask row's last attended key are padding: skipped, as in the
        # forward
        hi = tl.minimum(_causal_key_end(start_m, len_q, len_k, BLOCK_M, IS_CAUSAL),
                        _key_bound(mask_ptr, stride_mask_b, b, len_k, HAS_MASK,
                                   KEY_BLOCK))
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            n_in = offs_n < len_k
            kt = _load_tile(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], n_in, d_in,
                            True, EVEN_D, True)
            vt = _load_tile(v_base + offs_n[None, :] * stride_vn + offs_d[:, None], n_in, d_in,
                            True, EVEN_D, True)
            qk = _mm(q, kt)
            valid = _score_valid(offs_m, offs_n, len_q, len_k, mask_ptr, stride_mask_b, b,
                                 HAS_MASK, IS_CAUSAL)
            p = tl.where(valid, tl.math.exp2(qk * qk_scale - lse[:, None]), 0.0)
            dp = _mm(do, vt)
            if HAS_DROPOUT:
                keep = _dropout_keep_tile(seed, row_ctr, start_n, dropout_p, BLOCK_M, BLOCK_N)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(kt.dtype), tl.trans(kt))
        dq = dq * sm_scale
        dq_base = _head_base(dq_ptr, b, q_start, h, stride_dqb, stride_dqm, stride_dqh)
        _store_tile(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :],
                    dq.to(dq_ptr.dtype.element_ty), m_in, d_in, EVEN_D)


@triton.jit
def _attention_dropout_mask_kernel(seed_ptr, mask_ptr, seqlen_q, seqlen_k, dropout_p,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # each program owns BLOCK_M rows of the (seqlen_q, seqlen_k) mask of one (batch, head)
    pid_m, pid_bh = _block_and_head(tl.cdiv(seqlen_q, BLOCK_M))
    pid_bh = pid_bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = tl.load(seed_ptr)
    row_off = (pid_bh * seqlen_q + offs_m) * seqlen_k
    row_ctr = _dropout_row_counter(pid_bh, seqlen_q, seqlen_k, offs_m)
    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs = row_off[:, None] + offs_n[None, :]
        keep = _dropout_keep_tile(seed, row_ctr, start_n, dropout_p, BLOCK_M, BLOCK_N)
        tl.store(mask_ptr + offs, keep.to(tl.int8),
                 mask=(offs_m < seqlen_q)[:, None] & (offs_n < seqlen_k)[None, :])


# ----------------------------------------------------------------------------------------
# launchers

# Mask entries the kernels read per step of their scan for a row's last attended key
# (_key_bound), a multiple of 32: 8 independent 32-byte loads in flight a step, so BERT's
# 128 keys are one step (one memory latency, as the kv_end load this scan replaced) and 512
# keys two.
KEY_BLOCK = 256


def key_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The key mask as the kernels read it: int8, nonzero = attend, unit column stride. bool
    and int8 masks are viewed, not copied; other integer masks cost two ops. The launchers
    take any mask dtype and call this; ``fastbert.ops.attention`` calls it once per call, so
    that the forward and the backward both get the int8 form as it is."""
    m = attention_mask
    if m.dtype != torch.int8:
        m = m.view(torch.int8) if m.dtype == torch.bool else (m != 0).view(torch.int8)
    return _last_dim_contiguous(m)


# The config helpers below are pure functions of a few hashable arguments, cached: the
# launchers call them at every call, and small BERT shapes are host-bound.

@functools.lru_cache(maxsize=None)
def block_d(head_dim: int) -> int:
    """The power-of-two tile width holding ``head_dim``."""
    return max(16, next_power_of_2(int(head_dim)))


# Block configs were chosen from ptxas -v of the kernels as the JIT compiles them for aligned
# tensors (`python -m tests.aot_compile attention --regs` marks pointers and strides divisible
# by 16, as the JIT does: vectorized loads, cp.async pipelining over num_stages); not yet timed
# on a GPU. sm_90 (the target), bf16/fp16, no spills: forward 96-241 registers and up to 128 KB
# of shared memory, dK/dV 166-254 and up to 66 KB, dQ 94-206. sm_80 spills up to ~30 bytes a
# thread in a few variants. The fp32 ones (IEEE FMA matmuls) use small tiles.

@functools.lru_cache(maxsize=None)
def fwd_config(head_dim: int, dtype: torch.dtype, dropout: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel."""
    bd = block_d(head_dim)
    if dtype == torch.float32:
        return (32, 32, 4, 2) if bd <= 64 else (32, 16, 4, 1)
    # 8 warps: with 4 a 128 x 64 score tile of a 128-wide head spills registers. With dropout
    # (Philox draws: _dropout_keep_tile), 64 keys a block take 168-240 registers and spill
    # nowhere at head dims 16-64 (sm_90 ptxas of the JIT's own specialization, i32 strides,
    # seq 512, fp16 / bf16, key mask or causal) and ~20 loop instructions a key against ~22
    # with 32 keys; at head dim 128 they take 255 and spill (8 bytes in bf16), so 32 keys
    # there (218-245 registers, no spills), and for the masked head-dim columns of head dims
    # 80 / 96. (tests/aot_compile.py reports more registers than these: it types strides as
    # i64 and compiles every int as divisible by 16.) Not timed.
    if bd != head_dim or (dropout and bd > 64):
        return 128, 32, 8, 3
    return 128, 64, 8, 3


@functools.lru_cache(maxsize=None)
def bwd_configs(head_dim: int, dtype: torch.dtype):
    """((BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel, the same of the dQ
    kernel). The dK/dV kernel holds BLOCK_N keys (k, v, dk, dv tiles) and streams BLOCK_M
    queries; the dQ kernel holds BLOCK_M queries and streams BLOCK_N keys. At the 128-wide
    head tile the tutorial's (32, 128) / (128, 32) would halve the re-reads of the streamed
    side but take 246-255 registers on sm_90 and spill on sm_80: to be timed first.

    The 16-bit (num_warps, num_stages) are the run-time tuner's picks (kernels/_tune.py) on an
    H200 (benchmarks/results/attention_tuned_nvidia-h200.txt, 2026-11-28): the same pick at
    every shape it tuned (batch x heads 32-4096, seq 128-8192, padding mask and causal, bf16),
    against (8, 2) for both kernels before. With them forward + backward took 20-30% less
    GPU time (the forward's config unchanged; bert-base padded, GPU ms: 0.407 -> 0.313 at seq
    128, 0.917 -> 0.649 at 512; bert-large 0.527 -> 0.405, 1.229 -> 0.866; varlen 16-512 0.462
    -> 0.350; causal seq 1024-8192, head dim 64 and 128, 20-24%). Tuned only in bf16 without
    dropout at head dims 64 and 128: fp16, dropout and the other head dims take the same
    pairs untimed. The tuner itself stays off by default: its per-call lookup cost more host time
    than that saved (varlen fwd+bwd wall 0.54 -> 0.88 ms)."""
    bd = block_d(head_dim)
    if dtype == torch.float32:
        return ((32, 32, 4, 2), (32, 32, 4, 2)) if bd <= 64 else ((16, 32, 4, 1), (32, 16, 4, 1))
    if bd <= 64:
        return (32, 128, 4, 3), (128, 32, 8, 3)
    return (32, 64, 8, 3), (64, 32, 4, 2)


# (num_warps, num_stages) pairs the opt-in run-time tuner (kernels/_tune.py) times for the
# 16-bit kernels, the launcher's default first; fp32 keeps its default. Four warps on a
# 128-wide head's forward and dK/dV tiles would spill (see fwd_config, bwd_candidates), so
# there only their pipeline depth varies; the dQ kernel and the narrower heads also try four
# warps. Each pair compiles for sm_80 / sm_90 (aot_configs); none is measured yet.
@functools.lru_cache(maxsize=None)
def fwd_candidates(head_dim: int, dtype: torch.dtype, dropout: bool) -> tuple:
    """The forward kernel's tuning candidates, ``fwd_config``'s pair first."""
    _, _, warps, stages = fwd_config(head_dim, dtype, dropout)
    if dtype == torch.float32:
        return ((warps, stages),)
    if block_d(head_dim) <= 64:
        return _with_default((warps, stages), ((8, 3), (4, 3), (8, 2), (4, 4)))
    return _with_default((warps, stages), ((8, 3), (8, 2), (8, 4)))


@functools.lru_cache(maxsize=None)
def bwd_candidates(head_dim: int, dtype: torch.dtype) -> tuple:
    """(the dK/dV kernel's, the dQ kernel's) tuning candidates, ``bwd_configs``' pairs
    first."""
    (_, _, w1, s1), (_, _, w2, s2) = bwd_configs(head_dim, dtype)
    if dtype == torch.float32:
        return ((w1, s1),), ((w2, s2),)
    if block_d(head_dim) <= 64:
        pairs = ((8, 2), (4, 2), (4, 3), (8, 3))
        return _with_default((w1, s1), pairs), _with_default((w2, s2), pairs)
    # the 128-wide dK/dV tile spills 100-500 bytes a thread with four warps (ptxas, sm_90)
    return (_with_default((w1, s1), ((8, 2), (8, 3))),
            _with_default((w2, s2), ((8, 2), (8, 3), (4, 2))))


def _with_default(default: tuple, pairs: tuple) -> tuple:
    return (default,) + tuple(p for p in pairs if p != default)


# True: the causal forward runs each head's query blocks last first. Under a causal mask the
# last query block sees every key and the first one block's worth, so in the default order a
# grid ends on a head's heaviest programs and the card idles while they finish (a tail of up
# to one heavy program a wave); started first, the heavy ones overlap the light ones, the
# longest-processing-time-first order FlashAttention-3's causal scheduler uses. A head's blocks
# stay adjacent (its K/V shared in L2). Off until a GPU run times it (bench_attention's
# fastbert_heavy_first_fwd rows, causal forward: the seq-2048 case missed the 50%-of-matmul target
# at 48% on the H200, 2026-11-28); results are the same bits either way.
CAUSAL_HEAVY_FIRST = False
# False forces the three-kernel backward everywhere (benchmarks/bench_attention.py times both)
ONE_LAUNCH_BACKWARD = True
# True: where the backward is not one launch, the dK/dV kernel also adds dQ with fp32 atomics
# (ATOMIC_DQ) instead of a separate dQ kernel recomputing P and dP. Off: on the H200
# (2026-11-28, bench_attention's fastbert_atomic_dq_bwd rows) forward + backward took
# 1.06-1.17x the default's time (causal seq 1024-8192, padded seq 512) and 1.56x on the varlen
# batch; never used under torch.use_deterministic_algorithms(True).
ATOMIC_DQ_BACKWARD = False


def bwd_atomic_dq() -> bool:
    """Whether a backward that is not one launch adds dQ in the dK/dV kernel with atomics."""
    return ATOMIC_DQ_BACKWARD and not torch.are_deterministic_algorithms_enabled()


def bwd_fused(seqlen_k: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the backward is the dK/dV kernel alone (FUSED_DQ): every sequence's keys fit
    in its one key block, so each program also finishes its queries' dQ and delta, and the
    delta pre-pass and the dQ kernel (two launches, two more reads of Q, dO, K and V) are
    skipped. With seqlen_k 0 there is no program to write dQ: not fused."""
    return ONE_LAUNCH_BACKWARD and 0 < seqlen_k <= bwd_configs(head_dim, dtype)[0][1]


# Elements of O (and of dO) per program of the delta (rowsum(dO * O)) pre-pass: 16 per thread
# at PREPROCESS_WARPS warps. The pass is memory-bound, so it wants occupancy: 64 rows of a
# 128-wide head took 255 registers a thread (ptxas -v, sm_90); 16 rows take 56.
PREPROCESS_ELEMENTS = 2048
PREPROCESS_WARPS = 4


def preprocess_block_m(block_d_: int) -> int:
    """Rows per program of the delta pre-pass for a head-dim tile of width ``block_d_``."""
    return max(16, PREPROCESS_ELEMENTS // block_d_)


# Tile of the test-only dropout-mask kernel.
MASK_BLOCK = 64


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; the batch stride is 0 in the packed varlen layout."""
    s = t.stride()      # one call: each t.stride(i) is a separate trip into C++
    return (0, s[0], s[1]) if varlen else s[:3]


# The kernels add a sequence's base offset in int64 (_head_base) but index the tokens and
# heads within it in int32 (offs_m * stride_token + h * stride_head): exact while the largest
# such offset stays below 2**31. A contiguous (batch, seq, heads, dim) tensor is far below it;
# a sequence-first layout ((seq, batch, heads, dim).transpose(0, 1), nn.MultiheadAttention's
# and Megatron's) has a token stride of batch * heads * dim and passes it at ~2**31 elements.
MAX_INT32_OFFSET = 2**31 - 1


def _operand(t: torch.Tensor, varlen: bool,
             max_seqlen: int = 0) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` with a unit last-dim stride and token / head offsets within a sequence that fit
    int32 (copied only when not) and its ``_strides3``, from one stride() call (the
    launchers run at every call: host time). A sequence spans ``t.shape[1]`` tokens in the
    padded layout, at most ``max_seqlen`` in the packed (varlen) one."""
    s = t.stride()
    shape = t.shape
    rows = max_seqlen if varlen else shape[1]

    def span(s):  # the largest offset from a sequence's first token, + 1
        return (rows - 1) * s[-3] + (shape[-2] - 1) * s[-2] + shape[-1]
    if s[-1] == 1 and span(s) <= MAX_INT32_OFFSET:
        return t, ((0, s[0], s[1]) if varlen else s[:3])
    t = t.contiguous()
    s = t.stride()
    if span(s) > MAX_INT32_OFFSET:
        raise ValueError(
            f"attention: a sequence of {rows} tokens x {shape[-2]} heads x {shape[-1]} dims "
            f"spans more than 2**31 elements, past the kernels' int32 indexing within a "
            f"sequence; split the heads (or the sequence) over several calls")
    return t, ((0, s[0], s[1]) if varlen else s[:3])


def _layout(q_shape, k_shape, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """(batch, seqlen_q, seqlen_k) of the launch: the varlen ones come from the caller."""
    if cu_seqlens_q is not None:
        return cu_seqlens_q.shape[0] - 1, int(max_seqlen_q), int(max_seqlen_k)
    return q_shape[0], q_shape[1], k_shape[1]


def _mask_arg(attention_mask: Optional[torch.Tensor]):
    """(int8 mask, its batch stride) for the kernels."""
    if attention_mask is None:
        return None, 0
    m = key_mask(attention_mask)
    return m, m.stride(0)


@on_tensor_device
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None,
                  cu_seqlens_q: Optional[torch.Tensor] = None,
                  cu_seqlens_k: Optional[torch.Tensor] = None,
                  max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                  seed: Optional[torch.Tensor] = None, causal: bool = False,
                  dropout_p: float = 0.0, softmax_scale: float = 1.0):
    """Launch the forward.

    Args:
        q: (batch, seqlen_q, heads, head_dim), or (total_q, heads, head_dim) with cu_seqlens_q;
            fp32/fp16/bf16.
        k, v: (batch, seqlen_k, heads_kv, head_dim), or (total_k, heads_kv, head_dim);
            heads_kv divides heads; q's dtype.
        attention_mask: (batch, seqlen_k) bool/int8, nonzero = attend (padded layout), or None.
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) prefix sums of the lengths (varlen), or None.
        max_seqlen_q, max_seqlen_k: python ints bounding the varlen lengths (grid size).
        seed: int64 tensor of one element (dropout), or None.
        softmax_scale: multiplies QK^T before the softmax.

    Returns:
        out (q's shape and dtype) and lse (fp32, (batch, heads, max_seqlen_q), base-2
        log-sum-exp of the scaled scores; +inf on rows that see no key and, for varlen, on
        rows past their sequence).
    """
    varlen = cu_seqlens_q is not None
    (q, st_q), (k, st_k), (v, st_v) = (_operand(q, varlen, max_seqlen_q),
                                       _operand(k, varlen, max_seqlen_k),
                                       _operand(v, varlen, max_seqlen_k))
    q_shape, k_shape = q.shape, k.shape
    batch, sq, sk = _layout(q_shape, k_shape, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    heads, head_dim, heads_kv = q_shape[-2], q_shape[-1], k_shape[-2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads, sq), dtype=torch.float32, device=q.device)
    mask, stride_mask_b = _mask_arg(attention_mask)
    has_dropout = seed is not None and dropout_p > 0.0
    bm, bn, warps, stages = fwd_config(head_dim, q.dtype, has_dropout)
    bd = block_d(head_dim)
    if batch * heads > 0 and sq > 0:
        grid = (cdiv(sq, bm) * batch * heads,)   # flat: see _block_and_head
        args = (q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, seed,
                *st_q, *st_k, *st_v, *_strides3(out, varlen), stride_mask_b,
                heads, heads // heads_kv, sq, sk, head_dim,
                float(softmax_scale) * _SCORE_LOG2E, float(dropout_p))
        meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, EVEN_D=bd == head_dim, IS_VARLEN=varlen,
                    IS_CAUSAL=bool(causal), HAS_MASK=mask is not None, HAS_DROPOUT=has_dropout,
                    KEY_BLOCK=KEY_BLOCK)
        if causal and CAUSAL_HEAVY_FIRST:
            meta["HEAVY_FIRST"] = True
        if _tune.ENABLED is not False and _tune.on():
            warps, stages = _tune.pick(
                _tuning_key("attention_fwd", q.dtype, head_dim, meta, batch * heads, sq, sk),
                fwd_candidates(head_dim, q.dtype, has_dropout),
                lambda c: launch(_attention_fwd_kernel, grid, *args, **meta, num_warps=c[0],
                                 num_stages=c[1]),
                q.device)
        launch(_attention_fwd_kernel, grid, *args, **meta, num_warps=warps, num_stages=stages)
    return out, lse


@on_tensor_device
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None,
                  cu_seqlens_q: Optional[torch.Tensor] = None,
                  cu_seqlens_k: Optional[torch.Tensor] = None,
                  max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                  seed: Optional[torch.Tensor] = None, causal: bool = False,
                  dropout_p: float = 0.0, softmax_scale: float = 1.0, *,
                  need_dq: bool = True, need_dkv: bool = True):
    """Launch the backward (deterministic unless ``bwd_atomic_dq()``: see
    ATOMIC_DQ_BACKWARD). Arguments as ``attention_fwd``, plus do (out's
    shape), out and lse from the forward. Returns (dq, dk, dv) in the inputs' shapes and
    dtypes. ``need_dq=False`` skips the dq kernel and ``need_dkv=False`` the dk/dv kernel:
    those outputs are then zeros."""
    varlen = cu_seqlens_q is not None
    (q, st_q), (k, st_k), (v, st_v) = (_operand(q, varlen, max_seqlen_q),
                                       _operand(k, varlen, max_seqlen_k),
                                       _operand(v, varlen, max_seqlen_k))
    (do, st_do), (out, st_out) = (_operand(do, varlen, max_seqlen_q),
                                  _operand(out, varlen, max_seqlen_q))
    q_shape, k_shape = q.shape, k.shape
    batch, sq, sk = _layout(q_shape, k_shape, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    heads, head_dim, heads_kv = q_shape[-2], q_shape[-1], k_shape[-2]
    groups = heads // heads_kv
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if batch * heads == 0:
        # no query row (or no query head): the keys get no gradient
        return dq, dk.zero_(), dv.zero_()
    if sq == 0:
        # no query sees any key: the keys get no gradient
        dk.zero_()
        dv.zero_()
        return dq, dk, dv
    mask, stride_mask_b = _mask_arg(attention_mask)
    has_dropout = seed is not None and dropout_p > 0.0
    bd = block_d(head_dim)
    (bm1, bn1, w1, s1), (bm2, bn2, w2, s2) = bwd_configs(head_dim, q.dtype)
    # every key in one block (BERT's seq 128 at head dim <= 64): one launch does it all.
    # Unless its batch * heads_kv programs would leave SMs idle while each loops over many
    # query blocks (long-query cross-attention at a small batch): the dQ kernel's grid has a
    # program per query block. (The interpreter runs programs one by one: no such concern.)
    fused = (need_dq and need_dkv and bwd_fused(sk, head_dim, q.dtype)
             and (sq <= bn1 or q.device.type != "cuda"
                  or batch * heads_kv >= num_programs(q.device, 1)))
    # FlashAttention-2's dQ: added by the dK/dV programs into a zeroed fp32 buffer (zeroed by
    # the delta pre-pass). Not where every key fits one block but the one-launch backward was
    # turned down for occupancy (above): the atomic path would put dQ on those same few
    # programs, while the dQ kernel's grid is wide. (With ONE_LAUNCH_BACKWARD off, as the
    # tests force it, short keys take the atomic path too, on a GPU as in the interpreter.)
    atomic = (not fused and need_dq and need_dkv and sk > 0 and bwd_atomic_dq()
              and (sk > bn1 or q.device.type != "cuda" or not ONE_LAUNCH_BACKWARD))
    dq_out = dq
    if atomic and dq.dtype != torch.float32:
        dq_out = torch.empty(dq.shape, dtype=torch.float32, device=dq.device)
    if fused:
        delta = lse   # not read (FUSED_DQ computes it); any fp32 pointer keeps one signature
    else:
        delta = torch.empty((batch, heads, sq), dtype=torch.float32, device=q.device)
        pre_bm = preprocess_block_m(bd)
        launch(
            _attention_bwd_preprocess_kernel, (cdiv(sq, pre_bm) * batch * heads,),
            out, do, delta, cu_seqlens_q, dq_out if atomic else delta, *st_out, *st_do,
            *(_strides3(dq_out, varlen) if atomic else (0, 0, 0)),
            heads, sq, head_dim, BLOCK_M=pre_bm, BLOCK_D=bd, EVEN_D=bd == head_dim,
            IS_VARLEN=varlen, ZERO_DQ=atomic, num_warps=PREPROCESS_WARPS,
        )
    qk_scale = float(softmax_scale) * _SCORE_LOG2E
    flags = dict(BLOCK_D=bd, EVEN_D=bd == head_dim, IS_VARLEN=varlen, IS_CAUSAL=bool(causal),
                 HAS_MASK=mask is not None, HAS_DROPOUT=has_dropout, KEY_BLOCK=KEY_BLOCK)
    if not need_dkv:
        dk.zero_()
        dv.zero_()
    elif sk > 0:
        grid1 = (cdiv(sk, bn1) * batch * heads_kv,)
        args1 = (q, k, v, do, lse, delta, dk, dv, out, dq_out,
                 mask, cu_seqlens_q, cu_seqlens_k, seed,
                 *st_q, *st_k, *st_v, *st_do, *_strides3(dk, varlen), *_strides3(dv, varlen),
                 *st_out, *_strides3(dq_out, varlen),
                 stride_mask_b, heads, heads_kv, groups, sq, sk, head_dim, qk_scale,
                 float(softmax_scale), float(dropout_p))
        meta1 = dict(BLOCK_M=bm1, BLOCK_N=bn1, FUSED_DQ=fused, ATOMIC_DQ=atomic, **flags)
        if _tune.ENABLED is not False and _tune.on():
            # the grid is over kv heads; each program loops over its group of q heads
            key = _tuning_key("attention_bwd_dkdv", q.dtype, head_dim, meta1, batch * heads_kv,
                              sq, sk, groups)
            tuned = []

            def dkdv(c):
                if atomic:   # the kernel adds dQ into dq_out, which the pre-pass zeroed once
                    dq_out.zero_()
                tuned.append(c)
                launch(_attention_bwd_dkdv_kernel, grid1, *args1, **meta1, num_warps=c[0],
                       num_stages=c[1])
            w1, s1 = _tune.pick(key, bwd_candidates(head_dim, q.dtype)[0], dkdv, q.device)
            if atomic and tuned:   # the tuning runs left their sum in dq_out
                dq_out.zero_()
        launch(_attention_bwd_dkdv_kernel, grid1, *args1, **meta1, num_warps=w1, num_stages=s1)
    if atomic and dq_out is not dq:
        dq.copy_(dq_out)
    if fused or atomic:
        return dq, dk, dv
    if not need_dq:
        return dq.zero_(), dk, dv
    grid2 = (cdiv(sq, bm2) * batch * heads,)
    args2 = (q, k, v, do, lse, delta, dq, mask, cu_seqlens_q, cu_seqlens_k, seed,
             *st_q, *st_k, *st_v, *st_do, *_strides3(dq, varlen), stride_mask_b,
             heads, groups, sq, sk, head_dim, qk_scale, float(softmax_scale), float(dropout_p))
    meta2 = dict(BLOCK_M=bm2, BLOCK_N=bn2, **flags)
    if _tune.ENABLED is not False and _tune.on():
        w2, s2 = _tune.pick(
            _tuning_key("attention_bwd_dq", q.dtype, head_dim, meta2, batch * heads, sq, sk),
            bwd_candidates(head_dim, q.dtype)[1],
            lambda c: launch(_attention_bwd_dq_kernel, grid2, *args2, **meta2, num_warps=c[0],
                             num_stages=c[1]),
            q.device)
    launch(_attention_bwd_dq_kernel, grid2, *args2, **meta2, num_warps=w2, num_stages=s2)
    return dq, dk, dv


def _tuning_key(kernel: str, dtype: torch.dtype, head_dim: int, meta: dict, n_heads: int,
                sq: int, sk: int, groups: int = 1) -> tuple:
    """A tuning key (kernels/_tune.py): the kernel, dtype, head dim and constexpr flags (each
    call site builds ``meta`` in one order: its values suffice), the size classes of the
    (batch x heads) the grid covers (kv heads for the dK/dV kernel), seqlen_q and seqlen_k,
    which set the grid and each program's loop lengths, and the q heads per kv head the dK/dV
    programs loop over."""
    return (kernel, dtype, head_dim, *meta.values(), _tune.bucket(n_heads), _tune.bucket(sq),
            _tune.bucket(sk), groups)


@on_tensor_device
def attention_dropout_mask(seed: torch.Tensor, batch: int, heads: int, seqlen_q: int,
                           seqlen_k: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask (bool, (batch, heads, seqlen_q, seqlen_k)) the kernels draw for ``seed``.

    Test-only: element (b, h, i, j) is the kernels' decision for query i and key j of sequence
    b, head h (for varlen, positions within the sequence; seqlen_q/k are max_seqlen_q/k).
    """
    out = torch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.int8, device=seed.device)
    if out.numel():
        grid = (cdiv(seqlen_q, MASK_BLOCK) * batch * heads,)
        launch(_attention_dropout_mask_kernel, grid, seed, out, seqlen_q, seqlen_k,
               float(dropout_p), BLOCK_M=MASK_BLOCK, BLOCK_N=MASK_BLOCK)
    return out.bool()


# ----------------------------------------------------------------------------------------
# ahead-of-time compile descriptions

def _sig(names_types):
    return dict(names_types)


def _fwd_signature(dt: str):
    ptrs = [("q_ptr", f"*{dt}"), ("k_ptr", f"*{dt}"), ("v_ptr", f"*{dt}"), ("o_ptr", f"*{dt}"),
            ("lse_ptr", "*fp32"), ("mask_ptr", "*i8"),
            ("cu_q_ptr", "*i32"), ("cu_k_ptr", "*i32"), ("seed_ptr", "*i64")]
    strides = [(f"stride_{t}{s}", "i64") for t in ("q", "k", "v", "o")
               for s in (("b", "m", "h") if t in ("q", "o") else ("b", "n", "h"))]
    scalars = [("stride_mask_b", "i64"), ("n_heads", "i32"), ("n_groups", "i32"),
               ("seqlen_q", "i32"), ("seqlen_k", "i32"), ("head_dim", "i32"),
               ("qk_scale", "fp32"), ("dropout_p", "fp32")]
    # HEAVY_FIRST has a default, but Triton 3.8's AOT compile needs every constexpr named
    return _sig(ptrs + strides + scalars
                + [(c, "constexpr") for c in _FLAG_NAMES + ("HEAVY_FIRST",)])


def _preprocess_signature(dt: str):
    return {"o_ptr": f"*{dt}", "do_ptr": f"*{dt}", "delta_ptr": "*fp32", "cu_q_ptr": "*i32",
            "dq_ptr": "*fp32",
            "stride_ob": "i64", "stride_om": "i64", "stride_oh": "i64", "stride_dob": "i64",
            "stride_dom": "i64", "stride_doh": "i64", "stride_dqb": "i64", "stride_dqm": "i64",
            "stride_dqh": "i64", "n_heads": "i32", "seqlen_q": "i32",
            "head_dim": "i32", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr",
            "EVEN_D": "constexpr", "IS_VARLEN": "constexpr", "ZERO_DQ": "constexpr"}


def _bwd_signature(dt: str, dq: bool, atomic_dq: bool = False):
    ptrs = [("q_ptr", f"*{dt}"), ("k_ptr", f"*{dt}"), ("v_ptr", f"*{dt}"), ("do_ptr", f"*{dt}"),
            ("lse_ptr", "*fp32"), ("delta_ptr", "*fp32")]
    ptrs += ([("dq_ptr", f"*{dt}")] if dq else
             [("dk_ptr", f"*{dt}"), ("dv_ptr", f"*{dt}"), ("o_ptr", f"*{dt}"),
              ("dq_ptr", "*fp32" if atomic_dq else f"*{dt}")])
    ptrs += [("mask_ptr", "*i8"), ("cu_q_ptr", "*i32"),
             ("cu_k_ptr", "*i32"), ("seed_ptr", "*i64")]
    outs = ("dq",) if dq else ("dk", "dv", "o", "dq")
    strides = []
    for t in ("q", "k", "v", "do") + outs:
        row = "m" if t in ("q", "do", "dq", "o") else "n"
        strides += [(f"stride_{t}b", "i64"), (f"stride_{t}{row}", "i64"), (f"stride_{t}h", "i64")]
    heads = [("n_heads", "i32")] + ([] if dq else [("n_heads_kv", "i32")]) + [("n_groups", "i32")]
    scalars = [("stride_mask_b", "i64")] + heads + [
        ("seqlen_q", "i32"), ("seqlen_k", "i32"), ("head_dim", "i32"), ("qk_scale", "fp32"),
        ("sm_scale", "fp32"), ("dropout_p", "fp32")]
    flags = _FLAG_NAMES + (() if dq else ("FUSED_DQ", "ATOMIC_DQ"))
    return _sig(ptrs + strides + scalars + [(c, "constexpr") for c in flags])


_FLAG_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "EVEN_D", "IS_VARLEN", "IS_CAUSAL", "HAS_MASK",
               "HAS_DROPOUT", "KEY_BLOCK")
_TORCH_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def aot_configs():
    """Every block config the launchers pick: each (dtype, head-dim tile) with every padded
    option on (causal, key mask, dropout), for the forward and both backward kernels, and
    the same for head dim 80 in bf16 (the 128 tile with the head-dim mask, as 96); then every
    option off, padded and varlen, at head dim 64 in fp16, and varlen with causal and dropout
    at 128 in bf16; the delta pre-pass for every tile; the test-only dropout-mask kernel."""
    def kernels(dt, head_dim, varlen, causal, mask, drop, tag):
        bd = block_d(head_dim)
        f = dict(BLOCK_D=bd, EVEN_D=bd == head_dim, IS_VARLEN=varlen, IS_CAUSAL=causal,
                 HAS_MASK=mask, HAS_DROPOUT=drop, KEY_BLOCK=KEY_BLOCK)
        bm, bn, w, s = fwd_config(head_dim, _TORCH_DT[dt], drop)
        yield AotConfig(_attention_fwd_kernel, _fwd_signature(dt),
                        dict(BLOCK_M=bm, BLOCK_N=bn, HEAVY_FIRST=False, **f), w, s,
                        name=f"attention_fwd[{tag}]")
        (bm, bn, w, s), (bm2, bn2, w2, s2) = bwd_configs(head_dim, _TORCH_DT[dt])
        for fused, atomic in ((False, False), (True, False), (False, True)):
            yield AotConfig(_attention_bwd_dkdv_kernel, _bwd_signature(dt, False, atomic),
                            dict(BLOCK_M=bm, BLOCK_N=bn, FUSED_DQ=fused, ATOMIC_DQ=atomic, **f),
                            w, s, name=f"attention_bwd_dkdv[{tag},fused_dq={fused},"
                                       f"atomic_dq={atomic}]")
        yield AotConfig(_attention_bwd_dq_kernel, _bwd_signature(dt, True),
                        dict(BLOCK_M=bm2, BLOCK_N=bn2, **f), w2, s2,
                        name=f"attention_bwd_dq[{tag}]")

    tiles = sorted({block_d(d) for d in SUPPORTED_HEAD_DIMS})
    for dt in ("bf16", "fp16", "fp32"):
        for bd in tiles:
            yield from kernels(dt, bd, False, True, True, True, f"{dt},d{bd},causal+mask+dropout")
    yield from kernels("bf16", 80, False, True, True, True, "bf16,d80,causal+mask+dropout")
    for bd in tiles:  # without dropout the forward takes 64 keys a block at every head dim
        bm, bn, w, s = fwd_config(bd, torch.bfloat16, False)
        yield AotConfig(_attention_fwd_kernel, _fwd_signature("bf16"),
                        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, EVEN_D=True, IS_VARLEN=False,
                             IS_CAUSAL=True, HAS_MASK=True, HAS_DROPOUT=False,
                             KEY_BLOCK=KEY_BLOCK, HEAVY_FIRST=False), w, s,
                        name=f"attention_fwd[bf16,d{bd},causal+mask]")
        # CAUSAL_HEAVY_FIRST
        yield AotConfig(_attention_fwd_kernel, _fwd_signature("bf16"),
                        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, EVEN_D=True, IS_VARLEN=False,
                             IS_CAUSAL=True, HAS_MASK=False, HAS_DROPOUT=False,
                             KEY_BLOCK=KEY_BLOCK, HEAVY_FIRST=True), w, s,
                        name=f"attention_fwd[bf16,d{bd},causal,heavy_first]")
    for tag, flags in (("none", (False,) * 4), ("varlen", (True, False, False, False))):
        yield from kernels("fp16", 64, *flags, f"fp16,d64,{tag}")
    yield from kernels("bf16", 128, True, True, False, True, "bf16,d128,varlen+causal+dropout")
    for bd in tiles:
        for varlen in (False, True):
            yield AotConfig(_attention_bwd_preprocess_kernel, _preprocess_signature("bf16"),
                            dict(BLOCK_M=preprocess_block_m(bd), BLOCK_D=bd, EVEN_D=True,
                                 IS_VARLEN=varlen, ZERO_DQ=varlen),
                            PREPROCESS_WARPS,
                            name=f"attention_bwd_preprocess[bf16,d{bd},varlen={varlen}]")
    for dt, even in (("bf16", False), ("fp16", True), ("fp32", True)):
        yield AotConfig(_attention_bwd_preprocess_kernel, _preprocess_signature(dt),
                        dict(BLOCK_M=preprocess_block_m(128), BLOCK_D=128, EVEN_D=even,
                             IS_VARLEN=False, ZERO_DQ=True),
                        PREPROCESS_WARPS, name=f"attention_bwd_preprocess[{dt},d128,even_d={even}]")
    # the run-time tuner's other (num_warps, num_stages) pairs (bwd_candidates,
    # fwd_candidates), bf16 with every padded option on, at each head-dim tile, and at head
    # dim 80 (the 128 tile with the head-dim mask, as 96: the most registers)
    for hd in tiles + [80]:
        bd = block_d(hd)
        f = dict(BLOCK_D=bd, EVEN_D=bd == hd, IS_VARLEN=False, IS_CAUSAL=True, HAS_MASK=True,
                 KEY_BLOCK=KEY_BLOCK)
        for drop in (False, True):
            bm, bn, _, _ = fwd_config(hd, torch.bfloat16, drop)
            for w, s in fwd_candidates(hd, torch.bfloat16, drop)[1:]:
                yield AotConfig(_attention_fwd_kernel, _fwd_signature("bf16"),
                                dict(BLOCK_M=bm, BLOCK_N=bn, HAS_DROPOUT=drop, HEAVY_FIRST=False,
                                     **f), w, s,
                                name=f"attention_fwd[bf16,d{hd},dropout={drop},tuning w{w}s{s}]")
        (bm, bn, _, _), (bm2, bn2, _, _) = bwd_configs(hd, torch.bfloat16)
        dkdv_pairs, dq_pairs = bwd_candidates(hd, torch.bfloat16)
        for w, s in dkdv_pairs[1:]:
            for fused, atomic in ((False, False), (True, False), (False, True)):
                yield AotConfig(_attention_bwd_dkdv_kernel, _bwd_signature("bf16", False, atomic),
                                dict(BLOCK_M=bm, BLOCK_N=bn, FUSED_DQ=fused, ATOMIC_DQ=atomic,
                                     HAS_DROPOUT=True, **f), w, s,
                                name=f"attention_bwd_dkdv[bf16,d{hd},fused_dq={fused},"
                                     f"atomic_dq={atomic},tuning w{w}s{s}]")
        for w, s in dq_pairs[1:]:
            yield AotConfig(_attention_bwd_dq_kernel, _bwd_signature("bf16", True),
                            dict(BLOCK_M=bm2, BLOCK_N=bn2, HAS_DROPOUT=True, **f), w, s,
                            name=f"attention_bwd_dq[bf16,d{hd},tuning w{w}s{s}]")
    yield AotConfig(_attention_dropout_mask_kernel,
                    {"seed_ptr": "*i64", "mask_ptr": "*i8", "seqlen_q": "i32", "seqlen_k": "i32",
                     "dropout_p": "fp32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                    dict(BLOCK_M=MASK_BLOCK, BLOCK_N=MASK_BLOCK), 4, name="attention_dropout_mask")
