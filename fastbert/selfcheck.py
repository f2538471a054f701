"""Correctness self-check of every fused op on this machine, for ``fastbert demo``.

Each check runs an op on the best kernel backend available here (the compiled kernels on a
CUDA device, the Triton interpreter on CPU) and compares the output and every input gradient
with the fp64 PyTorch reference, reporting the worst relative error.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List

import torch


@dataclasses.dataclass
class CheckResult:
    op: str
    shape: str
    dtype: str
    backend: str
    fwd_err: float
    bwd_err: float
    tol: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.fwd_err <= self.tol and self.bwd_err <= self.tol


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() if b.numel() else 0.0


def _compare(op: str, shape: str, fn: Callable, ref: Callable, inputs: List[torch.Tensor],
             backend: str, tol: float) -> CheckResult:
    t0 = time.perf_counter()
    xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    y = fn(*xs)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x for x in xs if x.requires_grad], dy)
    x64 = [t.detach().double().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    y64 = ref(*x64)
    g64 = torch.autograd.grad(y64, [x for x in x64 if x.requires_grad], dy.double())
    fwd = _rel_err(y, y64)
    bwd = max((_rel_err(g, r) for g, r in zip(grads, g64)), default=0.0)
    return CheckResult(op, shape, str(inputs[0].dtype).replace("torch.", ""), backend, fwd, bwd,
                       tol, time.perf_counter() - t0)


def checks(device: torch.device) -> Dict[str, Callable[[], CheckResult]]:
    from fastbert import ops

    backend = "triton"
    dt = torch.float16 if device.type == "cuda" else torch.float32
    tol = 1e-2 if dt == torch.float16 else 1e-4
    rows, hidden = (4096, 1024) if device.type == "cuda" else (16, 384)
    r = lambda *s: torch.randn(*s, device=device, dtype=dt)
    out: Dict[str, Callable[[], CheckResult]] = {}
    out["layer_norm(+residual,+bias)"] = lambda: _compare(
        "layer_norm", f"{rows}x{hidden}",
        lambda x, w, b, res, xb: ops.layer_norm(x, w, b, residual=res, x_bias=xb, backend=backend),
        lambda x, w, b, res, xb: ops.layer_norm_ref(x, w, b, residual=res, x_bias=xb),
        [r(rows, hidden), r(hidden), r(hidden), r(rows, hidden), r(hidden)], backend, tol)
    out["gelu_layer_norm"] = lambda: _compare(
        "gelu_layer_norm", f"{rows}x{hidden}",
        lambda x, xb, w, b: ops.gelu_layer_norm(x, xb, w, b, backend=backend),
        lambda x, xb, w, b: ops.layer_norm_ref(x, w, b, x_bias=xb, activation="gelu"),
        [r(rows, hidden), r(hidden), r(hidden), r(hidden)], backend, tol)
    out["bias_gelu"] = lambda: _compare(
        "bias_gelu", f"{rows}x{4 * hidden}",
        lambda x, b: ops.bias_gelu(x, b, backend=backend),
        lambda x, b: ops.bias_gelu_ref(x, b),
        [r(rows, 4 * hidden), r(4 * hidden)], backend, tol)
    return out


def run(device: torch.device, verbose: bool = True) -> List[CheckResult]:
    results = []
    for name, check in checks(device).items():
        res = check()
        res.op = name
        results.append(res)
    if verbose:
        print(f"{'op':<30} {'shape':<12} {'dtype':<8} {'backend':<7} {'fwd rel err':>12} "
              f"{'bwd rel err':>12} {'tol':>7}  result")
        for r in results:
            print(f"{r.op:<30} {r.shape:<12} {r.dtype:<8} {r.backend:<7} {r.fwd_err:12.2e} "
                  f"{r.bwd_err:12.2e} {r.tol:7.0e}  {'ok' if r.ok else 'FAIL'} ({r.seconds:.1f} s)")
    return results
