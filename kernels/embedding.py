"""BERT's embedding layer, ``dropout(LayerNorm(word[ids] + position[pos] + type[types]))``,
forward and backward.

Forward: one program per token gathers its three table rows, sums them in fp32, normalizes,
applies dropout and stores one row, plus the row's mean and rstd (fp32). Eager PyTorch
writes and re-reads the (tokens, H) sum twice before the LayerNorm; here only the output is
written. The kernels read the index tensors where they lie, through a (leading dimensions,
sequence) stride pair, stride 0 where one is broadcast ((S,) or (1, S) position ids, say):
broadcasting, flattening and copying them would cost host time at every call.

Backward: a persistent kernel (a few programs per SM, each over a contiguous range of tokens)
recomputes the sum from the tables (cheaper than storing it: the same bytes read, none
written), runs the LayerNorm backward, accumulates dweight / dbias partial rows in registers,
and hands the gradient of the sum, d(sum), to the three tables. Repeated ids (``[PAD]``,
``[CLS]``, frequent words, every position once per sequence, two token types) make that a
scatter-add with collisions, done one of two ways:

- atomic (the default for fp32 tables): ``tl.atomic_add`` into fp32 gradient tables. A
  program keeps a running sum per table while consecutive tokens share an id (runs of
  ``[PAD]``, token type runs) and issues one atomic per run, which cuts contention on the
  type table to a couple of atomics per program. fp32 atomics commute only up to rounding,
  so results may differ in the last bits from run to run. The fp32 position and type
  gradients reach their tables' dtype in the launch that sums the LayerNorm parameters'
  partial rows (``_common.sum_param_parts``), not in torch casts.
- segmented (``deterministic=True``, and the default for fp16/bf16 tables, see
  ``SEGMENTED_WORD_GRAD_DTYPES``): the kernel stores d(sum) rows (fp32), each token's
  int32 sort key per table (its row offset past the rows of the tables before it -- word,
  position, type -- so the three share one key space; -1 where the row gets no gradient:
  the padding id, an id out of range; 32-bit keys halve the radix sort's passes next to
  int64 ids, and -1 rows are never read), and zeroes the gradient tables (in their own
  dtypes). Then one stable sort orders all keys and a segmented sum adds each key's rows in
  a fixed order into its table. The sorted order is cut into chunks of ``SEGMENT_CHUNK``
  keys, one program per chunk (and column block): runs that end inside a chunk are written
  to the table directly; a run crossing chunk boundaries leaves one partial row per chunk,
  which a second kernel adds in chunk order, ``MERGE_TILE`` chunks at a time. A long run
  (the type table's two ids, a padding id) is thus summed in parallel, not by one program,
  and every sum has a fixed order: bit-identical gradients run to run. At BERT shapes the
  backward is bound by host time, not the GPU's: this path makes no torch op besides its
  allocations and one sort, where atomics need three zeroed fp32 tables (and, for a 16-bit
  word table, an fp32 (V, H) buffer zeroed and cast: more traffic than the sort at V =
  30522).

Ids out of range are never read or written: the loads are masked (the row counts as zero)
and the scatter skips them; ``fastbert.ops.embedding_layer_norm`` raises before launching
unless its bound check is turned off. That check (``index_bounds``) takes the min and max of
every index tensor in one small launch and one device-to-host copy. ``padding_idx`` gets no
gradient, as in ``nn.Embedding``.

References: NVIDIA Megatron / apex fused embedding + LayerNorm, Triton tutorial 05
(layer norm), CUB-style segmented reductions over sorted keys.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import (AotConfig, cdiv, dropout_keep_row, next_power_of_2, num_programs,
                      on_tensor_device, row_block, row_mean, rows_arg, _sum_param_parts)
from ._launch import launch

# Widest hidden size the fused kernels take: the backward keeps a row of the LayerNorm
# input, dy, three run accumulators and two partial sums in registers; ptxas reports 784 B
# of spill stores at 8192 on sm_90 and none worth naming at 4096 (BERT-family hidden sizes
# are <= 4096). Wider rows fall back to the PyTorch reference.
MAX_EMBED_COLS = 4096
# Programs per SM in the persistent backward, as in the LayerNorm backward.
BWD_PROGRAMS_PER_SM = 4
# Sorted keys per program in the segmented sum: small enough for thousands
# of programs at BERT batch sizes, large enough that most runs end inside one chunk.
SEGMENT_CHUNK = 32
# Columns per program in the segmented sum (a quarter of a BERT-base row keeps 4x the
# programs in flight).
SEGMENT_BLOCK_N = 256
# Word table dtypes whose gradients (all three tables') take the segmented sum even when
# deterministic=False: it writes the 16-bit gradients directly, where atomics need fp32
# tables zeroed, then cast (about twice the memory traffic at BERT's vocabulary, and three
# more torch ops at every backward). fp32 tables take the atomics.
SEGMENTED_WORD_GRAD_DTYPES = (torch.float16, torch.bfloat16)
# Chunk partials the merge kernel adds per step of a run that spans many chunks.
MERGE_TILE = 16
SEGMENT_NUM_WARPS = 4
# The bound check (``index_bounds``): ids a program reads per step, and the most programs
# (a few blocks each at BERT batch sizes; the host then takes the min / max of their
# results). The extremes of int64 stand for "no element".
BOUNDS_BLOCK = 1024
BOUNDS_MAX_PROGRAMS = 64
INDEX_MAX = tl.constexpr(2**63 - 1)
INDEX_MIN = tl.constexpr(-2**63)


@triton.jit
def _load_row_sum(ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, b, seq,
                  cols, mask, stride_ids_b, stride_ids_s, stride_pos_ids_b, stride_pos_ids_s,
                  stride_type_ids_b, stride_type_ids_s, stride_word_row, stride_pos_row,
                  stride_type_row, vocab_size, n_positions, n_types,
                  HAS_POS_IDS: tl.constexpr, HAS_TYPE: tl.constexpr, HAS_TYPE_IDS: tl.constexpr):
    """word[id] + position[pos] + type[t] of one token in fp32, and the three row indices.

    The token is (b, seq): b over input_ids' leading dimensions flattened (int64), seq its
    place in the sequence; each index tensor is read at b * stride_b + seq * stride_s
    (stride 0 where it is broadcast). A row index out of its table's range contributes zeros
    (masked load, never read)."""
    wid = tl.load(ids_ptr + b * stride_ids_b + seq * stride_ids_s).to(tl.int64)
    ok = (wid >= 0) & (wid < vocab_size)
    s = tl.load(word_ptr + wid * stride_word_row + cols, mask=mask & ok, other=0.0).to(tl.float32)
    if HAS_POS_IDS:
        pid = tl.load(pos_ids_ptr + b * stride_pos_ids_b + seq * stride_pos_ids_s).to(tl.int64)
    else:
        pid = seq.to(tl.int64)
    ok = (pid >= 0) & (pid < n_positions)
    s += tl.load(pos_ptr + pid * stride_pos_row + cols, mask=mask & ok, other=0.0).to(tl.float32)
    if HAS_TYPE:
        if HAS_TYPE_IDS:
            tid = tl.load(type_ids_ptr + b * stride_type_ids_b
                          + seq * stride_type_ids_s).to(tl.int64)
        else:
            tid = b * 0
        ok = (tid >= 0) & (tid < n_types)
        s += tl.load(type_ptr + tid * stride_type_row + cols, mask=mask & ok,
                     other=0.0).to(tl.float32)
    else:
        tid = b * 0
    return s, wid, pid, tid


@triton.jit
def _embedding_layer_norm_fwd_kernel(
    ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, w_ptr, b_ptr, seed_ptr,
    y_ptr, mean_ptr, rstd_ptr,
    stride_ids_b, stride_ids_s, stride_pos_ids_b, stride_pos_ids_s, stride_type_ids_b,
    stride_type_ids_s, stride_word_row, stride_pos_row, stride_type_row, stride_y_row,
    seq_len, n_cols, vocab_size, n_positions, n_types, eps, dropout_p,
    BLOCK_N: tl.constexpr,
    HAS_POS_IDS: tl.constexpr, HAS_TYPE: tl.constexpr, HAS_TYPE_IDS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # each program owns one token (one output row)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    # rows < 2**31 (n_rows is an int32): a 32-bit division
    b = tl.program_id(0) // seq_len
    seq = tl.program_id(0) - b * seq_len
    s, _, _, _ = _load_row_sum(ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr,
                               b.to(tl.int64), seq, cols, mask, stride_ids_b, stride_ids_s,
                               stride_pos_ids_b, stride_pos_ids_s, stride_type_ids_b,
                               stride_type_ids_s, stride_word_row, stride_pos_row,
                               stride_type_row, vocab_size, n_positions, n_types, HAS_POS_IDS,
                               HAS_TYPE, HAS_TYPE_IDS)
    mean = row_mean(s, mask, n_cols)
    sc = tl.where(mask, s - mean, 0.0)
    var = tl.sum(sc * sc, axis=0) / n_cols
    # + var * 0.0: NaN if the variance overflowed (|x - mean| past ~1.8e19; torch's CPU
    # kernel gives NaN too), not rstd = 0 (y = bias, zero gradients: a finite, wrong answer)
    rstd = 1.0 / tl.sqrt(var + eps) + var * 0.0
    y = sc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = dropout_keep_row(tl.load(seed_ptr), row, n_cols, 0, dropout_p, BLOCK_N)
        y = tl.where(keep, y / (1.0 - dropout_p), y * 0.0)
    tl.store(y_ptr + row * stride_y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _flush_run(grad_ptr, key, acc, cols, mask, n_keys, skip_key, n_cols):
    """Atomically add a run's summed gradient ``acc`` to row ``key`` of an fp32 table."""
    ok = (key >= 0) & (key < n_keys) & (key != skip_key)
    tl.atomic_add(grad_ptr + key * n_cols + cols, acc, mask=mask & ok)


@triton.jit
def _segment_key(idx, n_keys, skip_key, offset):
    """A token's sort key for one table's segmented sum: its row plus the table's ``offset``
    in the key space the segmented tables share (word rows, then position rows, then type
    rows), or -1 when that row gets no gradient (out of range, the padding row), so such
    tokens sort first and are skipped."""
    ok = (idx >= 0) & (idx < n_keys) & (idx != skip_key)
    return tl.where(ok, idx + offset, -1).to(tl.int32)


@triton.jit
def _zero_rows(ptr, n_keys, n_cols, pid, n_programs, cols, mask, BLOCK_N: tl.constexpr):
    """Zero rows pid, pid + n_programs, ... of a contiguous (n_keys, n_cols) table: the rows of
    a segmented gradient table that no id reaches stay zero (no torch.zeros launch)."""
    zero = tl.zeros((BLOCK_N,), dtype=ptr.dtype.element_ty)
    off = pid.to(tl.int64) * n_cols
    step = n_programs.to(tl.int64) * n_cols
    for _ in range(pid, n_keys, n_programs):
        tl.store(ptr + off + cols, zero, mask=mask)
        off += step


@triton.jit
def _embedding_layer_norm_bwd_kernel(
    ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, w_ptr, seed_ptr,
    dy_ptr, mean_ptr, rstd_ptr,
    dword_ptr, dpos_ptr, dtype_ptr, ds_ptr, keys_ptr, part_ptr,
    stride_ids_b, stride_ids_s, stride_pos_ids_b, stride_pos_ids_s, stride_type_ids_b,
    stride_type_ids_s, stride_word_row, stride_pos_row, stride_type_row, stride_dy_row,
    stride_part, n_rows, seq_len, n_cols, vocab_size, n_positions, n_types, padding_idx,
    rows_per_program, dropout_p,
    BLOCK_N: tl.constexpr,
    HAS_POS_IDS: tl.constexpr, HAS_TYPE: tl.constexpr, HAS_TYPE_IDS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    # each program owns tokens [pid * rows_per_program, (pid + 1) * rows_per_program), row
    # pid of each partial-sum slice of part_ptr (dweight, then dbias, the absent one left
    # out; it writes those rows even when it gets no tokens: zeros; stride_part apart, in
    # ds_ptr past the tokens' rows when segmented) and rows pid, pid + grid,
    # ... of each segmented gradient table, which it zeroes
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # tl.cast, not .to: the JIT makes an argument equal to 1 a Python int (one token)
    n_rows64 = tl.cast(n_rows, tl.int64)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # the run being accumulated per table: its id (-1: none yet) and its summed d(sum)
    cur_w = row_start * 0 - 1
    cur_p = row_start * 0 - 1
    cur_t = row_start * 0 - 1
    acc_w = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_p = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # the token's (b, seq), stepped along with row: one division per program, not per row
    b = row_start // seq_len
    seq = (row_start - b * seq_len).to(tl.int32)
    for row in range(row_start, row_end):
        s, wid, pos, tid = _load_row_sum(ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr,
                                         type_ptr, b, seq, cols, mask, stride_ids_b,
                                         stride_ids_s, stride_pos_ids_b, stride_pos_ids_s,
                                         stride_type_ids_b, stride_type_ids_s, stride_word_row,
                                         stride_pos_row, stride_type_row, vocab_size,
                                         n_positions, n_types, HAS_POS_IDS, HAS_TYPE,
                                         HAS_TYPE_IDS)
        seq += 1
        b = tl.where(seq == seq_len, b + 1, b)
        seq = tl.where(seq == seq_len, 0, seq)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (s - mean) * rstd, 0.0)
        dy = tl.load(dy_ptr + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = dropout_keep_row(seed, row, n_cols, 0, dropout_p, BLOCK_N)
            dy = tl.where(keep, dy / (1.0 - dropout_p), dy * 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * w
            dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
        c1 = tl.sum(xhat * g, axis=0) / n_cols
        c2 = tl.sum(g, axis=0) / n_cols
        ds = tl.where(mask, (g - (xhat * c1 + c2)) * rstd, 0.0)
        # a new id ends the previous run: one atomic per run, not per token
        if ATOMIC:
            new_w = wid != cur_w
            _flush_run(dword_ptr, cur_w, acc_w, cols, mask & new_w, vocab_size, padding_idx,
                       n_cols)
            acc_w = tl.where(new_w, ds, acc_w + ds)
            cur_w = wid
            new_p = pos != cur_p
            _flush_run(dpos_ptr, cur_p, acc_p, cols, mask & new_p, n_positions, -1, n_cols)
            acc_p = tl.where(new_p, ds, acc_p + ds)
            cur_p = pos
            if HAS_TYPE:
                new_t = tid != cur_t
                _flush_run(dtype_ptr, cur_t, acc_t, cols, mask & new_t, n_types, -1, n_cols)
                acc_t = tl.where(new_t, ds, acc_t + ds)
                cur_t = tid
        # else d(sum) rows and int32 sort keys (row r of keys_ptr: word, position, type),
        # read by the sort and the segment kernels; a position or type key is offset past the
        # word rows (and the position rows): one sort and one segmented sum serve every table
        if not ATOMIC:
            tl.store(ds_ptr + row * n_cols + cols, ds, mask=mask)
            tl.store(keys_ptr + row, _segment_key(wid, vocab_size, padding_idx, 0))
            tl.store(keys_ptr + n_rows64 + row,
                     _segment_key(pos, n_positions, -1, vocab_size))
            if HAS_TYPE:
                tl.store(keys_ptr + 2 * n_rows64 + row,
                         _segment_key(tid, n_types, -1, vocab_size + n_positions))
    if ATOMIC:
        _flush_run(dword_ptr, cur_w, acc_w, cols, mask, vocab_size, padding_idx, n_cols)
        _flush_run(dpos_ptr, cur_p, acc_p, cols, mask, n_positions, -1, n_cols)
        if HAS_TYPE:
            _flush_run(dtype_ptr, cur_t, acc_t, cols, mask, n_types, -1, n_cols)
    # the LayerNorm parameters' partial rows: into part_ptr's slices (summed by
    # sum_param_parts), or, segmented, into d(sum) rows n_rows + k * grid + pid with keys
    # past the tables' (one-row tables of the segmented sum, which adds them in a fixed order)
    if ATOMIC:
        lnp_ptr = part_ptr
    else:
        lnp_ptr = ds_ptr + n_rows64 * n_cols
        ln_key = vocab_size + n_positions + n_types
        key_ptr = keys_ptr + (2 + HAS_TYPE) * n_rows64 + pid
        if HAS_WEIGHT:
            tl.store(key_ptr, ln_key)
        if HAS_BIAS:
            tl.store(key_ptr + HAS_WEIGHT * tl.num_programs(0), ln_key + HAS_WEIGHT)
    if HAS_WEIGHT:
        tl.store(lnp_ptr + pid * n_cols + cols, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(lnp_ptr + HAS_WEIGHT * stride_part + pid * n_cols + cols, db_acc, mask=mask)
    # the segmented tables (then dword_ptr, dpos_ptr, dtype_ptr are the gradients in their
    # tables' dtypes) start as zeros: the segment kernels, launched after this one, write the
    # rows some id reaches
    if not ATOMIC:
        _zero_rows(dword_ptr, vocab_size, n_cols, pid, tl.num_programs(0), cols, mask, BLOCK_N)
        _zero_rows(dpos_ptr, n_positions, n_cols, pid, tl.num_programs(0), cols, mask, BLOCK_N)
        if HAS_TYPE:
            _zero_rows(dtype_ptr, n_types, n_cols, pid, tl.num_programs(0), cols, mask, BLOCK_N)


@triton.jit
def _store_grad_row(g0_ptr, g1_ptr, g2_ptr, g3_ptr, g4_ptr, key, acc, cols, mask, n_cols,
                    n_keys0, n_keys1, n_keys2, n_keys3, N_TAB: tl.constexpr):
    """Store a run's sum ``acc`` at ``key`` of the key space the N_TAB segmented tables share:
    rows [0, n_keys0) are table 0's, the next n_keys1 table 1's, and so on, each stored in its
    table's dtype. ``mask`` already excludes keys that get no gradient."""
    key = key.to(tl.int64)
    tl.store(g0_ptr + key * n_cols + cols, acc.to(g0_ptr.dtype.element_ty),
             mask=mask & (key < n_keys0))
    if N_TAB > 1:
        key -= n_keys0
        tl.store(g1_ptr + key * n_cols + cols, acc.to(g1_ptr.dtype.element_ty),
                 mask=mask & (key >= 0) & (key < n_keys1))
    if N_TAB > 2:
        key -= n_keys1
        tl.store(g2_ptr + key * n_cols + cols, acc.to(g2_ptr.dtype.element_ty),
                 mask=mask & (key >= 0) & (key < n_keys2))
    if N_TAB > 3:
        key -= n_keys2
        tl.store(g3_ptr + key * n_cols + cols, acc.to(g3_ptr.dtype.element_ty),
                 mask=mask & (key >= 0) & (key < n_keys3))
    if N_TAB > 4:
        key -= n_keys3
        tl.store(g4_ptr + key * n_cols + cols, acc.to(g4_ptr.dtype.element_ty),
                 mask=mask & (key >= 0))


@triton.jit
def _embedding_segment_sum_kernel(
    keys_ptr, perm_ptr, ds_ptr, g0_ptr, g1_ptr, g2_ptr, g3_ptr, g4_ptr, part_ptr, part_row0,
    n_rows, n_tok_keys, n_ds_rows, n_cols, n_keys0, n_keys1, n_keys2, n_keys3, n_keys,
    skip_key,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, N_TAB: tl.constexpr,
):
    # each program owns sorted positions [pid_c * CHUNK, (pid_c + 1) * CHUNK) and one column
    # block; keys_ptr holds the n_rows keys sorted (stable), perm_ptr the position each came
    # from in the unsorted keys: n_tok_keys in rows of n_ds_rows tokens (table j's key of
    # token r at j * n_ds_rows + r, d(sum) row r), then one key per d(sum) row from row
    # n_ds_rows on (the LayerNorm parameters' partial rows). part_ptr is (2, chunks, n_cols)
    # from row part_row0 on: [0] a chunk's piece of a run begun in an earlier chunk, [1] the
    # start of a run that continues into later chunks
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    part_ptr += part_row0 * n_cols
    cont_ptr = part_ptr
    open_ptr = part_ptr + tl.num_programs(0).to(tl.int64) * n_cols
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    c0 = pid_c.to(tl.int64) * CHUNK
    c1 = tl.minimum(c0 + CHUNK, n_rows)
    cur = tl.load(keys_ptr + c0)
    before = tl.load(keys_ptr + c0 - 1, mask=c0 > 0, other=-1)
    # the chunk's first run started in an earlier chunk: its piece goes to cont_ptr
    first_is_cont = (c0 > 0) & (before == cur)
    piece_start = c0
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(c0, c1):
        key = tl.load(keys_ptr + i)
        new = key != cur
        # a run ending inside the chunk is complete unless it began in an earlier chunk
        to_cont = new & (piece_start == c0) & first_is_cont
        ok = (cur >= 0) & (cur < n_keys) & (cur != skip_key)
        tl.store(cont_ptr + pid_c * n_cols + cols, acc, mask=mask & to_cont)
        _store_grad_row(g0_ptr, g1_ptr, g2_ptr, g3_ptr, g4_ptr, cur, acc, cols,
                        mask & new & (~to_cont) & ok, n_cols, n_keys0, n_keys1, n_keys2,
                        n_keys3, N_TAB)
        piece_start = tl.where(new, i, piece_start)
        src = tl.load(perm_ptr + i)
        src = tl.where(src < n_tok_keys, src % n_ds_rows, src - n_tok_keys + n_ds_rows)
        # a key that gets no gradient (padding runs are long) is never stored: skip its rows
        key_ok = (key >= 0) & (key < n_keys) & (key != skip_key)
        d = tl.load(ds_ptr + src * n_cols + cols, mask=mask & key_ok, other=0.0)
        acc = tl.where(new, d, acc + d)
        cur = key
    after = tl.load(keys_ptr + c1, mask=c1 < n_rows, other=-1)
    continues = (c1 < n_rows) & (after == cur)
    to_cont = (piece_start == c0) & first_is_cont
    to_open = continues & (~to_cont)
    ok = (cur >= 0) & (cur < n_keys) & (cur != skip_key)
    tl.store(cont_ptr + pid_c * n_cols + cols, acc, mask=mask & to_cont)
    tl.store(open_ptr + pid_c * n_cols + cols, acc, mask=mask & to_open)
    _store_grad_row(g0_ptr, g1_ptr, g2_ptr, g3_ptr, g4_ptr, cur, acc, cols,
                    mask & (~to_cont) & (~to_open) & ok, n_cols, n_keys0, n_keys1, n_keys2,
                    n_keys3, N_TAB)


@triton.jit
def _embedding_segment_merge_kernel(
    keys_ptr, g0_ptr, g1_ptr, g2_ptr, g3_ptr, g4_ptr, part_ptr, part_row0,
    n_rows, n_cols, n_keys0, n_keys1, n_keys2, n_keys3, n_keys, skip_key,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, MERGE: tl.constexpr, N_TAB: tl.constexpr,
):
    # each program owns the run that begins in chunk pid_c and continues past it, if any,
    # and one column block: it adds that run's partials from the following chunks in order
    # (keys, tables and part_ptr as the segment-sum kernel's)
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    part_ptr += part_row0 * n_cols
    cont_ptr = part_ptr
    open_ptr = part_ptr + tl.num_programs(0).to(tl.int64) * n_cols
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    c0 = pid_c.to(tl.int64) * CHUNK
    c1 = tl.minimum(c0 + CHUNK, n_rows)
    last = tl.load(keys_ptr + c1 - 1)
    before = tl.load(keys_ptr + c0 - 1, mask=c0 > 0, other=-1)
    after = tl.load(keys_ptr + c1, mask=c1 < n_rows, other=-1)
    opened = (c1 < n_rows) & (after == last) & ~((c0 > 0) & (before == last))
    # a key that gets no gradient (a long padding run, say) needs no merge
    ok = (last >= 0) & (last < n_keys) & (last != skip_key)
    if opened & ok:
        acc = tl.load(open_ptr + pid_c * n_cols + cols, mask=mask, other=0.0)
        j0 = pid_c.to(tl.int64) + 1
        more = opened
        while more:
            js = j0 + tl.arange(0, MERGE)
            starts = js * CHUNK
            # keys are sorted: the chunks holding this run are consecutive
            in_run = (starts < n_rows) & (tl.load(keys_ptr + starts, mask=starts < n_rows,
                                                   other=-1) == last)
            part = tl.load(cont_ptr + js[:, None] * n_cols + cols[None, :],
                           mask=in_run[:, None] & mask[None, :], other=0.0)
            acc += tl.sum(part, axis=0)
            more = tl.sum(in_run.to(tl.int32), axis=0) == MERGE
            j0 += MERGE
        _store_grad_row(g0_ptr, g1_ptr, g2_ptr, g3_ptr, g4_ptr, last, acc, cols, mask, n_cols,
                        n_keys0, n_keys1, n_keys2, n_keys3, N_TAB)


@triton.jit
def _min_max(ptr, n, out_ptr, pid, n_programs, BLOCK: tl.constexpr):
    """Store the min and max of this program's blocks of ptr[:n] at out_ptr[pid] and
    out_ptr[n_programs + pid] (INDEX_MAX / INDEX_MIN when it has no element)."""
    offs = tl.arange(0, BLOCK)
    lo = tl.full((BLOCK,), INDEX_MAX, tl.int64)
    hi = tl.full((BLOCK,), INDEX_MIN, tl.int64)
    for start in range(pid * BLOCK, n, n_programs * BLOCK):
        i = start + offs
        ok = i < n
        v = tl.load(ptr + i, mask=ok, other=0).to(tl.int64)
        lo = tl.minimum(lo, tl.where(ok, v, INDEX_MAX))
        hi = tl.maximum(hi, tl.where(ok, v, INDEX_MIN))
    tl.store(out_ptr + pid, tl.min(lo, axis=0))
    tl.store(out_ptr + n_programs + pid, tl.max(hi, axis=0))


@triton.jit
def _index_bounds_kernel(a_ptr, b_ptr, c_ptr, out_ptr, n_a, n_b, n_c,
                         N_IN: tl.constexpr, BLOCK: tl.constexpr):
    # each program owns every n_programs-th block of each index tensor and writes its min and
    # max of tensor t to out[t, 0, pid] and out[t, 1, pid]
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    _min_max(a_ptr, n_a, out_ptr, pid, n_programs, BLOCK)
    if N_IN > 1:
        _min_max(b_ptr, n_b, out_ptr + 2 * n_programs, pid, n_programs, BLOCK)
    if N_IN > 2:
        _min_max(c_ptr, n_c, out_ptr + 4 * n_programs, pid, n_programs, BLOCK)


# ----------------------------------------------------------------------------------------
# launchers

def _check_width(n_cols: int):
    if n_cols > MAX_EMBED_COLS:
        raise ValueError(f"the hidden size {n_cols} exceeds the fused embedding kernels' limit "
                         f"{MAX_EMBED_COLS}; use backend='torch'")


def _index_arg(t: Optional[torch.Tensor], shape) -> Tuple[Optional[torch.Tensor], int, int]:
    """An index tensor as the kernels read it, broadcast to input_ids' ``shape`` without a
    copy: (tensor, stride_b, stride_s), token (b, s) at b * stride_b + s * stride_s, where b
    runs over ``shape``'s leading dimensions flattened and s over the sequence; a broadcast
    dimension has stride 0. Copied (flat, contiguous) only when its leading dimensions do not
    flatten to one stride, e.g. broadcast over some of them but not all; never for 1-D and
    2-D input_ids."""
    if t is None:
        return None, 0, 0
    if len(shape) == 2 and t.dim() == 2:  # (B, S) ids, the common case
        (n_b, n_s), (s_b, s_s) = t.shape, t.stride()
        return t, s_b if n_b != 1 else 0, s_s if n_s != 1 else 0
    shape = shape or (1,)
    nd = len(shape)
    eff = [0] * (nd - t.dim()) + [st if n != 1 else 0 for n, st in zip(t.shape, t.stride())]
    stride_b, inner = None, 1
    for i in range(nd - 2, -1, -1):
        if shape[i] == 1:
            continue
        if stride_b is None:
            stride_b = eff[i]
        elif eff[i] != stride_b * inner:
            return torch.broadcast_to(t, shape).reshape(-1), shape[-1], 1
        inner *= shape[i]
    return t, stride_b or 0, eff[-1]


def _table(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A table (rows, H) or vector (H,) with unit column stride, as the kernels index it (a
    strided view or an expanded, stride-0 LayerNorm vector would be read wrongly or past its
    storage), copied only if needed."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _gather_inputs(input_ids, position_ids, token_type_ids, word_weight, position_weight,
                   type_weight):
    """The index tensors as (tensor, stride_b, stride_s) and unit-stride tables, as both
    launchers need them."""
    n_cols = word_weight.shape[-1]
    _check_width(n_cols)
    shape = tuple(input_ids.shape)
    ids = _index_arg(input_ids, shape)
    pos_ids = _index_arg(position_ids, shape)
    type_ids = _index_arg(token_type_ids if type_weight is not None else None, shape)
    word, pos, typ = _table(word_weight), _table(position_weight), _table(type_weight)
    return n_cols, shape, ids, pos_ids, type_ids, word, pos, typ


def index_bounds(tensors: Sequence[torch.Tensor]) -> List[Tuple[int, int]]:
    """(min, max) of each of one to three non-empty int32/int64 tensors: one launch and one
    device-to-host copy (which waits for the device), where torch takes an aminmax, a stack
    and a cast per tensor. The bound check of ``fastbert.ops.embedding_layer_norm``."""
    if not 1 <= len(tensors) <= 3:
        raise ValueError(f"index_bounds: takes one to three tensors, got {len(tensors)}")
    for t in tensors:
        if t.dtype not in (torch.int32, torch.int64) or t.numel() == 0:
            raise ValueError("index_bounds: tensors must be non-empty int32/int64, got "
                             f"{t.dtype} {tuple(t.shape)}")
    # read as flat arrays: reshape(-1) of a non-contiguous tensor can be a strided view
    return _index_bounds(*[t if t.is_contiguous() else t.contiguous() for t in tensors])


@on_tensor_device
def _index_bounds(*flat: torch.Tensor) -> List[Tuple[int, int]]:
    # the tensors as arguments: on_tensor_device launches on their GPU
    sizes = [t.numel() for t in flat]
    grid = min(cdiv(max(sizes), BOUNDS_BLOCK), BOUNDS_MAX_PROGRAMS)
    out = torch.empty((len(flat), 2, grid), dtype=torch.int64, device=flat[0].device)
    pad = 3 - len(flat)
    launch(_index_bounds_kernel, (grid,), *flat, *[None] * pad, out, *sizes, *[0] * pad,
           N_IN=len(flat), BLOCK=BOUNDS_BLOCK)
    return [(min(lo), max(hi)) for lo, hi in out.tolist()]


@on_tensor_device
def embedding_layer_norm_fwd(input_ids: torch.Tensor, word_weight: torch.Tensor,
                             position_weight: torch.Tensor, ln_weight: Optional[torch.Tensor],
                             ln_bias: Optional[torch.Tensor], eps: float,
                             position_ids: Optional[torch.Tensor] = None,
                             token_type_ids: Optional[torch.Tensor] = None,
                             type_weight: Optional[torch.Tensor] = None,
                             seed: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                             out_dtype: Optional[torch.dtype] = None):
    """Launch the fused forward.

    Args:
        input_ids: (..., S) int32/int64 token ids; the last dimension is the sequence.
        word_weight: (V, H); position_weight: (P, H); type_weight: (T, H) or None (no type
            embedding). fp32/fp16/bf16, each may differ; the output has ``out_dtype``
            (default word_weight's dtype).
        ln_weight, ln_bias: (H,) or None.
        position_ids: int tensor broadcastable to input_ids, or None for 0..S-1.
        token_type_ids: int tensor broadcastable to input_ids, or None for type 0.
        seed: int64 tensor of one element (dropout), or None.
        dropout_p: dropout probability on the normalized output; used when seed is given.

    Returns:
        y (input_ids.shape + (H,)), mean and rstd (fp32, (tokens,)).
    """
    n_cols, shape, ids, pos_ids, type_ids, word, pos, typ = _gather_inputs(
        input_ids, position_ids, token_type_ids, word_weight, position_weight, type_weight)
    ln_weight, ln_bias = _table(ln_weight), _table(ln_bias)
    n_rows = input_ids.numel()
    dev = word.device
    y = torch.empty(shape + (n_cols,), dtype=out_dtype or word.dtype, device=dev)
    mean = torch.empty((n_rows,), dtype=torch.float32, device=dev)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=dev)
    has_dropout = seed is not None and dropout_p > 0.0
    block_n, num_warps = row_block(n_cols)
    if n_rows > 0:
        launch(
            _embedding_layer_norm_fwd_kernel, (n_rows,),
            ids[0], pos_ids[0], type_ids[0], word, pos, typ, ln_weight, ln_bias, seed,
            y, mean, rstd, *ids[1:], *pos_ids[1:], *type_ids[1:],
            word.stride(0), pos.stride(0), typ.stride(0) if typ is not None else 0, n_cols,
            max(shape[-1] if shape else 1, 1), n_cols, word.shape[0], pos.shape[0],
            typ.shape[0] if typ is not None else 0, float(eps), float(dropout_p),
            BLOCK_N=block_n, HAS_POS_IDS=pos_ids[0] is not None, HAS_TYPE=typ is not None,
            HAS_TYPE_IDS=type_ids[0] is not None, HAS_DROPOUT=has_dropout,
            HAS_WEIGHT=ln_weight is not None, HAS_BIAS=ln_bias is not None,
            num_warps=num_warps,
        )
    return y, mean, rstd


def _launch_segment_sum(keys: torch.Tensor, ds: torch.Tensor, n_tok_keys: int,
                        n_ds_rows: int, grads: Sequence[torch.Tensor], skip_key: int,
                        chunk: int, partials: Optional[torch.Tensor] = None) -> None:
    """Add d(sum) rows into one to five gradient tables by sorted key, in a fixed order
    (deterministic): one sort, one segment-sum launch, one merge launch for every table.

    keys: int32 or int64 (sorted in their own dtype: 32-bit keys halve the radix sort's
    passes), n_tok_keys of them in rows of n_ds_rows (token r's key of one table, d(sum) row
    r), then one per d(sum) row from row n_ds_rows on. A table's keys are its rows plus the
    rows of the tables before it; a key outside every table, or ``skip_key``, gets nothing.
    ds: float32 with unit column stride and row stride H. grads: contiguous tables with H
    columns ((H,) counts as one row), any float dtype, zero where no key reaches (this writes
    only the rows some key reaches). partials: float32 (2 * chunks, H) scratch, or None to
    use ds's rows after those the keys name (the backward allocates ds with room for it).
    """
    n_rows = keys.shape[0]
    n_cols = ds.shape[-1]
    sorted_keys, perm = torch.sort(keys, stable=True)
    n_chunks = cdiv(n_rows, chunk)
    part_row0 = 0
    if partials is None:
        partials, part_row0 = ds, n_ds_rows + n_rows - n_tok_keys
    block_n = min(SEGMENT_BLOCK_N, next_power_of_2(max(n_cols, 16)))
    grid = (n_chunks, cdiv(n_cols, block_n))
    n_tab = len(grads)
    g = (*grads, None, None, None, None)[:5]
    sizes = [t.shape[0] if t.dim() == 2 else 1 for t in grads]
    nk = (*sizes, 0, 0, 0)[:4]
    launch(
        _embedding_segment_sum_kernel, grid,
        sorted_keys, perm, ds, *g, partials, part_row0, n_rows, n_tok_keys, n_ds_rows, n_cols,
        *nk, sum(sizes), skip_key, CHUNK=chunk, BLOCK_N=block_n, N_TAB=n_tab,
        num_warps=SEGMENT_NUM_WARPS)
    launch(
        _embedding_segment_merge_kernel, grid,
        sorted_keys, *g, partials, part_row0, n_rows, n_cols, *nk, sum(sizes), skip_key,
        CHUNK=chunk, BLOCK_N=block_n, MERGE=MERGE_TILE, N_TAB=n_tab,
        num_warps=SEGMENT_NUM_WARPS)


def _segment_sum(keys: torch.Tensor, ds: torch.Tensor, n_keys: int, skip_key: int,
                 dtype: torch.dtype, chunk: int = SEGMENT_CHUNK) -> torch.Tensor:
    """grad[k] = sum of ds rows whose key is k, summed in a fixed order (deterministic).

    keys: (n_rows,) int32 or int64. Keys out of [0, n_keys) and ``skip_key`` get nothing.
    ds: (n_rows, H) float32, contiguous. Returns (n_keys, H) of ``dtype``.
    """
    n_rows, n_cols = ds.shape
    grad = torch.zeros((n_keys, n_cols), dtype=dtype, device=ds.device)
    if n_rows > 0:
        partials = torch.empty((2 * cdiv(n_rows, chunk), n_cols), dtype=torch.float32,
                               device=ds.device)
        _launch_segment_sum(keys, ds, n_rows, n_rows, (grad,), skip_key, chunk, partials)
    return grad


@on_tensor_device
def embedding_layer_norm_bwd(dy: torch.Tensor, input_ids: torch.Tensor,
                             word_weight: torch.Tensor, position_weight: torch.Tensor,
                             ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                             mean: torch.Tensor, rstd: torch.Tensor,
                             position_ids: Optional[torch.Tensor] = None,
                             token_type_ids: Optional[torch.Tensor] = None,
                             type_weight: Optional[torch.Tensor] = None,
                             seed: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                             padding_idx: int = -1, deterministic: bool = False,
                             chunk: int = SEGMENT_CHUNK):
    """Launch the fused backward.

    Args:
        dy: gradient of the output, input_ids.shape + (H,).
        padding_idx: word id that gets no gradient, or -1 for none.
        deterministic: sort-and-segment table gradients (bit-identical run to run) for
            every table dtype; otherwise fp32 tables take fp32 atomics (16-bit ones are
            segmented either way, see ``SEGMENTED_WORD_GRAD_DTYPES``).
        chunk: sorted keys per program of the segmented sum (tests shrink it
            to exercise runs across many chunks on small inputs).
        The other arguments are the forward's.

    Returns:
        (dword, dposition, dtype, dln_weight, dln_bias), each in its parameter's dtype;
        dtype / dln_weight / dln_bias are None when that parameter is None.
    """
    # host time matters here (BERT's embedding backward is host-bound): on the segmented path
    # each tensor below is one allocation (the kernels zero the gradient tables and write
    # them in their dtypes), and one sort and one launch pair sum every gradient
    n_cols, shape, ids, pos_ids, type_ids, word, pos, typ = _gather_inputs(
        input_ids, position_ids, token_type_ids, word_weight, position_weight, type_weight)
    w = _table(ln_weight)
    n_rows = input_ids.numel()
    seq_len = shape[-1] if shape and shape[-1] > 0 else 1
    dev = word.device
    dy2, stride_dy = rows_arg(dy, n_cols)
    has_dropout = seed is not None and dropout_p > 0.0
    n_words, n_pos = word.shape[0], pos.shape[0]
    n_types = typ.shape[0] if typ is not None else 0
    # fp32 atomics unless asked to be deterministic (the flag, or
    # torch.use_deterministic_algorithms(True), as torch's own embedding backward honours)
    atomic = (not deterministic and not torch.are_deterministic_algorithms_enabled()
              and word_weight.dtype not in SEGMENTED_WORD_GRAD_DTYPES)
    n_parts = (ln_weight is not None) + (ln_bias is not None)
    block_n, num_warps = row_block(n_cols)
    dtyp = dlnw = dlnb = None
    if atomic:
        # fp32 accumulators, zeroed here; the LayerNorm parameters' partial rows (every
        # program writes its rows) and the fp32 position and type tables go through
        # sum_param_parts
        f32 = dict(dtype=torch.float32, device=dev)
        dword = torch.zeros((n_words, n_cols), **f32)
        dpos = torch.zeros((n_pos, n_cols), **f32)
        if typ is not None:
            dtyp = torch.zeros((n_types, n_cols), **f32)
        grid = max(1, min(num_programs(dev, BWD_PROGRAMS_PER_SM), n_rows))
        ds = keys = None
        parts = torch.empty((n_parts, grid, n_cols), **f32) if n_parts else None
    else:
        # the gradients in their parameters' dtypes, zeroed by the backward kernel (by torch
        # when no program runs); the LayerNorm parameters' gradients are one-row tables of
        # the segmented sum, fed by the kernel's partial rows. A full persistent grid, which
        # zeroes the tables
        if n_words + n_pos + n_types + 2 > 2**31:
            raise ValueError(f"the segmented embedding backward sorts int32 keys over the "
                             f"tables' {n_words + n_pos + n_types} rows in all; at most "
                             f"{2**31 - 2}")
        new = torch.empty if n_rows > 0 else torch.zeros
        dword = new((n_words, n_cols), dtype=word_weight.dtype, device=dev)
        dpos = new((n_pos, n_cols), dtype=position_weight.dtype, device=dev)
        seg = [dword, dpos]
        if typ is not None:
            dtyp = new((n_types, n_cols), dtype=type_weight.dtype, device=dev)
            seg.append(dtyp)
        n_tok_keys = len(seg) * n_rows
        if ln_weight is not None:
            dlnw = new((n_cols,), dtype=ln_weight.dtype, device=dev)
            seg.append(dlnw)
        if ln_bias is not None:
            dlnb = new((n_cols,), dtype=ln_bias.dtype, device=dev)
            seg.append(dlnb)
        grid = num_programs(dev, BWD_PROGRAMS_PER_SM)
        # one int32 sort key per token and table (a row each: word, position, type), then
        # one per partial row; d(sum) rows: the tokens', the partial rows, the chunk partials
        n_keys = n_tok_keys + n_parts * grid
        keys = torch.empty((n_keys,), dtype=torch.int32, device=dev)
        ds = torch.empty((n_rows + n_parts * grid + 2 * cdiv(n_keys, chunk), n_cols),
                         dtype=torch.float32, device=dev)
        parts = ds
    if n_rows > 0:
        launch(
            _embedding_layer_norm_bwd_kernel, (grid,),
            ids[0], pos_ids[0], type_ids[0], word, pos, typ, w, seed, dy2, mean, rstd,
            dword, dpos, dtyp, ds, keys, parts, *ids[1:], *pos_ids[1:], *type_ids[1:],
            word.stride(0), pos.stride(0), typ.stride(0) if typ is not None else 0, stride_dy,
            grid * n_cols, n_rows, seq_len, n_cols, n_words, n_pos, n_types,
            int(padding_idx), cdiv(n_rows, grid), float(dropout_p),
            BLOCK_N=block_n, HAS_POS_IDS=pos_ids[0] is not None, HAS_TYPE=typ is not None,
            HAS_TYPE_IDS=type_ids[0] is not None, HAS_DROPOUT=has_dropout,
            HAS_WEIGHT=ln_weight is not None, HAS_BIAS=ln_bias is not None,
            ATOMIC=atomic, num_warps=num_warps,
        )
        if not atomic:
            # the kernel mapped padding and out-of-range ids to key -1: no key is skipped here
            _launch_segment_sum(keys, ds, n_tok_keys, n_rows, seg, -1, chunk)
    if not atomic:
        return dword, dpos, dtyp, dlnw, dlnb
    # one launch finishes the LayerNorm parameter gradients (no tokens: no program ran, and
    # the sum over zero rows gives zeros) and converts the fp32 position and type tables
    if word_weight.dtype != torch.float32:
        # only reached when SEGMENTED_WORD_GRAD_DTYPES leaves out a 16-bit dtype
        dword = dword.to(word_weight.dtype)
    tables = [(dpos, position_weight)]
    if dtyp is not None:
        tables.append((dtyp, type_weight))
    dlnw, dlnb, *small = _sum_param_parts(parts, grid if n_rows > 0 else 0,
                                         (ln_weight, ln_bias), tables)
    dpos, dtyp = small[0], small[1] if dtyp is not None else None
    return dword, dpos, dtyp, dlnw, dlnb


# ----------------------------------------------------------------------------------------
# ahead-of-time compile descriptions

def _row_configs():
    out, n = [], 16
    while n <= MAX_EMBED_COLS:
        out.append(row_block(n))
        n *= 2
    return out


def aot_configs():
    """Every row block config with all options on (bf16 tables, int64 ids: segmented
    backward) and all off (fp32, int32 ids), both backward modes, and fp32 tables with all
    options on in the atomic backward; every option combination at hidden 1024 (fp16,
    segmented backward); the segmented-sum kernels over one and five fp32 tables at every
    block size, and at the block size BERT hidden sizes use over one fp16 / bf16 table, the
    backward's table sets in mixed dtypes, and int64 keys; the bound check for one to three
    int32 / int64 index tensors."""
    # (leading, sequence) strides of the three index tensors
    index_strides = {f"stride_{t}_{d}": "i64" for t in ("ids", "pos_ids", "type_ids")
                     for d in ("b", "s")}

    def fwd_sig(dt, it, yt=None):
        return {
            "ids_ptr": f"*{it}", "pos_ids_ptr": f"*{it}", "type_ids_ptr": f"*{it}",
            "word_ptr": f"*{dt}", "pos_ptr": f"*{dt}", "type_ptr": f"*{dt}", "w_ptr": "*fp32",
            "b_ptr": "*fp32", "seed_ptr": "*i64", "y_ptr": f"*{yt or dt}", "mean_ptr": "*fp32",
            "rstd_ptr": "*fp32", **index_strides, "stride_word_row": "i64",
            "stride_pos_row": "i64", "stride_type_row": "i64", "stride_y_row": "i64",
            "seq_len": "i32",
            "n_cols": "i32", "vocab_size": "i32", "n_positions": "i32", "n_types": "i32",
            "eps": "fp32", "dropout_p": "fp32", "BLOCK_N": "constexpr",
            "HAS_POS_IDS": "constexpr", "HAS_TYPE": "constexpr", "HAS_TYPE_IDS": "constexpr",
            "HAS_DROPOUT": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr"}

    def bwd_sig(dt, it, atomic, yt=None):
        # atomic tables are fp32 accumulators, segmented ones the gradients in dt
        gt = "fp32" if atomic else dt
        return {
            "ids_ptr": f"*{it}", "pos_ids_ptr": f"*{it}", "type_ids_ptr": f"*{it}",
            "word_ptr": f"*{dt}", "pos_ptr": f"*{dt}", "type_ptr": f"*{dt}", "w_ptr": "*fp32",
            "seed_ptr": "*i64", "dy_ptr": f"*{yt or dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
            "dword_ptr": f"*{gt}", "dpos_ptr": f"*{gt}", "dtype_ptr": f"*{gt}", "ds_ptr": "*fp32",
            "keys_ptr": "*i32", "part_ptr": "*fp32", **index_strides, "stride_word_row": "i64",
            "stride_pos_row": "i64", "stride_type_row": "i64", "stride_dy_row": "i64",
            "stride_part": "i32", "n_rows": "i32", "seq_len": "i32", "n_cols": "i32",
            "vocab_size": "i32", "n_positions": "i32", "n_types": "i32", "padding_idx": "i32",
            "rows_per_program": "i32", "dropout_p": "fp32", "BLOCK_N": "constexpr",
            "HAS_POS_IDS": "constexpr", "HAS_TYPE": "constexpr", "HAS_TYPE_IDS": "constexpr",
            "HAS_DROPOUT": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr",
            "ATOMIC": "constexpr"}

    def flags(pos_ids, typ, type_ids, drop, w, b):
        return dict(HAS_POS_IDS=pos_ids, HAS_TYPE=typ, HAS_TYPE_IDS=type_ids, HAS_DROPOUT=drop,
                    HAS_WEIGHT=w, HAS_BIAS=b)

    def fwd_bwd(dt, it, block_n, num_warps, f, tag, atomic_modes):
        yield AotConfig(_embedding_layer_norm_fwd_kernel, fwd_sig(dt, it),
                        dict(BLOCK_N=block_n, **f), num_warps,
                        name=f"embedding_layer_norm_fwd[{tag}]")
        for atomic in atomic_modes:
            yield AotConfig(_embedding_layer_norm_bwd_kernel, bwd_sig(dt, it, atomic),
                            dict(BLOCK_N=block_n, ATOMIC=atomic, **f), num_warps,
                            name=f"embedding_layer_norm_bwd[{tag},atomic={atomic}]")

    for block_n, num_warps in _row_configs():
        # 16-bit tables: segmented (both modes); fp32 tables: atomic (fast) or segmented
        yield from fwd_bwd("bf16", "i64", block_n, num_warps, flags(*[True] * 6),
                           f"bf16,all,{block_n}", (False,))
        yield from fwd_bwd("fp32", "i32", block_n, num_warps, flags(*[False] * 6),
                           f"fp32,none,{block_n}", (True, False))
        # fp32 tables with every option: the fast path of fp32 / AMP training (all three
        # run accumulators live, the most registers of any backward)
        yield from fwd_bwd("fp32", "i64", block_n, num_warps, flags(*[True] * 6),
                           f"fp32,all,{block_n}", (True,))
    # 16-bit tables under CUDA autocast: an fp32 output (and so an fp32 dy), as torch's
    # layer_norm gives there
    block_n, num_warps = row_block(768)
    yield AotConfig(_embedding_layer_norm_fwd_kernel, fwd_sig("bf16", "i64", "fp32"),
                    dict(BLOCK_N=block_n, **flags(*[True] * 6)), num_warps,
                    name="embedding_layer_norm_fwd[bf16 tables,fp32 output]")
    yield AotConfig(_embedding_layer_norm_bwd_kernel, bwd_sig("bf16", "i64", False, "fp32"),
                    dict(BLOCK_N=block_n, ATOMIC=False, **flags(*[True] * 6)), num_warps,
                    name="embedding_layer_norm_bwd[bf16 tables,fp32 dy]")
    # one token (batch 1 x seq 1): the JIT passes integer arguments equal to 1 as constants,
    # which a kernel must not call methods on (n_rows.to(...) once failed to compile there)
    block_n, num_warps = row_block(768)
    ones = {"n_rows": 1, "seq_len": 1, "rows_per_program": 1}
    for atomic, (dt, it) in ((False, ("bf16", "i64")), (True, ("fp32", "i64"))):
        sig = bwd_sig(dt, it, atomic) | {n: "constexpr" for n in ones}
        yield AotConfig(_embedding_layer_norm_bwd_kernel, sig,
                        dict(BLOCK_N=block_n, ATOMIC=atomic, **ones, **flags(*[True] * 6)),
                        num_warps, name=f"embedding_layer_norm_bwd[{dt},one token,atomic={atomic}]")
    block_n, num_warps = row_block(1024)
    for bits in range(1 << 5):
        pos_ids, typ, drop, w, b = [(bits >> i) & 1 == 1 for i in range(5)]
        yield from fwd_bwd("fp16", "i64", block_n, num_warps,
                           flags(pos_ids, typ, typ, drop, w, b), f"fp16,flags={bits:05b}",
                           (False,))
    # the segmented sums: the backward's int32 keys, one table (the word table of the default
    # mode) at every block size and in every dtype at the block size BERT hidden sizes use,
    # two and three tables (the deterministic mode) with mixed dtypes there; int64 keys (the
    # direct test's) at one size
    tabs = ("g0_ptr", "g1_ptr", "g2_ptr", "g3_ptr", "g4_ptr")

    def seg_configs(dts, kt, block_n):
        n_tab = len(dts)
        types = {t: f"*{d}" for t, d in zip(tabs, dts)}
        absent = {t: None for t in tabs[n_tab:]}
        c = dict(CHUNK=SEGMENT_CHUNK, BLOCK_N=block_n, N_TAB=n_tab, **absent)
        tag = f"{'/'.join(dts)},{kt},{block_n}"
        sizes = {"n_keys0": "i32", "n_keys1": "i32", "n_keys2": "i32", "n_keys3": "i32",
                 "n_keys": "i32", "skip_key": "i32"}
        sig = {"keys_ptr": f"*{kt}", "perm_ptr": "*i64", "ds_ptr": "*fp32", **types,
               **{t: "constexpr" for t in absent}, "part_ptr": "*fp32", "part_row0": "i64",
               "n_rows": "i32", "n_tok_keys": "i32", "n_ds_rows": "i32", "n_cols": "i32",
               **sizes, "CHUNK": "constexpr", "BLOCK_N": "constexpr", "N_TAB": "constexpr"}
        yield AotConfig(_embedding_segment_sum_kernel, sig, c, SEGMENT_NUM_WARPS,
                        name=f"embedding_segment_sum[{tag}]")
        sig = {"keys_ptr": f"*{kt}", **types, **{t: "constexpr" for t in absent},
               "part_ptr": "*fp32", "part_row0": "i64", "n_rows": "i32", "n_cols": "i32",
               **sizes, "CHUNK": "constexpr", "BLOCK_N": "constexpr", "MERGE": "constexpr",
               "N_TAB": "constexpr"}
        yield AotConfig(_embedding_segment_merge_kernel, sig, dict(MERGE=MERGE_TILE, **c),
                        SEGMENT_NUM_WARPS, name=f"embedding_segment_merge[{tag}]")

    block_n = 16
    while block_n <= SEGMENT_BLOCK_N:
        yield from seg_configs(("fp32",), "i32", block_n)
        yield from seg_configs(("fp32",) * 5, "i32", block_n)
        block_n *= 2
    # the backward's table sets: word and position, + type, + one or both LayerNorm
    # parameters (which may have another dtype than the tables)
    for dts in (("fp16",), ("bf16",), ("bf16", "bf16"), ("bf16", "fp32", "fp16"),
                ("bf16", "bf16", "bf16", "fp32"), ("fp16", "fp16", "fp16", "fp16", "fp16"),
                ("bf16", "bf16", "bf16", "bf16", "bf16"),
                ("bf16", "bf16", "bf16", "fp32", "fp32")):
        yield from seg_configs(dts, "i32", SEGMENT_BLOCK_N)
    yield from seg_configs(("fp32",), "i64", SEGMENT_BLOCK_N)
    # the bound check: one to three index tensors, int64 and int32
    for n_in in (1, 2, 3):
        for it in ("i64", "i32"):
            sig = {"a_ptr": f"*{it}", "b_ptr": f"*{it}", "c_ptr": f"*{it}", "out_ptr": "*i64",
                   "n_a": "i32", "n_b": "i32", "n_c": "i32", "N_IN": "constexpr",
                   "BLOCK": "constexpr"}
            consts = {"N_IN": n_in, "BLOCK": BOUNDS_BLOCK}
            for name in ("b_ptr", "c_ptr")[n_in - 1:]:
                sig[name] = "constexpr"
                consts[name] = None
            yield AotConfig(_index_bounds_kernel, sig, consts, 4,
                            name=f"index_bounds[{it},{n_in}]")
