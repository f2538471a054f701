"""BERT's embedding layer, ``dropout(LayerNorm(word[ids] + position[pos] + type[types]))``,
forward and backward.

Forward: one program per token gathers its three table rows, sums them in fp32, normalizes,
applies dropout and stores one row, plus the row's mean and rstd (fp32). Eager PyTorch
writes and re-reads the (tokens, H) sum twice before the LayerNorm; here only the output is
written.

Backward: a persistent kernel (a few programs per SM, each over a contiguous range of tokens)
recomputes the sum from the tables (cheaper than storing it: the same bytes read, none
written), runs the LayerNorm backward, accumulates dweight / dbias partial rows in registers,
and hands the gradient of the sum, d(sum), to the three tables. Repeated ids (``[PAD]``,
``[CLS]``, frequent words, every position once per sequence, two token types) make that a
scatter-add with collisions, done one of two ways:

- fast (default): ``tl.atomic_add`` into fp32 gradient tables. A program keeps a running
  sum per table while consecutive tokens share an id (runs of ``[PAD]``, token type runs)
  and issues one atomic per run, which cuts contention on the type table to a couple of
  atomics per program. fp32 atomics commute only up to rounding, so results may differ in
  the last bits from run to run. For fp16/bf16 word tables the word gradient takes the
  segmented sum below instead (see ``SEGMENTED_WORD_GRAD_DTYPES``): atomics would need an
  fp32 (V, H) buffer zeroed and cast afterwards, more traffic than the sort at V = 30522.
- deterministic: the kernel stores d(sum) rows (fp32); then, per table, the token indices
  are sorted by id (stable) and a segmented sum adds each id's rows in a fixed order. The
  sorted order is cut into chunks of ``SEGMENT_CHUNK`` tokens, one program per chunk (and
  column block): runs that end inside a chunk are written to the table directly; a run
  crossing chunk boundaries leaves one partial row per chunk, which a second kernel adds in
  chunk order, ``MERGE_TILE`` chunks at a time. A long run (the type table's two ids, a
  padding id) is thus summed in parallel, not by one program, and every sum has a fixed
  order: bit-identical gradients run to run.

Ids out of range are never read or written: the loads are masked (the row counts as zero)
and the scatter skips them; ``fastbert.ops.embedding_layer_norm`` raises before launching
unless its bound check is turned off. ``padding_idx`` gets no gradient, as in
``nn.Embedding``.

References: NVIDIA Megatron / apex fused embedding + LayerNorm, Triton tutorial 05
(layer norm), CUB-style segmented reductions over sorted keys.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (AotConfig, cdiv, dropout_keep, next_power_of_2, num_programs,
                      on_tensor_device, row_block)

# Widest hidden size the fused kernels take: the backward keeps a row of the LayerNorm
# input, dy, three run accumulators and two partial sums in registers; ptxas reports 784 B
# of spill stores at 8192 on sm_90 and none worth naming at 4096 (BERT-family hidden sizes
# are <= 4096). Wider rows fall back to the PyTorch reference.
MAX_EMBED_COLS = 4096
# Programs per SM in the persistent backward, as in the LayerNorm backward.
BWD_PROGRAMS_PER_SM = 4
# Sorted tokens per program in the deterministic segmented sum: small enough for thousands
# of programs at BERT batch sizes, large enough that most runs end inside one chunk.
SEGMENT_CHUNK = 32
# Columns per program in the segmented sum (a quarter of a BERT-base row keeps 4x the
# programs in flight).
SEGMENT_BLOCK_N = 256
# Word tables whose gradient takes the segmented sum even in the fast mode: it writes the
# 16-bit gradient directly, where atomics need an fp32 (V, H) table zeroed, then cast (about
# twice the memory traffic at BERT's vocabulary). fp32 tables take the atomics.
SEGMENTED_WORD_GRAD_DTYPES = (torch.float16, torch.bfloat16)
# Chunk partials the merge kernel adds per step of a run that spans many chunks.
MERGE_TILE = 16
SEGMENT_NUM_WARPS = 4


@triton.jit
def _load_row_sum(ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, row,
                  cols, mask, stride_word_row, stride_pos_row, stride_type_row,
                  seq_len, vocab_size, n_positions, n_types,
                  HAS_POS_IDS: tl.constexpr, HAS_TYPE: tl.constexpr, HAS_TYPE_IDS: tl.constexpr):
    """word[id] + position[pos] + type[t] of one token in fp32, and the three row indices.

    A row index out of its table's range contributes zeros (masked load, never read)."""
    wid = tl.load(ids_ptr + row).to(tl.int64)
    ok = (wid >= 0) & (wid < vocab_size)
    s = tl.load(word_ptr + wid * stride_word_row + cols, mask=mask & ok, other=0.0).to(tl.float32)
    if HAS_POS_IDS:
        pid = tl.load(pos_ids_ptr + row).to(tl.int64)
    else:
        pid = row % seq_len
    ok = (pid >= 0) & (pid < n_positions)
    s += tl.load(pos_ptr + pid * stride_pos_row + cols, mask=mask & ok, other=0.0).to(tl.float32)
    if HAS_TYPE:
        if HAS_TYPE_IDS:
            tid = tl.load(type_ids_ptr + row).to(tl.int64)
        else:
            tid = row * 0
        ok = (tid >= 0) & (tid < n_types)
        s += tl.load(type_ptr + tid * stride_type_row + cols, mask=mask & ok,
                     other=0.0).to(tl.float32)
    else:
        tid = row * 0
    return s, wid, pid, tid


@triton.jit
def _embedding_layer_norm_fwd_kernel(
    ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, w_ptr, b_ptr, seed_ptr,
    y_ptr, mean_ptr, rstd_ptr,
    stride_word_row, stride_pos_row, stride_type_row, stride_y_row,
    seq_len, n_cols, vocab_size, n_positions, n_types, eps, dropout_p,
    BLOCK_N: tl.constexpr,
    HAS_POS_IDS: tl.constexpr, HAS_TYPE: tl.constexpr, HAS_TYPE_IDS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # each program owns one token (one output row)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    s, _, _, _ = _load_row_sum(ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr,
                               row, cols, mask, stride_word_row, stride_pos_row,
                               stride_type_row, seq_len, vocab_size, n_positions, n_types,
                               HAS_POS_IDS, HAS_TYPE, HAS_TYPE_IDS)
    mean = tl.sum(s, axis=0) / n_cols
    sc = tl.where(mask, s - mean, 0.0)
    var = tl.sum(sc * sc, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    y = sc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), row * n_cols + cols, dropout_p)
        y = tl.where(keep, y / (1.0 - dropout_p), 0.0)
    tl.store(y_ptr + row * stride_y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _flush_run(grad_ptr, key, acc, cols, mask, n_keys, skip_key, n_cols):
    """Atomically add a run's summed gradient ``acc`` to row ``key`` of an fp32 table."""
    ok = (key >= 0) & (key < n_keys) & (key != skip_key)
    tl.atomic_add(grad_ptr + key * n_cols + cols, acc, mask=mask & ok)


@triton.jit
def _embedding_layer_norm_bwd_kernel(
    ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, w_ptr, seed_ptr,
    dy_ptr, mean_ptr, rstd_ptr,
    dword_ptr, dpos_ptr, dtype_ptr, ds_ptr, dw_part_ptr, db_part_ptr,
    stride_word_row, stride_pos_row, stride_type_row, stride_dy_row,
    n_rows, seq_len, n_cols, vocab_size, n_positions, n_types, padding_idx,
    rows_per_program, dropout_p,
    BLOCK_N: tl.constexpr,
    HAS_POS_IDS: tl.constexpr, HAS_TYPE: tl.constexpr, HAS_TYPE_IDS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC_WORD: tl.constexpr, ATOMIC_SMALL: tl.constexpr,
):
    # each program owns tokens [pid * rows_per_program, (pid + 1) * rows_per_program) and one
    # partial row of dweight / dbias
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
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
    for row in range(row_start, row_end):
        s, wid, pos, tid = _load_row_sum(ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr,
                                         type_ptr, row, cols, mask, stride_word_row,
                                         stride_pos_row, stride_type_row, seq_len, vocab_size,
                                         n_positions, n_types, HAS_POS_IDS, HAS_TYPE,
                                         HAS_TYPE_IDS)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (s - mean) * rstd, 0.0)
        dy = tl.load(dy_ptr + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, row * n_cols + cols, dropout_p)
            dy = tl.where(keep, dy / (1.0 - dropout_p), 0.0)
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
        if ATOMIC_WORD:
            new_w = wid != cur_w
            _flush_run(dword_ptr, cur_w, acc_w, cols, mask & new_w, vocab_size, padding_idx,
                       n_cols)
            acc_w = tl.where(new_w, ds, acc_w + ds)
            cur_w = wid
        if ATOMIC_SMALL:
            new_p = pos != cur_p
            _flush_run(dpos_ptr, cur_p, acc_p, cols, mask & new_p, n_positions, -1, n_cols)
            acc_p = tl.where(new_p, ds, acc_p + ds)
            cur_p = pos
            if HAS_TYPE:
                new_t = tid != cur_t
                _flush_run(dtype_ptr, cur_t, acc_t, cols, mask & new_t, n_types, -1, n_cols)
                acc_t = tl.where(new_t, ds, acc_t + ds)
                cur_t = tid
        if not (ATOMIC_WORD and ATOMIC_SMALL):
            tl.store(ds_ptr + row * n_cols + cols, ds, mask=mask)
    if ATOMIC_WORD:
        _flush_run(dword_ptr, cur_w, acc_w, cols, mask, vocab_size, padding_idx, n_cols)
    if ATOMIC_SMALL:
        _flush_run(dpos_ptr, cur_p, acc_p, cols, mask, n_positions, -1, n_cols)
        if HAS_TYPE:
            _flush_run(dtype_ptr, cur_t, acc_t, cols, mask, n_types, -1, n_cols)
    if HAS_WEIGHT:
        tl.store(dw_part_ptr + pid * n_cols + cols, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid * n_cols + cols, db_acc, mask=mask)


@triton.jit
def _embedding_segment_sum_kernel(
    keys_ptr, perm_ptr, ds_ptr, grad_ptr, cont_ptr, open_ptr,
    n_rows, n_cols, n_keys, skip_key,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # each program owns sorted positions [pid_c * CHUNK, (pid_c + 1) * CHUNK) and one column
    # block; keys_ptr holds the ids sorted (stable), perm_ptr the token each came from
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
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
        tl.store(grad_ptr + cur * n_cols + cols, acc.to(grad_ptr.dtype.element_ty),
                 mask=mask & new & (~to_cont) & ok)
        piece_start = tl.where(new, i, piece_start)
        src = tl.load(perm_ptr + i)
        d = tl.load(ds_ptr + src * n_cols + cols, mask=mask, other=0.0)
        acc = tl.where(new, d, acc + d)
        cur = key
    after = tl.load(keys_ptr + c1, mask=c1 < n_rows, other=-1)
    continues = (c1 < n_rows) & (after == cur)
    to_cont = (piece_start == c0) & first_is_cont
    to_open = continues & (~to_cont)
    ok = (cur >= 0) & (cur < n_keys) & (cur != skip_key)
    tl.store(cont_ptr + pid_c * n_cols + cols, acc, mask=mask & to_cont)
    tl.store(open_ptr + pid_c * n_cols + cols, acc, mask=mask & to_open)
    tl.store(grad_ptr + cur * n_cols + cols, acc.to(grad_ptr.dtype.element_ty),
             mask=mask & (~to_cont) & (~to_open) & ok)


@triton.jit
def _embedding_segment_merge_kernel(
    keys_ptr, grad_ptr, cont_ptr, open_ptr,
    n_rows, n_cols, n_keys, skip_key,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, MERGE: tl.constexpr,
):
    # each program owns the run that begins in chunk pid_c and continues past it, if any,
    # and one column block: it adds that run's partials from the following chunks in order
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    c0 = pid_c.to(tl.int64) * CHUNK
    c1 = tl.minimum(c0 + CHUNK, n_rows)
    last = tl.load(keys_ptr + c1 - 1)
    before = tl.load(keys_ptr + c0 - 1, mask=c0 > 0, other=-1)
    after = tl.load(keys_ptr + c1, mask=c1 < n_rows, other=-1)
    opened = (c1 < n_rows) & (after == last) & ~((c0 > 0) & (before == last))
    if opened:
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
        ok = (last >= 0) & (last < n_keys) & (last != skip_key)
        tl.store(grad_ptr + last * n_cols + cols, acc.to(grad_ptr.dtype.element_ty),
                 mask=mask & ok)


# ----------------------------------------------------------------------------------------
# launchers

def _check_width(n_cols: int):
    if n_cols > MAX_EMBED_COLS:
        raise ValueError(f"the hidden size {n_cols} exceeds the fused embedding kernels' limit "
                         f"{MAX_EMBED_COLS}; use backend='torch'")


def _flat_ids(t: Optional[torch.Tensor], shape) -> Optional[torch.Tensor]:
    """Index tensor broadcast to the ids' shape, flattened to (tokens,) contiguous."""
    if t is None:
        return None
    return torch.broadcast_to(t, shape).reshape(-1).contiguous()


def _table(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A table (rows, H) or vector (H,) with unit column stride, as the kernels index it (a
    strided view or an expanded, stride-0 LayerNorm vector would be read wrongly or past its
    storage), copied only if needed."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _gather_inputs(input_ids, position_ids, token_type_ids, word_weight, position_weight,
                   type_weight):
    """Flattened index tensors and unit-stride tables, as both launchers need them."""
    n_cols = word_weight.shape[-1]
    _check_width(n_cols)
    shape = tuple(input_ids.shape)
    ids = _flat_ids(input_ids, shape)
    pos_ids = _flat_ids(position_ids, shape)
    type_ids = _flat_ids(token_type_ids, shape) if type_weight is not None else None
    word, pos, typ = _table(word_weight), _table(position_weight), _table(type_weight)
    return n_cols, shape, ids, pos_ids, type_ids, word, pos, typ


@on_tensor_device
def embedding_layer_norm_fwd(input_ids: torch.Tensor, word_weight: torch.Tensor,
                             position_weight: torch.Tensor, ln_weight: Optional[torch.Tensor],
                             ln_bias: Optional[torch.Tensor], eps: float,
                             position_ids: Optional[torch.Tensor] = None,
                             token_type_ids: Optional[torch.Tensor] = None,
                             type_weight: Optional[torch.Tensor] = None,
                             seed: Optional[torch.Tensor] = None, dropout_p: float = 0.0):
    """Launch the fused forward.

    Args:
        input_ids: (..., S) int32/int64 token ids; the last dimension is the sequence.
        word_weight: (V, H); position_weight: (P, H); type_weight: (T, H) or None (no type
            embedding). fp32/fp16/bf16, each may differ; the output has word_weight's dtype.
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
    n_rows = ids.numel()
    dev = word.device
    y = torch.empty((n_rows, n_cols), dtype=word.dtype, device=dev)
    mean = torch.empty((n_rows,), dtype=torch.float32, device=dev)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=dev)
    has_dropout = seed is not None and dropout_p > 0.0
    block_n, num_warps = row_block(n_cols)
    if n_rows > 0:
        _embedding_layer_norm_fwd_kernel[(n_rows,)](
            ids, pos_ids, type_ids, word, pos, typ, ln_weight, ln_bias, seed, y, mean, rstd,
            word.stride(0), pos.stride(0), typ.stride(0) if typ is not None else 0, y.stride(0),
            max(shape[-1] if shape else 1, 1), n_cols, word.shape[0], pos.shape[0],
            typ.shape[0] if typ is not None else 0, float(eps), float(dropout_p),
            BLOCK_N=block_n, HAS_POS_IDS=pos_ids is not None, HAS_TYPE=typ is not None,
            HAS_TYPE_IDS=type_ids is not None, HAS_DROPOUT=has_dropout,
            HAS_WEIGHT=ln_weight is not None, HAS_BIAS=ln_bias is not None,
            num_warps=num_warps,
        )
    return y.reshape(shape + (n_cols,)), mean, rstd


def _segment_sum(keys: torch.Tensor, ds: torch.Tensor, n_keys: int, skip_key: int,
                 dtype: torch.dtype, chunk: int = SEGMENT_CHUNK) -> torch.Tensor:
    """grad[k] = sum of ds rows whose key is k, summed in a fixed order (deterministic).

    Keys out of [0, n_keys) and ``skip_key`` get nothing. Returns (n_keys, H) of ``dtype``.
    """
    n_rows, n_cols = ds.shape
    grad = torch.zeros((n_keys, n_cols), dtype=dtype, device=ds.device)
    if n_rows == 0:
        return grad
    sorted_keys, perm = torch.sort(keys.to(torch.int64), stable=True)
    n_chunks = cdiv(n_rows, chunk)
    cont = torch.empty((n_chunks, n_cols), dtype=torch.float32, device=ds.device)
    opened = torch.empty((n_chunks, n_cols), dtype=torch.float32, device=ds.device)
    block_n = min(SEGMENT_BLOCK_N, next_power_of_2(max(n_cols, 16)))
    grid = (n_chunks, cdiv(n_cols, block_n))
    _embedding_segment_sum_kernel[grid](
        sorted_keys, perm, ds, grad, cont, opened, n_rows, n_cols, n_keys, skip_key,
        CHUNK=chunk, BLOCK_N=block_n, num_warps=SEGMENT_NUM_WARPS)
    _embedding_segment_merge_kernel[grid](
        sorted_keys, grad, cont, opened, n_rows, n_cols, n_keys, skip_key,
        CHUNK=chunk, BLOCK_N=block_n, MERGE=MERGE_TILE, num_warps=SEGMENT_NUM_WARPS)
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
        deterministic: sort-and-segment table gradients (bit-identical run to run) instead
            of fp32 atomics.
        chunk: sorted tokens per program of the deterministic segmented sum (tests shrink it
            to exercise runs across many chunks on small inputs).
        The other arguments are the forward's.

    Returns:
        (dword, dposition, dtype, dln_weight, dln_bias), each in its parameter's dtype;
        dtype / dln_weight / dln_bias are None when that parameter is None.
    """
    n_cols, shape, ids, pos_ids, type_ids, word, pos, typ = _gather_inputs(
        input_ids, position_ids, token_type_ids, word_weight, position_weight, type_weight)
    w = _table(ln_weight)
    n_rows = ids.numel()
    seq_len = max(shape[-1] if shape else 1, 1)
    dev = word.device
    dy2 = dy.reshape(n_rows, n_cols)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    has_dropout = seed is not None and dropout_p > 0.0
    f32 = dict(dtype=torch.float32, device=dev)
    atomic_small = not deterministic
    atomic_word = not deterministic and word_weight.dtype not in SEGMENTED_WORD_GRAD_DTYPES
    dword = torch.zeros((word.shape[0], n_cols), **f32) if atomic_word else None
    dpos = torch.zeros((pos.shape[0], n_cols), **f32) if atomic_small else None
    dtyp = (torch.zeros((typ.shape[0], n_cols), **f32)
            if atomic_small and typ is not None else None)
    ds = None if atomic_word and atomic_small else torch.empty((n_rows, n_cols), **f32)
    grid = max(1, min(num_programs(dev, BWD_PROGRAMS_PER_SM), n_rows))
    rows_per_program = cdiv(n_rows, grid) if n_rows > 0 else 0
    dw_part = torch.zeros((grid, n_cols), **f32) if ln_weight is not None else None
    db_part = torch.zeros((grid, n_cols), **f32) if ln_bias is not None else None
    block_n, num_warps = row_block(n_cols)
    if n_rows > 0:
        _embedding_layer_norm_bwd_kernel[(grid,)](
            ids, pos_ids, type_ids, word, pos, typ, w, seed, dy2, mean, rstd,
            dword, dpos, dtyp, ds, dw_part, db_part,
            word.stride(0), pos.stride(0), typ.stride(0) if typ is not None else 0,
            dy2.stride(0), n_rows, seq_len, n_cols, word.shape[0], pos.shape[0],
            typ.shape[0] if typ is not None else 0, int(padding_idx), rows_per_program,
            float(dropout_p),
            BLOCK_N=block_n, HAS_POS_IDS=pos_ids is not None, HAS_TYPE=typ is not None,
            HAS_TYPE_IDS=type_ids is not None, HAS_DROPOUT=has_dropout,
            HAS_WEIGHT=ln_weight is not None, HAS_BIAS=ln_bias is not None,
            ATOMIC_WORD=atomic_word, ATOMIC_SMALL=atomic_small, num_warps=num_warps,
        )
    if atomic_word:
        dword = dword.to(word_weight.dtype)
    else:
        dword = _segment_sum(ids, ds, word.shape[0], int(padding_idx), word_weight.dtype, chunk)
    if atomic_small:
        dpos = dpos.to(position_weight.dtype)
        dtyp = dtyp.to(type_weight.dtype) if dtyp is not None else None
    else:
        rows = torch.arange(n_rows, device=dev)
        pos_keys = pos_ids if pos_ids is not None else rows % seq_len
        dpos = _segment_sum(pos_keys, ds, pos.shape[0], -1, position_weight.dtype, chunk)
        if typ is not None:
            type_keys = type_ids if type_ids is not None else torch.zeros_like(rows)
            dtyp = _segment_sum(type_keys, ds, typ.shape[0], -1, type_weight.dtype, chunk)
    dlnw = dw_part.sum(0).to(ln_weight.dtype) if ln_weight is not None else None
    dlnb = db_part.sum(0).to(ln_bias.dtype) if ln_bias is not None else None
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
    """Every row block config with all options on (bf16 tables, int64 ids) and all off
    (fp32, int32 ids), both backward modes, and fp32 tables with all options on in the
    all-atomic backward; every option combination at hidden 1024 (fp16,
    atomic backward); the segmented-sum kernels at every block size (fp32 gradients) and
    for fp16/bf16 gradients at the block size BERT hidden sizes use."""
    def fwd_sig(dt, it):
        return {
            "ids_ptr": f"*{it}", "pos_ids_ptr": f"*{it}", "type_ids_ptr": f"*{it}",
            "word_ptr": f"*{dt}", "pos_ptr": f"*{dt}", "type_ptr": f"*{dt}", "w_ptr": "*fp32",
            "b_ptr": "*fp32", "seed_ptr": "*i64", "y_ptr": f"*{dt}", "mean_ptr": "*fp32",
            "rstd_ptr": "*fp32", "stride_word_row": "i64", "stride_pos_row": "i64",
            "stride_type_row": "i64", "stride_y_row": "i64", "seq_len": "i32",
            "n_cols": "i32", "vocab_size": "i32", "n_positions": "i32", "n_types": "i32",
            "eps": "fp32", "dropout_p": "fp32", "BLOCK_N": "constexpr",
            "HAS_POS_IDS": "constexpr", "HAS_TYPE": "constexpr", "HAS_TYPE_IDS": "constexpr",
            "HAS_DROPOUT": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr"}

    def bwd_sig(dt, it):
        return {
            "ids_ptr": f"*{it}", "pos_ids_ptr": f"*{it}", "type_ids_ptr": f"*{it}",
            "word_ptr": f"*{dt}", "pos_ptr": f"*{dt}", "type_ptr": f"*{dt}", "w_ptr": "*fp32",
            "seed_ptr": "*i64", "dy_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
            "dword_ptr": "*fp32", "dpos_ptr": "*fp32", "dtype_ptr": "*fp32", "ds_ptr": "*fp32",
            "dw_part_ptr": "*fp32", "db_part_ptr": "*fp32", "stride_word_row": "i64",
            "stride_pos_row": "i64", "stride_type_row": "i64", "stride_dy_row": "i64",
            "n_rows": "i32", "seq_len": "i32", "n_cols": "i32", "vocab_size": "i32",
            "n_positions": "i32", "n_types": "i32", "padding_idx": "i32",
            "rows_per_program": "i32", "dropout_p": "fp32", "BLOCK_N": "constexpr",
            "HAS_POS_IDS": "constexpr", "HAS_TYPE": "constexpr", "HAS_TYPE_IDS": "constexpr",
            "HAS_DROPOUT": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr",
            "ATOMIC_WORD": "constexpr", "ATOMIC_SMALL": "constexpr"}

    def flags(pos_ids, typ, type_ids, drop, w, b):
        return dict(HAS_POS_IDS=pos_ids, HAS_TYPE=typ, HAS_TYPE_IDS=type_ids, HAS_DROPOUT=drop,
                    HAS_WEIGHT=w, HAS_BIAS=b)

    def fwd_bwd(dt, it, block_n, num_warps, f, tag, atomic_modes):
        yield AotConfig(_embedding_layer_norm_fwd_kernel, fwd_sig(dt, it),
                        dict(BLOCK_N=block_n, **f), num_warps,
                        name=f"embedding_layer_norm_fwd[{tag}]")
        for word, small in atomic_modes:
            yield AotConfig(_embedding_layer_norm_bwd_kernel, bwd_sig(dt, it),
                            dict(BLOCK_N=block_n, ATOMIC_WORD=word, ATOMIC_SMALL=small, **f),
                            num_warps,
                            name=f"embedding_layer_norm_bwd[{tag},atomic={word},{small}]")

    for block_n, num_warps in _row_configs():
        # 16-bit tables: segmented word gradient (fast) or all segmented (deterministic);
        # fp32 tables: all atomic (fast) or all segmented
        yield from fwd_bwd("bf16", "i64", block_n, num_warps, flags(*[True] * 6),
                           f"bf16,all,{block_n}", ((False, True), (False, False)))
        yield from fwd_bwd("fp32", "i32", block_n, num_warps, flags(*[False] * 6),
                           f"fp32,none,{block_n}", ((True, True), (False, False)))
        # fp32 tables with every option: the fast path of fp32 / AMP training (all three
        # run accumulators live, the most registers of any backward)
        yield from fwd_bwd("fp32", "i64", block_n, num_warps, flags(*[True] * 6),
                           f"fp32,all,{block_n}", ((True, True),))
    block_n, num_warps = row_block(1024)
    for bits in range(1 << 5):
        pos_ids, typ, drop, w, b = [(bits >> i) & 1 == 1 for i in range(5)]
        yield from fwd_bwd("fp16", "i64", block_n, num_warps,
                           flags(pos_ids, typ, typ, drop, w, b), f"fp16,flags={bits:05b}",
                           ((False, True),))
    seg_sig = lambda dt: {
        "keys_ptr": "*i64", "perm_ptr": "*i64", "ds_ptr": "*fp32", "grad_ptr": f"*{dt}",
        "cont_ptr": "*fp32", "open_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
        "n_keys": "i32", "skip_key": "i32", "CHUNK": "constexpr", "BLOCK_N": "constexpr"}
    merge_sig = lambda dt: {
        "keys_ptr": "*i64", "grad_ptr": f"*{dt}", "cont_ptr": "*fp32", "open_ptr": "*fp32",
        "n_rows": "i32", "n_cols": "i32", "n_keys": "i32", "skip_key": "i32",
        "CHUNK": "constexpr", "BLOCK_N": "constexpr", "MERGE": "constexpr"}
    block_n = 16
    while block_n <= SEGMENT_BLOCK_N:
        for dt in (("fp32", "fp16", "bf16") if block_n == SEGMENT_BLOCK_N else ("fp32",)):
            c = dict(CHUNK=SEGMENT_CHUNK, BLOCK_N=block_n)
            yield AotConfig(_embedding_segment_sum_kernel, seg_sig(dt), c, SEGMENT_NUM_WARPS,
                            name=f"embedding_segment_sum[{dt},{block_n}]")
            yield AotConfig(_embedding_segment_merge_kernel, merge_sig(dt),
                            dict(MERGE=MERGE_TILE, **c), SEGMENT_NUM_WARPS,
                            name=f"embedding_segment_merge[{dt},{block_n}]")
        block_n *= 2
