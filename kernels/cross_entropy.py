"""Softmax cross-entropy over rows of logits, and the masked-LM head loss built on it.

One kernel pair computes, for each row r of logits x (V classes) with target t_r,

    m_r    = max_c x_rc,   l_r = log(sum_c exp(x_rc - m_r))      (online, one pass over V)
    loss_r = (1 - eps) (m_r - x_rt) + eps (m_r - mean_c x_rc) + l_r     (eps: label smoothing)
    dx_rc  = scale_r (exp((x_rc - m_r) - l_r) - eps / V - (1 - eps) [c == t_r])

with loss_r = 0 and dx_r = 0 where t_r == ignore_index: this is
``torch.nn.functional.cross_entropy`` with ``label_smoothing`` and ``ignore_index``.

Three ways to use it:

- ``cross_entropy_fwd`` with ``grad_scale`` + ``cross_entropy_scale_`` *store* (the
  ``cross_entropy`` op with ``STORE_GRADS`` (below) on; off by default: on an H200, bf16 16384 x
  30522, this forward ran at ~1.2 TB/s where the recompute kernels' three passes averaged ~3.9
  TB/s; ~2.8 TB/s each at 4096 rows): the forward writes the
  gradient of the loss itself (the incoming gradient taken as 1). A row of up to ``MAX_ONE_BLOCK_V``
  classes (BERT's 30522 included) is held in registers whole (``ONE_BLOCK``), so the forward
  reads the logits once and writes the gradient once; the backward multiplies it in place by
  the incoming gradient, read on the device, and does nothing more when that is 1.0 (a plain
  ``loss.backward()``): two passes over (N, V) in all, where eager PyTorch makes about six
  (log_softmax read + write; nll backward zero-fill; log_softmax backward two reads + write).
  Any other incoming gradient (loss scaling, accumulation) adds a read and a write. Wider rows
  loop over blocks and read the row twice in the forward (the second read mostly from L2).
  ``STORE_GRAD_PIPELINED_WARPS_PER_SM`` (opt-in, not yet timed) runs the one-block forward on
  a persistent grid whose row loop is software-pipelined: a row's load in flight while the row
  before is reduced and its gradient written.
- ``cross_entropy_fwd`` + ``cross_entropy_bwd`` *recompute*: the forward reads the logits once
  and stores only (m, l) (8 bytes a row); the backward reads them again and writes the
  gradient: three passes. The ``cross_entropy`` op's default, and always for reduction "none"
  (a gradient a row), inference (one read), float16 (a stored gradient of a mean underflows
  before loss scaling reaches it: see ``fastbert.ops.cross_entropy.stores_grads``) and
  torch.compile (AOTAutograd cannot trace a backward that mutates a saved tensor).
- ``linear_cross_entropy`` (the ``masked_lm_loss`` op) fuses the vocabulary projection: rows
  are processed in chunks; for each chunk cuBLAS computes logits = x W^T + b into one reused
  buffer, the forward kernel computes the loss and each row's statistics, the backward kernel
  overwrites those logits with the gradient, and cuBLAS immediately turns it into dx, dW and
  db (Liger's fused linear
  cross-entropy). No (rows, V) tensor outlives its chunk, so the memory is one chunk buffer of
  about ``CHUNK_ELEMENTS`` elements whatever the number of rows. For a reduced loss in float32
  or bfloat16 the gradient is written in the forward, because the logits do not exist
  afterwards and recomputing them costs a second projection GEMM; float16 and reduction
  "none" recompute them in the backward (``fastbert.ops.cross_entropy.stores_grads``).

Host cost: small and medium BERT shapes are host-bound (on an H200 machine ~20 us a launch, ~13
us a torch op), so the scalars around the kernels stay on the device without torch ops. A
reduced loss, the count of a mean and the label check are one more launch of one program
(``_cross_entropy_reduce_kernel``: fp64 sum, count, first out-of-range target), which torch
did in about a dozen ops; above ``REDUCE_ONE_PROGRAM_ROWS`` rows a grid of programs writes
partials and ``_cross_entropy_reduce_parts_kernel`` combines them (in a fixed order: the same
bits run to run). The backward kernels read the incoming gradient (in the loss's dtype) and the
count and divide on the device; ``cross_entropy_scale_`` scales masked_lm_loss's three stored
gradients in one launch. masked_lm_loss's row selection and label check are one launch of one
program (``select_rows``: the rows in order, their labels, the count, the first bad label),
whose two numbers the host reads in its one sync, where torch took seven ops and two syncs.

Numerics: fp32 accumulation (the few scalars of a row's loss are combined in fp64 and rounded
once); the running max keeps exp() in range, so logits of +-1e4 (fp16's
range included) are safe. The max m and the log-sum l are kept apart rather than folded into
one lse = m + l: at |x| ~ 1e4 the rounding of that sum alone (5e-4) would be a relative error
of 5e-4 in every probability, where torch's log_softmax has ~1e-7. -inf logits (a masked
vocabulary entry) are allowed, even for a whole block. A target outside [0, V) other than
ignore_index is never used as an address: its row gets a NaN loss and a zero gradient (the
reduction reports the first one and the ops raise, on by default). In ``linear_cross_entropy``
the gradient of the logits is stored in the input dtype (as torch's own backward does), dW
partial products of several chunks are summed in fp32 for 16-bit weights, and db is summed in
fp32. In fp16 that gradient
is stored scaled up into fp16's normal range (``PRESCALE``) and the small factor is applied to
the fp32 GEMM results, rounded once: stored as it is, most of it would underflow.

References: Liger-Kernel's cross_entropy and fused_linear_cross_entropy; Milakov & Gimelshein,
"Online normalizer calculation for softmax" (2018); Wijmans et al., "Cut Your Losses in
Large-Vocabulary Language Models" (2024).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (LOG2E, AotConfig, cdiv, mm_fp32, next_power_of_2, num_programs,
                      on_tensor_device)
from ._launch import launch

# Whether the ``cross_entropy`` op's forward (fastbert.ops) writes the gradient of a reduced
# loss (float32 / bfloat16) for its backward to scale in place (two passes over (N, V)), instead
# of the backward recomputing it from the logits (three passes). Off: measured on an H200 (bf16, 16384 x 30522,
# benchmarks/results/cross_entropy_nvidia-h200.md, 2026-11-26), forward + backward took 1.57 ms
# storing (row held in registers, 32 warps, one row per SM), 1.29 ms storing with the row-looping
# forward, 1.05 ms recomputing (eager: 2.16 ms): fewer bytes, but the fused forward runs far from
# the bandwidth the two separate kernels reach. ``masked_lm_loss`` stores for a reduced float32
# / bfloat16 loss whatever this says (it saves the projection GEMMs, not a pass; ``stores_grads``).
# bench_cross_entropy times both paths.
STORE_GRADS = False

# The forward that stores the gradient of a row wider than one block (MAX_ONE_BLOCK_V) reads the
# row twice: its statistics, then its gradient. With one program a row, ~8 programs an SM have
# ~60 MB of rows in flight at V = 30522 in bf16, more than L2 (50 MB on H100 / H200), so the
# second read came from DRAM (measured on an H200: 1.56 TB/s effective). A number here caps the
# grid at that many programs per SM looping over the rows (2 x 132 x 61 KB = 16 MB in flight),
# so the second read can hit L2: two DRAM passes over (N, V) in all. None (the default): one
# program a row. Timed on the H200 (2026-11-28, 2 and 4 programs an SM): 1.0-1.24x the GPU time
# of one program a row looping over each row (fastbert_stored_looping), no better.
STORE_GRAD_PROGRAMS_PER_SM: Optional[int] = None
# The forward that stores the gradient of a row held in registers whole (ONE_BLOCK: up to
# MAX_ONE_BLOCK_V classes) runs one program an SM (32 warps, 32 fp32 a thread at V = 30522),
# and with one program a row each SM loads its row, reduces it, then writes its gradient, the
# memory idle in between: ~1.2 TB/s on an H200 (bf16, 16384 x 30522, read + write), where the
# recomputing kernels moved their three passes at ~3.9 TB/s. A number here instead launches a
# persistent grid, each program looping over rows pid, pid + grid, ... with the loop
# software-pipelined (STORE_GRAD_ROW_STAGES): the load of a row ahead is a cp.async into shared
# memory, in flight while this row is reduced and its gradient stored. The grid: this many
# warps an SM in programs of the row's num_warps (32 programs of one warp at V = 32), but one
# program an SM for rows wider than MAX_BLOCK_V, whose registers leave room for no second one
# (ptxas, sm_90: 105-196 a thread at 8192 and 16384 classes, 64 of 32 warps at 32768). Rows of
# 512 - 4096 classes take ~94 registers a thread: ~21 warps fit an SM, so more than 16 asked
# there leaves the last programs of an SM to run after the others (right results, a longer
# tail). None (the default until a GPU run times it: bench_cross_entropy's
# fastbert_stored_pipelined rows): one program a row.
STORE_GRAD_PIPELINED_WARPS_PER_SM: Optional[int] = None
# The pipelined row loop's num_stages: Triton keeps stages - 1 row buffers in shared memory.
# 3 (two buffers, 128 KB at V = 30522 in bf16) has one row's load in flight while the row
# before is computed (sm_90 code: `cp.async.wait_group 3` at the loop's head); with 2 (one
# buffer) the next row's load is issued only after this row's gradient stores and waited for
# at once (`wait_group 0`): the stores and the load overlap, the compute and the load do not.
# Where the buffers would not fit (STORE_GRAD_PIPELINE_MAX_BYTES, the card's shared memory)
# fewer stages are used: float32 rows of 30522 classes (128 KB) run with 2. Below 2 (or where
# not even one buffer fits) the forward runs one program a row, as without the setting.
STORE_GRAD_ROW_STAGES = 3
# The most shared memory the pipelined loop's row buffers may take ((stages - 1) x BLOCK_V x
# the element size): within sm_80's 163 KB with room for the reductions' scratch, and on a card
# with less shared memory a block (sm_86 / sm_89: ~99 KB) its opt-in limit less 16 KB
# (``pipeline_stages``). A row that fits not even one buffer runs one program a row.
STORE_GRAD_PIPELINE_MAX_BYTES = 144 * 1024
# What the pipelined forward keeps of a card's opt-in shared memory for other than its row
# buffers: the reductions' scratch (a few KB at 32 warps) with room to spare.
PIPELINE_SCRATCH_BYTES = 16 * 1024
# The shared memory every CUDA block may use without opting in, for a torch whose device
# properties lack the opt-in figure.
DEFAULT_BLOCK_SHARED_BYTES = 48 * 1024
# The widest block of a row a program holds in registers at once; wider rows loop over blocks.
# 4096 fp32 over 8 warps is 16 elements a thread: wide loads without register spills.
MAX_BLOCK_V = 4096
# With the gradient written in the forward, a row of up to this many classes is held in
# registers whole (32 fp32 a thread over 32 warps at the widest): read from memory once, where a
# wider row is read twice (its statistics, then its gradient). 32768 covers BERT's 30522.
MAX_ONE_BLOCK_V = 32768
# The elements a thread holds in a one-block row wider than MAX_BLOCK_V.
ONE_BLOCK_PER_THREAD = 32
# cross_entropy_scale_: a grid of at most this many programs loops over the gradient (about 8
# resident programs an SM on a 132-SM H100), so that the launch is short when it has nothing
# to do (an incoming gradient of 1.0) and still fills the card when it scales.
SCALE_PROGRAMS = 1024
SCALE_BLOCK = 4096
# cross_entropy_scale_: the gradients one launch scales (masked_lm_loss: dhidden, dweight, dbias).
SCALE_MAX_TENSORS = 3
# The reduction after the forward (the loss of a mean / sum, the count of a mean, the label
# check) runs as one program looping over the rows: BERT-size batches (4096 - 16384 rows) take
# 2 - 8 iterations, a few microseconds, where torch's reductions were about a dozen launches.
REDUCE_BLOCK = 2048
REDUCE_NUM_WARPS = 8
# Above this many rows (16 iterations of that one program) the reduction runs in two stages:
# a grid of programs, each writing the partial (fp64 sum, count, first bad row) of its
# consecutive rows, and one program combining them in order. One launch more, so not at BERT
# sizes; one program alone would take ~0.5 - 1 ms at a million rows. Deterministic: no
# atomics, every sum in a fixed order.
REDUCE_ONE_PROGRAM_ROWS = 16 * REDUCE_BLOCK
# The two-stage reduction's most programs (partials): the second stage reads them all as one
# block. 1024 is ~8 programs an SM on a 132-SM H100; more rows give each program more blocks.
REDUCE_PARTS = 1024
# masked_lm_loss's row selection (the rows whose label is not ignore_index, in order, and the
# label check) runs as one program scanning this many labels a step: 1 - 4 steps at BERT sizes
# (4096 - 16384 tokens), one launch where torch took seven ops and two host syncs. It grows with
# the tokens as the projection GEMMs it feeds do (about 60 us of GEMMs for each step's ~600
# masked rows at V = 30522, H = 768), so it stays a few percent of them at any size.
SELECT_BLOCK = 4096
SELECT_NUM_WARPS = 8
# cross_entropy_fwd's reductions, in the order of the reduce kernel's REDUCTION constexpr.
REDUCTIONS = ("none", "sum", "mean")
# The dtypes a gradient scale tensor may have: a loss's (its incoming gradient), read on the
# device and converted to fp32 there.
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# linear_cross_entropy: the chunk of logits (rows x V, in the input dtype) that exists at once.
# 2**25 elements = 64 MiB in bf16: about 1100 rows at V = 30522, 670 at V = 50257, enough rows
# for cuBLAS to run the projection GEMMs at full rate, and a fixed memory cost whatever the
# number of masked tokens (BERT-base at batch 32, seq 128, 15% masked is one chunk).
CHUNK_ELEMENTS = 1 << 25
# Chunk row counts are rounded to a multiple of this (tensor-core tile friendly GEMM shapes).
CHUNK_ROW_MULTIPLE = 16
# linear_cross_entropy in fp16: the chunk's gradient is written as (softmax - onehot) times
# grad_scale * PRESCALE / max|grad_scale|, and the GEMMs that consume it multiply their fp32
# results by max|grad_scale| / PRESCALE (one grad_scale for all rows: times PRESCALE, and the
# products times grad_scale / PRESCALE, the same values with the sign moved). |softmax - onehot|
# <= 1, so the stored values stay at most 1024, far below fp16's 65504, and a typical
# probability (3e-5 at V = 30522) times 1024 is a normal fp16 number; times grad_scale (the
# incoming gradient / n, ~1e-3) most of them would be at or below fp16's smallest subnormal
# (6e-8). A power of two: it adds no rounding itself.
PRESCALE = 1024.0
# Rows are read and written in parts so that nearly every access is a 16-byte vector: the head
# (the columns before the row's first element offset that is a multiple of ALIGN), the body
# (whole groups of ALIGN elements, in blocks of BLOCK_V whose mask changes only at group
# boundaries) and the tail (the rest, fewer than ALIGN). Masking a whole row by `c < n_cols`
# made every access a scalar one unless V was a multiple of 16, and BERT's 30522 is not (its
# bf16 rows are also only 4-byte aligned every other row); ptxas showed 2-byte loads and
# stores throughout (a review of the sm_90 code; not timed). 8 elements: 16 bytes of bf16 /
# fp16, 32 of fp32.
ALIGN = tl.constexpr(8)
# The lanes of the block that holds a row's head and tail together (each fewer than ALIGN).
REST = tl.constexpr(16)


@triton.jit
def _row_parts(row_off, n_cols):
    """(lead, n_body) of a row whose first element is at element offset ``row_off`` (int64) from
    the tensor's data pointer: columns [0, lead) come before the first offset that is a multiple
    of ALIGN (the head, fewer than ALIGN; the whole row when it is shorter), [lead, lead +
    n_body) are whole groups of ALIGN (the body), the rest of the row is the tail (fewer than
    ALIGN)."""
    # (ALIGN - r) written tensor-first: a constexpr on the left makes a constexpr the
    # interpreter cannot convert back (the operands are never negative: C's and Python's
    # remainders agree)
    lead = (-(row_off % ALIGN - ALIGN)) % ALIGN
    # a row that ends before its first aligned offset is all head (n_body 0); lead is not
    # clipped to the row, so that row_off + lead, the body's hinted offset, is always a
    # multiple of ALIGN
    n_body = tl.multiple_of(tl.maximum(n_cols - lead, 0) // ALIGN * ALIGN, ALIGN)
    return lead, n_body


@triton.jit
def _rest_cols(lead, n_body, n_cols):
    """The head and the tail of a row as one block of REST lanes: (columns, mask). Head and
    tail together are n_cols - n_body columns, also when the row is all head."""
    j = tl.arange(0, REST)
    return tl.where(j < lead, j, j + n_body), j < n_cols - n_body


@triton.jit
def _online_update(m, s, x):
    """Fold a block x (fp32, -inf where masked) into the running max m and sum s of exp(x - m)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # a block of -inf only (masked vocabulary) leaves m_new = -inf: subtract 0 instead so that
    # exp(-inf - -inf) does not turn into NaN
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    s = s * tl.exp2((m - m_safe) * LOG2E) + tl.sum(tl.exp2((x - m_safe) * LOG2E), axis=0)
    return m_new, s


@triton.jit
def _finite_or_zero(v):
    """v where it is finite, else 0 (a reference point of a row's mean)."""
    return tl.where(tl.abs(v) < float("inf"), v, 0.0)


@triton.jit
def _mean_part(x, ref, mask, n_cols):
    """A block's part of label smoothing's (mean(x) - ref) / 2: sum((x - ref) / 2V) over the
    masked lanes (doubled in fp64 by the caller). Deviations from a logit of the row, not the
    logits: a mean of logits that share a large offset (1e4) summed in fp32 is off by ulps of
    the offset (~1e-3; 15-80x torch's error, a review found), their deviations are exact
    differences. Halved first, so that the difference of two finite fp32 logits never
    overflows, and divided by V before the sum: the half-deviations are at most 3.4e38 in
    size, so every partial sum stays finite for 3e38-sized logits of both signs, where the
    mean deviation itself may not be (a doubling in fp32 overflowed: -inf losses of finite
    rows)."""
    d = (x * 0.5 - ref * 0.5) * (1.0 / n_cols)
    return tl.sum(tl.where(mask, d, 0.0), axis=0)


@triton.jit
def _row_stats(x_ptr, row_off, n_cols, BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """(max, log(sum(exp(x - max))), ref, (mean(x) - ref) / 2) of the row at x_ptr + row_off, in
    fp32, by the online method: the body in blocks of BLOCK_V (16-byte loads), then head and
    tail. With HAS_SMOOTHING ref is the row's first logit (0 if it is not finite), else the
    last two are 0."""
    cols = tl.arange(0, BLOCK_V)
    lead, n_body = _row_parts(row_off, n_cols)
    body_off = row_off + lead
    m = -float("inf")
    s = 0.0
    dev = 0.0
    ref = 0.0
    if HAS_SMOOTHING:
        # the mean is taken as the row's first logit plus the mean deviation from it
        ref = _finite_or_zero(tl.load(x_ptr + row_off, mask=n_cols > 0, other=0.0).to(
            tl.float32))
    for start in range(0, n_body, BLOCK_V):
        j = start + cols
        in_body = j < n_body
        x = tl.load(x_ptr + tl.multiple_of(body_off + start, ALIGN) + cols, mask=in_body,
                    other=-float("inf")).to(tl.float32)
        m, s = _online_update(m, s, x)
        if HAS_SMOOTHING:
            dev += _mean_part(x, ref, in_body, n_cols)
    c, in_rest = _rest_cols(lead, n_body, n_cols)
    x = tl.load(x_ptr + row_off + c, mask=in_rest, other=-float("inf")).to(tl.float32)
    m, s = _online_update(m, s, x)
    if HAS_SMOOTHING:
        dev += _mean_part(x, ref, in_rest, n_cols)
    return m, tl.log(s), ref, dev


@triton.jit
def _row_scale(scale_ptr, stride_scale, scale_value, count_ptr, row,
               HAS_SCALE: tl.constexpr, HAS_COUNT: tl.constexpr):
    """The factor of a row's gradient: its incoming gradient (read on the device from scale_ptr,
    any float dtype, or the fp32 argument scale_value), divided by the count of a mean (read
    on the device from count_ptr) when there is one. Rounded as torch's fp32 ``grad / count``."""
    if HAS_SCALE:
        s = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
    else:
        s = scale_value
    if HAS_COUNT:
        # IEEE division: Triton's plain fp32 `/` is an approximate one (div.full.f32)
        s = tl.math.div_rn(s, tl.load(count_ptr).to(tl.float32))
    return s


@triton.jit
def _grad_block(x, c, target, m, log_s, scale, n_cols, label_smoothing,
                HAS_SMOOTHING: tl.constexpr):
    """scale * (softmax(x) - smoothing / V - (1 - smoothing) onehot(target)) on a block of a
    row: x (fp32) at columns c."""
    g = tl.exp2(((x - m) - log_s) * LOG2E)
    if HAS_SMOOTHING:
        g = g - label_smoothing / n_cols
    g = tl.where(c == target, g - (1.0 - label_smoothing), g)
    return g * scale


@triton.jit
def _dx_offset(a, b, ALIGNED_DX: tl.constexpr):
    """The gradient's offset a + b of a body block: ALIGNED_DX (the launcher checked that
    gradient and logits rows have the same offsets modulo ALIGN) says it is a multiple of ALIGN
    too. The hint goes on the sum made here: on an argument (a block argument of the function
    until it is inlined) or on `x + 0` (folded to x) it would be dropped."""
    if ALIGNED_DX:
        return tl.multiple_of(a + b, ALIGN)
    else:
        return a + b


@triton.jit
def _store_row_grad(x_ptr, x_off, dx_ptr, dx_off, target, m, log_s, scale, n_cols,
                    label_smoothing, BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                    ALIGNED_DX: tl.constexpr):
    """dx = scale * (softmax(x) - smoothing / V - (1 - smoothing) onehot(target)) for one row
    (logits at x_ptr + x_off, gradient at dx_ptr + dx_off), split as the logits' row."""
    cols = tl.arange(0, BLOCK_V)
    lead, n_body = _row_parts(x_off, n_cols)
    for start in range(0, n_body, BLOCK_V):
        in_body = start + cols < n_body
        x = tl.load(x_ptr + tl.multiple_of(x_off + lead + start, ALIGN) + cols, mask=in_body,
                    other=0.0).to(tl.float32)
        g = _grad_block(x, lead + start + cols, target, m, log_s, scale, n_cols,
                        label_smoothing, HAS_SMOOTHING)
        tl.store(dx_ptr + _dx_offset(dx_off + lead, start, ALIGNED_DX) + cols,
                 g.to(dx_ptr.dtype.element_ty), mask=in_body)
    c, in_rest = _rest_cols(lead, n_body, n_cols)
    x = tl.load(x_ptr + x_off + c, mask=in_rest, other=0.0).to(tl.float32)
    g = _grad_block(x, c, target, m, log_s, scale, n_cols, label_smoothing, HAS_SMOOTHING)
    tl.store(dx_ptr + dx_off + c, g.to(dx_ptr.dtype.element_ty), mask=in_rest)


@triton.jit
def _store_zero_row(dx_ptr, dx_off, n_cols, BLOCK_V: tl.constexpr):
    """Zeros over the row at dx_ptr + dx_off, split as that row."""
    cols = tl.arange(0, BLOCK_V)
    lead, n_body = _row_parts(dx_off, n_cols)
    zero = tl.zeros((BLOCK_V,), dtype=dx_ptr.dtype.element_ty)
    for start in range(0, n_body, BLOCK_V):
        tl.store(dx_ptr + tl.multiple_of(dx_off + lead + start, ALIGN) + cols, zero,
                 mask=start + cols < n_body)
    c, in_rest = _rest_cols(lead, n_body, n_cols)
    tl.store(dx_ptr + dx_off + c, tl.zeros((REST,), dtype=dx_ptr.dtype.element_ty), mask=in_rest)


@triton.jit
def _cross_entropy_fwd_row(
    row, logits_ptr, target_ptr, loss_ptr, stats_ptr, scale_ptr, count_ptr, dlogits_ptr,
    stride_logits_row, stride_target, stride_scale, stride_dlogits_row,
    n_cols, ignore_index, label_smoothing, scale_value,
    BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr, STORE_GRAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_COUNT: tl.constexpr,
    ALIGNED_DX: tl.constexpr,
):
    # one row (int64 index) of the forward: see _cross_entropy_fwd_kernel
    row_off = row * stride_logits_row
    target = tl.load(target_ptr + row * stride_target).to(tl.int64)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < n_cols)
    valid = in_range & (~ignored)
    if ONE_BLOCK:
        # the whole row (n_cols <= BLOCK_V) stays in registers, its body in one block and its
        # head and tail in another: the gradient is computed from them, so the row is read
        # from memory once even with STORE_GRAD
        lead, n_body = _row_parts(row_off, n_cols)
        j = tl.arange(0, BLOCK_V)
        in_body = j < n_body
        x = tl.load(logits_ptr + tl.multiple_of(row_off + lead, ALIGN) + j, mask=in_body,
                    other=-float("inf")).to(tl.float32)
        c_rest, in_rest = _rest_cols(lead, n_body, n_cols)
        x_rest = tl.load(logits_ptr + row_off + c_rest, mask=in_rest,
                         other=-float("inf")).to(tl.float32)
        m = tl.maximum(tl.max(x, axis=0), tl.max(x_rest, axis=0))
        # a row of -inf only: subtract 0 so that exp(-inf - -inf) does not turn into NaN
        m_safe = tl.where(m == -float("inf"), 0.0, m)
        log_s = tl.log(tl.sum(tl.exp2((x - m_safe) * LOG2E), axis=0)
                       + tl.sum(tl.exp2((x_rest - m_safe) * LOG2E), axis=0))
        ref = m_safe   # the mean as its deviation from the max (see _mean_part)
        dev = 0.0
        if HAS_SMOOTHING:
            dev = _mean_part(x, ref, in_body, n_cols) + _mean_part(x_rest, ref, in_rest, n_cols)
        c = lead + j
        x_t = (tl.sum(tl.where((c == target) & in_body & valid, x, 0.0), axis=0)
               + tl.sum(tl.where((c_rest == target) & in_rest & valid, x_rest, 0.0), axis=0))
    else:
        m, log_s, ref, dev = _row_stats(logits_ptr, row_off, n_cols, BLOCK_V, HAS_SMOOTHING)
        # the target logit is loaded only when it is a valid address
        x_t = tl.load(logits_ptr + row_off + target, mask=valid, other=0.0).to(tl.float32)
    # lse - x = (m - x) + log_s: differences to the max first, exact for nearby large logits.
    # The few scalar terms are combined in fp64 (a handful of operations a row, free) so that
    # the fp32 loss is rounded once: at |x| ~ 1e4 each fp32 step would round by up to 1e-3.
    m64 = m.to(tl.float64)
    lse_minus_xt = (m64 - x_t.to(tl.float64)) + log_s.to(tl.float64)
    if HAS_SMOOTHING:
        # (1 - eps) (lse - x_t) + eps (lse - mean_c x_c), mean_c x_c = ref + 2 dev (fp64)
        smooth = ((m64 - ref.to(tl.float64)) - 2.0 * dev.to(tl.float64)) + log_s.to(tl.float64)
        loss64 = (1.0 - label_smoothing) * lse_minus_xt + label_smoothing * smooth
    else:
        loss64 = lse_minus_xt
    loss = loss64.to(tl.float32)
    loss = tl.where(ignored, 0.0, tl.where(in_range, loss, float("nan")))
    # the loss a row in the output's dtype (reduction "none": no conversion afterwards)
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    if STORE_GRAD:
        dx_off = row * stride_dlogits_row
        # In place: the warp that owns element `target` may overwrite it with its gradient
        # while another warp has still to load x_t above (a race the interpreter, one program
        # at a time in lock step, never shows). Every read of the row ends before this barrier.
        # ONE_BLOCK reads the row once, at the top, and every store below depends on the row's
        # max and sum, reductions over every warp's loaded values (a barrier of their own):
        # no barrier there, which would also keep the row loop from being pipelined
        # (ROW_STAGES: Triton 3.6 pipelines no loop that holds a debug_barrier).
        if not ONE_BLOCK:
            tl.debug_barrier()
        if ONE_BLOCK:
            scale = _row_scale(scale_ptr, stride_scale, scale_value, count_ptr, row, HAS_SCALE,
                               HAS_COUNT)
            g = _grad_block(x, c, target, m, log_s, scale, n_cols, label_smoothing,
                            HAS_SMOOTHING)
            g_rest = _grad_block(x_rest, c_rest, target, m, log_s, scale, n_cols,
                                 label_smoothing, HAS_SMOOTHING)
            # ignored and out-of-range rows get exactly 0, whatever the scale (inf, NaN)
            g = tl.where(valid, g, 0.0)
            g_rest = tl.where(valid, g_rest, 0.0)
            tl.store(dlogits_ptr + _dx_offset(dx_off, lead, ALIGNED_DX) + j,
                     g.to(dlogits_ptr.dtype.element_ty), mask=in_body)
            tl.store(dlogits_ptr + dx_off + c_rest, g_rest.to(dlogits_ptr.dtype.element_ty),
                     mask=in_rest)
        elif valid:
            scale = _row_scale(scale_ptr, stride_scale, scale_value, count_ptr, row, HAS_SCALE,
                               HAS_COUNT)
            _store_row_grad(logits_ptr, row_off, dlogits_ptr, dx_off, target, m, log_s, scale,
                            n_cols, label_smoothing, BLOCK_V, HAS_SMOOTHING, ALIGNED_DX)
        else:
            _store_zero_row(dlogits_ptr, dx_off, n_cols, BLOCK_V)


@triton.jit(do_not_specialize=["n_rows"])
def _cross_entropy_fwd_kernel(
    logits_ptr, target_ptr, loss_ptr, stats_ptr, scale_ptr, count_ptr, dlogits_ptr,
    stride_logits_row, stride_target, stride_scale, stride_dlogits_row,
    n_cols, ignore_index, label_smoothing, scale_value, n_rows,
    BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr, STORE_GRAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_COUNT: tl.constexpr,
    ROW_LOOP: tl.constexpr, ALIGNED_DX: tl.constexpr, ROW_STAGES: tl.constexpr = 0,
):
    # each program owns one row of logits (and, with STORE_GRAD, of their gradient, which may
    # be the same memory: written in place)
    # ROW_LOOP: a grid smaller than the rows, each program taking rows pid, pid + grid, ...
    # (STORE_GRAD_PROGRAMS_PER_SM: the rows being worked on at once stay in L2 for the
    # gradient's second read of a row wider than one block)
    # ROW_STAGES > 0 (ONE_BLOCK with STORE_GRAD_PIPELINED_WARPS_PER_SM): the row loop is
    # software-pipelined, each row's load a cp.async into shared memory; with 3 stages one row's
    # load is in flight while the row before is reduced and its gradient stored (with 2 only
    # the stores and the next load overlap)
    if ROW_STAGES > 0:
        for r in tl.range(tl.program_id(0), n_rows, tl.num_programs(0), num_stages=ROW_STAGES):
            _cross_entropy_fwd_row(
                tl.cast(r, tl.int64), logits_ptr, target_ptr, loss_ptr, stats_ptr, scale_ptr,
                count_ptr, dlogits_ptr, stride_logits_row, stride_target, stride_scale,
                stride_dlogits_row, n_cols, ignore_index, label_smoothing, scale_value,
                BLOCK_V, HAS_SMOOTHING, STORE_GRAD, ONE_BLOCK, HAS_SCALE, HAS_COUNT, ALIGNED_DX)
    elif ROW_LOOP:
        for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            _cross_entropy_fwd_row(
                tl.cast(r, tl.int64), logits_ptr, target_ptr, loss_ptr, stats_ptr, scale_ptr,
                count_ptr, dlogits_ptr, stride_logits_row, stride_target, stride_scale,
                stride_dlogits_row, n_cols, ignore_index, label_smoothing, scale_value,
                BLOCK_V, HAS_SMOOTHING, STORE_GRAD, ONE_BLOCK, HAS_SCALE, HAS_COUNT, ALIGNED_DX)
    else:
        _cross_entropy_fwd_row(
            tl.program_id(0).to(tl.int64), logits_ptr, target_ptr, loss_ptr, stats_ptr,
            scale_ptr, count_ptr, dlogits_ptr, stride_logits_row, stride_target, stride_scale,
            stride_dlogits_row, n_cols, ignore_index, label_smoothing, scale_value,
            BLOCK_V, HAS_SMOOTHING, STORE_GRAD, ONE_BLOCK, HAS_SCALE, HAS_COUNT, ALIGNED_DX)


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr, target_ptr, stats_ptr, scale_ptr, count_ptr, dlogits_ptr,
    stride_logits_row, stride_target, stride_scale, stride_dlogits_row,
    n_cols, ignore_index, label_smoothing, scale_value,
    BLOCK_V: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_COUNT: tl.constexpr, ALIGNED_DX: tl.constexpr,
):
    # each program owns one row of logits and of their gradient
    row = tl.program_id(0).to(tl.int64)
    dx_off = row * stride_dlogits_row
    target = tl.load(target_ptr + row * stride_target).to(tl.int64)
    valid = (target != ignore_index) & (target >= 0) & (target < n_cols)
    if valid:
        m = tl.load(stats_ptr + 2 * row)
        log_s = tl.load(stats_ptr + 2 * row + 1)
        scale = _row_scale(scale_ptr, stride_scale, scale_value, count_ptr, row, HAS_SCALE,
                           HAS_COUNT)
        _store_row_grad(logits_ptr, row * stride_logits_row, dlogits_ptr, dx_off, target, m,
                        log_s, scale, n_cols, label_smoothing, BLOCK_V, HAS_SMOOTHING,
                        ALIGNED_DX)
    else:
        # ignored rows get exactly 0 even when the incoming gradient is inf or NaN (torch too)
        # or their logits are (torch: NaN there)
        _store_zero_row(dlogits_ptr, dx_off, n_cols, BLOCK_V)


@triton.jit
def _reduce_store(total, count, bad_row, n_rows, out_ptr, count_ptr, REDUCTION: tl.constexpr,
                  CHECK: tl.constexpr):
    """Store the reduced loss (fp64 ``total``: the sum, divided by ``count`` for a mean) and the
    count, or with CHECK -1 - bad_row when bad_row < n_rows (an out-of-range target there)."""
    if REDUCTION != 0:
        if REDUCTION == 2:
            # 0 / 0 = NaN when every target is ignored, as torch
            total = total / count.to(tl.float64)
        # through fp32, as torch's fp64 -> fp16 / bf16 conversion rounds
        tl.store(out_ptr, total.to(tl.float32).to(out_ptr.dtype.element_ty))
    if CHECK:
        # an out-of-range target at row r is reported as the count -1 - r: the host reads this
        # one value (its one sync) and raises
        count = tl.where(bad_row < n_rows, -1 - bad_row, count)
    tl.store(count_ptr, count)


@triton.jit
def _cross_entropy_reduce_kernel(
    loss_ptr, target_ptr, out_ptr, count_ptr, part_sum_ptr, part_count_ptr, part_bad_ptr,
    stride_target, n_rows, n_cols, ignore_index, rows_per_program,
    BLOCK: tl.constexpr, REDUCTION: tl.constexpr, CHECK: tl.constexpr, PARTIAL: tl.constexpr,
):
    # one program owns every row (PARTIAL off), or rows_per_program consecutive rows (PARTIAL:
    # the first stage of the two-stage reduction): the sum of the row losses (REDUCTION 1:
    # "sum", 2: "mean"), the count of targets neither ignored nor out of range (the divisor of
    # a mean) and, with CHECK, the first out-of-range target, in one launch where torch takes
    # about a dozen ops
    pid = tl.program_id(0)
    row0 = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row0 + rows_per_program, n_rows)
    offs = tl.arange(0, BLOCK)
    # fp64: the reduced loss is rounded once, however many rows (an fp32 sum of losses of
    # 1e4 would be off by ulps)
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    n_valid = tl.zeros((BLOCK,), dtype=tl.int64)
    first_bad = tl.full((BLOCK,), n_rows, dtype=tl.int64)
    for start in range(0, rows_per_program, BLOCK):
        r = row0 + start + offs
        mask = r < row_end
        t = tl.load(target_ptr + r * stride_target, mask=mask, other=ignore_index).to(tl.int64)
        # the row mask too: lanes past the rows read the fill value, which an int32 target
        # truncates (an ignore_index outside int32 would not match itself)
        counted = mask & (t != ignore_index) & (t >= 0) & (t < n_cols)
        n_valid += counted.to(tl.int64)
        if REDUCTION != 0:
            acc += tl.load(loss_ptr + r, mask=mask, other=0.0).to(tl.float64)
        if CHECK:
            bad = mask & (t != ignore_index) & ~counted
            first_bad = tl.minimum(first_bad, tl.where(bad, r, n_rows))
    count = tl.sum(n_valid, axis=0)
    total = tl.sum(acc, axis=0)
    bad_row = tl.min(first_bad, axis=0)
    if PARTIAL:
        tl.store(part_sum_ptr + pid, total)
        tl.store(part_count_ptr + pid, count)
        tl.store(part_bad_ptr + pid, bad_row)
    else:
        _reduce_store(total, count, bad_row, n_rows, out_ptr, count_ptr, REDUCTION, CHECK)


@triton.jit
def _cross_entropy_reduce_parts_kernel(
    part_sum_ptr, part_count_ptr, part_bad_ptr, out_ptr, count_ptr, n_parts, n_rows,
    BLOCK: tl.constexpr, REDUCTION: tl.constexpr, CHECK: tl.constexpr,
):
    # one program owns every partial of the first stage (n_parts <= BLOCK): their sums in
    # fp64, in a fixed order (the same bits run to run), their counts, their first bad row
    p = tl.arange(0, BLOCK)
    mask = p < n_parts
    total = tl.sum(tl.load(part_sum_ptr + p, mask=mask, other=0.0), axis=0)
    count = tl.sum(tl.load(part_count_ptr + p, mask=mask, other=0), axis=0)
    bad_row = tl.min(tl.load(part_bad_ptr + p, mask=mask, other=n_rows), axis=0)
    _reduce_store(total, count, bad_row, n_rows, out_ptr, count_ptr, REDUCTION, CHECK)


@triton.jit
def _cross_entropy_select_kernel(
    target_ptr, sel_ptr, info_ptr, stride_target, n_rows, n_cols, ignore_index,
    BLOCK: tl.constexpr, CHECK: tl.constexpr,
):
    # one program owns every row: the rows whose target is not ignore_index go to sel[:n] in
    # increasing order (an exclusive prefix sum over each block), the others to sel[n:n_rows]
    # in decreasing order (from the end: n is known only at the end), and each row's target,
    # as int64, to the same place of sel[n_rows:]; then info = (n, the first selected row
    # whose target is out of range (CHECK), or n_rows, the number of selected rows whose target
    # is out of range). Every element written: the output is the same bits run to run.
    offs = tl.arange(0, BLOCK)
    n_sel = tl.zeros((1,), dtype=tl.int64)
    n_bad = tl.zeros((1,), dtype=tl.int64)
    first_bad = tl.full((BLOCK,), n_rows, dtype=tl.int64)
    for start in range(0, n_rows, BLOCK):
        r = (start + offs).to(tl.int64)
        in_rows = r < n_rows
        t = tl.load(target_ptr + r * stride_target, mask=in_rows,
                    other=ignore_index).to(tl.int64)
        # the row mask too: the fill value of an int32 target is ignore_index truncated
        keep = in_rows & (t != ignore_index)
        k = keep.to(tl.int64)
        before = n_sel + tl.cumsum(k, axis=0) - k
        pos = tl.where(keep, before, n_rows - 1 - (r - before))
        tl.store(sel_ptr + pos, r, mask=in_rows)
        tl.store(sel_ptr + n_rows + pos, t, mask=in_rows)
        n_sel += tl.sum(k, axis=0)
        bad = keep & ((t < 0) | (t >= n_cols))
        n_bad += tl.sum(bad.to(tl.int64), axis=0)
        if CHECK:
            first_bad = tl.minimum(first_bad, tl.where(bad, r, n_rows))
    tl.store(info_ptr + tl.arange(0, 1), n_sel)
    tl.store(info_ptr + 1, tl.min(first_bad, axis=0))
    tl.store(info_ptr + 2 + tl.arange(0, 1), n_bad)


@triton.jit
def _scale_tensor(ptr, n_elements, g, BLOCK: tl.constexpr):
    """ptr[:n_elements] *= g, the blocks pid, pid + n_programs, ... by this program."""
    offs = tl.arange(0, BLOCK)
    # full blocks without a mask (an element count like N x 30522 would otherwise keep the
    # loads and stores from being vectorized), then the partial last block
    n_full = n_elements // BLOCK
    for block in range(tl.program_id(0), n_full, tl.num_programs(0)):
        # int64: the gradient may hold more than 2**31 elements
        _scale_block(ptr + tl.cast(block, tl.int64) * BLOCK + offs, g, offs, False)
    if tl.program_id(0) == tl.num_programs(0) - 1:
        o = tl.cast(n_full, tl.int64) * BLOCK + offs
        _scale_block(ptr + o, g, o < n_elements, True)


@triton.jit
def _cross_entropy_scale_kernel(a_ptr, b_ptr, c_ptr, grad_ptr, n_a, n_b, n_c,
                                BLOCK: tl.constexpr, N_TENSORS: tl.constexpr):
    # each program owns the blocks pid, pid + n_programs, ... of each flat (contiguous)
    # gradient: up to three (masked_lm_loss's dhidden, dweight, dbias) in one launch
    g = tl.load(grad_ptr).to(tl.float32)
    # decided on the device: an incoming gradient of 1.0 (loss.backward()) costs one load a
    # program and no pass over the gradient, without a host sync to find that out
    if g != 1.0:
        _scale_tensor(a_ptr, n_a, g, BLOCK)
        if N_TENSORS > 1:
            _scale_tensor(b_ptr, n_b, g, BLOCK)
        if N_TENSORS > 2:
            _scale_tensor(c_ptr, n_c, g, BLOCK)


@triton.jit
def _scale_block(ptrs, g, mask, MASKED: tl.constexpr):
    if MASKED:
        d = tl.load(ptrs, mask=mask, other=0.0)
    else:
        d = tl.load(ptrs)
    d32 = d.to(tl.float32)
    # exact zeros (ignored rows) stay zero whatever g is (inf, NaN), as torch's
    out = tl.where(d32 == 0.0, 0.0, d32 * g).to(d.dtype)
    if MASKED:
        tl.store(ptrs, out, mask=mask)
    else:
        tl.store(ptrs, out)


def ce_block(n_cols: int, one_block: bool = False) -> tuple[int, int, bool]:
    """(BLOCK_V, num_warps, ONE_BLOCK) for a row of ``n_cols`` classes; ``one_block`` allows a
    whole row of up to MAX_ONE_BLOCK_V classes in registers (the forward with STORE_GRAD)."""
    block_v = next_power_of_2(max(int(n_cols), 16))
    if not (one_block and block_v <= MAX_ONE_BLOCK_V):
        block_v = min(block_v, MAX_BLOCK_V)
    if block_v <= MAX_BLOCK_V:
        # 16 elements a thread at the widest block, at least one warp
        num_warps = min(max(block_v // 512, 1), 8)
    else:
        num_warps = block_v // (32 * ONE_BLOCK_PER_THREAD)
    return block_v, num_warps, block_v >= n_cols and one_block


def pipeline_stages(row_bytes: int, device: torch.device) -> int:
    """num_stages of the pipelined row loop for rows of ``row_bytes`` (BLOCK_V elements):
    STORE_GRAD_ROW_STAGES, fewer where its stages - 1 row buffers would pass the shared memory
    allowed (STORE_GRAD_PIPELINE_MAX_BYTES, and on CUDA the device's opt-in shared memory a
    block less PIPELINE_SCRATCH_BYTES), 0 where not even one buffer fits (no pipelining)."""
    limit = STORE_GRAD_PIPELINE_MAX_BYTES
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        limit = min(limit, _optin_shared(index) - PIPELINE_SCRATCH_BYTES)
    stages = STORE_GRAD_ROW_STAGES
    while stages >= 2 and (stages - 1) * row_bytes > limit:
        stages -= 1
    return stages if stages >= 2 else 0


@functools.lru_cache(maxsize=None)
def _optin_shared(index: int) -> int:
    """The shared memory a block may opt in to on CUDA device ``index`` (bytes)."""
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0)
               or getattr(props, "shared_memory_per_block", DEFAULT_BLOCK_SHARED_BYTES))


def ce_block_configs(one_block: bool = False):
    """Every (BLOCK_V, num_warps, ONE_BLOCK) ``ce_block`` can return, for the AOT compile."""
    out, n = [], 16
    while n <= (MAX_ONE_BLOCK_V if one_block else MAX_BLOCK_V):
        out.append(ce_block(n, one_block))
        n *= 2
    return out


def _check_rows(logits: torch.Tensor, target: torch.Tensor):
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with unit column stride, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")


def _check_dlogits(dlogits: torch.Tensor, logits: torch.Tensor):
    if (dlogits.shape != logits.shape or dlogits.dtype != logits.dtype
            or dlogits.stride(1) != 1):
        raise ValueError(f"dlogits must be {tuple(logits.shape)} {logits.dtype} with unit column "
                         f"stride, got {tuple(dlogits.shape)} {dlogits.dtype} strides "
                         f"{dlogits.stride()}")


def _aligned_dx(logits: torch.Tensor, dlogits: torch.Tensor) -> bool:
    """Whether every gradient row starts at the same element offset modulo ALIGN as its logits
    row: then the kernels split both rows alike and may hint the gradient's body offsets as
    aligned too (stored as 16-byte vectors when both data pointers are 16-byte aligned)."""
    return (dlogits.stride(0) - logits.stride(0)) % ALIGN.value == 0


def _scale_args(scale, count: Optional[torch.Tensor], n_rows: int):
    """A gradient scale as the kernels take it: (tensor or None, its row stride, the fp32 value
    used without a tensor, count or None)."""
    if count is not None and (count.dtype != torch.int64 or count.numel() != 1):
        raise ValueError(f"count must be a one-element int64 tensor, got {count.dtype} of shape "
                         f"{tuple(count.shape)}")
    if not isinstance(scale, torch.Tensor):
        return None, 0, float(scale), count
    if scale.dtype not in SCALE_DTYPES or scale.dim() > 1:
        raise ValueError(f"grad_scale must be a float32, float16 or bfloat16 scalar tensor, one "
                         f"value a row, or a Python float, got {scale.dtype} of shape "
                         f"{tuple(scale.shape)}")
    if scale.dim() == 0:
        return scale, 0, 1.0, count
    if scale.shape[0] != n_rows:
        raise ValueError(f"grad_scale must have {n_rows} values, got {scale.shape[0]}")
    return scale, scale.stride(0), 1.0, count


@on_tensor_device
def cross_entropy_fwd(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                      label_smoothing: float, grad_scale=None,
                      dlogits: Optional[torch.Tensor] = None, *,
                      count: Optional[torch.Tensor] = None, reduction: str = "none",
                      loss_dtype: torch.dtype = torch.float32, check_labels: bool = False,
                      loss: Optional[torch.Tensor] = None):
    """Launch the forward, and for a reduced loss or a label check the reduction after it.

    Args:
        logits: (N, V) fp32/fp16/bf16, unit column stride.
        target: (N,) int64/int32 class indices; ignore_index marks rows without a target.
        label_smoothing: in [0, 1].
        grad_scale: None, or the incoming gradient of each row's loss: a float32 / float16 /
            bfloat16 tensor of shape () or (N,) (read on the device), or a Python float; then
            the gradient of sum_r grad_scale_r * loss_r (divided by ``count``) is written into
            ``dlogits``.
        dlogits: with grad_scale, where the gradient goes: (N, V) of logits' dtype with unit
            column stride, or None to overwrite ``logits`` in place.
        count: with grad_scale, None or a one-element int64 tensor dividing it on the device
            (the divisor of a mean).
        reduction: "none" (a loss a row), "sum", or "mean" over the rows whose target is
            neither ignored nor out of range (NaN when there is none, as torch).
        loss_dtype: the dtype of the loss returned (computed in fp32, reduced in fp64).
        check_labels: also look for targets outside [0, V) other than ignore_index: reported
            through the count returned, never raised here.
        loss: reduction "none" only: the contiguous (N,) tensor of loss_dtype the row losses are
            written to, or None for a new one.

    Returns:
        (loss, stats, count): loss (N,) (0 on ignored rows, NaN on out-of-range ones) or ()
        in loss_dtype; stats (N, 2) float32: each row's max and log-sum-exp relative to it, for
        the backward; count None for "none" without check_labels, else an int64 () tensor:
        the targets neither ignored nor out of range (the divisor of a mean), or with
        check_labels -1 - r when row r holds the first out-of-range target.
    """
    _check_rows(logits, target)
    n_rows, n_cols = logits.shape
    dev = logits.device
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    reduce = REDUCTIONS.index(reduction)
    if loss is None or reduce:
        if loss is not None:
            raise ValueError(f"loss can be given for reduction 'none' only, got {reduction!r}")
        # a reduced loss is summed from fp32 row losses
        loss = torch.empty((n_rows,), dtype=loss_dtype if reduce == 0 else torch.float32,
                           device=dev)
    elif loss.shape != (n_rows,) or loss.dtype != loss_dtype or loss.stride(0) != 1:
        raise ValueError(f"loss must be contiguous ({n_rows},) {loss_dtype}, got "
                         f"{tuple(loss.shape)} {loss.dtype} strides {loss.stride()}")
    stats = torch.empty((n_rows, 2), dtype=torch.float32, device=dev)
    store_grad = grad_scale is not None
    scale, stride_scale, scale_value, grad_count = (
        _scale_args(grad_scale, count, n_rows) if store_grad else (None, 0, 1.0, None))
    if dlogits is None:
        dlogits = logits
    elif store_grad:
        _check_dlogits(dlogits, logits)
    block_v, num_warps, one_block = ce_block(n_cols, one_block=store_grad)
    if n_rows > 0:
        grid = n_rows
        row_stages = 0
        if store_grad and not one_block and STORE_GRAD_PROGRAMS_PER_SM:
            grid = min(n_rows, num_programs(dev, STORE_GRAD_PROGRAMS_PER_SM))
        elif store_grad and one_block and STORE_GRAD_PIPELINED_WARPS_PER_SM:
            stages = pipeline_stages(block_v * logits.element_size(), dev)
            if stages:
                per_sm = (1 if block_v > MAX_BLOCK_V
                          else max(1, STORE_GRAD_PIPELINED_WARPS_PER_SM // num_warps))
                grid = min(n_rows, num_programs(dev, per_sm))
                row_stages = stages if grid < n_rows else 0
        launch(
            _cross_entropy_fwd_kernel, (grid,),
            logits, target, loss, stats, scale, grad_count, dlogits,
            logits.stride(0), target.stride(0), stride_scale, dlogits.stride(0),
            n_cols, int(ignore_index), float(label_smoothing), scale_value, n_rows,
            BLOCK_V=block_v, HAS_SMOOTHING=label_smoothing > 0.0, STORE_GRAD=store_grad,
            ONE_BLOCK=one_block, HAS_SCALE=scale is not None, HAS_COUNT=grad_count is not None,
            ROW_LOOP=grid < n_rows, ALIGNED_DX=_aligned_dx(logits, dlogits),
            ROW_STAGES=row_stages, num_warps=num_warps,
        )
    if not (reduce or check_labels):
        return loss, stats, None
    out = torch.empty((), dtype=loss_dtype, device=dev) if reduce else None
    n_valid = torch.empty((), dtype=torch.int64, device=dev)
    _reduce(loss, target, out, n_valid, n_rows, n_cols, int(ignore_index), reduce,
            bool(check_labels))
    return (out if reduce else loss), stats, n_valid


def _reduce(loss, target, out, n_valid, n_rows, n_cols, ignore_index, reduce, check):
    """Launch the reduction: one program up to REDUCE_ONE_PROGRAM_ROWS rows (also for no row:
    the sum is 0, the mean 0 / 0 = NaN, the count 0), else the two stages."""
    block = REDUCE_BLOCK
    if n_rows <= REDUCE_ONE_PROGRAM_ROWS:
        launch(
            _cross_entropy_reduce_kernel, (1,),
            loss, target, out, n_valid, None, None, None, target.stride(0), n_rows, n_cols,
            ignore_index, max(n_rows, 1), BLOCK=block, REDUCTION=reduce, CHECK=check,
            PARTIAL=False, num_warps=REDUCE_NUM_WARPS)
        return
    n_blocks = cdiv(n_rows, block)
    per_program = cdiv(n_blocks, min(n_blocks, REDUCE_PARTS)) * block
    n_parts = cdiv(n_rows, per_program)
    dev = loss.device
    part_sum = torch.empty((n_parts,), dtype=torch.float64, device=dev)
    part_count_bad = torch.empty((2, n_parts), dtype=torch.int64, device=dev)
    launch(
        _cross_entropy_reduce_kernel, (n_parts,),
        loss, target, None, None, part_sum, part_count_bad[0], part_count_bad[1],
        target.stride(0), n_rows, n_cols, ignore_index, per_program, BLOCK=block,
        REDUCTION=reduce, CHECK=check, PARTIAL=True, num_warps=REDUCE_NUM_WARPS)
    launch(
        _cross_entropy_reduce_parts_kernel, (1,),
        part_sum, part_count_bad[0], part_count_bad[1], out, n_valid, n_parts, n_rows,
        BLOCK=REDUCE_PARTS, REDUCTION=reduce, CHECK=check, num_warps=REDUCE_NUM_WARPS)


@on_tensor_device
def select_rows(target: torch.Tensor, ignore_index: int, n_classes: int,
                check_labels: bool = True):
    """Launch the selection of the rows whose target is not ``ignore_index``, as
    ``(target != ignore_index).nonzero()`` gives them, with their targets and the label check:
    one launch and no host sync (the caller reads ``info``).

    Args:
        target: (N,) int64 / int32 class indices or ignore_index, any stride.
        n_classes: the number of classes V (targets outside [0, V) are out of range).
        check_labels: look for out-of-range targets among the selected rows.

    Returns:
        (sel, info): sel (2 N,) int64, the selected rows in increasing order in sel[:n], the
        others in decreasing order in sel[n:N], and the targets of these rows in sel[N:] in the
        same order; info (3,) int64: n, the first selected row whose target is out of range
        (N when there is none, and always without check_labels), and how many selected rows
        have an out-of-range target (with check_labels too).
    """
    if target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must be a 1-D int64 / int32 tensor, got {target.dtype} of "
                         f"shape {tuple(target.shape)}")
    n_rows = target.shape[0]
    sel = torch.empty((2 * n_rows,), dtype=torch.int64, device=target.device)
    info = torch.empty((3,), dtype=torch.int64, device=target.device)
    launch(
        _cross_entropy_select_kernel, (1,),
        target, sel, info, target.stride(0), n_rows, int(n_classes), int(ignore_index),
        BLOCK=SELECT_BLOCK, CHECK=bool(check_labels), num_warps=SELECT_NUM_WARPS)
    return sel, info


@on_tensor_device
def cross_entropy_scale_(dlogits: torch.Tensor, grad: torch.Tensor, *more: torch.Tensor) -> None:
    """Multiply, in place, gradients a forward stored (STORE_GRAD) by the incoming gradient
    of the loss: a scalar tensor, read on the device. When it is 1.0 nothing is read or
    written but that scalar (no host sync decides it). Exact zeros stay zero.

    Args:
        dlogits, *more: up to SCALE_MAX_TENSORS contiguous fp32/fp16/bf16 tensors, any shapes,
            all scaled by one launch (empty ones are skipped).
        grad: one-element floating tensor on their device.
    """
    tensors = (dlogits,) + more
    if len(tensors) > SCALE_MAX_TENSORS:
        raise ValueError(f"at most {SCALE_MAX_TENSORS} tensors a launch, got {len(tensors)}")
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"dlogits must be contiguous, got strides {t.stride()}")
    if grad.numel() != 1 or not grad.is_floating_point():
        raise ValueError(f"grad must be a one-element floating tensor, got {grad.dtype} of shape "
                         f"{tuple(grad.shape)}")
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        return
    blocks = sum(cdiv(t.numel(), SCALE_BLOCK) for t in tensors)
    absent = SCALE_MAX_TENSORS - len(tensors)
    launch(
        _cross_entropy_scale_kernel, (min(blocks, SCALE_PROGRAMS),),
        *tensors, *([None] * absent), grad, *(t.numel() for t in tensors), *([0] * absent),
        BLOCK=SCALE_BLOCK, N_TENSORS=len(tensors), num_warps=8)


@on_tensor_device
def cross_entropy_bwd(logits: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
                      grad_scale, ignore_index: int, label_smoothing: float,
                      dlogits: Optional[torch.Tensor] = None, *,
                      count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the backward: d(sum_r grad_scale_r * loss_r / count) / d logits, logits' dtype,
    (N, V).

    Args:
        logits, target: as for ``cross_entropy_fwd``.
        stats: (N, 2) float32 from ``cross_entropy_fwd``.
        grad_scale: float32 / float16 / bfloat16 tensor of shape () (one scale for all rows) or
            (N,), read on the device (a loss's incoming gradient as it is), or a Python float.
        dlogits: where the gradient goes ((N, V), logits' dtype, unit column stride; it may be
            ``logits`` itself: each program reads a block of its row before writing it), or
            None for a new tensor.
        count: None, or a one-element int64 tensor dividing grad_scale on the device (the
            divisor of a mean, as ``cross_entropy_fwd`` returns it).
    """
    _check_rows(logits, target)
    n_rows, n_cols = logits.shape
    # the kernel addresses stats as a contiguous (N, 2) float32 array
    if stats.shape != (n_rows, 2) or stats.dtype != torch.float32 or not stats.is_contiguous():
        raise ValueError(f"stats must be the contiguous ({n_rows}, 2) float32 tensor that "
                         f"cross_entropy_fwd returned, got {stats.dtype} of shape "
                         f"{tuple(stats.shape)} strides {stats.stride()}")
    scale, stride_scale, scale_value, count = _scale_args(grad_scale, count, n_rows)
    if dlogits is None:
        # logits' strides when they are dense and row-major, else contiguous: the kernel
        # writes rows with a unit column stride, which empty_like does not always give
        # (overlapping rows, strides (1, 1) from unfold, come back column-major)
        dlogits = torch.empty_like(logits)
        if n_cols > 1 and dlogits.stride(1) != 1:
            dlogits = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    else:
        _check_dlogits(dlogits, logits)
    block_v, num_warps, _ = ce_block(n_cols)
    if n_rows > 0:
        launch(
            _cross_entropy_bwd_kernel, (n_rows,),
            logits, target, stats, scale, count, dlogits,
            logits.stride(0), target.stride(0), stride_scale, dlogits.stride(0),
            n_cols, int(ignore_index), float(label_smoothing), scale_value,
            BLOCK_V=block_v, HAS_SMOOTHING=label_smoothing > 0.0, HAS_SCALE=scale is not None,
            HAS_COUNT=count is not None, ALIGNED_DX=_aligned_dx(logits, dlogits),
            num_warps=num_warps,
        )
    return dlogits


def chunk_rows(n_rows: int, n_cols: int, chunk_elements: Optional[int] = None) -> int:
    """Rows a chunk of ``linear_cross_entropy`` holds: about chunk_elements (default
    ``CHUNK_ELEMENTS``) / n_cols, with the rows spread evenly over the chunks so that the last
    chunk is not a sliver."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    most = max(CHUNK_ROW_MULTIPLE, chunk_elements // max(n_cols, 1) // CHUNK_ROW_MULTIPLE
               * CHUNK_ROW_MULTIPLE)
    n_chunks = cdiv(max(n_rows, 1), most)
    rows = cdiv(max(n_rows, 1), n_chunks)
    return min(most, cdiv(rows, CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE)


def _prescale(grad_scale):
    """fp16 (see PRESCALE): (the scale the gradient is stored with, the factor of the fp32
    products). One scale for every row (a Python float or a () tensor, a mean's or sum's
    incoming gradient): stored times PRESCALE, the products times grad_scale / PRESCALE (a
    power of two: the same bits as the grad_scale / |grad_scale| * PRESCALE stored before, the
    sign moved to the factor), one op. A scale a row (M,): grad_scale * PRESCALE / s and
    s / PRESCALE with s = max|grad_scale|, on the device (no host sync), s clamped for an
    all-zero grad_scale, an inf / NaN one passed on unchanged (factor 1)."""
    if not isinstance(grad_scale, torch.Tensor):
        return PRESCALE, float(grad_scale) / PRESCALE
    g = grad_scale if grad_scale.dtype == torch.float32 else grad_scale.float()
    if g.dim() == 0:
        return PRESCALE, g / PRESCALE
    tiny = torch.finfo(torch.float32).tiny
    s = g.abs().amax()
    s = torch.where(torch.isfinite(s), s.clamp_min(tiny), PRESCALE)
    return g / s * PRESCALE, s / PRESCALE


@on_tensor_device
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         target: torch.Tensor, ignore_index: int, label_smoothing: float,
                         grad_scale=None, need_dx: bool = True, need_dweight: bool = True,
                         need_dbias: bool = True, chunk_elements: Optional[int] = None):
    """Cross-entropy of the rows of ``x @ weight.T + bias``, chunked over rows.

    Args:
        x: (M, H) fp32/fp16/bf16, the rows to project (masked tokens, already gathered).
        weight: (V, H), x's dtype. bias: (V,) x's dtype, or None.
        target: (M,) int64/int32.
        grad_scale: None (loss only), or the incoming gradient of each row's loss: a float32 /
            float16 / bfloat16 tensor () or (M,), or a Python float (passed to the kernel by
            value: no tensor): the gradients returned are those of sum_r grad_scale_r * loss_r.
        need_dx, need_dweight, need_dbias: which gradients to compute (with grad_scale).
        chunk_elements: the size of the one logits buffer, in elements (about rows x V);
            default ``CHUNK_ELEMENTS``.

    Returns:
        (loss (M,) float32, dx (M, H) x.dtype, dweight (V, H) weight.dtype, dbias (V,)
        bias.dtype); gradients not computed are None.
    """
    n_rows, hidden = x.shape
    vocab = weight.shape[0]
    if weight.shape != (vocab, hidden) or (bias is not None and bias.shape != (vocab,)):
        raise ValueError(f"weight must be (V, {hidden}) and bias (V,), got {tuple(weight.shape)} "
                         f"and {None if bias is None else tuple(bias.shape)}")
    if target.shape != (n_rows,):
        raise ValueError(f"target must have shape ({n_rows},), got {tuple(target.shape)}")
    grads = grad_scale is not None
    need_dx, need_dweight, need_dbias = (grads and need_dx, grads and need_dweight,
                                         grads and need_dbias and bias is not None)
    dev = x.device
    if n_rows == 0:
        return (torch.empty((0,), dtype=torch.float32, device=dev),
                torch.empty_like(x) if need_dx else None,
                # contiguous whatever the weight's layout (W.t() of an (H, V) parameter): the
                # backward scales them in place, which takes contiguous tensors only
                torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if need_dweight
                else None,
                torch.zeros(bias.shape, dtype=bias.dtype, device=dev) if need_dbias else None)
    rows = chunk_rows(n_rows, vocab, chunk_elements)
    prescaled = grads and x.dtype == torch.float16
    unscale = 1.0
    if prescaled:
        grad_scale, unscale = _prescale(grad_scale)
    if rows >= n_rows:
        # one chunk (BERT-base at batch 32, seq 128): every product into a new tensor, no
        # buffers, slices or accumulators (each a torch call on the host)
        logits = F.linear(x, weight, bias)
        loss, stats, _ = cross_entropy_fwd(logits, target, ignore_index, label_smoothing)
        if not grads:
            return loss, None, None, None
        # the loss and each row's statistics (one read of the logits), then the gradient
        # written over them (one read, one write): measured on an H200 (bf16, V = 30522), these
        # two kernels ran at ~2.8 TB/s each (4096 rows; ~3.9 TB/s at 16384) where the forward
        # that writes the gradient from a row held in registers ran at ~1.2 TB/s (16384 rows;
        # cross_entropy's STORE_GRADS)
        cross_entropy_bwd(logits, target, stats, grad_scale, ignore_index, label_smoothing,
                          dlogits=logits)
        if prescaled:
            # fp32 products scaled back, then rounded once
            dx = mm_fp32(logits, weight).mul_(unscale).to(x.dtype) if need_dx else None
            dw = (mm_fp32(logits.t(), x).mul_(unscale).to(weight.dtype) if need_dweight
                  else None)
            db = (logits.sum(0, dtype=torch.float32).mul_(unscale).to(bias.dtype) if need_dbias
                  else None)
        else:
            dx = torch.mm(logits, weight) if need_dx else None
            dw = torch.mm(logits.t(), x) if need_dweight else None
            # torch sums 16-bit tensors in fp32 and rounds the result once
            db = logits.sum(0) if need_dbias else None
        return loss, dx, dw, db
    # several chunks: views of each chunk's rows made by one split each, not a slice a chunk
    loss = torch.empty((n_rows,), dtype=torch.float32, device=dev)
    dx = torch.empty_like(x) if need_dx else None
    n_chunks = cdiv(n_rows, rows)
    per_row_scale = isinstance(grad_scale, torch.Tensor) and grad_scale.dim() == 1
    chunks = zip(x.split(rows), target.split(rows), loss.split(rows),
                 dx.split(rows) if need_dx else [None] * n_chunks,
                 grad_scale.split(rows) if per_row_scale else [grad_scale] * n_chunks)
    # dW partial products are summed in fp32 for low-precision weights (for fp16's prescaled
    # ones scaled back once at the end); db in fp32; the first chunk's product is the
    # accumulator (no zero-filled buffers)
    acc_fp32 = need_dweight and weight.dtype != torch.float32
    dw = db = None
    buf = torch.empty((rows, vocab), dtype=x.dtype, device=dev)
    wt = weight.t()
    for xc, tc, loss_c, dx_c, scale in chunks:
        logits = buf if xc.shape[0] == rows else buf[:xc.shape[0]]
        if bias is not None:
            torch.addmm(bias, xc, wt, out=logits)
        else:
            torch.mm(xc, wt, out=logits)
        # as in the one-chunk case: loss and statistics, then the gradient over the logits
        _, stats, _ = cross_entropy_fwd(logits, tc, ignore_index, label_smoothing, loss=loss_c)
        if not grads:
            continue
        cross_entropy_bwd(logits, tc, stats, scale, ignore_index, label_smoothing,
                          dlogits=logits)
        # logits now holds d loss / d logits for this chunk (times PRESCALE / s in fp16)
        if need_dx:
            if prescaled:
                # one fp32 (rows, H) temporary: scaled back, then rounded once
                dx_c.copy_(mm_fp32(logits, weight).mul_(unscale))
            else:
                torch.mm(logits, weight, out=dx_c)
        if need_dweight:
            if dw is None:
                dw = mm_fp32(logits.t(), xc) if prescaled else torch.mm(logits.t(), xc)
                dw = dw.float() if acc_fp32 else dw
            elif prescaled:
                dw.add_(mm_fp32(logits.t(), xc))
            elif acc_fp32:
                dw += torch.mm(logits.t(), xc)
            else:
                dw.addmm_(logits.t(), xc)
        if need_dbias:
            part_b = logits.sum(0, dtype=torch.float32)
            db = part_b if db is None else db.add_(part_b)
    if prescaled:
        if need_dweight:
            dw.mul_(unscale)
        if need_dbias:
            db.mul_(unscale)
    if acc_fp32:
        dw = dw.to(weight.dtype)
    if need_dbias:
        db = db.to(bias.dtype)
    return loss, dx, dw, db


def aot_configs():
    """Every block config: the forward with and without smoothing / gradient (row-looping
    blocks) and the backward, in bf16 (every variant the ops launch), fp16 and fp32; every
    one-block forward with gradient in bf16, fp16 and fp32 (the widest ones in each); the
    reductions; the gradient scaling; int32 targets once. A pointer the launch passes as None
    (no scale tensor, no count, no reduced output) is a constexpr, as the JIT specializes it."""
    def ptr_or_none(name, ty, present, sig, consts):
        if present:
            sig[name] = ty
        else:
            sig[name], consts[name] = "constexpr", None

    def fwd(dt, block_v, num_warps, smooth, grad, one=False, tt="i64", loss="fp32",
            has_scale=False, has_count=False, row_loop=False, aligned_dx=True, row_stages=0):
        sig = {"logits_ptr": f"*{dt}", "target_ptr": f"*{tt}", "loss_ptr": f"*{loss}",
               "stats_ptr": "*fp32", "scale_ptr": "*fp32", "count_ptr": "*i64",
               "dlogits_ptr": f"*{dt}", "stride_logits_row": "i64", "stride_target": "i64",
               "stride_scale": "i64", "stride_dlogits_row": "i64", "n_cols": "i32",
               "ignore_index": "i32", "label_smoothing": "fp32", "scale_value": "fp32",
               "n_rows": "i32", "BLOCK_V": "constexpr", "HAS_SMOOTHING": "constexpr",
               "STORE_GRAD": "constexpr", "ONE_BLOCK": "constexpr", "HAS_SCALE": "constexpr",
               "HAS_COUNT": "constexpr", "ROW_LOOP": "constexpr", "ALIGNED_DX": "constexpr",
               "ROW_STAGES": "constexpr"}
        consts = dict(BLOCK_V=block_v, HAS_SMOOTHING=smooth, STORE_GRAD=grad, ONE_BLOCK=one,
                      HAS_SCALE=has_scale, HAS_COUNT=has_count, ROW_LOOP=row_loop,
                      ALIGNED_DX=aligned_dx, ROW_STAGES=row_stages)
        ptr_or_none("scale_ptr", "*fp32", has_scale, sig, consts)
        ptr_or_none("count_ptr", "*i64", has_count, sig, consts)
        return AotConfig(_cross_entropy_fwd_kernel, sig, consts, num_warps,
                         name=f"cross_entropy_fwd[{dt},{tt},loss={loss},{block_v},smooth={smooth},"
                              f"grad={grad},one_block={one},scale={has_scale},count={has_count},"
                              f"row_loop={row_loop},aligned_dx={aligned_dx},"
                              f"row_stages={row_stages}]")

    def bwd(dt, block_v, num_warps, smooth, tt="i64", scale="fp32", has_count=False,
            aligned_dx=True):
        sig = {"logits_ptr": f"*{dt}", "target_ptr": f"*{tt}", "stats_ptr": "*fp32",
               "scale_ptr": f"*{scale}", "count_ptr": "*i64", "dlogits_ptr": f"*{dt}",
               "stride_logits_row": "i64", "stride_target": "i64", "stride_scale": "i64",
               "stride_dlogits_row": "i64", "n_cols": "i32", "ignore_index": "i32",
               "label_smoothing": "fp32", "scale_value": "fp32", "BLOCK_V": "constexpr",
               "HAS_SMOOTHING": "constexpr", "HAS_SCALE": "constexpr", "HAS_COUNT": "constexpr",
               "ALIGNED_DX": "constexpr"}
        consts = dict(BLOCK_V=block_v, HAS_SMOOTHING=smooth, HAS_SCALE=scale is not None,
                      HAS_COUNT=has_count, ALIGNED_DX=aligned_dx)
        ptr_or_none("scale_ptr", f"*{scale}", scale is not None, sig, consts)
        ptr_or_none("count_ptr", "*i64", has_count, sig, consts)
        return AotConfig(_cross_entropy_bwd_kernel, sig, consts, num_warps,
                         name=f"cross_entropy_bwd[{dt},{tt},{block_v},smooth={smooth},"
                              f"scale={scale},count={has_count},aligned_dx={aligned_dx}]")

    for block_v, num_warps, _ in ce_block_configs():
        for smooth in (False, True):
            # cross_entropy: the row losses of a reduced loss (fp32); the backward of a mean:
            # the incoming gradient (the loss's dtype) over the count
            yield fwd("bf16", block_v, num_warps, smooth, False)
            yield bwd("bf16", block_v, num_warps, smooth, scale="bf16", has_count=True)
        # reduction "none": the row losses in the loss's dtype, the incoming gradient a row
        yield fwd("bf16", block_v, num_warps, False, False, loss="bf16")
        yield bwd("bf16", block_v, num_warps, True, scale="bf16")
        # STORE_GRADS: 1 / count of a mean, or 1 of a sum; a scale tensor (the launchers)
        yield fwd("bf16", block_v, num_warps, True, True, has_count=True)
        yield fwd("bf16", block_v, num_warps, False, True, has_scale=True)
        # ... with STORE_GRAD_PROGRAMS_PER_SM: a grid of fewer programs looping over the rows
        yield fwd("bf16", block_v, num_warps, True, True, has_count=True, row_loop=True)
        # masked_lm_loss: the stored gradients' scale by value; fp16's prescaled fp32 rows
        yield bwd("bf16", block_v, num_warps, False, scale=None)
        yield fwd("fp16", block_v, num_warps, True, True, has_scale=True)
        yield fwd("fp16", block_v, num_warps, True, False, loss="fp16")
        yield bwd("fp16", block_v, num_warps, True, scale="fp32")
        yield fwd("fp32", block_v, num_warps, False, False)
        yield bwd("fp32", block_v, num_warps, False, scale=None)
    for block_v, num_warps, one in ce_block_configs(one_block=True):
        yield fwd("bf16", block_v, num_warps, False, True, one, has_count=True)
        # STORE_GRAD_PIPELINED_WARPS_PER_SM: the pipelined row loop (2 and 3 stages, where the
        # row buffers fit STORE_GRAD_PIPELINE_MAX_BYTES)
        for dt, size in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
            for stages in (2, 3):
                if (stages - 1) * block_v * size <= STORE_GRAD_PIPELINE_MAX_BYTES:
                    yield fwd(dt, block_v, num_warps, dt == "fp16", True, one,
                              has_count=dt != "fp16", has_scale=dt == "fp16", row_loop=True,
                              row_stages=stages)
        yield fwd("fp16", block_v, num_warps, True, True, one, has_scale=True)
        yield fwd("fp32", block_v, num_warps, True, True, one, has_scale=True, has_count=True)
    block_v, num_warps, _ = ce_block(MAX_BLOCK_V)
    yield fwd("fp32", block_v, num_warps, True, True, tt="i32", has_scale=True)
    yield bwd("fp32", block_v, num_warps, True, tt="i32")
    # a gradient whose rows are offset from the logits' rows modulo ALIGN (a caller's dlogits)
    yield fwd("bf16", block_v, num_warps, False, True, has_count=True, aligned_dx=False)
    yield bwd("bf16", block_v, num_warps, False, scale="bf16", has_count=True, aligned_dx=False)
    for block_v, num_warps, one in ce_block_configs(one_block=True)[-1:]:
        yield fwd("bf16", block_v, num_warps, False, True, one, has_count=True, aligned_dx=False)
    # the reduction: a loss of each dtype, mean / sum / none, checked or not, int32 targets once;
    # in one program, then as the first stage (partials) and the second of the two-stage one
    for out, reduce, check, tt in (("fp32", 2, False, "i64"), ("bf16", 2, True, "i64"),
                                   ("fp16", 1, False, "i64"), ("bf16", 1, True, "i32"),
                                   (None, 0, True, "i64")):
        for partial in (False, True):
            sig = {"loss_ptr": "*fp32" if reduce else f"*{out or 'bf16'}", "target_ptr": f"*{tt}",
                   "out_ptr": f"*{out}", "count_ptr": "*i64", "part_sum_ptr": "*fp64",
                   "part_count_ptr": "*i64", "part_bad_ptr": "*i64", "stride_target": "i64",
                   "n_rows": "i32", "n_cols": "i32", "ignore_index": "i32",
                   "rows_per_program": "i32", "BLOCK": "constexpr", "REDUCTION": "constexpr",
                   "CHECK": "constexpr", "PARTIAL": "constexpr"}
            consts = dict(BLOCK=REDUCE_BLOCK, REDUCTION=reduce, CHECK=check, PARTIAL=partial)
            ptr_or_none("out_ptr", f"*{out}", out is not None and not partial, sig, consts)
            ptr_or_none("count_ptr", "*i64", not partial, sig, consts)
            for name in ("part_sum_ptr", "part_count_ptr", "part_bad_ptr"):
                ptr_or_none(name, sig[name], partial, sig, consts)
            yield AotConfig(_cross_entropy_reduce_kernel, sig, consts, REDUCE_NUM_WARPS,
                            name=f"cross_entropy_reduce[{out},{REDUCTIONS[reduce]},check={check},"
                                 f"{tt},partial={partial}]")
        sig = {"part_sum_ptr": "*fp64", "part_count_ptr": "*i64", "part_bad_ptr": "*i64",
               "out_ptr": f"*{out}", "count_ptr": "*i64", "n_parts": "i32", "n_rows": "i32",
               "BLOCK": "constexpr", "REDUCTION": "constexpr", "CHECK": "constexpr"}
        consts = dict(BLOCK=REDUCE_PARTS, REDUCTION=reduce, CHECK=check)
        ptr_or_none("out_ptr", f"*{out}", out is not None, sig, consts)
        yield AotConfig(_cross_entropy_reduce_parts_kernel, sig, consts, REDUCE_NUM_WARPS,
                        name=f"cross_entropy_reduce_parts[{out},{REDUCTIONS[reduce]},"
                             f"check={check}]")
    # masked_lm_loss's row selection: int64 / int32 labels, checked or not
    for tt, check in (("i64", True), ("i64", False), ("i32", True)):
        sig = {"target_ptr": f"*{tt}", "sel_ptr": "*i64", "info_ptr": "*i64",
               "stride_target": "i64", "n_rows": "i32", "n_cols": "i32", "ignore_index": "i32",
               "BLOCK": "constexpr", "CHECK": "constexpr"}
        yield AotConfig(_cross_entropy_select_kernel, sig, dict(BLOCK=SELECT_BLOCK, CHECK=check),
                        SELECT_NUM_WARPS, name=f"cross_entropy_select[{tt},check={check}]")
    # the incoming gradient is fp32 for a float32 loss (masked_lm_loss, autocast), else the
    # gradient's dtype; the element count is i32 below 2**31; one tensor (cross_entropy) or
    # three (masked_lm_loss)
    for dt, gt, nt, n in (("bf16", "bf16", "i64", 1), ("bf16", "fp32", "i32", 1),
                          ("fp16", "fp32", "i32", 1), ("fp32", "fp32", "i32", 1),
                          ("bf16", "fp32", "i32", 3), ("fp32", "fp32", "i64", 3),
                          ("bf16", "fp32", "i32", 2)):
        sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "c_ptr": f"*{dt}", "grad_ptr": f"*{gt}",
               "n_a": nt, "n_b": nt, "n_c": nt, "BLOCK": "constexpr", "N_TENSORS": "constexpr"}
        consts = dict(BLOCK=SCALE_BLOCK, N_TENSORS=n)
        for i, name in enumerate(("b_ptr", "c_ptr")):
            ptr_or_none(name, f"*{dt}", i + 1 < n, sig, consts)
        yield AotConfig(_cross_entropy_scale_kernel, sig, consts, 8,
                        name=f"cross_entropy_scale[{dt},{gt},{nt},tensors={n}]")
