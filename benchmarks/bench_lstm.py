"""Benchmark fastbert.nn.LSTM (fused Triton recurrence) against torch.nn.LSTM (cuDNN).

    python -m benchmarks.bench_lstm [--quick] [--device cuda] [--no-write]

Every case is forward + backward (gradients of the input and every parameter) in bf16:
- Padded input: batch {16, 64, 256} x hidden {256, 512, 1024} x seq {64, 256}, one
  unidirectional layer (input size = hidden); 2-layer bidirectional, 1-layer bidirectional
  and 2-layer unidirectional at batch 64 for every hidden x seq (the last two after the
  other cases). fastbert vs cuDNN. Target: <= 1.25x cuDNN's time.
- Variable length (lengths uniform in [seq/4, seq], batch 64, 1 layer): fastbert with a
  PackedSequence vs fastbert on the padded batch, and cuDNN packed vs cuDNN padded.
  Target: fastbert packed <= 1.1x fastbert padded. The PackedSequence is the timed call's
  input (built once, outside it): torch's pack_padded_sequence, a copy per time step forward
  and backward whichever LSTM follows, is not timed (until 2026-11-26 it was: the H200
  results before then include it).
- LayerNormLSTM (batch 64, seq 64, hidden 256 and 512): fastbert.nn.LayerNormLSTM (one
  time-looping launch up to hidden 256; above, a cuBLAS recurrent GEMM + one fused row kernel
  per step; on CUDA the other of the two is timed too) vs an eager PyTorch LayerNorm-LSTM.
  Target >= 3x.

On CUDA, fastbert's per-step and time-looping recurrences are also timed against each other
(hidden 256-1024, batch 16 and 64), to place ``PERSISTENT_MAX_HIDDEN`` from measurements.
The padded cases also time both LSTMs replayed from CUDA graphs
(``torch.cuda.make_graphed_callables``): the gap to the plain call is launch overhead. And
``fastbert_triton_step_graph``: fastbert's own CUDA-graph mode (kernels/lstm.py
``PER_STEP_CUDA_GRAPH``, off by default), with the per-step path forced at every hidden size
(``PERSISTENT_MAX_HIDDEN`` = 0), the cooperative loop off. Its captures
happen in the untimed first call and their static buffers stay in the mode's cache, so its
peak_mb leaves them out. The time-loop case times the mode too.
``fastbert_triton`` is the default path: on a GPU the cooperative time loop (kernels/lstm.py
``COOP_TIME_LOOP``, the 16-bit default since the H200 run of 2026-11-28), one launch per
layer and direction with a grid barrier a step, where it fits one program per SM (hidden <= 1024);
there ``fastbert_triton_no_coop`` times the path without it (per-step / time-looping), and
``coop`` in the time-loop case times it against those;
``fastbert_triton_coop_resident`` (``coop_resident``): the same with each program's W_hh slice
loaded once and kept on chip (``COOP_RESIDENT_W``, off by default), where it fits and up to
hidden ``COOP_RESIDENT_MAX_HIDDEN`` (256).
``fastbert_triton_tiles`` / ``_tiles_b64`` (hidden > ``PERSISTENT_MAX_HIDDEN``): the per-step
path with the opt-in tile variants (kernels/lstm.py ``FWD_BLOCK_K``, ``BWD_BLOCK_K``,
``FWD_NARROW_WARPS``; ``MAX_STEP_BLOCK_B`` 64), the cooperative loop off;
``fastbert_triton_coop_tiles``: the cooperative loop with K = 128 tiles (``FWD_BLOCK_K``,
``BWD_BLOCK_K``).
``fastbert_triton_per_step`` (hidden <= ``PERSISTENT_MAX_HIDDEN``, where the default is the
time-looping kernel): the plain per-step loop, whose per-step launches became cheap
(kernels/_launch.py) after the last measurement placed that threshold. One case
per target runs first, then the rest of the grid (``make gpu-check`` may stop a script
part-way).

FLOPs: 2 * T * B * 4H * (I + H) per layer and direction forward (input and recurrent GEMMs),
3x that for forward + backward. The full grid is trimmed (more than one layer or direction
only at batch 64) to stay near a minute or two on an H100.

On CPU (CI smoke test) only the PyTorch paths run, on tiny shapes.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from benchmarks._harness import Case, main_for, with_setting
from fastbert.nn import LSTM, LayerNormLSTM

# fwd + bwd = 3x the forward's GEMM FLOPs (the backward computes dX-side and dW-side GEMMs)
FWD_BWD_FLOP_RATIO = 3


def _flops(seq, batch, n_in, hidden, layers, dirs):
    total, layer_in = 0, n_in
    for _ in range(layers):
        total += dirs * 2 * seq * batch * 4 * hidden * (layer_in + hidden)
        layer_in = hidden * dirs
    return FWD_BWD_FLOP_RATIO * total


def _lazy(build: Callable[[], Callable[[], object]]) -> Callable[[], object]:
    """Allocate a case's model and inputs on its first call, not when cases are listed."""
    state: Dict[str, Callable] = {}

    def run():
        if "fn" not in state:
            state["fn"] = build()
        return state["fn"]()
    return run


def _fwd_bwd(model, x, lengths=None, packed=False):
    """Forward + backward of ``model`` on ``x`` (T, B, I), or, with ``packed``, on the
    PackedSequence of ``x`` cut to ``lengths``, built once outside the timed call with its
    ``data`` as the input leaf: the time is the LSTM's own handling of a PackedSequence (the
    user's input), not torch's pack_padded_sequence, whose forward and backward loop over the
    time steps (a copy per step each, ~2T small ops, as much for cuDNN as for us)."""
    params = list(model.parameters())
    if packed:
        p = pack_padded_sequence(x, lengths, enforce_sorted=False)
        leaf = p.data.detach().requires_grad_()
        inp = PackedSequence(leaf, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
    else:
        leaf = inp = x.requires_grad_()

    def run():
        out, (h, c) = model(inp)
        out = out.data if packed else out
        return torch.autograd.grad(out.float().sum() + h.float().sum(), [leaf] + params)
    return run


class _Flat(torch.nn.Module):
    """(output, (h_n, c_n)) -> (output, h_n, c_n), the flat outputs CUDA-graph capture takes."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return out, h, c


def _graphed_fwd_bwd(model, x):
    """Forward + backward of ``model`` captured once in CUDA graphs
    (``torch.cuda.make_graphed_callables``) and replayed on each call."""
    params = list(model.parameters())
    graphed = torch.cuda.make_graphed_callables(_Flat(model), (x,))

    def run():
        out, h, c = graphed(x)
        return torch.autograd.grad(out.float().sum() + h.float().sum(), [x] + params)
    return run


def _padded_case(device, dtype, batch, hidden, seq, layers, dirs):
    kw = dict(num_layers=layers, bidirectional=dirs == 2)

    def build(impl):
        def make():
            torch.manual_seed(0)
            x = torch.randn(seq, batch, hidden, device=device, dtype=dtype)
            if impl == "cudnn":
                model = torch.nn.LSTM(hidden, hidden, **kw).to(device, dtype)
            else:
                model = LSTM(hidden, hidden, **kw, backend=impl.split("_")[1]).to(device, dtype)
            return _fwd_bwd(model, x)
        return _lazy(make)

    def build_graphed(impl):
        def make():
            torch.manual_seed(0)
            x = torch.randn(seq, batch, hidden, device=device, dtype=dtype, requires_grad=True)
            if impl == "cudnn":
                model = torch.nn.LSTM(hidden, hidden, **kw).to(device, dtype)
            else:
                model = LSTM(hidden, hidden, **kw, backend="triton").to(device, dtype)
            return _graphed_fwd_bwd(model, x)
        return _lazy(make)

    def build_step_graph():
        def make():
            _fresh_step_graphs()
            torch.manual_seed(0)
            x = torch.randn(seq, batch, hidden, device=device, dtype=dtype)
            model = LSTM(hidden, hidden, **kw, backend="triton").to(device, dtype)
            return _step_graph(_fwd_bwd(model, x))
        return _lazy(make)

    impls = ["cudnn" if device.type == "cuda" else "torch_nn_lstm"]
    impls += ["fastbert_triton"] if device.type == "cuda" else ["fastbert_torch"]
    fns = {i: build("cudnn" if i in ("cudnn", "torch_nn_lstm") else i) for i in impls}
    if device.type == "cuda":
        # the default path: on a GPU the cooperative time loop where it applies (below)
        fns["fastbert_triton"] = _coop(build("fastbert_triton"), None)
        # the per-step path in fastbert's own CUDA-graph mode (see the module docstring)
        fns["fastbert_triton_step_graph"] = _coop(build_step_graph(), False)
        # where the default is the time-looping kernel, the per-step path too (its launches
        # no longer go through Triton's binding: kernels/_launch.py)
        if hidden <= _persistent_max_hidden():
            fns["fastbert_triton_per_step"] = _coop(
                _with_threshold("PERSISTENT_MAX_HIDDEN", 0, build("fastbert_triton")), False)
        # the opt-in tile variants of the per-step kernels (kernels/lstm.py FWD_BLOCK_K,
        # BWD_BLOCK_K, FWD_NARROW_WARPS; MAX_STEP_BLOCK_B), the cooperative loop off
        if hidden > _persistent_max_hidden():
            for name, settings in _TILE_VARIANTS.items():
                fns[f"fastbert_triton_{name}"] = _coop(_tiles(settings, build("fastbert_triton")),
                                                       False)
        # where the default is the cooperative time loop (see the module docstring): the
        # per-step / time-looping path without it, the default before 2026-11-28
        if _coop_applies(device, seq, batch, hidden):
            fns["fastbert_triton_no_coop"] = _coop(build("fastbert_triton"), False)
            if hidden > _persistent_max_hidden():
                # the cooperative loop with K = 128 tiles (its kernels read the tile flags): on
                # the H200 (2026-11-28) the tiles took the per-step path's GPU time to 0.62x
                # the cooperative loop's at hidden 1024, seq 256 (7.3 vs 11.9 ms at batch 64),
                # the cooperative loop saved the launches; together not yet timed. Without
                # FWD_NARROW_WARPS: with it the cooperative forward spills 32-52 bytes a thread
                # at its 32x16 / 32x32 tiles (sm_90 ptxas, Triton 3.6); without, 12 at 32x64
                # (batch 256, hidden 1024) and none elsewhere in these cases
                fns["fastbert_triton_coop_tiles"] = _coop(
                    _tiles(_COOP_TILE_FLAGS, build("fastbert_triton")), True)
            if _resident_applies(device, seq, batch, hidden, dtype):
                fns["fastbert_triton_coop_resident"] = _resident(_coop(build("fastbert_triton")))
        # the same forward+backward replayed from CUDA graphs: how much of each time is
        # launch overhead (the per-step path launches a kernel or two per step from Python)
        fns["cudnn_graphed"] = build_graphed("cudnn")
        fns["fastbert_triton_graphed"] = build_graphed("fastbert")
    return Case("lstm fwd+bwd padded",
                dict(batch=batch, hidden=hidden, seq=seq, layers=layers, dirs=dirs,
                     dtype=str(dtype).replace("torch.", "")),
                fns, flops=_flops(seq, batch, hidden, hidden, layers, dirs), baseline=impls[0])


def _varlen_case(device, dtype, batch, hidden, seq):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(seq // 4, 1), seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    on_gpu = device.type == "cuda"

    def build(kind, packed):
        def make():
            torch.manual_seed(0)
            x = torch.randn(seq, batch, hidden, device=device, dtype=dtype)
            if kind == "torch":
                model = torch.nn.LSTM(hidden, hidden).to(device, dtype)
            else:
                model = LSTM(hidden, hidden, backend="triton" if on_gpu else "torch").to(device, dtype)
            return _fwd_bwd(model, x, lengths, packed)
        return _lazy(make)

    ours = "fastbert_triton" if on_gpu else "fastbert_torch"
    ref = "cudnn" if on_gpu else "torch_nn_lstm"
    fns = {f"{ours}_padded": build("ours", False), f"{ours}_packed": build("ours", True),
           f"{ref}_padded": build("torch", False), f"{ref}_packed": build("torch", True)}
    # FLOPs of the real tokens only, for every impl
    real = int(lengths.sum())
    return Case("lstm fwd+bwd varlen",
                dict(batch=batch, hidden=hidden, seq=seq, layers=1, dirs=1,
                     dtype=str(dtype).replace("torch.", "")),
                fns, flops=_flops(1, real, hidden, hidden, 1, 1), baseline=f"{ours}_padded")


def _persistent_max_hidden() -> int:
    from fastbert.kernels import lstm as klstm
    return klstm.PERSISTENT_MAX_HIDDEN


def _with_threshold(name: str, value: int, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``fastbert.kernels.lstm.<name>`` (a hidden-size threshold choosing
    between the per-step and the time-looping recurrence) set to ``value``: forces one of the
    two time loops, forward and backward."""
    from fastbert.kernels import lstm as klstm
    return with_setting(klstm, name, value, fn)


# (kept to three rows a case with coop_tiles: each costs the LSTM's share of the gpu-check
# budget; bwd_k128, BWD_BLOCK_K=128 alone, was dropped after the H200 run of 2026-11-28, where
# "tiles" took 0.79-0.95x its GPU time in each of the 17 cases at hidden 512-1024, though in
# wall time it was the slower of the two in 8 of them, by up to 1.32x)
_TILE_FLAGS = dict(BWD_BLOCK_K=128, FWD_BLOCK_K=128, FWD_NARROW_WARPS=True)
_COOP_TILE_FLAGS = dict(BWD_BLOCK_K=128, FWD_BLOCK_K=128)
_TILE_VARIANTS = {"tiles": _TILE_FLAGS,
                  # batch blocks of 64 rows: W_hh read by half as many programs a step, and
                  # Hopper's warpgroup MMA (wgmma needs 64 rows; 32 gives mma.sync)
                  "tiles_b64": {**_TILE_FLAGS, "MAX_STEP_BLOCK_B": 64}}


def _tiles(settings: dict, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the kernels/lstm.py tile flags in ``settings`` set."""
    from fastbert.kernels import lstm as klstm
    for name, value in settings.items():
        fn = with_setting(klstm, name, value, fn)
    return fn


def _step_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the per-step recurrence forced (``PERSISTENT_MAX_HIDDEN`` set to 0) and
    replayed from the CUDA-graph mode's own graphs
    (``fastbert.kernels.lstm.PER_STEP_CUDA_GRAPH``)."""
    from fastbert.kernels import lstm as klstm
    return with_setting(klstm, "PER_STEP_CUDA_GRAPH", True,
                        _with_threshold("PERSISTENT_MAX_HIDDEN", 0, fn))


def _coop(fn: Callable[[], object], on: Optional[bool] = True) -> Callable[[], object]:
    """``fn`` run with the cooperative time loop (``fastbert.kernels.lstm.COOP_TIME_LOOP``) on,
    off (the per-step variants' rows), or None: the library's default (on for CUDA tensors;
    gpu_check.sh unsets $FASTBERT_LSTM_COOP, which would decide it)."""
    from fastbert.kernels import lstm as klstm
    return with_setting(klstm, "COOP_TIME_LOOP", on, fn)


def _resident(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the cooperative kernels' W_hh kept on chip
    (``fastbert.kernels.lstm.COOP_RESIDENT_W``)."""
    from fastbert.kernels import lstm as klstm
    return with_setting(klstm, "COOP_RESIDENT_W", True, fn)


def _resident_applies(device, seq, batch, hidden, dtype) -> bool:
    """Whether COOP_RESIDENT_W changes a cooperative (seq, batch, hidden) layer's kernels (the
    forward's or the backward's slice fits on chip)."""
    from fastbert.kernels import lstm as klstm
    blocks = _coop(lambda: klstm.use_coop(seq, batch, hidden, False, device))()
    if not blocks:
        return False
    size = torch.empty((), dtype=dtype).element_size()
    return _resident(lambda: any(klstm.coop_resident(kind, hidden, blocks[0], blocks[1], size)
                                 for kind in ("fwd", "bwd")))()


def _coop_applies(device, seq, batch, hidden) -> bool:
    """Whether the cooperative time loop runs a (seq, batch, hidden) layer on ``device`` (no
    projection) when switched on: else a coop row would time the default path."""
    from fastbert.kernels import lstm as klstm
    return bool(_coop(lambda: klstm.use_coop(seq, batch, hidden, False, device))())


def _fresh_step_graphs() -> None:
    """Drop the graph mode's captures (and their static buffers) of earlier cases."""
    from fastbert.kernels import lstm as klstm
    klstm.clear_step_graphs()


def _time_loop_case(device, dtype, batch, hidden, seq):
    """fastbert's ways to run the time loop on the same layer: one launch per step, the same
    replayed from the CUDA-graph mode's graphs, the single time-looping launch (forced
    either way by moving ``PERSISTENT_MAX_HIDDEN``) and the cooperative time loop, to place
    that threshold and decide the cooperative loop's default from measurements."""
    def build(kind):
        def make():
            _fresh_step_graphs()
            torch.manual_seed(0)
            x = torch.randn(seq, batch, hidden, device=device, dtype=dtype)
            model = LSTM(hidden, hidden, backend="triton").to(device, dtype)
            if kind == "per_step_graphed":
                return _coop(_step_graph(_fwd_bwd(model, x)), False)
            if kind == "coop":
                return _coop(_fwd_bwd(model, x))
            if kind == "coop_resident":
                return _resident(_coop(_fwd_bwd(model, x)))
            return _coop(_with_threshold("PERSISTENT_MAX_HIDDEN",
                                         hidden if kind == "time_looping" else 0,
                                         _fwd_bwd(model, x)), False)
        return _lazy(make)

    return Case("lstm fwd+bwd time loop",
                dict(batch=batch, hidden=hidden, seq=seq, layers=1, dirs=1,
                     dtype=str(dtype).replace("torch.", "")),
                {kind: build(kind) for kind in ("per_step", "per_step_graphed", "time_looping")
                 + (("coop",) if _coop_applies(device, seq, batch, hidden) else ())
                 + (("coop_resident",) if _resident_applies(device, seq, batch, hidden, dtype)
                    else ())},
                flops=_flops(seq, batch, hidden, hidden, 1, 1), baseline="per_step")


class _EagerLayerNormLSTM(torch.nn.Module):
    """The eager PyTorch LayerNorm-LSTM users write: a Python loop over timesteps with
    nn.LayerNorm on the two gate projections and the cell."""

    def __init__(self, n_in, hidden):
        super().__init__()
        self.ih = torch.nn.Linear(n_in, 4 * hidden)
        self.hh = torch.nn.Linear(hidden, 4 * hidden)
        self.ln_ih = torch.nn.LayerNorm(4 * hidden)
        self.ln_hh = torch.nn.LayerNorm(4 * hidden)
        self.ln_c = torch.nn.LayerNorm(hidden)
        self.hidden = hidden

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.hidden)
        c = x.new_zeros(x.shape[1], self.hidden)
        xg = self.ln_ih(self.ih(x))
        outs = []
        for t in range(x.shape[0]):
            i, f, g, o = (xg[t] + self.ln_hh(self.hh(h))).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
            outs.append(h)
        return torch.stack(outs), (h, c)


def _layer_norm_case(device, dtype, batch, hidden, seq):
    from fastbert.kernels import lstm as klstm

    def build(kind, persistent=None):
        def make():
            _fresh_step_graphs()
            torch.manual_seed(0)
            x = torch.randn(seq, batch, hidden, device=device, dtype=dtype)
            backend = "triton" if device.type == "cuda" else "torch"
            model = (_EagerLayerNormLSTM(hidden, hidden) if kind == "eager"
                     else LayerNormLSTM(hidden, hidden, backend=backend))
            inner = _fwd_bwd(model.to(device, dtype), x)
            if persistent is None:
                return inner
            return _with_threshold("LN_PERSISTENT_MAX_HIDDEN", hidden if persistent else 0,
                                   inner)
        return _lazy(make)

    impls = {"eager_pytorch": build("eager"), "fastbert": build("ours")}
    if device.type == "cuda":
        # the time loop the automatic choice did not take, to place LN_PERSISTENT_MAX_HIDDEN
        if klstm.use_ln_persistent(hidden, False):
            impls["fastbert_per_step"] = build("ours", persistent=False)
        else:
            impls["fastbert_time_looping"] = build("ours", persistent=True)
    return Case("layer_norm_lstm fwd+bwd",
                dict(batch=batch, hidden=hidden, seq=seq, layers=1, dirs=1,
                     dtype=str(dtype).replace("torch.", "")),
                impls, flops=_flops(seq, batch, hidden, hidden, 1, 1), baseline="eager_pytorch")


def cases(device: torch.device, quick: bool) -> List[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quick:
        return [_padded_case(device, dtype, 4, 32, 8, 1, 1),
                _padded_case(device, dtype, 4, 32, 8, 2, 2),
                _varlen_case(device, dtype, 4, 32, 8),
                _layer_norm_case(device, dtype, 4, 32, 8)]
    # one case for each target first (make gpu-check may stop a script part-way), then the grid
    first = [("padded", 64, 512, 256, 1, 1), ("varlen", 64, 512, 256),
             ("layer_norm", 64, 256, 64), ("padded", 64, 256, 64, 1, 1),
             ("padded", 64, 512, 256, 2, 2)]
    rest = []
    for seq in (64, 256):
        for hidden in (256, 512, 1024):
            for batch in (16, 64, 256):
                rest.append(("padded", batch, hidden, seq, 1, 1))
            rest.append(("padded", 64, hidden, seq, 2, 2))
    rest += [("varlen", 64, hidden, 256) for hidden in (256, 512, 1024)]
    rest += [("layer_norm", 64, hidden, 64) for hidden in (256, 512)]
    rest += [("time_loop", batch, hidden, 256) for hidden in (256, 512, 1024)
             for batch in (16, 64)]
    # the rest of #5's "1 and 2 layers, uni- and bidirectional": one layer bidirectional and
    # two unidirectional, batch 64, every hidden x seq (last: the budget may stop before them)
    rest += [("padded", 64, hidden, seq, layers, dirs) for layers, dirs in ((1, 2), (2, 1))
             for seq in (64, 256) for hidden in (256, 512, 1024)]
    make = {"padded": _padded_case, "varlen": _varlen_case, "layer_norm": _layer_norm_case,
            "time_loop": _time_loop_case}
    return [make[kind](device, dtype, *shape)
            for kind, *shape in first + [c for c in rest if c not in first]]


def main(argv=None):
    main_for("lstm", cases, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
