"""Benchmark: the LayerNorm family, forward, backward and forward+backward, bf16.

Implementations (same math: LayerNorm(x + residual) with weight and bias, and
GELU(x + bias) for bias_gelu):
    eager     -- the PyTorch code people write (F.layer_norm(x + residual))
    compile   -- torch.compile of that same code
    fastbert  -- fastbert.ops (Triton)
    apex      -- apex.normalization.fused_layer_norm (when importable)
    liger     -- liger_kernel.ops.layer_norm (when importable)

Bytes are the minimum a fused kernel must move (each input read once, each output written
once), so GB/s is comparable across implementations, and "%copy_bw" is that rate as a fraction
of the device-to-device copy bandwidth measured in the same run.
Targets on an H100 (a benchmark, not a test): >= 85% of copy bandwidth forward and backward
at hidden 768 and 1024, and faster than torch.compile.

    python -m benchmarks.bench_layer_norm [--quick] [--device cuda]
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from benchmarks._harness import Case, main_for

HIDDEN = (768, 1024, 4096)
ROWS = (8192, 32768, 65536)


def _eager_ln(x, res, w, b):
    return F.layer_norm(x + res, x.shape[-1:], w, b, 1e-5)


# BERT's epilogue after the attention-output and FFN-output projections, as trained
# (hidden_dropout_prob 0.1): LayerNorm(dropout(x + dense bias) + residual)
EPILOGUE_DROPOUT_P = 0.1


def _eager_epilogue(x, xb, res, w, b):
    return F.layer_norm(F.dropout(x + xb, EPILOGUE_DROPOUT_P) + res, x.shape[-1:], w, b, 1e-5)


def _optional_impls() -> Dict[str, Callable]:
    out = {}
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
        out["apex"] = lambda x, res, w, b: fused_layer_norm_affine(x + res, w, b, x.shape[-1:], 1e-5)
    except Exception:
        pass
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        out["liger"] = lambda x, res, w, b: LigerLayerNormFunction.apply(x + res, w, b, 1e-5)
    except Exception:
        pass
    return out


@contextlib.contextmanager
def _retainable_backward(enabled: bool):
    """torch.compile donates saved buffers to its backward (torch >= 2.6) and then refuses
    ``retain_graph=True``, checking the flag at every backward call: the "bwd" mode (one
    graph, its backward timed repeatedly) turns donation off around compile and backward."""
    import torch._functorch.config as cfg
    if not enabled or not hasattr(cfg, "donated_buffer"):
        yield
        return
    with cfg.patch(donated_buffer=False):
        yield


MODES = ("fwd", "bwd", "fwd+bwd")


def _modes(fwd: Callable, leaves, out_like, compiled: bool = False):
    """fwd, bwd (backward of a graph built once, retained), fwd+bwd callables. ``compiled``:
    ``fwd`` runs torch.compile code (see ``_retainable_backward``)."""
    def f():
        with torch.no_grad():
            return fwd()

    with _retainable_backward(compiled):
        y = fwd()
    dy = torch.randn_like(y)

    def b():
        with _retainable_backward(compiled):
            return torch.autograd.grad(y, leaves, dy, retain_graph=True)

    def fb():
        return torch.autograd.grad(fwd(), leaves, dy)

    return {"fwd": f, "bwd": b, "fwd+bwd": fb}


def cases(device: torch.device, quick: bool) -> List[Case]:
    from fastbert import ops
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(256, 768)] if quick else [(r, h) for h in HIDDEN for r in ROWS]
    extra = _optional_impls() if device.type == "cuda" else {}
    out: List[Case] = []
    # the peer at its best: static shapes (by default the second shape turns the graph
    # dynamic), one graph a shape and grad mode, so dynamo's recompile limit (8 a function)
    # must not send the later shapes back to eager
    import torch._dynamo as dynamo
    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
    compiled = torch.compile(_eager_ln, dynamic=False)
    compiled_gelu = torch.compile(lambda x, b: F.gelu(x + b), dynamic=False)
    compiled_epilogue = torch.compile(_eager_epilogue, dynamic=False)
    names = ["eager", "compile", "fastbert"] + list(extra)
    for rows, hidden in shapes:
        # a shape's tensors, graphs and compiled kernels are built on its first timed call, not
        # here (all nine shapes at once held tens of GB and spent the time share before the
        # first case); the shape's cases share them and free them once all have run
        state: Dict[str, Dict] = {}

        def build(rows=rows, hidden=hidden, state=state):
            if state:
                return state
            built: Dict[str, Dict] = {}   # into state only when whole (a failed build retries)
            # the kernels on a GPU (an automatic fallback would time the reference under
            # fastbert's name), the automatic choice on CPU
            pin = {"backend": "triton"} if device.type == "cuda" else {}
            x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
            res = torch.randn_like(x, requires_grad=True)
            w = torch.randn(hidden, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(hidden, device=device, dtype=dtype, requires_grad=True)
            impls = {
                "eager": lambda: _eager_ln(x, res, w, b),
                "compile": lambda: compiled(x, res, w, b),
                "fastbert": lambda: ops.layer_norm(x, w, b, residual=res, **pin),
            }
            for name, fn in extra.items():
                impls[name] = (lambda fn=fn: fn(x, res, w, b))
            per_mode: Dict[str, Dict[str, Callable]] = {m: {} for m in MODES}
            for name, fn in impls.items():
                for mode, call in _modes(fn, [x, res, w, b], x,
                                         compiled=name == "compile").items():
                    per_mode[mode][name] = call
            built["layer_norm"] = per_mode
            if hidden != 4096:
                xb = torch.randn(hidden, device=device, dtype=dtype, requires_grad=True)
                eimpls = {
                    "eager": lambda: _eager_epilogue(x, xb, res, w, b),
                    "compile": lambda: compiled_epilogue(x, xb, res, w, b),
                    "fastbert": lambda: ops.layer_norm(x, w, b, residual=res, x_bias=xb,
                                                       dropout_p=EPILOGUE_DROPOUT_P, **pin),
                }
                built["epilogue"] = {"fwd+bwd": {
                    n: _modes(fn, [x, xb, res, w, b], x, compiled=n == "compile")["fwd+bwd"]
                    for n, fn in eimpls.items()}}
            if hidden != 4096:
                xi = torch.randn(rows, 4 * hidden, device=device, dtype=dtype,
                                 requires_grad=True)
                bi = torch.randn(4 * hidden, device=device, dtype=dtype, requires_grad=True)
                gimpls = {"eager": lambda: F.gelu(xi + bi),
                          "compile": lambda: compiled_gelu(xi, bi),
                          "fastbert": lambda: ops.bias_gelu(xi, bi, **pin)}
                built["bias_gelu"] = {"fwd+bwd": {n: _modes(fn, [xi, bi], xi)["fwd+bwd"]
                                                  for n, fn in gimpls.items()}}
            state.update(built)
            return state

        def lazy(op, mode, name, build=build):
            return lambda: build()[op][mode][name]()

        es = torch.empty((), dtype=dtype).element_size()
        io = rows * hidden * es
        # fwd: read x, residual; write y.  bwd: read x, residual, dy; write dx (= dresidual)
        nbytes = {"fwd": 3 * io, "bwd": 4 * io, "fwd+bwd": 7 * io}
        params = {"rows": rows, "hidden": hidden, "dtype": str(dtype).replace("torch.", "")}
        for mode in MODES:
            out.append(Case(f"layer_norm+residual {mode}", params,
                            {n: lazy("layer_norm", mode, n) for n in names},
                            bytes=nbytes[mode], baseline="eager"))
        if hidden != 4096:
            # the epilogue as BERT trains it (dense bias + dropout 0.1 + residual, LayerNorm):
            # the same minimum bytes as layer_norm+residual (a fused kernel regenerates the
            # dropout mask in the backward; eager also writes and reads it)
            out.append(Case("bert epilogue (bias+dropout+residual) fwd+bwd",
                            {**params, "dropout_p": EPILOGUE_DROPOUT_P},
                            {n: lazy("epilogue", "fwd+bwd", n)
                             for n in ("eager", "compile", "fastbert")},
                            bytes=nbytes["fwd+bwd"], baseline="eager"))
        # bias_gelu on the FFN intermediate (4 * hidden), fwd+bwd
        if hidden != 4096:
            ib = rows * 4 * hidden * es
            # fwd: read x, write y; bwd: read x, dy, write dx
            out.append(Case("bias_gelu fwd+bwd", {**params, "hidden": 4 * hidden},
                            {n: lazy("bias_gelu", "fwd+bwd", n)
                             for n in ("eager", "compile", "fastbert")},
                            bytes=5 * ib, baseline="eager"))
    return out


def main(argv=None):
    main_for("layer_norm", cases, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
