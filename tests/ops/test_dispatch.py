"""Backend resolution: argument > FASTBERT_BACKEND > use_backend > auto."""
import sys
import warnings

import pytest
import torch

import fastbert
from fastbert import ops
from fastbert.ops import _dispatch


def _spy(monkeypatch):
    calls = []
    real = _dispatch.resolve

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out)
        return out

    # the module, not the function of the same name that fastbert.ops exports
    monkeypatch.setattr(sys.modules["fastbert.ops.layer_norm"], "resolve", spy)
    return calls


def test_resolution_order_argument_env_context_auto(monkeypatch, device):
    calls = _spy(monkeypatch)
    x = torch.randn(2, 16, device=device)
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    ops.layer_norm(x, None, None)
    # auto: CPU tensors -> the reference, CUDA tensors -> the kernel
    assert calls[-1] == ("triton" if device.type == "cuda" else "torch")
    with fastbert.use_backend("triton"):
        ops.layer_norm(x, None, None)
        assert calls[-1] == "triton"
        monkeypatch.setenv("FASTBERT_BACKEND", "torch")
        ops.layer_norm(x, None, None)
        assert calls[-1] == "torch"  # env beats the context
        ops.layer_norm(x, None, None, backend="triton")
        assert calls[-1] == "triton"  # argument beats everything


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        with fastbert.use_backend("xla"):
            pass
    monkeypatch.setenv("FASTBERT_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTBERT_BACKEND: unknown backend 'fast'"):
        ops.layer_norm(torch.randn(2, 4), None, None)


def test_explicit_backend_that_cannot_run_raises_with_reason(monkeypatch):
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    x = torch.randn(2, 16)
    with pytest.raises(ops.BackendUnavailable, match="no CUDA C\\+\\+ kernel"):
        ops.layer_norm(x, None, None, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ops.BackendUnavailable, match="Triton interpreter is off"):
        ops.layer_norm(x, None, None, backend="triton")


def test_auto_falls_back_with_one_time_warning_naming_the_reason():
    fake = [torch.empty(0, device="meta")]
    _dispatch._warned.clear()
    # meta tensors stand in for "not runnable by the kernels": auto on non-CUDA tensors is torch
    assert _dispatch.resolve("probe_op", fake) == "torch"
    reasons = []

    def cant(b):
        return "head dim 72 is not supported"

    if torch.cuda.is_available():
        t = [torch.empty(1, device="cuda")]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert _dispatch.resolve("probe_op", t, extra_check=cant, preference=("triton",)) == "torch"
            assert _dispatch.resolve("probe_op", t, extra_check=cant, preference=("triton",)) == "torch"
        reasons = [str(x.message) for x in w]
        assert len(reasons) == 1 and "head dim 72" in reasons[0]


def test_backend_report_lists_every_backend():
    rep = _dispatch.backend_report()
    assert set(rep) == set(_dispatch.BACKENDS)
    assert rep["torch"] is None
    if not torch.cuda.is_available():
        assert rep["cuda"]  # a reason string


def test_env_module_prints_report():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "fastbert.env"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "backend", "cuda"):
        assert word in out.stdout
