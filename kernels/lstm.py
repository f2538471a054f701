"""LSTM recurrence, forward and backward, fused: per-timestep kernels and time-looping
(persistent) kernels, plus the LayerNorm-LSTM variant.

The input projections of all timesteps are one GEMM per layer and direction, done by the
caller (cuBLAS): ``xg = x @ W_ih^T + b_ih + b_hh``, shape (T, B, 4H). What remains is the
recurrence, which this file fuses:

forward, step s (time t = s, or T-1-s for the reverse direction):
    gates = xg[t] + h_{s} @ W_hh^T               (the recurrent GEMM, tl.dot, fp32 accumulate)
    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid  (gate order i, f, g, o as in torch)
    c' = f * c + i * g                            (cell state always fp32)
    h' = o * tanh(c')
    steps with t >= length[b] keep (h, c) unchanged and write zero output
A program owns a block of batch rows and a block of hidden columns j, and computes the four
gate columns (j, H+j, 2H+j, 3H+j) of that block, so all gate math of the step stays in
registers: the gate pre-activations never touch memory. The gate activations are stored
once (input dtype) for the backward.

With a projection (``proj_size`` P > 0) the cell kernel writes r = o * tanh(c') and a second
kernel computes h' = r @ W_hr^T with the same length masking.

backward, step s in reverse order:
    dh = dy[t] + dgates[next] @ W_hh + dcarry    (the recurrent GEMM of the *previous*
                                                  backward step's gate gradients, fused with
                                                  this step's pointwise math)
    then all gate gradients, dc, written as dgates[t] (input dtype) and dc (fp32, in place).
Steps past a sequence's length pass dh and dc through unchanged (``dcarry``) and write zero
gate gradients. dW_hh, dW_ih, dx and the biases are then single large GEMMs over all
timesteps (sum_t dgates_t^T h_{t-1}), done by the caller.

LayerNorm-LSTM (haste's formulation: LN on W_ih x and on W_hh h over the 4H gate
pre-activations, LN on c before the output tanh): the LayerNorms reduce over whole rows, so
the recurrent GEMM is one cuBLAS call per step and a row kernel (one program per batch row)
fuses everything else of the step: LN(W_hh h) * g_hh + xg, the gates, the cell update,
LN(c) * g_c + b_c, the output and the length masking; its backward fuses both LayerNorm
backwards with the gate gradients and accumulates the LayerNorm weight gradients per row in
place. The W_ih x LayerNorm is done for all timesteps at once by the caller. With a
projection the row kernel writes the unprojected output r = o * tanh(LN(c) * g_c + b_c),
r @ W_hr^T is a second cuBLAS GEMM per step and a small row kernel masks it by length into
the new state and the output; the backward runs the same three pieces in reverse
(dh masked -> dh @ W_hr -> the row kernel), and dW_hr is one GEMM over all steps. Without a
projection and up to LN_PERSISTENT_MAX_HIDDEN, time-looping kernels run the whole sequence in
one launch instead: a program per batch row computes its rec = W_hh h as a GEMV (W_hh
streamed from L2 each step), then runs the same row step; block barriers only, since a
program reads back nothing but its own row.

Precision of the LayerNorm-LSTM with 16-bit inputs: what the LayerNorms normalize and what
the LayerNorm-weight gradients sum over steps stays fp32 between the kernels. The recurrent
GEMMs write rec = W_hh h in fp32 (cuBLAS with an fp32 result, or the GEMV's accumulator), the
gate activations are saved in fp32, and the backward's per-step GEMMs (dr = dh @ W_hr and
drec @ W_hh) write fp32. Rounding each of these to 16 bits once per step made the fp16
gradients of the LayerNorm weights up to 3.5x as far from the fp64 reference as an eager
fp16 PyTorch LayerNorm-LSTM (the low-precision test of tests/ops/test_lstm.py over 64 seeds;
up to 1.8x without those roundings): LN(rec) divides rec's rounding error by the row's
standard deviation, and d(g_hh) = sum over steps of dpre * LN(rec) adds it up. The cost is
memory: recs and gates, saved for the backward, take 8 bytes per gate element and step
together instead of 4. The state h, the gate gradients drec and the masked state gradients
stay in the input dtype: they are operands of cuBLAS GEMMs, which take both operands in one
dtype.

Three ways to run the time loop:
- per step (any hidden size, projection): one launch per step, a 2-D grid over batch blocks x
  column blocks, so a step spreads over many SMs; it pays a launch (a few microseconds on the
  GPU, more in Python) per step and re-reads W_hh from L2 every step.
- persistent (hidden <= PERSISTENT_MAX_HIDDEN, no projection): one launch for the whole
  sequence; a program owns a batch block and every hidden column and loops over time. Batch
  rows never interact, so no grid-wide barrier is needed, only a block barrier between steps
  (the program reads its own h_t back from global memory). It streams all of W_hh through
  one SM per step, which is why it is limited to small hidden sizes, and it uses only
  cdiv(B, 16) SMs.
- cooperative (``COOP_TIME_LOOP``, the default for 16-bit layers on a GPU since it was
  checked and timed on one, see there; hidden <= COOP_MAX_HIDDEN, no projection): the
  per-step grid and tiles in one launch that loops over time. A program keeps its batch
  block and column block for every step (it re-reads the same W_hh columns from L2 each
  step: the barrier's acquire invalidates the SM's L1; ``COOP_RESIDENT_W`` keeps them in
  shared memory), and the step's work spreads over up to one program per SM. After each step
  the programs of one batch block meet at a barrier (``_group_barrier``: an arrival count
  per batch block, release / acquire atomics at GPU scope, as CUDA's cooperative-groups grid
  sync): the next step reads their columns of h (backward: of the gate gradients). The
  barrier needs every program of the grid resident at once: the grid is at most one program
  per SM (``coop_blocks`` widens the tiles to fit, else the layer takes another path) and is
  launched as a cooperative grid (the driver starts it only when all its programs can be
  resident together, or fails the launch); a group that still cannot meet (other work on
  concurrent streams holding the SMs its missing programs need, e.g. two such loops at once,
  or MPS limiting the SMs) gives up after COOP_MAX_SPINS reads and writes NaN from then on
  instead of hanging. The interpreter runs one program at a time, so on CPU the same kernel
  runs one launch per step without the barrier (``_coop_launches``). This is the shape of
  cuDNN's persistent RNN; with ``COOP_RESIDENT_W`` (off by default, see there) each program
  also loads its W_hh slice once, before the loop, into shared memory, and each step is one
  GEMM over the whole reduction: no W_hh traffic after the first step (where the slice fits,
  up to hidden COOP_RESIDENT_MAX_HIDDEN).

CUDA-graph mode of the per-step loops (``PER_STEP_CUDA_GRAPH``, off by default): the host
time of the per-step path is one Python launch per kernel and step (~20 us each on the H200
machine's host, 2T-4T launches per layer and direction), which bounds it at small and medium
sizes. In this mode each loop (the plain LSTM's forward and backward) is captured once per
shape into a CUDA graph over static input and output buffers; a call copies its inputs in,
replays the graph and returns clones of the outputs (autograd saves them, so the next call
must not overwrite them): a dozen torch ops and one graph launch instead of the loop. The
kernels and their arguments are the plain loop's, so the results are bitwise the same. The
LayerNorm-LSTM's loops (a cuBLAS GEMM a step) are never graphed: the H200's gpu test found
their graphed results wrong (2026-11-28; the first call's too, which runs the loop eagerly on
a side stream before the capture; cause not found, no GPU since), and the mode was removed
for them. A call
made while its stream is being captured runs the plain loop (the caller's graph records it);
CPU tensors (the interpreter) always do. The captures and their buffers live in a small LRU
cache (``_step_graph``): about one plain call's inputs and outputs of memory per entry.
Recapturing for every new shape makes the mode a loss for inputs whose sequence length
changes from call to call.

References: cuDNN persistent RNN (Diamos et al., 2016), haste (lmnt-com/haste), PyTorch's
``_thnn_fused_lstm_cell``.
"""
from __future__ import annotations

import collections
import functools
import os
import threading
import warnings
from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (AotConfig, LOG2E, _sm_count, _tanh, cdiv, env_flag, mm_fp32,
                      next_power_of_2, on_tensor_device, row_mean)
from ._launch import bind, launch

# tl.dot needs every block dimension >= 16; the batch block is padded up to it.
MIN_DOT_BLOCK = 16
# K step of the per-step GEMMs and the largest batch block: wider tiles spill registers in
# the forward, which holds four accumulators and one W_hh tile per gate (ptxas -v).
STEP_BLOCK_K = 32
MAX_STEP_BLOCK_B = 32
# The widest column block of the per-step and time-looping kernels (same register reason).
MAX_BLOCK_H = 64
# The time-looping ("persistent") kernels give each program a batch block and all hidden
# columns, so one program streams all of W_hh (8 H^2 bytes in 16 bits) from L2 every step;
# up to this hidden size that costs less than a launch per step (estimate: 512 KB at ~100 GB/s
# per SM is ~5 us, a Python-side Triton launch ~20 us). Measured once (H200, bf16, run 1 of
# benchmarks/results, before kernels/_launch.py and the CUDA-graph mode): at hidden 256 the
# time-looping kernels took 1.0-2.0x cuDNN's time, GPU-bound (graphed = ungraphed), with
# cdiv(B, 16) programs (4 SMs at batch 64); bench_lstm times the per-step path beside it. Read at
# every call (``use_persistent``): 0 forces the per-step path at every hidden size, which is
# how bench_lstm times it against the time-looping kernels (LN_PERSISTENT_MAX_HIDDEN likewise).
PERSISTENT_MAX_HIDDEN = 256
PERSISTENT_WARPS = 8
# Below this many programs per step the column block shrinks, to spread one step over more
# SMs (a step's work is small: B x 4H x P multiply-adds).
MIN_STEP_PROGRAMS = 128
# The CUDA-graph mode of the per-step loops (module docstring): True / False switch it; None
# (the default) takes $FASTBERT_LSTM_CUDA_GRAPH, "1" on, "0" or unset off, read once on the
# first per-step call. Off by default: on the H200 (2026-11-28) its results were bitwise the
# plain loop's and it took 0.30-1.04x the per-step / time-looping path's time (bench_lstm's
# fastbert_triton_step_graph rows), but the cooperative loop, the default where it applies,
# took 0.73-1.07x the mode's time, and a capture per input shape makes the mode a loss for
# varying lengths. It still serves the layers the cooperative loop does not take.
PER_STEP_CUDA_GRAPH: Optional[bool] = None
CUDA_GRAPH_ENV = "FASTBERT_LSTM_CUDA_GRAPH"
# Captured loops kept, least recently used evicted: a layer's forward and backward in each
# direction are four (layers of equal shapes share them).
CUDA_GRAPH_CACHE_SIZE = 8
# The cooperative time loop (module docstring): True / False switch it; None takes
# $FASTBERT_LSTM_COOP ("1" on, "0" off; once set, read once, on the first call that could use
# it), and while that is unset (looked up at each call), the default: on for 16-bit CUDA
# tensors outside a CUDA-graph capture, off elsewhere (float32, which no GPU run has timed or
# checked in this loop; the interpreter's CPU tensors, where the loop runs one launch a step
# anyway; a capture, where a cooperative launch has not been checked on a GPU). The default
# since the H200 run of 2026-11-28 (benchmarks/results/lstm_nvidia-h200.md, bf16): wall time
# below the per-step / time-looping path's in 25 of the 26 padded cases (geometric mean
# 1.75x faster, 0.99x at worst), bitwise their results in the gpu tests (bf16, hidden 72-1024,
# batch 7-256). The gain is the launches it saves: in GPU time (gpu_ms) it was 2.9-3.4x faster
# at hidden 256 but 0.93-0.98x at hidden 512-1024 in 13 of the cases.
COOP_TIME_LOOP: Optional[bool] = None
COOP_ENV = "FASTBERT_LSTM_COOP"
# Up to this hidden size (no projection). A program re-reads its W_hh columns from L2 every
# step (the barrier's acquire invalidates its SM's L1): 4 x BLOCK_H x H in 16 bits, 32 KB at
# hidden 256 with BLOCK_H 16, 512 KB at 1024 with BLOCK_H 64 (the widest tiles).
COOP_MAX_HIDDEN = 1024
# Reads of the arrival count a waiting program makes before it gives up (about half a second
# to a second of waiting: a step takes microseconds, so only a group whose programs are not all
# resident gets there) and the mark it then leaves on the count (_group_barrier). The counts
# stay below it: n_steps x group < 2^30.
COOP_MAX_SPINS = 1 << 20
COOP_POISON = 1 << 30
# Opt-in tile variants of the per-step and cooperative kernels, off by default (bench_lstm
# times them beside the default: on the H200, 2026-11-28, with the cooperative loop off, all
# three together took 0.67-1.22x the per-step loop's time at hidden 512-1024, 0.68-0.77x at
# 1024 with batch >= 64 and seq 256; but they would change the cooperative loop's tiles too,
# the default now, a combination not timed). Read at every call.
# FWD_BLOCK_K / BWD_BLOCK_K: the K step of the forward's recurrent GEMM (over the state size)
# and of the backward's (over 4H; with a projection, over its size P); None takes STEP_BLOCK_K
# (32), else a power of two (clipped to the reduction). The backward's K loop is
# 4H / BLOCK_K dependent iterations that move 3-6 KB each (64 of them at hidden 512, 128 at
# 1024): bound by L2 latency, not bandwidth. 128 makes them 4x fewer and 4x larger, and every
# W_hh / dgates load 16 bytes a thread (SASS, sm_90: 8 bytes at 32).
# FWD_NARROW_WARPS: the forward with BLOCK_B * BLOCK_H / 256 warps (2 to 8) instead of
# ``_step_warps`` (/ 128, 4 to 16). At 4 warps on a 32x16 tile and 16 on 32x64 Triton's MMA
# layout gives every warp a half-size slice of an MMA tile, so each MMA is computed twice
# (HMMA per step twice the tile's) and each thread loads its W_hh tiles 8 bytes at a time.
FWD_BLOCK_K: Optional[int] = None
BWD_BLOCK_K: Optional[int] = None
FWD_NARROW_WARPS = False
# COOP_RESIDENT_W: the cooperative time loop (COOP_TIME_LOOP) loads each program's W_hh slice
# once, before its time loop, and keeps it on chip: forward, the program's hidden columns of
# the four gates over the whole state; backward, its columns of every gate row. Each step is
# then one GEMM over the whole reduction (no K loop) with no W_hh traffic: without it every
# program re-reads its slice from L2 every step (review D, session 16: 6.4 -> 2.4 MB of L2
# reads per forward step at 64 x 512). Where it does not fit (below) the loop reloads it as
# before. Opt-in: on the H200 (2026-11-28, bench_lstm's ``fastbert_triton_coop_resident``
# rows, bf16) it took 0.58-0.71x the non-resident loop's GPU time at hidden 256 (wall time
# 0.59-0.70x at seq 256; at seq 64, host-bound, 0.92-1.27x), but at hidden 512 the gpu test
# found its results wrong (batch 16 and 64: up to 1.8 off in bf16, a quarter of the elements
# at batch 16 over 200 steps; cause not found, no GPU since; a race that hidden 256 merely did
# not show is not ruled out, hence still opt-in): it runs only up to COOP_RESIDENT_MAX_HIDDEN,
# the largest the gpu tests passed at (batch 7-256). Read at every call.
# The slice and the step's other GEMM operand (the batch block's h, or its gate gradients,
# over the whole reduction) are staged in shared memory (sm_90 TTGIR: the slice's local_alloc
# is hoisted before the time loop, only local_loads inside it): a kernel runs resident when
# the two together fit COOP_RESIDENT_MAX_BYTES (``resident_bytes``), which leaves room for
# the rest under sm_80's 163 KB. In 16 bits that is every hidden up to 256 at every batch, and
# hidden 512 at batch block 16 (forward also at batch block 32; ptxas: <= 24 B of spills
# there).
# fp32 operands take tl.dot's FMA path ("ieee"), which holds the whole K of both operands in
# registers: the four-gate forward spills kilobytes a thread at K = 256 (ptxas, sm_80 / sm_90,
# review s17 B), hundreds of bytes at 128; it runs resident only up to RESIDENT_FP32_MAX_K.
COOP_RESIDENT_W = False
COOP_RESIDENT_MAX_HIDDEN = 256
COOP_RESIDENT_MAX_BYTES = 128 * 1024
RESIDENT_FP32_MAX_K = 64


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(-x * LOG2E))


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    # fp32 operands multiply in full fp32 ("ieee"), not TF32, like torch's default matmul;
    # the Triton interpreter's tl.dot is wrong for bf16 operands: compute in fp32 there
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _state_grad(dy_ptr, dgn_ptr, w_hh_ptr, dcarry_ptr, offs_b, mask_b, offs_n, mask_n, valid,
                stride_dy_b, stride_dg_b, stride_w_row, stride_dcarry_b, n_gates, w_res,
                HAS_NEXT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr, DOT_FP32: tl.constexpr):
    """Gradient w.r.t. the state h after this step, columns offs_n of it:
    dy (masked) + dgates_next @ W_hh + the pass-through carry. Returns (G*valid, G*(1-valid)).
    RESIDENT: ``w_res`` is W_hh's (BLOCK_K, BLOCK_N) tile of every gate row (BLOCK_K >=
    n_gates), loaded once by the caller (``_w_rows_tile``): one GEMM, no K loop."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if HAS_NEXT and RESIDENT:
        offs_k = tl.arange(0, BLOCK_K)
        a = tl.load(dgn_ptr + offs_b[:, None] * stride_dg_b + offs_k[None, :],
                    mask=mask_b[:, None] & (offs_k < n_gates)[None, :], other=0.0)
        acc += _dot(a, w_res, DOT_FP32)
    elif HAS_NEXT:
        for k0 in range(0, n_gates, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < n_gates
            a = tl.load(dgn_ptr + offs_b[:, None] * stride_dg_b + offs_k[None, :],
                        mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_hh_ptr + offs_k[:, None] * stride_w_row + offs_n[None, :],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc += _dot(a, w, DOT_FP32)
    m2 = mask_b[:, None] & mask_n[None, :]
    dy = tl.load(dy_ptr + offs_b[:, None] * stride_dy_b + offs_n[None, :], mask=m2,
                 other=0.0).to(tl.float32)
    carry = tl.load(dcarry_ptr + offs_b[:, None] * stride_dcarry_b + offs_n[None, :], mask=m2,
                    other=0.0)
    g_valid = tl.where(valid, acc + dy + carry, 0.0)
    g_carry = tl.where(valid, 0.0, acc + carry)
    return g_valid, g_carry


@triton.jit
def _fwd_tile(xg_ptr, h_prev_ptr, c_prev_ptr, w_hh_ptr, len_ptr, h_out_ptr, c_out_ptr, y_ptr,
              gates_ptr, stride_xg_b, stride_h_b, stride_c_b, stride_w_row, stride_y_b,
              stride_gates_b, n_batch, n_hidden, n_state, t, offs_b, offs_h,
              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
              HAS_PROJ: tl.constexpr, DOT_FP32: tl.constexpr):
    """One step for batch rows offs_b and hidden columns offs_h of all four gates."""
    acc_i, acc_f, acc_g, acc_o = _fwd_acc(h_prev_ptr, w_hh_ptr, stride_h_b, stride_w_row,
                                          n_batch, n_hidden, n_state, offs_b, offs_h,
                                          BLOCK_B, BLOCK_H, BLOCK_K, DOT_FP32)
    _fwd_finish(acc_i, acc_f, acc_g, acc_o, xg_ptr, h_prev_ptr, c_prev_ptr, len_ptr, h_out_ptr,
                c_out_ptr, y_ptr, gates_ptr, stride_xg_b, stride_h_b, stride_c_b, stride_y_b,
                stride_gates_b, n_batch, n_hidden, t, offs_b, offs_h, HAS_PROJ)


@triton.jit
def _fwd_acc(h_prev_ptr, w_hh_ptr, stride_h_b, stride_w_row, n_batch, n_hidden, n_state,
             offs_b, offs_h, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
             BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """h_prev @ W_hh^T for hidden columns offs_h of each gate: four (BLOCK_B, BLOCK_H) fp32."""
    mask_b = offs_b < n_batch
    mask_h = offs_h < n_hidden
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    w_cols = w_hh_ptr + offs_h[None, :] * stride_w_row
    gate_stride = n_hidden * stride_w_row
    for k0 in range(0, n_state, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < n_state
        a = tl.load(h_prev_ptr + offs_b[:, None] * stride_h_b + offs_k[None, :],
                    mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        # W_hh^T tiles (BLOCK_K, BLOCK_H), one per gate
        wmask = mask_k[:, None] & mask_h[None, :]
        wp = w_cols + offs_k[:, None]
        acc_i += _dot(a, tl.load(wp, mask=wmask, other=0.0), DOT_FP32)
        acc_f += _dot(a, tl.load(wp + gate_stride, mask=wmask, other=0.0), DOT_FP32)
        acc_g += _dot(a, tl.load(wp + 2 * gate_stride, mask=wmask, other=0.0), DOT_FP32)
        acc_o += _dot(a, tl.load(wp + 3 * gate_stride, mask=wmask, other=0.0), DOT_FP32)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _w_gate_tiles(w_hh_ptr, stride_w_row, n_hidden, n_state, offs_h, BLOCK_K: tl.constexpr):
    """The W_hh^T tiles (BLOCK_K, BLOCK_H) of hidden columns offs_h of each gate over the
    whole state (BLOCK_K >= n_state): what ``_fwd_acc`` loads a K step at a time."""
    offs_k = tl.arange(0, BLOCK_K)
    wmask = (offs_k < n_state)[:, None] & (offs_h < n_hidden)[None, :]
    wp = w_hh_ptr + offs_h[None, :] * stride_w_row + offs_k[:, None]
    gate_stride = n_hidden * stride_w_row
    return (tl.load(wp, mask=wmask, other=0.0), tl.load(wp + gate_stride, mask=wmask, other=0.0),
            tl.load(wp + 2 * gate_stride, mask=wmask, other=0.0),
            tl.load(wp + 3 * gate_stride, mask=wmask, other=0.0))


@triton.jit
def _w_rows_tile(w_hh_ptr, stride_w_row, n_gates, n_hidden, offs_n, BLOCK_K: tl.constexpr):
    """W_hh's (BLOCK_K, BLOCK_N) tile of every gate row (BLOCK_K >= n_gates = 4H) and columns
    offs_n: what ``_state_grad`` loads a K step at a time."""
    offs_k = tl.arange(0, BLOCK_K)
    return tl.load(w_hh_ptr + offs_k[:, None] * stride_w_row + offs_n[None, :],
                   mask=(offs_k < n_gates)[:, None] & (offs_n < n_hidden)[None, :], other=0.0)


@triton.jit
def _fwd_finish(acc_i, acc_f, acc_g, acc_o, xg_ptr, h_prev_ptr, c_prev_ptr, len_ptr, h_out_ptr,
                c_out_ptr, y_ptr, gates_ptr, stride_xg_b, stride_h_b, stride_c_b, stride_y_b,
                stride_gates_b, n_batch, n_hidden, t, offs_b, offs_h, HAS_PROJ: tl.constexpr):
    """The gates' pointwise math of one step from the recurrent GEMM's results, and its
    stores (state, output, saved gates)."""
    mask_b = offs_b < n_batch
    mask_h = offs_h < n_hidden
    m2 = mask_b[:, None] & mask_h[None, :]
    xg = xg_ptr + offs_b[:, None] * stride_xg_b + offs_h[None, :]
    gi = _sigmoid(acc_i + tl.load(xg, mask=m2, other=0.0).to(tl.float32))
    gf = _sigmoid(acc_f + tl.load(xg + n_hidden, mask=m2, other=0.0).to(tl.float32))
    gg = _tanh(acc_g + tl.load(xg + 2 * n_hidden, mask=m2, other=0.0).to(tl.float32))
    go = _sigmoid(acc_o + tl.load(xg + 3 * n_hidden, mask=m2, other=0.0).to(tl.float32))
    length = tl.load(len_ptr + offs_b, mask=mask_b, other=0)
    valid = (t < length)[:, None]
    c_prev = tl.load(c_prev_ptr + offs_b[:, None] * stride_c_b + offs_h[None, :], mask=m2,
                     other=0.0)
    c = gf * c_prev + gi * gg
    h = go * _tanh(c)
    tl.store(c_out_ptr + offs_b[:, None] * stride_c_b + offs_h[None, :],
             tl.where(valid, c, c_prev), mask=m2)
    gp = gates_ptr + offs_b[:, None] * stride_gates_b + offs_h[None, :]
    gdt = gates_ptr.dtype.element_ty
    tl.store(gp, gi.to(gdt), mask=m2)
    tl.store(gp + n_hidden, gf.to(gdt), mask=m2)
    tl.store(gp + 2 * n_hidden, gg.to(gdt), mask=m2)
    tl.store(gp + 3 * n_hidden, go.to(gdt), mask=m2)
    out = tl.where(valid, h, 0.0)
    # with a projection y is r = o * tanh(c) (zero past the length), projected by the next kernel
    tl.store(y_ptr + offs_b[:, None] * stride_y_b + offs_h[None, :],
             out.to(y_ptr.dtype.element_ty), mask=m2)
    if not HAS_PROJ:
        h_old = tl.load(h_prev_ptr + offs_b[:, None] * stride_h_b + offs_h[None, :], mask=m2,
                        other=0.0).to(tl.float32)
        tl.store(h_out_ptr + offs_b[:, None] * stride_h_b + offs_h[None, :],
                 tl.where(valid, h, h_old).to(h_out_ptr.dtype.element_ty), mask=m2)


# The per-step kernels take whole (T, B, .) buffers and the step's indices (s: processing
# order, t: time), and offset the pointers themselves: the launch loop then passes the same
# tensors every step instead of slicing seven views per step in Python (about 1.6 us each on
# the host, per step, which a small step's GPU time does not hide). The indices change every
# launch: not specializing them (Triton would compile separate variants for 1 and multiples
# of 16) keeps one compiled kernel per configuration.
@triton.jit(do_not_specialize=["s", "t"])
def _lstm_fwd_kernel(
    xg_ptr, hs_ptr, cs_ptr, w_hh_ptr, len_ptr, out_ptr, gates_ptr,
    stride_xg_t, stride_xg_b, stride_hs_s, stride_h_b, stride_cs_s, stride_c_b, stride_w_row,
    stride_out_t, stride_out_b, stride_gates_t, stride_gates_b,
    n_batch, n_hidden, n_state, s, t,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_PROJ: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # each program owns batch rows [pid_b * BLOCK_B, +BLOCK_B) and hidden columns
    # [pid_h * BLOCK_H, +BLOCK_H) of all four gates, for step s (time t): it reads state s
    # and writes state s + 1, out[t] (y, or r = o * tanh(c) with a projection) and gates[t]
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    s64 = tl.cast(s, tl.int64)
    t64 = tl.cast(t, tl.int64)
    _fwd_tile(xg_ptr + t64 * stride_xg_t, hs_ptr + s64 * stride_hs_s, cs_ptr + s64 * stride_cs_s,
              w_hh_ptr, len_ptr, hs_ptr + (s64 + 1) * stride_hs_s,
              cs_ptr + (s64 + 1) * stride_cs_s, out_ptr + t64 * stride_out_t,
              gates_ptr + t64 * stride_gates_t, stride_xg_b, stride_h_b, stride_c_b,
              stride_w_row, stride_out_b, stride_gates_b, n_batch, n_hidden, n_state, t,
              offs_b, offs_h, BLOCK_B, BLOCK_H, BLOCK_K, HAS_PROJ, DOT_FP32)


@triton.jit(do_not_specialize=["n_steps"])
def _lstm_fwd_persistent_kernel(
    xg_ptr, hs_ptr, cs_ptr, w_hh_ptr, len_ptr, y_ptr, gates_ptr,
    stride_xg_t, stride_xg_b, stride_hs_s, stride_h_b, stride_cs_s, stride_c_b, stride_w_row,
    stride_y_t, stride_y_b, stride_gates_t, stride_gates_b,
    n_batch, n_hidden, n_steps,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    REVERSE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # each program owns batch rows [pid * BLOCK_B, +BLOCK_B) for every step and every hidden
    # column: batch rows are independent, so the time loop needs no grid-wide barrier, only a
    # block barrier between steps (this program's h_t is read back from global memory)
    pid_b = tl.program_id(0)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    for s in range(0, n_steps):
        t = s
        if REVERSE:
            t = n_steps - 1 - s
        s64 = tl.cast(s, tl.int64)
        t64 = tl.cast(t, tl.int64)
        for j0 in range(0, n_hidden, BLOCK_H):
            offs_h = j0 + tl.arange(0, BLOCK_H)
            _fwd_tile(xg_ptr + t64 * stride_xg_t, hs_ptr + s64 * stride_hs_s,
                      cs_ptr + s64 * stride_cs_s, w_hh_ptr, len_ptr,
                      hs_ptr + (s64 + 1) * stride_hs_s, cs_ptr + (s64 + 1) * stride_cs_s,
                      y_ptr + t64 * stride_y_t, gates_ptr + t64 * stride_gates_t,
                      stride_xg_b, stride_h_b, stride_c_b, stride_w_row, stride_y_b,
                      stride_gates_b, n_batch, n_hidden, n_hidden, t, offs_b, offs_h,
                      BLOCK_B, BLOCK_H, BLOCK_K, False, DOT_FP32)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["s", "t"])
def _lstm_proj_fwd_kernel(
    rs_ptr, w_hr_ptr, hs_ptr, len_ptr, ys_ptr,
    stride_r_t, stride_r_b, stride_w_row, stride_hs_s, stride_h_b, stride_y_t, stride_y_b,
    n_batch, n_hidden, n_proj, s, t,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # each program owns batch rows [pid_b * BLOCK_B, +BLOCK_B) and projected columns
    # [pid_p * BLOCK_H, +BLOCK_H): state s + 1 and y[t] = r[t] @ W_hr^T, masked by length
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    s64 = tl.cast(s, tl.int64)
    t64 = tl.cast(t, tl.int64)
    r_ptr = rs_ptr + t64 * stride_r_t
    h_prev_ptr = hs_ptr + s64 * stride_hs_s
    h_out_ptr = hs_ptr + (s64 + 1) * stride_hs_s
    y_ptr = ys_ptr + t64 * stride_y_t
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_p = pid_p * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < n_batch
    mask_p = offs_p < n_proj
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, n_hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < n_hidden
        a = tl.load(r_ptr + offs_b[:, None] * stride_r_b + offs_k[None, :],
                    mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_hr_ptr + offs_p[None, :] * stride_w_row + offs_k[:, None],
                    mask=mask_k[:, None] & mask_p[None, :], other=0.0)
        acc += _dot(a, w, DOT_FP32)
    m2 = mask_b[:, None] & mask_p[None, :]
    length = tl.load(len_ptr + offs_b, mask=mask_b, other=0)
    valid = (t < length)[:, None]
    h_old = tl.load(h_prev_ptr + offs_b[:, None] * stride_h_b + offs_p[None, :], mask=m2,
                    other=0.0).to(tl.float32)
    tl.store(h_out_ptr + offs_b[:, None] * stride_h_b + offs_p[None, :],
             tl.where(valid, acc, h_old).to(h_out_ptr.dtype.element_ty), mask=m2)
    tl.store(y_ptr + offs_b[:, None] * stride_y_b + offs_p[None, :],
             tl.where(valid, acc, 0.0).to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_tile(dy_ptr, dgn_ptr, w_hh_ptr, gv_ptr, w_hr_ptr, gates_ptr, c_ptr, c_prev_ptr, len_ptr,
              dcarry_ptr, dc_ptr, dg_ptr, stride_dy_b, stride_dg_b, stride_w_row, stride_gv_b,
              stride_wr_row, stride_gates_b, stride_c_b, stride_dcarry_b, stride_dc_b,
              n_batch, n_hidden, n_proj, t, offs_b, offs_h, w_res,
              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
              HAS_NEXT: tl.constexpr, HAS_PROJ: tl.constexpr, RESIDENT: tl.constexpr,
              DOT_FP32: tl.constexpr):
    """One backward step for batch rows offs_b and hidden columns offs_h of all four gates
    (RESIDENT, no projection: ``w_res`` as ``_state_grad`` takes it)."""
    mask_b = offs_b < n_batch
    mask_h = offs_h < n_hidden
    m2 = mask_b[:, None] & mask_h[None, :]
    length = tl.load(len_ptr + offs_b, mask=mask_b, other=0)
    valid = (t < length)[:, None]
    if HAS_PROJ:
        # dr = (dh masked by length) @ W_hr, dh already reduced by _lstm_proj_bwd_kernel
        dr = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, n_proj, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < n_proj
            a = tl.load(gv_ptr + offs_b[:, None] * stride_gv_b + offs_k[None, :],
                        mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_hr_ptr + offs_k[:, None] * stride_wr_row + offs_h[None, :],
                        mask=mask_k[:, None] & mask_h[None, :], other=0.0)
            dr += _dot(a, w, DOT_FP32)
    else:
        dr, g_carry = _state_grad(dy_ptr, dgn_ptr, w_hh_ptr, dcarry_ptr, offs_b, mask_b,
                                  offs_h, mask_h, valid, stride_dy_b, stride_dg_b,
                                  stride_w_row, stride_dcarry_b, 4 * n_hidden, w_res, HAS_NEXT,
                                  BLOCK_B, BLOCK_H, BLOCK_K, RESIDENT, DOT_FP32)
        # a tile smaller than the program's threads is held by several of them and only one
        # copy stores: every copy must have loaded the carry first
        tl.debug_barrier()
        tl.store(dcarry_ptr + offs_b[:, None] * stride_dcarry_b + offs_h[None, :], g_carry,
                 mask=m2)
    gp = gates_ptr + offs_b[:, None] * stride_gates_b + offs_h[None, :]
    gi = tl.load(gp, mask=m2, other=0.0).to(tl.float32)
    gf = tl.load(gp + n_hidden, mask=m2, other=0.0).to(tl.float32)
    gg = tl.load(gp + 2 * n_hidden, mask=m2, other=0.0).to(tl.float32)
    go = tl.load(gp + 3 * n_hidden, mask=m2, other=0.0).to(tl.float32)
    cofs = offs_b[:, None] * stride_c_b + offs_h[None, :]
    c = tl.load(c_ptr + cofs, mask=m2, other=0.0)
    c_prev = tl.load(c_prev_ptr + cofs, mask=m2, other=0.0)
    dc_in = tl.load(dc_ptr + offs_b[:, None] * stride_dc_b + offs_h[None, :], mask=m2,
                    other=0.0)
    tc = _tanh(c)
    dc = dc_in + dr * go * (1.0 - tc * tc)
    d_o = dr * tc * go * (1.0 - go)
    d_i = dc * gg * gi * (1.0 - gi)
    d_f = dc * c_prev * gf * (1.0 - gf)
    d_g = dc * gi * (1.0 - gg * gg)
    tl.debug_barrier()  # every copy has loaded dc_in (see the carry above)
    tl.store(dc_ptr + offs_b[:, None] * stride_dc_b + offs_h[None, :],
             tl.where(valid, dc * gf, dc_in), mask=m2)
    dgp = dg_ptr + offs_b[:, None] * stride_dg_b + offs_h[None, :]
    dgt = dg_ptr.dtype.element_ty
    tl.store(dgp, tl.where(valid, d_i, 0.0).to(dgt), mask=m2)
    tl.store(dgp + n_hidden, tl.where(valid, d_f, 0.0).to(dgt), mask=m2)
    tl.store(dgp + 2 * n_hidden, tl.where(valid, d_g, 0.0).to(dgt), mask=m2)
    tl.store(dgp + 3 * n_hidden, tl.where(valid, d_o, 0.0).to(dgt), mask=m2)


@triton.jit(do_not_specialize=["s", "t", "t_next"])
def _lstm_bwd_kernel(
    dy_ptr, dg_ptr, w_hh_ptr, gv_ptr, w_hr_ptr, gates_ptr, cs_ptr, len_ptr, dcarry_ptr, dc_ptr,
    stride_dy_t, stride_dy_b, stride_dg_t, stride_dg_b, stride_w_row, stride_gv_t, stride_gv_b,
    stride_wr_row, stride_gates_t, stride_gates_b, stride_cs_s, stride_c_b, stride_dcarry_b,
    stride_dc_b, n_batch, n_hidden, n_proj, s, t, t_next,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_NEXT: tl.constexpr, HAS_PROJ: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # each program owns batch rows [pid_b * BLOCK_B, +BLOCK_B) and hidden columns
    # [pid_h * BLOCK_H, +BLOCK_H) of all four gate gradients of step s (time t); t_next is
    # the time of the step processed after it in the forward (read only with HAS_NEXT)
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    s64 = tl.cast(s, tl.int64)
    t64 = tl.cast(t, tl.int64)
    tn64 = tl.cast(t_next, tl.int64)
    _bwd_tile(dy_ptr + t64 * stride_dy_t, dg_ptr + tn64 * stride_dg_t, w_hh_ptr,
              gv_ptr + t64 * stride_gv_t, w_hr_ptr, gates_ptr + t64 * stride_gates_t,
              cs_ptr + (s64 + 1) * stride_cs_s, cs_ptr + s64 * stride_cs_s, len_ptr,
              dcarry_ptr, dc_ptr, dg_ptr + t64 * stride_dg_t, stride_dy_b, stride_dg_b,
              stride_w_row, stride_gv_b, stride_wr_row, stride_gates_b, stride_c_b,
              stride_dcarry_b, stride_dc_b, n_batch, n_hidden, n_proj, t, offs_b, offs_h, 0,
              BLOCK_B, BLOCK_H, BLOCK_K, HAS_NEXT, HAS_PROJ, False, DOT_FP32)


@triton.jit
def _bwd_step_times(i, n_steps, REVERSE: tl.constexpr):
    """(s, t, t_next) of iteration i of a time-looping backward: the processing step s (last
    first), its time t, and the time of the step processed after it in the forward."""
    s = n_steps - 1 - i
    t = s
    t_next = s + 1
    if REVERSE:
        t = n_steps - 1 - s
        t_next = t - 1
    return s, t, t_next


@triton.jit(do_not_specialize=["n_steps"])
def _lstm_bwd_persistent_kernel(
    dy_ptr, w_hh_ptr, gates_ptr, cs_ptr, len_ptr, dcarry_ptr, dc_ptr, dg_ptr,
    stride_dy_t, stride_dy_b, stride_dg_t, stride_dg_b, stride_w_row, stride_gates_t,
    stride_gates_b, stride_cs_s, stride_c_b, stride_dcarry_b, stride_dc_b,
    n_batch, n_hidden, n_steps,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    REVERSE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # each program owns batch rows [pid * BLOCK_B, +BLOCK_B) for every step and every hidden
    # column (see _lstm_fwd_persistent_kernel); steps run from the last processed one back
    pid_b = tl.program_id(0)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    for i in range(0, n_steps):
        s, t, t_next = _bwd_step_times(i, n_steps, REVERSE)
        s64 = tl.cast(s, tl.int64)
        t64 = tl.cast(t, tl.int64)
        # the step after this one in the forward has no gate gradients on the first iteration:
        # its "next" pointer is then this step's own (unread) slot
        tn64 = tl.where(i == 0, t64, tl.cast(t_next, tl.int64))
        for j0 in range(0, n_hidden, BLOCK_H):
            offs_h = j0 + tl.arange(0, BLOCK_H)
            if i == 0:
                _bwd_tile(dy_ptr + t64 * stride_dy_t, dg_ptr + tn64 * stride_dg_t, w_hh_ptr,
                          dy_ptr, w_hh_ptr, gates_ptr + t64 * stride_gates_t,
                          cs_ptr + (s64 + 1) * stride_cs_s, cs_ptr + s64 * stride_cs_s, len_ptr,
                          dcarry_ptr, dc_ptr, dg_ptr + t64 * stride_dg_t, stride_dy_b, stride_dg_b,
                          stride_w_row, 0, 0, stride_gates_b, stride_c_b, stride_dcarry_b,
                          stride_dc_b, n_batch, n_hidden, n_hidden, t, offs_b, offs_h, 0,
                          BLOCK_B, BLOCK_H, BLOCK_K, False, False, False, DOT_FP32)
            else:
                _bwd_tile(dy_ptr + t64 * stride_dy_t, dg_ptr + tn64 * stride_dg_t, w_hh_ptr,
                          dy_ptr, w_hh_ptr, gates_ptr + t64 * stride_gates_t,
                          cs_ptr + (s64 + 1) * stride_cs_s, cs_ptr + s64 * stride_cs_s, len_ptr,
                          dcarry_ptr, dc_ptr, dg_ptr + t64 * stride_dg_t, stride_dy_b, stride_dg_b,
                          stride_w_row, 0, 0, stride_gates_b, stride_c_b, stride_dcarry_b,
                          stride_dc_b, n_batch, n_hidden, n_hidden, t, offs_b, offs_h, 0,
                          BLOCK_B, BLOCK_H, BLOCK_K, True, False, False, DOT_FP32)
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------
# cooperative time loop: a per-step grid that stays resident and loops over time


@triton.jit
def _group_barrier(count_ptr, target, failed, max_spins):
    """Wait until ``target`` arrivals are counted at ``count_ptr`` (one per program of the
    group and step; the count only grows), then return ``failed``: whether this group gave up.

    Release / acquire at GPU scope: the stores this program made before the barrier (the
    step's state) are seen by every program that passes it after (the pattern of CUDA's
    cooperative-groups grid sync; the block barriers make the count see all of this program's
    threads). A group whose programs are not all resident would wait forever: after
    ``max_spins`` reads the waiting program gives up, marks the count with COOP_POISON (every
    program of the group then sees it at its next barrier) and the callers write NaN from then
    on, so an impossible schedule shows as NaN outputs, never as a hang or a silently wrong
    value."""
    tl.debug_barrier()
    seen = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") + 1
    limit = tl.where(failed, 0, max_spins)
    spins = max_spins * 0
    while (seen < target) & (spins < limit):
        seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    stuck = seen < target
    if stuck:
        tl.atomic_or(count_ptr, 1073741824, sem="release", scope="gpu")  # COOP_POISON
    tl.debug_barrier()
    return failed | stuck | (seen >= 1073741824)


@triton.jit
def _poison_tile(ptr, offs_b, offs_n, stride_b, n_batch, n_cols):
    m2 = (offs_b < n_batch)[:, None] & (offs_n < n_cols)[None, :]
    tl.store(ptr + offs_b[:, None] * stride_b + offs_n[None, :],
             tl.full((offs_b.shape[0], offs_n.shape[0]), float("nan"), tl.float32)
             .to(ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["n_steps", "step_begin", "step_end", "max_spins"])
def _lstm_fwd_coop_kernel(
    xg_ptr, hs_ptr, cs_ptr, w_hh_ptr, len_ptr, y_ptr, gates_ptr, count_ptr,
    stride_xg_t, stride_xg_b, stride_hs_s, stride_h_b, stride_cs_s, stride_c_b, stride_w_row,
    stride_y_t, stride_y_b, stride_gates_t, stride_gates_b,
    n_batch, n_hidden, n_steps, step_begin, step_end, max_spins,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    REVERSE: tl.constexpr, SYNC: tl.constexpr, RESIDENT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # the per-step kernel's grid and tiles (program (pid_b, pid_h): batch rows of block pid_b,
    # hidden columns of block pid_h, all four gates), run for steps [step_begin, step_end)
    # in one launch: after each step the programs of one batch block (they read each other's
    # columns of h) meet at a barrier. The program reads the same W_hh columns every step
    # (from L2: the barrier's acquire invalidates L1). Without SYNC (one launch per step: the
    # Triton interpreter runs programs one after another, so they cannot wait for each
    # other) the kernel is the per-step kernel. RESIDENT (BLOCK_K >= hidden): the program's
    # W_hh columns of the four gates are loaded once, before the loop, and kept on chip: each
    # step is one GEMM of h by them, no K loop, no W_hh traffic.
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_group = tl.num_programs(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    failed = pid_b < 0
    if RESIDENT:
        w_i, w_f, w_g, w_o = _w_gate_tiles(w_hh_ptr, stride_w_row, n_hidden, n_hidden, offs_h,
                                           BLOCK_K)
    for s in range(step_begin, step_end):
        t = s
        if REVERSE:
            t = n_steps - 1 - s
        s64 = tl.cast(s, tl.int64)
        t64 = tl.cast(t, tl.int64)
        h_out = hs_ptr + (s64 + 1) * stride_hs_s
        h_prev = hs_ptr + s64 * stride_hs_s
        if RESIDENT:
            offs_k = tl.arange(0, BLOCK_K)
            a = tl.load(h_prev + offs_b[:, None] * stride_h_b + offs_k[None, :],
                        mask=(offs_b < n_batch)[:, None] & (offs_k < n_hidden)[None, :],
                        other=0.0)
            acc_i = _dot(a, w_i, DOT_FP32)
            acc_f = _dot(a, w_f, DOT_FP32)
            acc_g = _dot(a, w_g, DOT_FP32)
            acc_o = _dot(a, w_o, DOT_FP32)
        else:
            acc_i, acc_f, acc_g, acc_o = _fwd_acc(h_prev, w_hh_ptr, stride_h_b, stride_w_row,
                                                  n_batch, n_hidden, n_hidden, offs_b, offs_h,
                                                  BLOCK_B, BLOCK_H, BLOCK_K, DOT_FP32)
        _fwd_finish(acc_i, acc_f, acc_g, acc_o, xg_ptr + t64 * stride_xg_t, h_prev,
                    cs_ptr + s64 * stride_cs_s, len_ptr, h_out, cs_ptr + (s64 + 1) * stride_cs_s,
                    y_ptr + t64 * stride_y_t, gates_ptr + t64 * stride_gates_t, stride_xg_b,
                    stride_h_b, stride_c_b, stride_y_b, stride_gates_b, n_batch, n_hidden, t,
                    offs_b, offs_h, False)
        if SYNC:
            if failed:
                # everything this step wrote may come from an incomplete h: the state (c
                # carries on to c_n), the output and the saved gates
                tl.debug_barrier()
                _poison_tile(h_out, offs_b, offs_h, stride_h_b, n_batch, n_hidden)
                _poison_tile(cs_ptr + (s64 + 1) * stride_cs_s, offs_b, offs_h, stride_c_b,
                             n_batch, n_hidden)
                _poison_tile(y_ptr + t64 * stride_y_t, offs_b, offs_h, stride_y_b, n_batch,
                             n_hidden)
                for g in range(4):
                    _poison_tile(gates_ptr + t64 * stride_gates_t + g * n_hidden, offs_b,
                                 offs_h, stride_gates_b, n_batch, n_hidden)
            if s + 1 < step_end:  # no step left to read this one's state: no barrier
                failed = _group_barrier(count_ptr + pid_b, (s - step_begin + 1) * n_group,
                                        failed, max_spins)


@triton.jit(do_not_specialize=["n_steps", "step_begin", "step_end", "max_spins"])
def _lstm_bwd_coop_kernel(
    dy_ptr, w_hh_ptr, gates_ptr, cs_ptr, len_ptr, dcarry_ptr, dc_ptr, dg_ptr, count_ptr,
    stride_dy_t, stride_dy_b, stride_dg_t, stride_dg_b, stride_w_row, stride_gates_t,
    stride_gates_b, stride_cs_s, stride_c_b, stride_dcarry_b, stride_dc_b,
    n_batch, n_hidden, n_steps, step_begin, step_end, max_spins,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    REVERSE: tl.constexpr, SYNC: tl.constexpr, RESIDENT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # the backward of _lstm_fwd_coop_kernel: the per-step backward kernel's grid and tiles,
    # iterations [step_begin, step_end) of the backward time loop (iteration i processes
    # step s = n_steps - 1 - i) in one launch, a barrier per batch block after each: a step
    # reads the gate gradients of all four gates and all columns written by its group in the
    # iteration before. dcarry and dc are read and written in the program's own columns only.
    # RESIDENT (BLOCK_K >= 4H): the program's W_hh columns, every gate row, are loaded once,
    # before the loop, and kept on chip: each step is one GEMM of the gate gradients by them.
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_group = tl.num_programs(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    failed = pid_b < 0
    w_res = 0
    if RESIDENT:
        w_res = _w_rows_tile(w_hh_ptr, stride_w_row, 4 * n_hidden, n_hidden, offs_h, BLOCK_K)
    for i in range(step_begin, step_end):
        s, t, t_next = _bwd_step_times(i, n_steps, REVERSE)
        s64 = tl.cast(s, tl.int64)
        t64 = tl.cast(t, tl.int64)
        tn64 = tl.where(i == 0, t64, tl.cast(t_next, tl.int64))
        dg_out = dg_ptr + t64 * stride_dg_t
        if i == 0:
            _bwd_tile(dy_ptr + t64 * stride_dy_t, dg_ptr + tn64 * stride_dg_t, w_hh_ptr,
                      dy_ptr, w_hh_ptr, gates_ptr + t64 * stride_gates_t,
                      cs_ptr + (s64 + 1) * stride_cs_s, cs_ptr + s64 * stride_cs_s, len_ptr,
                      dcarry_ptr, dc_ptr, dg_out, stride_dy_b, stride_dg_b,
                      stride_w_row, 0, 0, stride_gates_b, stride_c_b, stride_dcarry_b,
                      stride_dc_b, n_batch, n_hidden, n_hidden, t, offs_b, offs_h, w_res,
                      BLOCK_B, BLOCK_H, BLOCK_K, False, False, RESIDENT, DOT_FP32)
        else:
            _bwd_tile(dy_ptr + t64 * stride_dy_t, dg_ptr + tn64 * stride_dg_t, w_hh_ptr,
                      dy_ptr, w_hh_ptr, gates_ptr + t64 * stride_gates_t,
                      cs_ptr + (s64 + 1) * stride_cs_s, cs_ptr + s64 * stride_cs_s, len_ptr,
                      dcarry_ptr, dc_ptr, dg_out, stride_dy_b, stride_dg_b,
                      stride_w_row, 0, 0, stride_gates_b, stride_c_b, stride_dcarry_b,
                      stride_dc_b, n_batch, n_hidden, n_hidden, t, offs_b, offs_h, w_res,
                      BLOCK_B, BLOCK_H, BLOCK_K, True, False, RESIDENT, DOT_FP32)
        if SYNC:
            if failed:
                # the gate gradients and both carried state gradients (dc0 and, through the
                # carry, dh0 come from them)
                tl.debug_barrier()
                for g in range(4):
                    _poison_tile(dg_out + g * n_hidden, offs_b, offs_h, stride_dg_b, n_batch,
                                 n_hidden)
                _poison_tile(dc_ptr, offs_b, offs_h, stride_dc_b, n_batch, n_hidden)
                _poison_tile(dcarry_ptr, offs_b, offs_h, stride_dcarry_b, n_batch, n_hidden)
            if i + 1 < step_end:
                failed = _group_barrier(count_ptr + pid_b, (i - step_begin + 1) * n_group,
                                        failed, max_spins)


@triton.jit(do_not_specialize=["t", "t_next"])
def _lstm_proj_bwd_kernel(
    dys_ptr, dg_ptr, w_hh_ptr, len_ptr, dcarry_ptr, gvs_ptr,
    stride_dy_t, stride_dy_b, stride_dg_t, stride_dg_b, stride_w_row, stride_dcarry_b,
    stride_gv_t, stride_gv_b, n_batch, n_hidden, n_proj, t, t_next,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_NEXT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # each program owns batch rows [pid_b * BLOCK_B, +BLOCK_B) and projected columns
    # [pid_p * BLOCK_H, +BLOCK_H) of the gradient w.r.t. the projected state at time t
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    t64 = tl.cast(t, tl.int64)
    dy_ptr = dys_ptr + t64 * stride_dy_t
    dgn_ptr = dg_ptr + tl.cast(t_next, tl.int64) * stride_dg_t
    gv_ptr = gvs_ptr + t64 * stride_gv_t
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_p = pid_p * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < n_batch
    mask_p = offs_p < n_proj
    length = tl.load(len_ptr + offs_b, mask=mask_b, other=0)
    valid = (t < length)[:, None]
    g_valid, g_carry = _state_grad(dy_ptr, dgn_ptr, w_hh_ptr, dcarry_ptr, offs_b, mask_b,
                                   offs_p, mask_p, valid, stride_dy_b, stride_dg_b,
                                   stride_w_row, stride_dcarry_b, 4 * n_hidden, 0, HAS_NEXT,
                                   BLOCK_B, BLOCK_H, BLOCK_K, False, DOT_FP32)
    m2 = mask_b[:, None] & mask_p[None, :]
    tl.debug_barrier()  # every copy has loaded the carry (see _bwd_tile)
    tl.store(dcarry_ptr + offs_b[:, None] * stride_dcarry_b + offs_p[None, :], g_carry, mask=m2)
    tl.store(gv_ptr + offs_b[:, None] * stride_gv_b + offs_p[None, :],
             g_valid.to(gv_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _row_norm4(a_i, a_f, a_g, a_o, mask, n):
    """Mean and centered values (zero past n) of a row held as four gate blocks of n columns."""
    mean = (tl.sum(a_i, axis=0) + tl.sum(a_f, axis=0) + tl.sum(a_g, axis=0)
            + tl.sum(a_o, axis=0)) / (4 * n)
    # one correction step, as row_mean (exact for a constant row)
    mean += (tl.sum(tl.where(mask, a_i - mean, 0.0), axis=0)
             + tl.sum(tl.where(mask, a_f - mean, 0.0), axis=0)
             + tl.sum(tl.where(mask, a_g - mean, 0.0), axis=0)
             + tl.sum(tl.where(mask, a_o - mean, 0.0), axis=0)) / (4 * n)
    c_i = tl.where(mask, a_i - mean, 0.0)
    c_f = tl.where(mask, a_f - mean, 0.0)
    c_g = tl.where(mask, a_g - mean, 0.0)
    c_o = tl.where(mask, a_o - mean, 0.0)
    return mean, c_i, c_f, c_g, c_o


# Like the plain per-step kernels, the LayerNorm-LSTM row kernels take whole (T, B, .)
# buffers and the step's indices (s: processing order, t: time) and offset the pointers
# themselves, so the launch loop slices nothing per step.
@triton.jit(do_not_specialize=["s", "t"])
def _ln_lstm_fwd_kernel(
    recs_ptr, xg_ptr, hs_ptr, cs_ptr, g_hh_ptr, g_c_ptr, b_c_ptr, len_ptr, out_ptr, gates_ptr,
    stats_ptr, stride_g_t, stride_b, stride_h_s, stride_c_s, stride_out_t, stride_c_b,
    stride_stats_t, n_hidden, s, t, eps,
    BLOCK_H: tl.constexpr, HAS_PROJ: tl.constexpr,
):
    # each program owns one batch row: the LayerNorms reduce over the whole row (4H gate
    # pre-activations, H cell values), so a row never splits across programs. recs / xg /
    # gates: (T, B, 4H) at (stride_g_t, stride_b); hs (T+1, B, .) at stride_h_s (unused with
    # HAS_PROJ); cs (T+1, B, H) at stride_c_s; out (T, B, H): y, or r with HAS_PROJ; rows of
    # H at stride_c_b; stats (T, B, 4)
    s64 = tl.cast(s, tl.int64)
    t64 = tl.cast(t, tl.int64)
    _ln_fwd_row(tl.program_id(0).to(tl.int64), recs_ptr + t64 * stride_g_t,
                xg_ptr + t64 * stride_g_t, hs_ptr + s64 * stride_h_s, cs_ptr + s64 * stride_c_s,
                g_hh_ptr, g_c_ptr, b_c_ptr, len_ptr, hs_ptr + (s64 + 1) * stride_h_s,
                cs_ptr + (s64 + 1) * stride_c_s, out_ptr + t64 * stride_out_t,
                gates_ptr + t64 * stride_g_t, stats_ptr + t64 * stride_stats_t, stride_b,
                stride_c_b, n_hidden, t, eps, BLOCK_H, HAS_PROJ)


@triton.jit
def _ln_fwd_row(b, rec_ptr, xg_ptr, h_prev_ptr, c_prev_ptr, g_hh_ptr, g_c_ptr, b_c_ptr,
                len_ptr, h_out_ptr, c_out_ptr, y_ptr, gates_ptr, stats_ptr, stride_b,
                stride_c_b, n_hidden, t, eps, BLOCK_H: tl.constexpr, HAS_PROJ: tl.constexpr):
    """One LayerNorm-LSTM step of batch row b, given its recurrent projection rec (one step's
    pointers: rec / xg / gates rows of 4H at stride_b, state rows of H at stride_c_b, stats
    (B, 4)). With HAS_PROJ y_ptr receives the unprojected output r (zero past the length)
    and h_prev / h_out are not touched: the new (projected) state is r @ W_hr^T, masked by
    _ln_lstm_proj_fwd_kernel."""
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_hidden
    H = n_hidden
    row = b * stride_b + cols
    r_i = tl.load(rec_ptr + row, mask=mask, other=0.0).to(tl.float32)
    r_f = tl.load(rec_ptr + row + H, mask=mask, other=0.0).to(tl.float32)
    r_g = tl.load(rec_ptr + row + 2 * H, mask=mask, other=0.0).to(tl.float32)
    r_o = tl.load(rec_ptr + row + 3 * H, mask=mask, other=0.0).to(tl.float32)
    mean, r_i, r_f, r_g, r_o = _row_norm4(r_i, r_f, r_g, r_o, mask, n_hidden)
    var = (tl.sum(r_i * r_i, axis=0) + tl.sum(r_f * r_f, axis=0) + tl.sum(r_g * r_g, axis=0)
           + tl.sum(r_o * r_o, axis=0)) / (4 * n_hidden)
    rstd = 1.0 / tl.sqrt(var + eps) + var * 0.0  # NaN if var overflowed (as our layer_norm)
    gi = _sigmoid(r_i * rstd * tl.load(g_hh_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                  + tl.load(xg_ptr + row, mask=mask, other=0.0).to(tl.float32))
    gf = _sigmoid(r_f * rstd * tl.load(g_hh_ptr + H + cols, mask=mask, other=0.0).to(tl.float32)
                  + tl.load(xg_ptr + row + H, mask=mask, other=0.0).to(tl.float32))
    gg = _tanh(r_g * rstd * tl.load(g_hh_ptr + 2 * H + cols, mask=mask, other=0.0).to(tl.float32)
               + tl.load(xg_ptr + row + 2 * H, mask=mask, other=0.0).to(tl.float32))
    go = _sigmoid(r_o * rstd * tl.load(g_hh_ptr + 3 * H + cols, mask=mask, other=0.0).to(tl.float32)
                  + tl.load(xg_ptr + row + 3 * H, mask=mask, other=0.0).to(tl.float32))
    crow = b * stride_c_b + cols
    c_prev = tl.load(c_prev_ptr + crow, mask=mask, other=0.0)
    c = gf * c_prev + gi * gg
    c_mean = row_mean(tl.where(mask, c, 0.0), mask, n_hidden)
    cc = tl.where(mask, c - c_mean, 0.0)
    c_var = tl.sum(cc * cc, axis=0) / n_hidden
    c_rstd = 1.0 / tl.sqrt(c_var + eps) + c_var * 0.0
    cn = (cc * c_rstd * tl.load(g_c_ptr + cols, mask=mask, other=0.0).to(tl.float32)
          + tl.load(b_c_ptr + cols, mask=mask, other=0.0).to(tl.float32))
    h = go * _tanh(cn)
    valid = t < tl.load(len_ptr + b)
    tl.store(c_out_ptr + crow, tl.where(valid, c, c_prev), mask=mask)
    if not HAS_PROJ:
        h_old = tl.load(h_prev_ptr + crow, mask=mask, other=0.0)
        tl.store(h_out_ptr + crow,
                 tl.where(valid, h, h_old.to(tl.float32)).to(h_out_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(y_ptr + crow, tl.where(valid, h, 0.0).to(y_ptr.dtype.element_ty), mask=mask)
    gdt = gates_ptr.dtype.element_ty
    tl.store(gates_ptr + row, gi.to(gdt), mask=mask)
    tl.store(gates_ptr + row + H, gf.to(gdt), mask=mask)
    tl.store(gates_ptr + row + 2 * H, gg.to(gdt), mask=mask)
    tl.store(gates_ptr + row + 3 * H, go.to(gdt), mask=mask)
    # per-row statistics for the backward: (mean, rstd) of the recurrent projection and of c
    tl.store(stats_ptr + b * 4, mean)
    tl.store(stats_ptr + b * 4 + 1, rstd)
    tl.store(stats_ptr + b * 4 + 2, c_mean)
    tl.store(stats_ptr + b * 4 + 3, c_rstd)


@triton.jit
def _ln_state_grad(dh_mm_ptr, dy_ptr, dcarry_ptr, row, mask, valid, HAS_NEXT: tl.constexpr):
    """Gradient w.r.t. one row of the state after this step: dy + (next step's drec @ W_hh)
    + the carry, returned zero past the length; there the carry keeps it (stored in place)
    and passes it on towards h0."""
    g_state = tl.load(dcarry_ptr + row, mask=mask, other=0.0)
    if HAS_NEXT:
        g_state += tl.load(dh_mm_ptr + row, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row, mask=mask, other=0.0).to(tl.float32)
    # a row narrower than the program's threads is held by several of them, and only one
    # copy stores: without this barrier another copy could load the carry after it was
    # overwritten (the time-looping kernels run 4 warps on rows as narrow as 16)
    tl.debug_barrier()
    tl.store(dcarry_ptr + row, tl.where(valid, 0.0, g_state), mask=mask)
    return tl.where(valid, g_state + dy, 0.0)


@triton.jit(do_not_specialize=["s", "t"])
def _ln_lstm_bwd_kernel(
    dh_mm_ptr, dy_ptr, recs_ptr, gates_ptr, cs_ptr, stats_ptr, g_hh_ptr, g_c_ptr, b_c_ptr,
    len_ptr, dcarry_ptr, dc_ptr, dxg_ptr, drec_ptr, dg_hh_acc_ptr, dgb_c_acc_ptr,
    stride_g_t, stride_b, stride_dy_t, stride_c_s, stride_c_b, stride_stats_t, n_hidden, s, t,
    BLOCK_H: tl.constexpr, HAS_NEXT: tl.constexpr, HAS_PROJ: tl.constexpr,
):
    # each program owns one batch row (see _ln_lstm_fwd_kernel) and its row of the
    # LayerNorm-weight gradient accumulators, summed over batch rows by the caller. dh_mm
    # (B, H) fp32 is this step's (the caller's GEMM result); dy (T, B, H) at stride_dy_t
    # (unused with HAS_PROJ)
    s64 = tl.cast(s, tl.int64)
    t64 = tl.cast(t, tl.int64)
    _ln_bwd_row(tl.program_id(0).to(tl.int64), dh_mm_ptr, dy_ptr + t64 * stride_dy_t,
                recs_ptr + t64 * stride_g_t, gates_ptr + t64 * stride_g_t,
                cs_ptr + (s64 + 1) * stride_c_s, cs_ptr + s64 * stride_c_s,
                stats_ptr + t64 * stride_stats_t, g_hh_ptr, g_c_ptr, b_c_ptr, len_ptr,
                dcarry_ptr, dc_ptr, dxg_ptr + t64 * stride_g_t, drec_ptr + t64 * stride_g_t,
                dg_hh_acc_ptr, dgb_c_acc_ptr, stride_b, stride_c_b, n_hidden, t, BLOCK_H,
                HAS_NEXT, HAS_PROJ)


@triton.jit
def _ln_bwd_row(b, dh_mm_ptr, dy_ptr, rec_ptr, gates_ptr, c_ptr, c_prev_ptr, stats_ptr,
                g_hh_ptr, g_c_ptr, b_c_ptr, len_ptr, dcarry_ptr, dc_ptr, dxg_ptr, drec_ptr,
                dg_hh_acc_ptr, dgb_c_acc_ptr, stride_b, stride_c_b, n_hidden, t,
                BLOCK_H: tl.constexpr, HAS_NEXT: tl.constexpr, HAS_PROJ: tl.constexpr):
    """Backward of one LayerNorm-LSTM step of batch row b (pointers as ``_ln_fwd_row``;
    dh_mm holds the next step's drec @ W_hh, or with HAS_PROJ the gradient of r)."""
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_hidden
    H = n_hidden
    row = b * stride_b + cols
    crow = b * stride_c_b + cols
    valid = t < tl.load(len_ptr + b)
    if HAS_PROJ:
        # dh_mm_ptr holds the gradient w.r.t. the unprojected output, (dh masked by length)
        # @ W_hr, from the caller's GEMM (see _ln_lstm_proj_bwd_kernel); dy, dcarry and
        # HAS_NEXT are not used
        dr = tl.where(valid, tl.load(dh_mm_ptr + crow, mask=mask, other=0.0).to(tl.float32), 0.0)
    else:
        dr = _ln_state_grad(dh_mm_ptr, dy_ptr, dcarry_ptr, crow, mask, valid, HAS_NEXT)
    gi = tl.load(gates_ptr + row, mask=mask, other=0.0).to(tl.float32)
    gf = tl.load(gates_ptr + row + H, mask=mask, other=0.0).to(tl.float32)
    gg = tl.load(gates_ptr + row + 2 * H, mask=mask, other=0.0).to(tl.float32)
    go = tl.load(gates_ptr + row + 3 * H, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(stats_ptr + b * 4)
    rstd = tl.load(stats_ptr + b * 4 + 1)
    c_mean = tl.load(stats_ptr + b * 4 + 2)
    c_rstd = tl.load(stats_ptr + b * 4 + 3)
    c = tl.load(c_ptr + crow, mask=mask, other=0.0)
    c_prev = tl.load(c_prev_ptr + crow, mask=mask, other=0.0)
    dc_in = tl.load(dc_ptr + crow, mask=mask, other=0.0)
    # cell LayerNorm: cn = c_hat * g_c + b_c, h = o * tanh(cn)
    c_hat = tl.where(mask, (c - c_mean) * c_rstd, 0.0)
    g_c = tl.load(g_c_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tcn = _tanh(c_hat * g_c + tl.load(b_c_ptr + cols, mask=mask, other=0.0).to(tl.float32))
    d_o = dr * tcn * go * (1.0 - go)
    dcn = dr * go * (1.0 - tcn * tcn)
    acc = dgb_c_acc_ptr + b * 2 * H + cols
    tl.store(acc, tl.load(acc, mask=mask, other=0.0) + dcn * c_hat, mask=mask)
    tl.store(acc + H, tl.load(acc + H, mask=mask, other=0.0) + dcn, mask=mask)
    dch = dcn * g_c
    m1 = tl.sum(dch, axis=0) / n_hidden
    m2 = tl.sum(dch * c_hat, axis=0) / n_hidden
    dc = dc_in + tl.where(mask, (dch - m1 - c_hat * m2) * c_rstd, 0.0)
    d_i = dc * gg * gi * (1.0 - gi)
    d_f = dc * c_prev * gf * (1.0 - gf)
    d_g = dc * gi * (1.0 - gg * gg)
    tl.debug_barrier()  # every copy of the row has loaded dc_in (see _ln_state_grad)
    tl.store(dc_ptr + crow, tl.where(valid, dc * gf, dc_in), mask=mask)
    d_i = tl.where(valid & mask, d_i, 0.0)
    d_f = tl.where(valid & mask, d_f, 0.0)
    d_g = tl.where(valid & mask, d_g, 0.0)
    d_o = tl.where(valid & mask, d_o, 0.0)
    xdt = dxg_ptr.dtype.element_ty
    tl.store(dxg_ptr + row, d_i.to(xdt), mask=mask)
    tl.store(dxg_ptr + row + H, d_f.to(xdt), mask=mask)
    tl.store(dxg_ptr + row + 2 * H, d_g.to(xdt), mask=mask)
    tl.store(dxg_ptr + row + 3 * H, d_o.to(xdt), mask=mask)
    # recurrent LayerNorm: pre = rec_hat * g_hh + xg, backward through rec_hat over 4H
    r_i = tl.load(rec_ptr + row, mask=mask, other=0.0).to(tl.float32)
    r_f = tl.load(rec_ptr + row + H, mask=mask, other=0.0).to(tl.float32)
    r_g = tl.load(rec_ptr + row + 2 * H, mask=mask, other=0.0).to(tl.float32)
    r_o = tl.load(rec_ptr + row + 3 * H, mask=mask, other=0.0).to(tl.float32)
    r_i = tl.where(mask, (r_i - mean) * rstd, 0.0)
    r_f = tl.where(mask, (r_f - mean) * rstd, 0.0)
    r_g = tl.where(mask, (r_g - mean) * rstd, 0.0)
    r_o = tl.where(mask, (r_o - mean) * rstd, 0.0)
    acc = dg_hh_acc_ptr + b * 4 * H + cols
    tl.store(acc, tl.load(acc, mask=mask, other=0.0) + d_i * r_i, mask=mask)
    tl.store(acc + H, tl.load(acc + H, mask=mask, other=0.0) + d_f * r_f, mask=mask)
    tl.store(acc + 2 * H, tl.load(acc + 2 * H, mask=mask, other=0.0) + d_g * r_g, mask=mask)
    tl.store(acc + 3 * H, tl.load(acc + 3 * H, mask=mask, other=0.0) + d_o * r_o, mask=mask)
    e_i = d_i * tl.load(g_hh_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    e_f = d_f * tl.load(g_hh_ptr + H + cols, mask=mask, other=0.0).to(tl.float32)
    e_g = d_g * tl.load(g_hh_ptr + 2 * H + cols, mask=mask, other=0.0).to(tl.float32)
    e_o = d_o * tl.load(g_hh_ptr + 3 * H + cols, mask=mask, other=0.0).to(tl.float32)
    n4 = 4 * n_hidden
    k1 = (tl.sum(e_i, axis=0) + tl.sum(e_f, axis=0) + tl.sum(e_g, axis=0)
          + tl.sum(e_o, axis=0)) / n4
    k2 = (tl.sum(e_i * r_i, axis=0) + tl.sum(e_f * r_f, axis=0) + tl.sum(e_g * r_g, axis=0)
          + tl.sum(e_o * r_o, axis=0)) / n4
    rdt = drec_ptr.dtype.element_ty
    tl.store(drec_ptr + row, ((e_i - k1 - r_i * k2) * rstd).to(rdt), mask=mask)
    tl.store(drec_ptr + row + H, ((e_f - k1 - r_f * k2) * rstd).to(rdt), mask=mask)
    tl.store(drec_ptr + row + 2 * H, ((e_g - k1 - r_g * k2) * rstd).to(rdt), mask=mask)
    tl.store(drec_ptr + row + 3 * H, ((e_o - k1 - r_o * k2) * rstd).to(rdt), mask=mask)


@triton.jit(do_not_specialize=["n_steps"])
def _ln_lstm_fwd_persistent_kernel(
    xg_ptr, hs_ptr, cs_ptr, w_hh_ptr, g_hh_ptr, g_c_ptr, b_c_ptr, len_ptr, y_ptr, gates_ptr,
    recs_ptr, stats_ptr,
    stride_g_t, stride_g_b, stride_h_s, stride_c_s, stride_y_t, stride_row, stride_stats_t,
    stride_w_row, n_hidden, n_steps, eps,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    REVERSE: tl.constexpr,
):
    # one program per batch row for the whole sequence: each step computes the row's
    # recurrent projection rec = W_hh h (a GEMV streaming W_hh from L2, stored to recs for
    # the backward), then the same row step as the per-step kernel reads it back. The row is
    # the program's own, so only block barriers are needed: between the GEMV's stores and the
    # row step's loads, and between the row step's new state and the next GEMV.
    # xg / gates / recs: (T, B, 4H) at (stride_g_t, stride_g_b); hs (T+1, B, H) at
    # stride_h_s, cs likewise at stride_c_s, y (T, B, H) at stride_y_t, all rows of H at
    # stride_row; stats (T, B, 4)
    b = tl.program_id(0).to(tl.int64)
    n_gates = 4 * n_hidden
    for s in range(0, n_steps):
        t = s
        if REVERSE:
            t = n_steps - 1 - s
        s64 = tl.cast(s, tl.int64)
        t64 = tl.cast(t, tl.int64)
        h_prev = hs_ptr + s64 * stride_h_s + b * stride_row
        rec_row = recs_ptr + t64 * stride_g_t + b * stride_g_b
        for n0 in range(0, n_gates, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_gates
            # elementwise partial products, reduced once per block of gate rows
            part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, n_hidden, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < n_hidden
                hk = tl.load(h_prev + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                w = tl.load(w_hh_ptr + offs_n[:, None] * stride_w_row + offs_k[None, :],
                            mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                part += w * hk[None, :]
            acc = tl.sum(part, axis=1)
            tl.store(rec_row + offs_n, acc.to(recs_ptr.dtype.element_ty), mask=mask_n)
        tl.debug_barrier()
        _ln_fwd_row(b, recs_ptr + t64 * stride_g_t, xg_ptr + t64 * stride_g_t,
                    hs_ptr + s64 * stride_h_s, cs_ptr + s64 * stride_c_s, g_hh_ptr, g_c_ptr,
                    b_c_ptr, len_ptr, hs_ptr + (s64 + 1) * stride_h_s,
                    cs_ptr + (s64 + 1) * stride_c_s, y_ptr + t64 * stride_y_t,
                    gates_ptr + t64 * stride_g_t, stats_ptr + t64 * stride_stats_t,
                    stride_g_b, stride_row, n_hidden, t, eps, BLOCK_H, False)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["n_steps"])
def _ln_lstm_bwd_persistent_kernel(
    dy_ptr, recs_ptr, gates_ptr, cs_ptr, stats_ptr, w_hh_ptr, g_hh_ptr, g_c_ptr, b_c_ptr,
    len_ptr, dcarry_ptr, dc_ptr, dxg_ptr, drec_ptr, dh_mm_ptr, dg_hh_acc_ptr, dgb_c_acc_ptr,
    stride_g_t, stride_g_b, stride_c_s, stride_dy_t, stride_row, stride_stats_t, stride_w_row,
    n_hidden, n_steps,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    REVERSE: tl.constexpr,
):
    # one program per batch row, steps from the last processed one back (see
    # _ln_lstm_fwd_persistent_kernel): each step first computes the row's dh_mm = drec_next
    # W_hh (a GEMV over the gate gradients of the step after it, which this program wrote
    # on its previous iteration; zero on the first), then the per-step kernel's row backward.
    # dxg / drec / recs / gates: (T, B, 4H) at (stride_g_t, stride_g_b); cs (T+1, B, H) at
    # stride_c_s; dy (T, B, H) at stride_dy_t; dh_mm, dcarry, dc (B, H) fp32; rows of H at
    # stride_row
    b = tl.program_id(0).to(tl.int64)
    n_gates = 4 * n_hidden
    for i in range(0, n_steps):
        s, t, t_next = _bwd_step_times(i, n_steps, REVERSE)
        s64 = tl.cast(s, tl.int64)
        t64 = tl.cast(t, tl.int64)
        drec_next = drec_ptr + tl.cast(t_next, tl.int64) * stride_g_t + b * stride_g_b
        for k0 in range(0, n_hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < n_hidden
            # elementwise partial products, reduced (across warps) once per column block
            part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            if i > 0:
                for n0 in range(0, n_gates, BLOCK_N):
                    offs_n = n0 + tl.arange(0, BLOCK_N)
                    mask_n = offs_n < n_gates
                    d = tl.load(drec_next + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                    w = tl.load(w_hh_ptr + offs_n[:, None] * stride_w_row + offs_k[None, :],
                                mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                    part += w * d[:, None]
            acc = tl.sum(part, axis=0)
            tl.store(dh_mm_ptr + b * stride_row + offs_k, acc, mask=mask_k)
        tl.debug_barrier()
        _ln_bwd_row(b, dh_mm_ptr, dy_ptr + t64 * stride_dy_t, recs_ptr + t64 * stride_g_t,
                    gates_ptr + t64 * stride_g_t, cs_ptr + (s64 + 1) * stride_c_s,
                    cs_ptr + s64 * stride_c_s, stats_ptr + t64 * stride_stats_t, g_hh_ptr,
                    g_c_ptr, b_c_ptr, len_ptr, dcarry_ptr, dc_ptr, dxg_ptr + t64 * stride_g_t,
                    drec_ptr + t64 * stride_g_t, dg_hh_acc_ptr, dgb_c_acc_ptr, stride_g_b,
                    stride_row, n_hidden, t, BLOCK_H, True, False)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["s", "t"])
def _ln_lstm_proj_fwd_kernel(
    hs_ptr, len_ptr, ys_ptr,
    stride_h_s, stride_y_t, stride_b, n_proj, s, t,
    BLOCK_P: tl.constexpr,
):
    # each program owns one batch row of the projected state: state s + 1 holds r @ W_hr^T
    # (the caller's GEMM wrote it there) and is overwritten in place with the new state, the
    # previous state past the length; y[t] gets the projection, zero past the length.
    # stride_b is the row stride of both (., B, P) buffers (the launcher allocates them alike)
    b = tl.program_id(0).to(tl.int64)
    s64 = tl.cast(s, tl.int64)
    h_ptr = hs_ptr + (s64 + 1) * stride_h_s
    h_prev_ptr = hs_ptr + s64 * stride_h_s
    y_ptr = ys_ptr + tl.cast(t, tl.int64) * stride_y_t
    cols = tl.arange(0, BLOCK_P)
    mask = cols < n_proj
    row = b * stride_b + cols
    valid = t < tl.load(len_ptr + b)
    h = tl.load(h_ptr + row, mask=mask, other=0.0)
    h_old = tl.load(h_prev_ptr + row, mask=mask, other=0.0)
    tl.store(h_ptr + row, tl.where(valid, h, h_old), mask=mask)
    tl.store(y_ptr + row, tl.where(valid, h, 0.0).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["t"])
def _ln_lstm_proj_bwd_kernel(
    dh_mm_ptr, dys_ptr, len_ptr, dcarry_ptr, gvs_ptr,
    stride_dy_t, stride_gv_t, stride_b, n_proj, t,
    BLOCK_P: tl.constexpr, HAS_NEXT: tl.constexpr,
):
    # each program owns one batch row of the gradient w.r.t. the projected state after this
    # step; gv gets it masked by length (the caller multiplies it by W_hr, and keeps it for
    # dW_hr), the carry keeps the part past the length. stride_b is the row stride of all
    # four (B, P) rows; dy and gv are (T, B, P) at their time strides
    b = tl.program_id(0).to(tl.int64)
    dy_ptr = dys_ptr + tl.cast(t, tl.int64) * stride_dy_t
    gv_ptr = gvs_ptr + tl.cast(t, tl.int64) * stride_gv_t
    cols = tl.arange(0, BLOCK_P)
    mask = cols < n_proj
    row = b * stride_b + cols
    valid = t < tl.load(len_ptr + b)
    gv = _ln_state_grad(dh_mm_ptr, dy_ptr, dcarry_ptr, row, mask, valid, HAS_NEXT)
    tl.store(gv_ptr + row, gv.to(gv_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# launchers

def step_blocks(n_batch: int, n_cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps) for the per-step kernels."""
    block_b = min(max(next_power_of_2(max(n_batch, 1)), MIN_DOT_BLOCK), MAX_STEP_BLOCK_B)
    block_h = MAX_BLOCK_H
    n_batch_blocks = cdiv(n_batch, block_b)
    while block_h > MIN_DOT_BLOCK and n_batch_blocks * cdiv(n_cols, block_h) < MIN_STEP_PROGRAMS:
        block_h //= 2
    return block_b, block_h, STEP_BLOCK_K, _step_warps(block_b, block_h)


def _step_warps(block_b: int, block_h: int) -> int:
    # the forward holds four (BLOCK_B, BLOCK_H) fp32 accumulators plus four W_hh tiles: about
    # 128 tile elements per warp keeps them in registers (ptxas -v: no spills, except 36 B in
    # the fp32 16x64 forward on sm_80)
    return min(max(block_b * block_h // 128, 4), 16)


def _k_step(flag: Optional[int], n_k: int) -> int:
    """The K step of a recurrent GEMM over n_k: STEP_BLOCK_K, or ``flag`` (FWD_BLOCK_K /
    BWD_BLOCK_K) clipped to [MIN_DOT_BLOCK, next_power_of_2(n_k)]."""
    if flag is None:
        return STEP_BLOCK_K
    if isinstance(flag, bool) or not isinstance(flag, int) or flag < 1 or flag & (flag - 1):
        raise ValueError(f"fastbert.kernels.lstm FWD_BLOCK_K / BWD_BLOCK_K must be None or a "
                         f"power of two, got {flag!r}")
    return max(MIN_DOT_BLOCK, min(flag, next_power_of_2(n_k)))


def fwd_step_warps(block_b: int, block_h: int) -> int:
    """Warps of the per-step / cooperative forward (FWD_NARROW_WARPS, see there)."""
    if FWD_NARROW_WARPS:
        return min(max(block_b * block_h // 256, 2), 8)
    return _step_warps(block_b, block_h)


def step_block_configs():
    """Every (BLOCK_B, BLOCK_H, BLOCK_K, num_warps) ``step_blocks`` can return."""
    def powers_of_2(top):  # MIN_DOT_BLOCK, 2 * MIN_DOT_BLOCK, ..., top
        return [1 << e for e in range(MIN_DOT_BLOCK.bit_length() - 1, top.bit_length())]
    return [(b, h, STEP_BLOCK_K, _step_warps(b, h)) for b in powers_of_2(MAX_STEP_BLOCK_B)
            for h in powers_of_2(MAX_BLOCK_H)]


def _dot_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype == torch.bfloat16 and device.type != "cuda"


def _time_order(n_steps: int, reverse: bool):
    return range(n_steps - 1, -1, -1) if reverse else range(n_steps)


def use_persistent(n_hidden: int, has_proj: bool) -> bool:
    """Whether the time-looping kernels run this layer (see PERSISTENT_MAX_HIDDEN)."""
    return not has_proj and n_hidden <= PERSISTENT_MAX_HIDDEN


def persistent_blocks(n_hidden: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps) of the time-looping kernels: the smallest batch
    block (the most programs), a column block of up to MAX_BLOCK_H, 8 warps (their loops keep
    more live state than one step: 4 warps spill in fp32; at 8, ptxas -v still reports up
    to 40 B of spills in some fp32 configs, none in bf16 on sm_90)."""
    block_h = min(MAX_BLOCK_H, next_power_of_2(max(n_hidden, MIN_DOT_BLOCK)))
    return MIN_DOT_BLOCK, block_h, STEP_BLOCK_K, PERSISTENT_WARPS


def coop_enabled(device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> bool:
    """``COOP_TIME_LOOP``; while it is None, $FASTBERT_LSTM_COOP decides ("1" on, "0" off),
    read once into it; while that is unset too, on for a CUDA ``device`` whose current stream
    is not being captured and a 16-bit ``dtype``, else off."""
    global COOP_TIME_LOOP
    if COOP_TIME_LOOP is None:
        if not os.environ.get(COOP_ENV, "").strip():
            return (device is not None and device.type == "cuda"
                    and dtype in (torch.float16, torch.bfloat16)
                    and not torch.cuda.is_current_stream_capturing())
        COOP_TIME_LOOP = env_flag(COOP_ENV)
    return COOP_TIME_LOOP


def coop_blocks(n_batch: int, n_hidden: int,
                max_programs: int) -> Optional[tuple[int, int, int, int]]:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps) of the cooperative time loop: the per-step
    kernels' tiles (``step_blocks``), widened until the grid has at most ``max_programs``
    programs (every program must be resident at once: one an SM), or None if even the widest
    tiles make too many."""
    bb, bh, bk, _ = step_blocks(n_batch, n_hidden)

    def programs():
        return cdiv(n_batch, bb) * cdiv(n_hidden, bh)
    while programs() > max_programs and bh < MAX_BLOCK_H:
        bh *= 2
    while programs() > max_programs and bb < MAX_STEP_BLOCK_B:
        bb *= 2
    if programs() > max_programs:
        return None
    return bb, bh, bk, _step_warps(bb, bh)


def use_coop(n_steps: int, n_batch: int, n_hidden: int, has_proj: bool,
             device: torch.device,
             dtype: Optional[torch.dtype] = None) -> Optional[tuple[int, int, int, int]]:
    """The cooperative time loop's blocks if it runs this layer, else None: switched on
    (``coop_enabled``, for the layer's ``device`` and ``dtype``), no projection, hidden <=
    COOP_MAX_HIDDEN, a grid of at most one program per SM, counts below COOP_POISON. On CPU
    (the interpreter) any grid: it runs there one launch per step."""
    if has_proj or n_hidden > COOP_MAX_HIDDEN or not coop_enabled(device, dtype):
        return None
    limit = _sm_count(device.index) if device.type == "cuda" else 1 << 30
    blocks = coop_blocks(n_batch, n_hidden, limit)
    if blocks is None or n_steps * cdiv(n_hidden, blocks[1]) >= COOP_POISON:
        return None
    return blocks


def resident_k(kind: str, n_hidden: int) -> int:
    """BLOCK_K of a resident cooperative kernel: the whole reduction, hidden ("fwd") or 4 *
    hidden ("bwd"), as a power of two, at least MIN_DOT_BLOCK (tl.dot's smallest K: the masks
    zero the padding)."""
    return max(MIN_DOT_BLOCK, next_power_of_2(n_hidden if kind == "fwd" else 4 * n_hidden))


def resident_bytes(kind: str, n_hidden: int, block_b: int, block_h: int, itemsize: int) -> int:
    """Shared memory of a resident cooperative kernel's two GEMM operands: forward the four
    gates' (K, BLOCK_H) W_hh tiles and the (BLOCK_B, K) h tile; backward the (K, BLOCK_H) W_hh
    tile and the (BLOCK_B, K) gate gradients (K = ``resident_k``)."""
    tiles = 4 * block_h if kind == "fwd" else block_h
    return (tiles + block_b) * resident_k(kind, n_hidden) * itemsize


def coop_resident(kind: str, n_hidden: int, block_b: int, block_h: int, itemsize: int) -> bool:
    """Whether the cooperative ``kind`` ("fwd" / "bwd") kernel keeps its W_hh slice on chip:
    COOP_RESIDENT_W, hidden <= COOP_RESIDENT_MAX_HIDDEN, both operands within
    COOP_RESIDENT_MAX_BYTES, and for 4-byte operands in the forward K <= RESIDENT_FP32_MAX_K."""
    if not COOP_RESIDENT_W or n_hidden > COOP_RESIDENT_MAX_HIDDEN:
        return False
    if kind == "fwd" and itemsize > 2 and resident_k(kind, n_hidden) > RESIDENT_FP32_MAX_K:
        return False
    return resident_bytes(kind, n_hidden, block_b, block_h, itemsize) <= COOP_RESIDENT_MAX_BYTES


def _coop_launches(n_steps: int, device: torch.device):
    """(step_begin, step_end, SYNC) of each launch of a cooperative time loop: the whole loop
    in one launch on a GPU; on CPU one launch a step without the barrier (the interpreter runs
    one program at a time, so programs cannot wait for each other)."""
    if device.type == "cuda":
        return [(0, n_steps, True)]
    return [(s, s + 1, False) for s in range(n_steps)]


# ----------------------------------------------------------------------------------------
# CUDA-graph mode of the per-step loops


def step_graph_enabled() -> bool:
    """``PER_STEP_CUDA_GRAPH``; while it is None, $FASTBERT_LSTM_CUDA_GRAPH decides ("1" on,
    "0" or unset off), read once into it."""
    global PER_STEP_CUDA_GRAPH
    if PER_STEP_CUDA_GRAPH is None:
        PER_STEP_CUDA_GRAPH = env_flag(CUDA_GRAPH_ENV)
    return PER_STEP_CUDA_GRAPH


def _use_step_graph(t: torch.Tensor) -> bool:
    """Whether this call's per-step loop (the plain LSTM's) replays a CUDA graph: the mode is
    on, the tensors are CUDA tensors (never the interpreter's CPU tensors), and the current
    stream is not being captured already (then the plain loop is what the caller's graph
    records)."""
    return (step_graph_enabled() and t.is_cuda
            and not torch.cuda.is_current_stream_capturing())


class _StepGraph:
    """One captured per-step loop: ``dests``, the static tensors each call's inputs are
    copied into; ``outs``, the static tensors the loop writes (cloned for each call); the
    graph's ``replay``; ``done``, an event after the last call's use of the static tensors
    (None off CUDA)."""
    __slots__ = ("dests", "outs", "replay", "done")

    def __init__(self, dests, outs, done):
        self.dests, self.outs, self.replay, self.done = dests, outs, None, done


# key -> _StepGraph, least recently used first (see _step_graph for what it holds)
_STEP_GRAPHS: "collections.OrderedDict[tuple, _StepGraph]" = collections.OrderedDict()
_STEP_GRAPHS_LOCK = threading.Lock()


def _capture(loop: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """Run ``loop`` once on a side stream, then capture it into a CUDA graph on that stream
    (the warm-up the torch.cuda.graph docs ask for: Triton compiles and loads its kernels
    outside the capture); returns the graph's replay.
    The warm-up computes this call's results into the static outputs."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)  # the inputs were copied in on the current stream
    with torch.cuda.stream(side):
        loop()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: only this thread's capture-unsafe CUDA calls are errors during the
    # capture, not those of unrelated threads (a data loader's pinned-memory thread, say)
    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        loop()
    return graph.replay


def _trim_step_graphs(size: int) -> None:
    while len(_STEP_GRAPHS) > size:
        _, old = _STEP_GRAPHS.popitem(last=False)
        if old.done is not None:
            # its static tensors may still be in use on another stream: wait before they are
            # freed (an eviction is rare: it comes with a capture)
            old.done.synchronize()


def clear_step_graphs() -> None:
    """Drop every captured per-step loop and its static tensors (their memory goes back to
    PyTorch's caching allocator)."""
    with _STEP_GRAPHS_LOCK:
        _trim_step_graphs(0)


def step_graph_keys() -> list:
    """The keys of the captured loops, least recently used first (for tests and benchmarks)."""
    with _STEP_GRAPHS_LOCK:
        return list(_STEP_GRAPHS)


def _static(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # same strides as the first call's input (empty_like keeps a dense layout), so the
    # replayed kernels and GEMMs see the layout the plain loop would see
    return None if t is None else torch.empty_like(t)


def _step_graph(head: tuple, sources: Tuple[torch.Tensor, ...],
                build: Callable[[], tuple]) -> Tuple[torch.Tensor, ...]:
    """A per-step loop replayed from a CUDA graph: copy ``sources`` into the static inputs,
    replay, return fresh clones of the static outputs.

    ``build()`` allocates the static tensors of a new capture and returns (dests, outs,
    loop): ``dests[i]`` receives ``sources[i]`` (``copy_``, converting dtype like the plain
    launchers' ``hs[0] = h0``), ``loop()`` enqueues the step launches on the static tensors
    only, ``outs`` are cloned for each call (a call's outputs are saved by autograd: the next
    call must not overwrite them).

    The cache key is ``head`` (the launcher and every scalar baked into the launches:
    direction), the device and each source's dtype, shape and strides; everything else a
    launch depends on (block sizes, grids) follows from those (the loops are Triton launches
    only). It holds the
    ``CUDA_GRAPH_CACHE_SIZE`` most recently used captures. Each holds its static tensors:
    the loop's inputs and outputs, about as much memory as one plain call's (forward: xg,
    the states hs and cs, the gates, y, rs with a projection, the weights and lengths;
    backward: dy, the saved gates and cs, the gate gradients and the carried state
    gradients), kept until evicted or ``clear_step_graphs()``.
    """
    device = sources[0].device
    key = (head, device) + tuple((s.dtype, s.shape, s.stride()) for s in sources)
    # static tensors are never inference tensors (a first call under inference_mode would
    # make them so, and a later training call could not copy into them) and never part of
    # an autograd graph (a copy from a tensor requiring grad would chain every call's graph
    # onto them)
    with _STEP_GRAPHS_LOCK, torch.inference_mode(False), torch.no_grad():
        entry = _STEP_GRAPHS.get(key)
        if entry is not None:
            _STEP_GRAPHS.move_to_end(key)
            if entry.done is not None:
                # the previous call may have run on another stream: its clones of the
                # static outputs must be done before this call's inputs overwrite them
                torch.cuda.current_stream(device).wait_event(entry.done)
            for dest, src in zip(entry.dests, sources):
                dest.copy_(src)
            entry.replay()
        else:
            dests, outs, loop = build()
            entry = _StepGraph(dests, outs,
                               torch.cuda.Event() if device.type == "cuda" else None)
            for dest, src in zip(dests, sources):
                dest.copy_(src)
            try:
                entry.replay = _capture(loop, device)
            except Exception as e:
                global PER_STEP_CUDA_GRAPH
                PER_STEP_CUDA_GRAPH = False
                warnings.warn(
                    f"the LSTM CUDA-graph mode (${CUDA_GRAPH_ENV}) could not capture the "
                    f"per-step loop ({type(e).__name__}: {e}); it is now off in this process: "
                    "this call and later ones run the plain loop", RuntimeWarning, stacklevel=2)
                # this call's results, from the plain loop over the inputs already copied in
                # (the failed warm-up or capture may have left the side stream mid-loop)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                loop()
                return tuple(o.clone() for o in outs)
            _STEP_GRAPHS[key] = entry
            _trim_step_graphs(CUDA_GRAPH_CACHE_SIZE)
        result = tuple(o.clone() for o in entry.outs)
        if entry.done is not None:
            entry.done.record(torch.cuda.current_stream(device))
        return result


def _lstm_fwd_buffers(n_steps, n_batch, n_hidden, n_state, has_proj, dt, dev):
    """hs, cs, gates, y, rs of ``lstm_fwd`` (uninitialized)."""
    hs = torch.empty((n_steps + 1, n_batch, n_state), dtype=dt, device=dev)
    cs = torch.empty((n_steps + 1, n_batch, n_hidden), dtype=torch.float32, device=dev)
    gates = torch.empty((n_steps, n_batch, 4 * n_hidden), dtype=dt, device=dev)
    y = torch.empty((n_steps, n_batch, n_state), dtype=dt, device=dev)
    rs = (torch.empty((n_steps, n_batch, n_hidden), dtype=dt, device=dev) if has_proj
          else y.new_empty(0))
    return hs, cs, gates, y, rs


@on_tensor_device
def lstm_fwd(xg: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
             w_hr: Optional[torch.Tensor], lengths: torch.Tensor, reverse: bool,
             persistent: Optional[bool] = None):
    """Run the recurrence of one layer and direction.

    Args:
        xg: (T, B, 4H) input projections of every step, biases included (x.dtype).
        h0: (B, P) initial hidden state, P = proj_size or H; c0: (B, H).
        w_hh: (4H, P); w_hr: (P, H) or None.
        lengths: (B,) int32/int64 on xg's device; steps t >= lengths[b] leave b's state alone
            and write zero output.
        reverse: run from t = T-1 down to 0 (the backward direction of a bidirectional LSTM).
        persistent: one launch looping over time (no projection only), or one launch per
            step; None picks with ``use_persistent``. The per-step loop replays a CUDA graph
            when ``step_graph_enabled()`` (same results, see ``PER_STEP_CUDA_GRAPH``).

    Returns:
        y (T, B, P), hs (T+1, B, P) the state after each processed step (hs[0] = h0, in
        processing order), cs (T+1, B, H) fp32 likewise, gates (T, B, 4H) the gate
        activations by time, rs (T, B, H) the unprojected outputs (empty without w_hr).
    """
    n_steps, n_batch, n_gates = xg.shape
    n_hidden = n_gates // 4
    n_state = w_hh.shape[1]
    dev, dt = xg.device, xg.dtype
    has_proj = w_hr is not None
    # the kernels index lengths and weight rows with unit element stride
    xg, w_hh, lengths = xg.contiguous(), w_hh.contiguous(), lengths.contiguous()
    if has_proj:
        w_hr = w_hr.contiguous()
    coop = None
    if persistent is None:
        coop = use_coop(n_steps, n_batch, n_hidden, has_proj, dev, dt)
        persistent = coop is None and use_persistent(n_hidden, has_proj)
    if n_steps > 0 and n_batch > 0 and coop is None and not persistent and _use_step_graph(xg):
        def build():
            s_xg, s_w_hh, s_w_hr, s_len = map(_static, (xg, w_hh, w_hr, lengths))
            hs, cs, gates, y, rs = _lstm_fwd_buffers(n_steps, n_batch, n_hidden, n_state,
                                                     has_proj, dt, dev)
            dests = (s_xg, hs[0], cs[0], s_w_hh, s_len) + ((s_w_hr,) if has_proj else ())
            loop = functools.partial(_lstm_fwd_steps, s_xg, hs, cs, s_w_hh, s_w_hr, s_len, y,
                                     gates, rs, reverse)
            return dests, (y, hs, cs, gates, rs), loop
        sources = (xg, h0, c0, w_hh, lengths) + ((w_hr,) if has_proj else ())
        return _step_graph(("lstm_fwd", bool(reverse)), sources, build)
    hs, cs, gates, y, rs = _lstm_fwd_buffers(n_steps, n_batch, n_hidden, n_state, has_proj,
                                             dt, dev)
    hs[0] = h0
    cs[0] = c0
    if n_steps == 0 or n_batch == 0:
        return y, hs, cs, gates, rs
    if coop is not None:
        bb, bh, bk, warps = coop
        grid = (cdiv(n_batch, bb), cdiv(n_hidden, bh))
        counts = torch.zeros(grid[0], dtype=torch.int32, device=dev)
        resident = coop_resident("fwd", n_hidden, bb, bh, w_hh.element_size())
        block_k = resident_k("fwd", n_hidden) if resident else _k_step(FWD_BLOCK_K, n_hidden)
        for begin, end, sync in _coop_launches(n_steps, dev):
            launch(
                _lstm_fwd_coop_kernel, grid,
                xg, hs, cs, w_hh, lengths, y, gates, counts,
                xg.stride(0), xg.stride(1), hs.stride(0), hs.stride(1), cs.stride(0),
                cs.stride(1), w_hh.stride(0), y.stride(0), y.stride(1), gates.stride(0),
                gates.stride(1), n_batch, n_hidden, n_steps, begin, end, COOP_MAX_SPINS,
                BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=block_k, REVERSE=bool(reverse), SYNC=sync,
                RESIDENT=resident, DOT_FP32=_dot_fp32(dt, dev),
                num_warps=fwd_step_warps(bb, bh), launch_cooperative_grid=sync)
        return y, hs, cs, gates, rs
    if persistent:
        if has_proj:
            raise ValueError("the persistent LSTM kernel has no projection")
        bb, bh, bk, warps = persistent_blocks(n_hidden)
        launch(
            _lstm_fwd_persistent_kernel, (cdiv(n_batch, bb),),
            xg, hs, cs, w_hh, lengths, y, gates,
            xg.stride(0), xg.stride(1), hs.stride(0), hs.stride(1), cs.stride(0), cs.stride(1),
            w_hh.stride(0), y.stride(0), y.stride(1), gates.stride(0), gates.stride(1),
            n_batch, n_hidden, n_steps,
            BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, REVERSE=bool(reverse),
            DOT_FP32=_dot_fp32(dt, dev), num_warps=warps)
        return y, hs, cs, gates, rs
    _lstm_fwd_steps(xg, hs, cs, w_hh, w_hr, lengths, y, gates, rs, reverse)
    return y, hs, cs, gates, rs


def _lstm_fwd_steps(xg, hs, cs, w_hh, w_hr, lengths, y, gates, rs, reverse):
    """Enqueue the per-step forward (buffers as ``lstm_fwd`` returns them, hs[0] and cs[0]
    holding the initial state): one cell launch, plus one projection launch with ``w_hr``,
    per step."""
    n_steps, n_batch, n_gates = xg.shape
    n_hidden = n_gates // 4
    n_state = w_hh.shape[1]
    has_proj = w_hr is not None
    dot32 = _dot_fp32(xg.dtype, xg.device)
    bb, bh, bk, warps = step_blocks(n_batch, n_hidden)
    grid = (cdiv(n_batch, bb), cdiv(n_hidden, bh))
    if has_proj:
        pbb, pbh, pbk, pwarps = step_blocks(n_batch, n_state)
        pgrid = (cdiv(n_batch, pbb), cdiv(n_state, pbh))
    out = rs if has_proj else y
    # the arguments that do not change from step to step, built once (host time per step
    # is what bounds small steps)
    cell_args = (xg, hs, cs, w_hh, lengths, out, gates, *xg.stride()[:2], *hs.stride()[:2],
                 *cs.stride()[:2], w_hh.stride(0), *out.stride()[:2], *gates.stride()[:2],
                 n_batch, n_hidden, n_state)
    cell_meta = dict(BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=_k_step(FWD_BLOCK_K, n_state),
                     HAS_PROJ=has_proj, DOT_FP32=dot32, num_warps=fwd_step_warps(bb, bh))
    if has_proj:
        proj_args = (rs, w_hr, hs, lengths, y, *rs.stride()[:2], w_hr.stride(0),
                     *hs.stride()[:2], *y.stride()[:2], n_batch, n_hidden, n_state)
        proj_meta = dict(BLOCK_B=pbb, BLOCK_H=pbh, BLOCK_K=pbk, DOT_FP32=dot32,
                         num_warps=pwarps)
    cell = bind(_lstm_fwd_kernel, grid, *cell_args, **cell_meta)
    proj = bind(_lstm_proj_fwd_kernel, pgrid, *proj_args, **proj_meta) if has_proj else None
    for s, t in enumerate(_time_order(n_steps, reverse)):
        cell(s, t)
        if has_proj:
            proj(s, t)


@on_tensor_device
def lstm_bwd(dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, w_hh: torch.Tensor,
             w_hr: Optional[torch.Tensor], lengths: torch.Tensor, hs: torch.Tensor,
             cs: torch.Tensor, gates: torch.Tensor, rs: torch.Tensor, reverse: bool,
             persistent: Optional[bool] = None):
    """Backward of ``lstm_fwd`` (``persistent`` and the CUDA-graph mode as there).

    Args:
        dy: (T, B, P) gradient of y; dh_n: (B, P), dc_n: (B, H) gradients of the final state.
        the rest: as passed to / returned by ``lstm_fwd``.

    Returns:
        dxg (T, B, 4H) (= the gate pre-activation gradients, x.dtype), dh0 (B, P) and dc0
        (B, H) in fp32, dw_hh (4H, P) and dw_hr (P, H) (empty without w_hr), both fp32.
    """
    n_steps, n_batch, n_gates = gates.shape
    n_hidden = n_gates // 4
    n_state = w_hh.shape[1]
    dev, dt = gates.device, gates.dtype
    has_proj = w_hr is not None
    dy, w_hh, lengths = dy.contiguous(), w_hh.contiguous(), lengths.contiguous()
    if has_proj:
        w_hr = w_hr.contiguous()
    coop = None
    if persistent is None:
        coop = use_coop(n_steps, n_batch, n_hidden, has_proj, dev, dt)
        persistent = coop is None and use_persistent(n_hidden, has_proj)
    if (n_steps > 0 and n_batch > 0 and coop is None and not persistent
            and _use_step_graph(gates)):
        def build():
            s_dy, s_w_hh, s_w_hr, s_len, s_gates, s_cs = map(
                _static, (dy, w_hh, w_hr, lengths, gates, cs))
            dgates, gv = _lstm_bwd_buffers(n_steps, n_batch, n_gates, n_state, has_proj, dt,
                                           dev)
            dcarry = torch.empty(dh_n.shape, dtype=torch.float32, device=dev)
            dc = torch.empty(dc_n.shape, dtype=torch.float32, device=dev)
            loop = functools.partial(_lstm_bwd_steps, s_dy, s_w_hh, s_w_hr, s_len, s_gates,
                                     s_cs, dgates, dcarry, dc, gv, reverse)
            dests = (s_dy, dcarry, dc, s_w_hh, s_len, s_gates, s_cs) + (
                (s_w_hr,) if has_proj else ())
            return dests, (dgates, dcarry, dc, gv), loop
        sources = (dy, dh_n, dc_n, w_hh, lengths, gates, cs) + ((w_hr,) if has_proj else ())
        dgates, dcarry, dc, gv = _step_graph(("lstm_bwd", bool(reverse)), sources, build)
    else:
        dgates, gv = _lstm_bwd_buffers(n_steps, n_batch, n_gates, n_state, has_proj, dt, dev)
        dcarry = dh_n.to(torch.float32).contiguous().clone()
        dc = dc_n.to(torch.float32).contiguous().clone()
        if n_steps > 0 and n_batch > 0 and coop is not None:
            bb, bh, bk, warps = coop
            grid = (cdiv(n_batch, bb), cdiv(n_hidden, bh))
            counts = torch.zeros(grid[0], dtype=torch.int32, device=dev)
            resident = coop_resident("bwd", n_hidden, bb, bh, w_hh.element_size())
            block_k = (resident_k("bwd", n_hidden) if resident
                       else _k_step(BWD_BLOCK_K, n_gates))
            for begin, end, sync in _coop_launches(n_steps, dev):
                launch(
                    _lstm_bwd_coop_kernel, grid,
                    dy, w_hh, gates, cs, lengths, dcarry, dc, dgates, counts,
                    dy.stride(0), dy.stride(1), dgates.stride(0), dgates.stride(1),
                    w_hh.stride(0), gates.stride(0), gates.stride(1), cs.stride(0),
                    cs.stride(1), dcarry.stride(0), dc.stride(0), n_batch, n_hidden, n_steps,
                    begin, end, COOP_MAX_SPINS,
                    BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=block_k, REVERSE=bool(reverse),
                    SYNC=sync, RESIDENT=resident, DOT_FP32=_dot_fp32(dt, dev),
                    num_warps=warps, launch_cooperative_grid=sync)
        elif n_steps > 0 and n_batch > 0 and persistent:
            if has_proj:
                raise ValueError("the persistent LSTM kernel has no projection")
            bb, bh, bk, warps = persistent_blocks(n_hidden)
            launch(
                _lstm_bwd_persistent_kernel, (cdiv(n_batch, bb),),
                dy, w_hh, gates, cs, lengths, dcarry, dc, dgates,
                dy.stride(0), dy.stride(1), dgates.stride(0), dgates.stride(1), w_hh.stride(0),
                gates.stride(0), gates.stride(1), cs.stride(0), cs.stride(1), dcarry.stride(0),
                dc.stride(0), n_batch, n_hidden, n_steps,
                BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, REVERSE=bool(reverse),
                DOT_FP32=_dot_fp32(dt, dev), num_warps=warps)
        elif n_steps > 0 and n_batch > 0:
            _lstm_bwd_steps(dy, w_hh, w_hr, lengths, gates, cs, dgates, dcarry, dc, gv,
                            reverse)
    dh0, dw_hh, dw_hr = _state_and_weight_grads(dgates, dcarry, w_hh, hs, gv if has_proj else None,
                                                rs, reverse)
    return dgates, dh0, dc, dw_hh, dw_hr


def _lstm_bwd_buffers(n_steps, n_batch, n_gates, n_state, has_proj, dt, dev):
    """dgates and gv of ``lstm_bwd`` (uninitialized; gv empty without a projection)."""
    dgates = torch.empty((n_steps, n_batch, n_gates), dtype=dt, device=dev)
    gv = (torch.empty((n_steps, n_batch, n_state), dtype=dt, device=dev) if has_proj
          else dgates.new_empty(0))
    return dgates, gv


def _lstm_bwd_steps(dy, w_hh, w_hr, lengths, gates, cs, dgates, dcarry, dc, gv, reverse):
    """Enqueue the per-step backward (buffers as in ``lstm_bwd``; dcarry and dc hold the
    final state's gradients and are updated in place): one cell launch, plus one projection
    launch with ``w_hr``, per step, from the last processed step back."""
    n_steps, n_batch, n_gates = gates.shape
    n_hidden = n_gates // 4
    n_state = w_hh.shape[1]
    has_proj = w_hr is not None
    bb, bh, bk, warps = step_blocks(n_batch, n_hidden)
    grid = (cdiv(n_batch, bb), cdiv(n_hidden, bh))
    dot32 = _dot_fp32(gates.dtype, gates.device)
    if has_proj:
        pbb, pbh, pbk, pwarps = step_blocks(n_batch, n_state)
        pgrid = (cdiv(n_batch, pbb), cdiv(n_state, pbh))
    order = list(_time_order(n_steps, reverse))
    # the arguments that do not change from step to step, built once (see lstm_fwd)
    gv_strides = gv.stride()[:2] if has_proj else (0, 0)
    cell_args = (dy, dgates, w_hh, gv, w_hr, gates, cs, lengths, dcarry, dc,
                 *dy.stride()[:2], *dgates.stride()[:2], w_hh.stride(0), *gv_strides,
                 w_hr.stride(0) if has_proj else 0, *gates.stride()[:2], *cs.stride()[:2],
                 dcarry.stride(0), dc.stride(0), n_batch, n_hidden, n_state)
    cell = bind(_lstm_bwd_kernel, grid, *cell_args, BLOCK_B=bb, BLOCK_H=bh,
                BLOCK_K=_k_step(BWD_BLOCK_K, n_state if has_proj else n_gates),
                HAS_PROJ=has_proj, DOT_FP32=dot32, num_warps=warps)
    if has_proj:
        proj_args = (dy, dgates, w_hh, lengths, dcarry, gv, *dy.stride()[:2],
                     *dgates.stride()[:2], w_hh.stride(0), dcarry.stride(0), *gv_strides,
                     n_batch, n_hidden, n_state)
        proj = bind(_lstm_proj_bwd_kernel, pgrid, *proj_args, BLOCK_B=pbb, BLOCK_H=pbh,
                    BLOCK_K=pbk, DOT_FP32=dot32, num_warps=pwarps)
    for s in range(n_steps - 1, -1, -1):
        t = order[s]
        has_next = s < n_steps - 1
        # time of the step processed after this one in the forward, whose gate gradients
        # feed this one (unread on the first backward step, HAS_NEXT=False)
        t_next = order[s + 1] if has_next else t
        if has_proj:
            proj(t, t_next, HAS_NEXT=has_next)
        cell(s, t, t_next, HAS_NEXT=has_next)


def _state_and_weight_grads(dgates: torch.Tensor, dcarry: torch.Tensor, w_hh: torch.Tensor,
                            hs: torch.Tensor, gv: Optional[torch.Tensor], rs: torch.Tensor,
                            reverse: bool):
    """The end of every LSTM backward, plain or LayerNorm: (dh0, dW_hh, dW_hr).

    dgates: (T, B, 4H) gradients of the recurrent GEMM's output (the gate pre-activations, or
    the recurrent LayerNorm's input); dcarry (B, P) fp32: the state gradient carried past
    rows' lengths; hs: (T+1, B, P) states in processing order; gv: (T, B, P) the masked state
    gradients and rs: (T, B, H) the unprojected outputs, with a projection (gv None without:
    dW_hr is then empty)."""
    n_steps, _, n_gates = dgates.shape
    n_state = hs.shape[-1]
    # gradient w.r.t. h0: the first processed step's gradients through W_hh, plus the carry
    # of rows whose first step was past their length
    if n_steps > 0:
        first = _time_order(n_steps, reverse)[0]
        dh0 = dcarry + mm_fp32(dgates[first], w_hh)
    else:
        dh0 = dcarry
    # weight gradients: one GEMM each over all timesteps; h_{t-1} of time t is hs[s]
    h_prev = hs[:n_steps]
    if reverse:
        h_prev = h_prev.flip(0)
    # (fp32 results: cuBLAS's fp32 accumulator, not rounded to 16 bits first)
    dw_hh = mm_fp32(dgates.reshape(-1, n_gates).t(), h_prev.reshape(-1, n_state))
    if gv is not None:
        dw_hr = mm_fp32(gv.reshape(-1, n_state).t(), rs.reshape(-1, rs.shape[-1]))
    else:
        dw_hr = dgates.new_empty(0, dtype=torch.float32)
    return dh0, dw_hh, dw_hr


# The widest hidden size the LayerNorm-LSTM row kernels hold in registers (a program keeps
# a whole row: the 4H recurrent pre-activations and several H-wide vectors, in fp32).
LN_MAX_HIDDEN = 2048


# The time-looping LayerNorm-LSTM kernels give each program one batch row for the whole
# sequence and compute its recurrent projection as a GEMV, each program streaming all of W_hh
# (8 H^2 bytes in 16 bits) from L2 every step: up to this hidden size (512 KB a step) that
# is estimated to cost less than the per-step path's four launches (two cuBLAS GEMMs, two
# row kernels) a step. Not measured on a GPU yet: bench_lstm times both.
LN_PERSISTENT_MAX_HIDDEN = 256
# GEMV tile of the time-looping LayerNorm-LSTM kernels (gate rows x hidden columns)
LN_GEMV_BLOCK_N = 64
LN_GEMV_MAX_BLOCK_K = 64
LN_PERSISTENT_WARPS = 4


def use_ln_persistent(n_hidden: int, has_proj: bool) -> bool:
    """Whether the time-looping LayerNorm-LSTM kernels run this layer."""
    return not has_proj and n_hidden <= LN_PERSISTENT_MAX_HIDDEN


def ln_persistent_blocks(n_hidden: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, BLOCK_K, num_warps) of the time-looping LayerNorm-LSTM kernels."""
    block_h, warps = ln_row_block(n_hidden)
    block_k = min(LN_GEMV_MAX_BLOCK_K, block_h)
    return block_h, LN_GEMV_BLOCK_N, block_k, max(warps, LN_PERSISTENT_WARPS)


def ln_row_block(n_hidden: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps) of the LayerNorm-LSTM row kernels."""
    block_h = next_power_of_2(max(int(n_hidden), 16))
    # about 16 fp32 elements of each 4H row per thread, between 1 and 16 warps
    return block_h, min(max(block_h // 128, 1), 16)


@on_tensor_device
def ln_lstm_fwd(xg: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
                w_hr: Optional[torch.Tensor], g_hh: torch.Tensor, g_c: torch.Tensor,
                b_c: torch.Tensor, lengths: torch.Tensor, reverse: bool, eps: float,
                persistent: Optional[bool] = None):
    """Recurrence of one LayerNorm-LSTM layer and direction.

    Per step: rec = h @ W_hh^T (cuBLAS, one GEMM), then one row kernel fusing LN(rec) *
    g_hh + xg, the gates, the cell update, LN(c) * g_c + b_c, the output and length masking.
    With ``w_hr`` the row kernel writes the unprojected output r instead, then r @ W_hr^T
    (cuBLAS, one GEMM) and a row kernel that masks it by length into the state and y.
    ``persistent`` (no projection only; None picks with ``use_ln_persistent``): one launch
    for the whole sequence instead, a program per batch row computing rec as a GEMV. (The
    per-step loop is never replayed from a CUDA graph: see ``PER_STEP_CUDA_GRAPH``.)

    Args:
        xg: (T, B, 4H) LN(x @ W_ih^T) * g_ih + b_ih + b_hh; h0: (B, P), P = proj_size or H;
            c0: (B, H).
        w_hh: (4H, P); w_hr: (P, H) or None; g_hh: (4H,); g_c, b_c: (H,);
            lengths: (B,) int64 on xg's device.

    Returns:
        y (T, B, P), hs (T+1, B, P), cs (T+1, B, H) fp32 (processing order), gates and recs
        (T, B, 4H) fp32 (see the module docstring: not rounded to xg's dtype), stats
        (T, B, 4) fp32: (mean, rstd) of rec and of c per row, rs (T, B, H) the unprojected
        outputs, zero past each length (empty without w_hr).
    """
    n_steps, n_batch, n_gates = xg.shape
    n_hidden = n_gates // 4
    n_state = w_hh.shape[1]
    has_proj = w_hr is not None
    if n_hidden > LN_MAX_HIDDEN:
        raise ValueError(f"hidden size {n_hidden} exceeds the LayerNorm-LSTM kernel's limit "
                         f"{LN_MAX_HIDDEN}; use backend='torch'")
    dev, dt = xg.device, xg.dtype
    # the row kernels index these with unit element stride
    xg, lengths = xg.contiguous(), lengths.contiguous()
    g_hh, g_c, b_c = g_hh.contiguous(), g_c.contiguous(), b_c.contiguous()
    if persistent is None:
        persistent = use_ln_persistent(n_hidden, has_proj)
    y, hs, cs, gates, recs, stats, rs = _ln_lstm_fwd_buffers(n_steps, n_batch, n_hidden,
                                                             n_state, has_proj, dt, dev)
    hs[0] = h0
    cs[0] = c0
    if n_steps == 0 or n_batch == 0:
        return y, hs, cs, gates, recs, stats, rs
    if persistent:
        if has_proj:
            raise ValueError("the time-looping LayerNorm-LSTM kernel has no projection")
        w_hh = w_hh.contiguous()
        bh, bn, bk, pw = ln_persistent_blocks(n_hidden)
        launch(
            _ln_lstm_fwd_persistent_kernel, (n_batch,),
            xg, hs, cs, w_hh, g_hh, g_c, b_c, lengths, y, gates, recs, stats,
            xg.stride(0), xg.stride(1), hs.stride(0), cs.stride(0), y.stride(0), hs.stride(1),
            stats.stride(0), w_hh.stride(0), n_hidden, n_steps, float(eps),
            BLOCK_H=bh, BLOCK_N=bn, BLOCK_K=bk, REVERSE=bool(reverse), num_warps=pw)
        return y, hs, cs, gates, recs, stats, rs
    _ln_lstm_fwd_steps(xg, w_hh, w_hr, g_hh, g_c, b_c, lengths, y, hs, cs, gates, recs, stats,
                       rs, reverse, eps)
    return y, hs, cs, gates, recs, stats, rs


def _ln_lstm_fwd_buffers(n_steps, n_batch, n_hidden, n_state, has_proj, dt, dev):
    """y, hs, cs, gates, recs, stats, rs of ``ln_lstm_fwd`` (uninitialized)."""
    n_gates = 4 * n_hidden
    hs = torch.empty((n_steps + 1, n_batch, n_state), dtype=dt, device=dev)
    cs = torch.empty((n_steps + 1, n_batch, n_hidden), dtype=torch.float32, device=dev)
    y = torch.empty((n_steps, n_batch, n_state), dtype=dt, device=dev)
    gates = torch.empty((n_steps, n_batch, n_gates), dtype=torch.float32, device=dev)
    recs = torch.empty((n_steps, n_batch, n_gates), dtype=torch.float32, device=dev)
    stats = torch.empty((n_steps, n_batch, 4), dtype=torch.float32, device=dev)
    rs = (torch.empty((n_steps, n_batch, n_hidden), dtype=dt, device=dev) if has_proj
          else y.new_empty(0))
    return y, hs, cs, gates, recs, stats, rs


def _ln_lstm_fwd_steps(xg, w_hh, w_hr, g_hh, g_c, b_c, lengths, y, hs, cs, gates, recs, stats,
                       rs, reverse, eps):
    """Enqueue the per-step LayerNorm-LSTM forward (buffers as ``ln_lstm_fwd`` returns them,
    hs[0] and cs[0] holding the initial state): per step one GEMM and one row kernel, plus
    one GEMM and one row kernel with ``w_hr``."""
    n_steps, n_batch, n_gates = xg.shape
    n_hidden = n_gates // 4
    n_state = w_hh.shape[1]
    has_proj = w_hr is not None
    block_h, warps = ln_row_block(n_hidden)
    w_t = w_hh.t()
    # without a projection the row kernel writes the new state and y itself
    out = rs if has_proj else y
    # the step-invariant launch arguments, built once; per-step views only for the GEMMs
    # (unbind makes them all in one call). recs, xg and gates share their strides, and so
    # do the H-wide rows of cs and out (all allocated contiguous here).
    row = bind(_ln_lstm_fwd_kernel, (n_batch,), recs, xg, hs, cs, g_hh, g_c, b_c, lengths,
               out, gates, stats, recs.stride(0), recs.stride(1), hs.stride(0), cs.stride(0),
               out.stride(0), cs.stride(1), stats.stride(0), n_hidden, BLOCK_H=block_h,
               HAS_PROJ=has_proj, num_warps=warps)
    hs_v, recs_v = hs.unbind(0), recs.unbind(0)
    if has_proj:
        w_hr_t = w_hr.t()
        block_p, pwarps = ln_row_block(n_state)
        proj = bind(_ln_lstm_proj_fwd_kernel, (n_batch,), hs, lengths, y, hs.stride(0),
                    y.stride(0), hs.stride(1), n_state, BLOCK_P=block_p, num_warps=pwarps)
        rs_v = rs.unbind(0)
    for s, t in enumerate(_time_order(n_steps, reverse)):
        mm_fp32(hs_v[s], w_t, recs_v[t])
        row(s, t, float(eps))
        if has_proj:
            torch.mm(rs_v[t], w_hr_t, out=hs_v[s + 1])
            proj(s, t)


@on_tensor_device
def ln_lstm_bwd(dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, w_hh: torch.Tensor,
                w_hr: Optional[torch.Tensor], g_hh: torch.Tensor, g_c: torch.Tensor,
                b_c: torch.Tensor, lengths: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor,
                gates: torch.Tensor, recs: torch.Tensor, stats: torch.Tensor, rs: torch.Tensor,
                reverse: bool, persistent: Optional[bool] = None):
    """Backward of ``ln_lstm_fwd``: per step one row kernel (gate, cell-LayerNorm and
    recurrent-LayerNorm gradients) and one GEMM (drec @ W_hh); with ``w_hr`` first a row
    kernel masking the state gradient by length and a GEMM (dh @ W_hr). ``persistent`` as
    in ``ln_lstm_fwd`` (one launch, the GEMM as a per-row GEMV).

    Args:
        dy: (T, B, P) gradient of y; dh_n: (B, P), dc_n: (B, H) gradients of the final state.
        the rest: as passed to / returned by ``ln_lstm_fwd``.

    Returns:
        dxg (T, B, 4H), dh0 (B, P) and dc0 (B, H) fp32, dw_hh (4H, P), dw_hr (P, H) (empty
        without w_hr), dg_hh (4H,), dg_c and db_c (H,), the last five fp32.
    """
    n_steps, n_batch, n_gates = gates.shape
    n_hidden = n_gates // 4
    n_state = w_hh.shape[1]
    has_proj = w_hr is not None
    # the input dtype (gates and recs are fp32 whatever it is)
    dev, dt = hs.device, hs.dtype
    dy, lengths = dy.contiguous(), lengths.contiguous()
    g_hh, g_c, b_c = g_hh.contiguous(), g_c.contiguous(), b_c.contiguous()
    if persistent is None:
        persistent = use_ln_persistent(n_hidden, has_proj)
    if persistent and has_proj:
        raise ValueError("the time-looping LayerNorm-LSTM kernel has no projection")
    dxg, drec, dh_mm, dg_hh_acc, dgb_c_acc, gv, dr = _ln_lstm_bwd_buffers(
        n_steps, n_batch, n_hidden, n_state, has_proj, dt, dev)
    dcarry = dh_n.to(torch.float32).contiguous().clone()
    dc = dc_n.to(torch.float32).contiguous().clone()
    if n_steps > 0 and n_batch > 0 and persistent:
        w_hh = w_hh.contiguous()
        bh, bn, bk, pw = ln_persistent_blocks(n_hidden)
        dh_scratch = torch.empty((n_batch, n_hidden), dtype=torch.float32, device=dev)
        # the kernel indexes the (T, B, 4H) buffers with one pair of strides and the rows
        # of H (cs, dy, dcarry, dc, the scratch) with one row stride: all are contiguous
        launch(
            _ln_lstm_bwd_persistent_kernel, (n_batch,),
            dy, recs, gates, cs, stats, w_hh, g_hh, g_c, b_c, lengths, dcarry, dc, dxg,
            drec, dh_scratch, dg_hh_acc, dgb_c_acc,
            dxg.stride(0), dxg.stride(1), cs.stride(0), dy.stride(0), cs.stride(1),
            stats.stride(0), w_hh.stride(0), n_hidden, n_steps,
            BLOCK_H=bh, BLOCK_N=bn, BLOCK_K=bk, REVERSE=bool(reverse), num_warps=pw)
    elif n_steps > 0 and n_batch > 0:
        _ln_lstm_bwd_steps(dy, w_hh, w_hr, g_hh, g_c, b_c, lengths, cs, gates, recs, stats,
                           dcarry, dc, dxg, drec, dh_mm, dg_hh_acc, dgb_c_acc, gv, dr,
                           reverse)
    dh0, dw_hh, dw_hr = _state_and_weight_grads(drec, dcarry, w_hh, hs, gv if has_proj else None,
                                                rs, reverse)
    acc = dgb_c_acc.view(n_batch, 2, n_hidden)
    return (dxg, dh0, dc, dw_hh, dw_hr, dg_hh_acc.sum(0), acc[:, 0].sum(0),
            acc[:, 1].sum(0))


def _ln_lstm_bwd_buffers(n_steps, n_batch, n_hidden, n_state, has_proj, dt, dev):
    """dxg, drec, dh_mm, dg_hh_acc, dgb_c_acc, gv, dr of ``ln_lstm_bwd`` (the two
    accumulators zero, the rest uninitialized; gv and dr None without a projection)."""
    n_gates = 4 * n_hidden
    dxg = torch.empty((n_steps, n_batch, n_gates), dtype=dt, device=dev)
    # drec in the input dtype: it is an operand of the GEMMs drec @ W_hh and dW_hh
    drec = torch.empty((n_steps, n_batch, n_gates), dtype=dt, device=dev)
    # the per-step GEMM results the row kernels read, fp32 (see the module docstring)
    dh_mm = torch.empty((n_batch, n_state), dtype=torch.float32, device=dev)
    dg_hh_acc = torch.zeros((n_batch, n_gates), dtype=torch.float32, device=dev)
    dgb_c_acc = torch.zeros((n_batch, 2 * n_hidden), dtype=torch.float32, device=dev)
    gv = dr = None
    if has_proj:
        # gv: the state gradients masked by length (kept for dW_hr); dr = gv @ W_hr
        gv = torch.empty((n_steps, n_batch, n_state), dtype=dt, device=dev)
        dr = torch.empty((n_batch, n_hidden), dtype=torch.float32, device=dev)
    return dxg, drec, dh_mm, dg_hh_acc, dgb_c_acc, gv, dr


def _ln_lstm_bwd_steps(dy, w_hh, w_hr, g_hh, g_c, b_c, lengths, cs, gates, recs, stats, dcarry,
                       dc, dxg, drec, dh_mm, dg_hh_acc, dgb_c_acc, gv, dr, reverse):
    """Enqueue the per-step LayerNorm-LSTM backward (buffers as in ``ln_lstm_bwd``; dcarry
    and dc hold the final state's gradients and are updated in place, the accumulators are
    added to), from the last processed step back."""
    n_steps, n_batch, n_gates = gates.shape
    n_hidden = n_gates // 4
    n_state = w_hh.shape[1]
    has_proj = w_hr is not None
    order = list(_time_order(n_steps, reverse))
    block_h, warps = ln_row_block(n_hidden)
    if has_proj:
        block_p, pwarps = ln_row_block(n_state)
    # step-invariant launch arguments built once (see ln_lstm_fwd); recs, gates, dxg and
    # drec share their strides, and so do the H-wide rows of cs, dy, dcarry and dc
    row = bind(_ln_lstm_bwd_kernel, (n_batch,), dr if has_proj else dh_mm, dy, recs, gates,
               cs, stats, g_hh, g_c, b_c, lengths, dcarry, dc, dxg, drec, dg_hh_acc,
               dgb_c_acc, recs.stride(0), recs.stride(1), dy.stride(0), cs.stride(0),
               cs.stride(1), stats.stride(0), n_hidden, BLOCK_H=block_h, HAS_PROJ=has_proj,
               num_warps=warps)
    drec_v = drec.unbind(0)
    if has_proj:
        proj = bind(_ln_lstm_proj_bwd_kernel, (n_batch,), dh_mm, dy, lengths, dcarry, gv,
                    dy.stride(0), gv.stride(0), gv.stride(1), n_state, BLOCK_P=block_p,
                    num_warps=pwarps)
        gv_v = gv.unbind(0)
    for s in range(n_steps - 1, -1, -1):
        t = order[s]
        has_next = s < n_steps - 1
        if has_next:
            mm_fp32(drec_v[order[s + 1]], w_hh, dh_mm)
        if has_proj:
            proj(t, HAS_NEXT=has_next)
            mm_fp32(gv_v[t], w_hr, dr)
        # with a projection HAS_NEXT is unused by the row kernel: one variant
        row(s, t, HAS_NEXT=has_next and not has_proj)


def aot_configs():
    """Every block config of the LSTM step kernels in fp32 and bf16, projection on and off,
    one fp16 config; the time-looping kernels at every column block in bf16 (both
    directions), fp16 and fp32; every LayerNorm-LSTM row block in bf16 and the smallest and
    largest in fp32, projection on and off, with the projection row kernels; the
    time-looping LayerNorm-LSTM kernels at three hidden sizes like the plain ones."""
    def sig(ptrs, ints, consts):
        out = dict(ptrs)
        out.update({n: "i32" for n in ints})
        out.update({n: "constexpr" for n in consts})
        return out

    def fwd_sig(dt):
        return sig({"xg_ptr": f"*{dt}", "hs_ptr": f"*{dt}", "cs_ptr": "*fp32",
                    "w_hh_ptr": f"*{dt}", "len_ptr": "*i64", "out_ptr": f"*{dt}",
                    "gates_ptr": f"*{dt}"},
                   ["stride_xg_t", "stride_xg_b", "stride_hs_s", "stride_h_b", "stride_cs_s",
                    "stride_c_b", "stride_w_row", "stride_out_t", "stride_out_b",
                    "stride_gates_t", "stride_gates_b", "n_batch", "n_hidden", "n_state",
                    "s", "t"],
                   ["BLOCK_B", "BLOCK_H", "BLOCK_K", "HAS_PROJ", "DOT_FP32"])

    def bwd_sig(dt):
        return sig({"dy_ptr": f"*{dt}", "dg_ptr": f"*{dt}", "w_hh_ptr": f"*{dt}",
                    "gv_ptr": f"*{dt}", "w_hr_ptr": f"*{dt}", "gates_ptr": f"*{dt}",
                    "cs_ptr": "*fp32", "len_ptr": "*i64", "dcarry_ptr": "*fp32",
                    "dc_ptr": "*fp32"},
                   ["stride_dy_t", "stride_dy_b", "stride_dg_t", "stride_dg_b", "stride_w_row",
                    "stride_gv_t", "stride_gv_b", "stride_wr_row", "stride_gates_t",
                    "stride_gates_b", "stride_cs_s", "stride_c_b", "stride_dcarry_b",
                    "stride_dc_b", "n_batch", "n_hidden", "n_proj", "s", "t", "t_next"],
                   ["BLOCK_B", "BLOCK_H", "BLOCK_K", "HAS_NEXT", "HAS_PROJ", "DOT_FP32"])

    def pfwd_sig(dt):
        return sig({"rs_ptr": f"*{dt}", "w_hr_ptr": f"*{dt}", "hs_ptr": f"*{dt}",
                    "len_ptr": "*i64", "ys_ptr": f"*{dt}"},
                   ["stride_r_t", "stride_r_b", "stride_w_row", "stride_hs_s", "stride_h_b",
                    "stride_y_t", "stride_y_b", "n_batch", "n_hidden", "n_proj", "s", "t"],
                   ["BLOCK_B", "BLOCK_H", "BLOCK_K", "DOT_FP32"])

    def pbwd_sig(dt):
        return sig({"dys_ptr": f"*{dt}", "dg_ptr": f"*{dt}", "w_hh_ptr": f"*{dt}",
                    "len_ptr": "*i64", "dcarry_ptr": "*fp32", "gvs_ptr": f"*{dt}"},
                   ["stride_dy_t", "stride_dy_b", "stride_dg_t", "stride_dg_b", "stride_w_row",
                    "stride_dcarry_b", "stride_gv_t", "stride_gv_b", "n_batch", "n_hidden",
                    "n_proj", "t", "t_next"],
                   ["BLOCK_B", "BLOCK_H", "BLOCK_K", "HAS_NEXT", "DOT_FP32"])

    def ln_fwd_sig(dt):
        return sig({"recs_ptr": "*fp32", "xg_ptr": f"*{dt}", "hs_ptr": f"*{dt}",
                    "cs_ptr": "*fp32", "g_hh_ptr": f"*{dt}", "g_c_ptr": f"*{dt}",
                    "b_c_ptr": f"*{dt}", "len_ptr": "*i64", "out_ptr": f"*{dt}",
                    "gates_ptr": "*fp32", "stats_ptr": "*fp32"},
                   ["stride_g_t", "stride_b", "stride_h_s", "stride_c_s", "stride_out_t",
                    "stride_c_b", "stride_stats_t", "n_hidden", "s", "t"],
                   []) | {"eps": "fp32", "BLOCK_H": "constexpr", "HAS_PROJ": "constexpr"}

    def ln_bwd_sig(dt):
        return sig({"dh_mm_ptr": "*fp32", "dy_ptr": f"*{dt}", "recs_ptr": "*fp32",
                    "gates_ptr": "*fp32", "cs_ptr": "*fp32", "stats_ptr": "*fp32",
                    "g_hh_ptr": f"*{dt}", "g_c_ptr": f"*{dt}", "b_c_ptr": f"*{dt}",
                    "len_ptr": "*i64", "dcarry_ptr": "*fp32", "dc_ptr": "*fp32",
                    "dxg_ptr": f"*{dt}", "drec_ptr": f"*{dt}", "dg_hh_acc_ptr": "*fp32",
                    "dgb_c_acc_ptr": "*fp32"},
                   ["stride_g_t", "stride_b", "stride_dy_t", "stride_c_s", "stride_c_b",
                    "stride_stats_t", "n_hidden", "s", "t"],
                   ["BLOCK_H", "HAS_NEXT", "HAS_PROJ"])

    def ln_pfwd_sig(dt):
        return sig({"hs_ptr": f"*{dt}", "len_ptr": "*i64", "ys_ptr": f"*{dt}"},
                   ["stride_h_s", "stride_y_t", "stride_b", "n_proj", "s", "t"], ["BLOCK_P"])

    def ln_pbwd_sig(dt):
        return sig({"dh_mm_ptr": "*fp32", "dys_ptr": f"*{dt}", "len_ptr": "*i64",
                    "dcarry_ptr": "*fp32", "gvs_ptr": f"*{dt}"},
                   ["stride_dy_t", "stride_gv_t", "stride_b", "n_proj", "t"],
                   ["BLOCK_P", "HAS_NEXT"])

    def step(dt, bb, bh, bk, warps, projs):
        blocks = dict(BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, DOT_FP32=False)
        tag = f"{dt},{bb}x{bh}x{bk}"
        for proj in projs:
            yield AotConfig(_lstm_fwd_kernel, fwd_sig(dt), dict(blocks, HAS_PROJ=proj), warps,
                            name=f"lstm_fwd[{tag},proj={proj}]")
            # HAS_NEXT=False only drops the GEMM loop; compile the full variant
            yield AotConfig(_lstm_bwd_kernel, bwd_sig(dt), dict(blocks, HAS_PROJ=proj, HAS_NEXT=True),
                            warps, name=f"lstm_bwd[{tag},proj={proj}]")
        if True in projs:
            yield AotConfig(_lstm_proj_fwd_kernel, pfwd_sig(dt), blocks, warps,
                            name=f"lstm_proj_fwd[{tag}]")
            yield AotConfig(_lstm_proj_bwd_kernel, pbwd_sig(dt), dict(blocks, HAS_NEXT=True),
                            warps, name=f"lstm_proj_bwd[{tag}]")

    for bb, bh, bk, warps in step_block_configs():
        yield from step("fp32", bb, bh, bk, warps, (False, True))
        yield from step("bf16", bb, bh, bk, warps, (False, True))
    yield from step("fp16", *step_blocks(16, 1024), (False,))
    # the opt-in tile variants (FWD_BLOCK_K / BWD_BLOCK_K 128, FWD_NARROW_WARPS) in bf16
    for bb, bh, bk, warps in step_block_configs():
        blocks = dict(BLOCK_B=bb, BLOCK_H=bh, DOT_FP32=False)
        for fk, fw in ((128, warps), (bk, min(max(bb * bh // 256, 2), 8)),
                       (128, min(max(bb * bh // 256, 2), 8))):
            yield AotConfig(_lstm_fwd_kernel, fwd_sig("bf16"),
                            dict(blocks, BLOCK_K=fk, HAS_PROJ=False), fw,
                            name=f"lstm_fwd[bf16,{bb}x{bh}x{fk},w{fw},variant]")
        yield AotConfig(_lstm_bwd_kernel, bwd_sig("bf16"),
                        dict(blocks, BLOCK_K=128, HAS_PROJ=False, HAS_NEXT=True), warps,
                        name=f"lstm_bwd[bf16,{bb}x{bh}x128,variant]")

    def persistent_sig(dt, kind):
        if kind == "fwd":
            names = ["xg_ptr", "hs_ptr", "cs_ptr", "w_hh_ptr", "len_ptr", "y_ptr", "gates_ptr"]
            types = [f"*{dt}", f"*{dt}", "*fp32", f"*{dt}", "*i64", f"*{dt}", f"*{dt}"]
            strides = ["stride_xg_t", "stride_xg_b", "stride_hs_s", "stride_h_b", "stride_cs_s",
                       "stride_c_b", "stride_w_row", "stride_y_t", "stride_y_b",
                       "stride_gates_t", "stride_gates_b"]
        else:
            names = ["dy_ptr", "w_hh_ptr", "gates_ptr", "cs_ptr", "len_ptr", "dcarry_ptr",
                     "dc_ptr", "dg_ptr"]
            types = [f"*{dt}", f"*{dt}", f"*{dt}", "*fp32", "*i64", "*fp32", "*fp32", f"*{dt}"]
            strides = ["stride_dy_t", "stride_dy_b", "stride_dg_t", "stride_dg_b", "stride_w_row",
                       "stride_gates_t", "stride_gates_b", "stride_cs_s", "stride_c_b",
                       "stride_dcarry_b", "stride_dc_b"]
        sig = dict(zip(names, types))
        sig.update({n: "i32" for n in strides + ["n_batch", "n_hidden", "n_steps"]})
        sig.update({n: "constexpr" for n in ("BLOCK_B", "BLOCK_H", "BLOCK_K", "REVERSE", "DOT_FP32")})
        return sig

    for n_hidden in (16, 32, PERSISTENT_MAX_HIDDEN):
        bb, bh, bk, warps = persistent_blocks(n_hidden)
        for dt, reverses in (("bf16", (False, True)), ("fp16", (False,)), ("fp32", (False,))):
            for rev in reverses:
                cx = dict(BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, REVERSE=rev, DOT_FP32=False)
                yield AotConfig(_lstm_fwd_persistent_kernel, persistent_sig(dt, "fwd"), cx, warps,
                                name=f"lstm_fwd_persistent[{dt},{bb}x{bh},reverse={rev}]")
                yield AotConfig(_lstm_bwd_persistent_kernel, persistent_sig(dt, "bwd"), cx, warps,
                                name=f"lstm_bwd_persistent[{dt},{bb}x{bh},reverse={rev}]")

    def coop_sig(dt, kind, kern):
        types = persistent_sig(dt, kind) | {"count_ptr": "*i32", "step_begin": "i32",
                                            "step_end": "i32", "max_spins": "i32",
                                            "SYNC": "constexpr", "RESIDENT": "constexpr"}
        return {n: types[n] for n in kern.arg_names}  # the kernel's argument order

    # the cooperative time loop takes the per-step tiles (coop_blocks widens within them)
    coop = [(dt, blocks, rev) for blocks in step_block_configs() for dt, rev in
            (("bf16", False), ("fp32", False))]
    coop += [("bf16", step_blocks(64, 512), True), ("fp16", step_blocks(64, 512), False)]
    for dt, (bb, bh, bk, warps), rev in coop:
        cx = dict(BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, REVERSE=rev, SYNC=True, RESIDENT=False,
                  DOT_FP32=False)
        for kind, kern in (("fwd", _lstm_fwd_coop_kernel), ("bwd", _lstm_bwd_coop_kernel)):
            yield AotConfig(kern, coop_sig(dt, kind, kern), cx, warps,
                            name=f"lstm_{kind}_coop[{dt},{bb}x{bh},reverse={rev}]")
    # COOP_RESIDENT_W (opt-in): the resident kernels the launchers pick at bench_lstm's
    # shapes on 108 SMs (A100) and 132 (H100 SXM / H200), in both 16-bit dtypes, plus small
    # hidden sizes (K at its floor) and fp32 at its largest resident K
    shapes = [(b, h, sms) for b in (16, 64, 256) for h in (256, 512) for sms in (108, 132)]
    shapes += [(5, 8, 132), (64, 64, 132)]
    seen = set()
    for n_batch, n_hidden, sms in shapes:
        blocks = coop_blocks(n_batch, n_hidden, sms)
        if blocks is None:
            continue
        bb, bh, _, warps = blocks
        for dt, size in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
            for kind, kern in (("fwd", _lstm_fwd_coop_kernel), ("bwd", _lstm_bwd_coop_kernel)):
                bk = resident_k(kind, n_hidden)
                fits = resident_bytes(kind, n_hidden, bb, bh, size) <= COOP_RESIDENT_MAX_BYTES
                if not fits or (size > 2 and kind == "fwd" and bk > RESIDENT_FP32_MAX_K) \
                        or (dt, kind, bb, bh, bk) in seen:
                    continue
                seen.add((dt, kind, bb, bh, bk))
                cx = dict(BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, REVERSE=False, SYNC=True,
                          RESIDENT=True, DOT_FP32=False)
                yield AotConfig(kern, coop_sig(dt, kind, kern), cx,
                                fwd_step_warps(bb, bh) if kind == "fwd" else warps,
                                name=f"lstm_{kind}_coop[{dt},{bb}x{bh}x{bk},resident]")

    def ln_persistent_sig(dt, kind):
        if kind == "fwd":
            ptrs = {"xg_ptr": f"*{dt}", "hs_ptr": f"*{dt}", "cs_ptr": "*fp32",
                    "w_hh_ptr": f"*{dt}", "g_hh_ptr": f"*{dt}", "g_c_ptr": f"*{dt}",
                    "b_c_ptr": f"*{dt}", "len_ptr": "*i64", "y_ptr": f"*{dt}",
                    "gates_ptr": "*fp32", "recs_ptr": "*fp32", "stats_ptr": "*fp32"}
            ints = ["stride_g_t", "stride_g_b", "stride_h_s", "stride_c_s", "stride_y_t",
                    "stride_row", "stride_stats_t", "stride_w_row", "n_hidden", "n_steps"]
            out = sig(ptrs, ints, [])
            out["eps"] = "fp32"
        else:
            ptrs = {"dy_ptr": f"*{dt}", "recs_ptr": "*fp32", "gates_ptr": "*fp32",
                    "cs_ptr": "*fp32", "stats_ptr": "*fp32", "w_hh_ptr": f"*{dt}",
                    "g_hh_ptr": f"*{dt}", "g_c_ptr": f"*{dt}", "b_c_ptr": f"*{dt}",
                    "len_ptr": "*i64", "dcarry_ptr": "*fp32", "dc_ptr": "*fp32",
                    "dxg_ptr": f"*{dt}", "drec_ptr": f"*{dt}", "dh_mm_ptr": "*fp32",
                    "dg_hh_acc_ptr": "*fp32", "dgb_c_acc_ptr": "*fp32"}
            ints = ["stride_g_t", "stride_g_b", "stride_c_s", "stride_dy_t", "stride_row",
                    "stride_stats_t", "stride_w_row", "n_hidden", "n_steps"]
            out = sig(ptrs, ints, [])
        out.update({n: "constexpr" for n in ("BLOCK_H", "BLOCK_N", "BLOCK_K", "REVERSE")})
        return out

    # 512: bench_lstm forces the time loop there to place LN_PERSISTENT_MAX_HIDDEN
    for n_hidden in (16, 64, LN_PERSISTENT_MAX_HIDDEN, 512):
        bh, bn, bk, warps = ln_persistent_blocks(n_hidden)
        for dt, reverses in (("bf16", (False, True)), ("fp16", (False,)), ("fp32", (False,))):
            for rev in reverses:
                cx = dict(BLOCK_H=bh, BLOCK_N=bn, BLOCK_K=bk, REVERSE=rev)
                for kind, kern in (("fwd", _ln_lstm_fwd_persistent_kernel),
                                   ("bwd", _ln_lstm_bwd_persistent_kernel)):
                    yield AotConfig(kern, ln_persistent_sig(dt, kind), cx, warps,
                                    name=f"ln_lstm_{kind}_persistent[{dt},{bh},reverse={rev}]")

    ln_blocks = []
    n = 16
    while n <= LN_MAX_HIDDEN:
        ln_blocks.append(ln_row_block(n))
        n *= 2
    for dt, blocks in (("bf16", ln_blocks), ("fp32", [ln_blocks[0], ln_blocks[-1]])):
        for block_h, warps in blocks:
            for proj in (False, True):
                tag = f"{dt},{block_h},proj={proj}"
                yield AotConfig(_ln_lstm_fwd_kernel, ln_fwd_sig(dt),
                                dict(BLOCK_H=block_h, HAS_PROJ=proj), warps,
                                name=f"ln_lstm_fwd[{tag}]")
                yield AotConfig(_ln_lstm_bwd_kernel, ln_bwd_sig(dt),
                                dict(BLOCK_H=block_h, HAS_NEXT=not proj, HAS_PROJ=proj), warps,
                                name=f"ln_lstm_bwd[{tag}]")
            # the projection row kernels take ln_row_block(proj_size): the same blocks
            yield AotConfig(_ln_lstm_proj_fwd_kernel, ln_pfwd_sig(dt), dict(BLOCK_P=block_h),
                            warps, name=f"ln_lstm_proj_fwd[{dt},{block_h}]")
            yield AotConfig(_ln_lstm_proj_bwd_kernel, ln_pbwd_sig(dt),
                            dict(BLOCK_P=block_h, HAS_NEXT=True), warps,
                            name=f"ln_lstm_proj_bwd[{dt},{block_h}]")
