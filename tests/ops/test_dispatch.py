"""Backend resolution: argument > FASTBERT_BACKEND > use_backend > auto; and the shared
argument checks."""
import os
import re
import sys
import warnings

import pytest
import torch

import fastbert
from fastbert import ops
from fastbert.ops import _checks, _dispatch


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
    monkeypatch.setattr(_dispatch, "_TRITON_INTERPRETS", False)   # triton imported without
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ops.BackendUnavailable, match="Triton interpreter is off"):
        ops.layer_norm(x, None, None, backend="triton")


@pytest.mark.parametrize("at_import", [True, False])
def test_triton_interpret_changed_after_import_is_named(monkeypatch, at_import):
    """Triton fixes the interpreter when it is imported (its library functions are decorated
    then); fastbert's kernels, decorated at first use, would follow a later TRITON_INTERPRET:
    an obscure InterpreterError or launch failure. The change is named instead."""
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_TRITON_INTERPRETS", at_import)
    monkeypatch.setenv("TRITON_INTERPRET", "0" if at_import else "1")
    assert _dispatch.interpreter_enabled() is at_import   # what Triton does, not the variable
    turned = "turned off" if at_import else "turned on"
    with pytest.raises(ops.BackendUnavailable,
                       match=f"TRITON_INTERPRET was {turned} after triton was imported"):
        ops.layer_norm(torch.randn(2, 16), None, None, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if at_import else "0")
    assert _dispatch.interpreter_mode_error() is None
    # read as Triton reads it: only 1 / true / on / yes / y (any case) are on
    for value in ("True", "YES", "on", "y") if at_import else ("false", "off", "no", "2", ""):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _dispatch.interpreter_mode_error() is None, value


def test_triton_interpret_unset_reads_as_off(monkeypatch):
    """The GPU machine's usual environment, TRITON_INTERPRET unset (the conftest sets it on a
    CPU box, so nothing else here runs without it): off, and no mode change to name."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_dispatch, "_TRITON_INTERPRETS", False)
    assert _dispatch._interpret_env_on() is False
    assert _dispatch.interpreter_mode_error() is None
    monkeypatch.setattr(_dispatch, "_TRITON_INTERPRETS", True)
    assert "turned off" in _dispatch.interpreter_mode_error()


def test_triton_interpreter_mode_is_read_from_triton():
    """The mode recorded at import is Triton's own (its library functions' type), which the
    conftest's TRITON_INTERPRET decided here."""
    assert _dispatch._triton_interprets() is _dispatch.interpreter_enabled()
    at_import = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    assert _dispatch._TRITON_INTERPRETS is at_import


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


def test_env_reader_sees_every_change_made_through_os_environ(monkeypatch):
    import os
    name = "FASTBERT_TEST_ENV_READER"
    read = _dispatch._env_reader(name)
    monkeypatch.delenv(name, raising=False)
    assert read() is None
    monkeypatch.setenv(name, " triton ")
    assert read() == " triton "
    os.environ[name] = "caf\xe9 \udcff"  # non-ASCII, and a byte that is not UTF-8
    assert read() == os.environ.get(name) == "caf\xe9 \udcff"
    monkeypatch.delenv(name)
    assert read() is None
    monkeypatch.setattr(os, "environ", {name: "replaced"})
    assert read() == "replaced"


def test_env_values_blank_or_auto_mean_auto(monkeypatch):
    for value in ("", "  ", "auto", " auto "):
        monkeypatch.setenv("FASTBERT_BACKEND", value)
        assert _dispatch.requested_backend(None) is None
    monkeypatch.setenv("FASTBERT_BACKEND", " triton ")
    assert _dispatch.requested_backend(None) == "triton"
    with pytest.raises(ValueError, match="backend=: unknown backend 'Triton'"):
        _dispatch.requested_backend("Triton")


def test_use_backend_is_process_wide_and_blocks_close_in_any_order(monkeypatch):
    """Another thread (autograd's backward threads, DataParallel replicas) sees the block its
    caller opened; blocks of two threads may close out of order."""
    import threading
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    seen = {}
    opened, close = threading.Event(), threading.Event()

    def other():
        seen["before"] = _dispatch.requested_backend(None)
        with fastbert.use_backend("triton"):
            seen["inside"] = _dispatch.requested_backend(None)
            opened.set()
            close.wait(10)
        seen["after"] = _dispatch.requested_backend(None)

    with fastbert.use_backend("torch"):
        th = threading.Thread(target=other)
        th.start()
        assert opened.wait(10)
        assert _dispatch.requested_backend(None) == "triton"   # the innermost, process-wide
    # this thread's block closed first: the other's stays open
    assert _dispatch.requested_backend(None) == "triton"
    close.set()
    th.join()
    assert seen == {"before": "torch", "inside": "triton", "after": None}
    assert _dispatch.requested_backend(None) is None


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recomputation_keeps_the_forwards_backend(monkeypatch, reentrant, device):
    """Activation checkpointing recomputes the forward in backward, after the use_backend block
    closed: with fastbert.checkpoint_context_fn (non-reentrant) or backend= (both modes) the
    recomputation takes the same backend, so its dropout masks and gradients equal those
    without checkpointing."""
    from torch.utils.checkpoint import checkpoint
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    torch.manual_seed(0)
    x = torch.randn(6, 32, device=device, requires_grad=True)
    w, b, g = (torch.randn(*s, device=device) for s in ((32,), (32,), (6, 32)))

    def grad_of(fn, **kw):
        x.grad = None
        torch.manual_seed(1)
        with fastbert.use_backend("triton"):
            y = checkpoint(fn, x, **kw) if kw else fn(x)
        (y * g).sum().backward()
        return x.grad.clone()

    f = lambda t: ops.layer_norm(t, w, b, dropout_p=0.5)
    want = grad_of(f)
    if not reentrant:
        got = grad_of(f, use_reentrant=False, context_fn=fastbert.checkpoint_context_fn)
        assert torch.equal(got, want)
    explicit = lambda t: ops.layer_norm(t, w, b, dropout_p=0.5, backend="triton")
    assert torch.equal(grad_of(explicit, use_reentrant=reentrant), want)


def test_explicit_triton_names_where_the_tensors_are(monkeypatch):
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    cpu, meta = torch.empty(2), torch.empty(2, device="meta")
    for tensors, where in (((cpu, None, meta), "['cpu', 'meta']"), ((meta,), "['meta']"),
                           ((None,), "[]")):
        with pytest.raises(ops.BackendUnavailable,
                           match=f"probe_op: backend 'triton' cannot run this call: "
                                 f"the tensors are on {re.escape(where)}; triton needs CUDA"):
            _dispatch.resolve("probe_op", tensors, "triton")
        # auto on tensors that are not all on CUDA: the reference, without asking the kernels
        assert _dispatch.resolve("probe_op", tensors, extra_check=pytest.fail) == "torch"
    # CPU tensors run where the interpreter is on (here; on a GPU machine: as if it were)
    monkeypatch.setattr(_dispatch, "_TRITON_INTERPRETS", True)
    monkeypatch.setattr(_dispatch, "_TRITON_VERSION", _dispatch.MIN_INTERPRETER_TRITON)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.resolve("probe_op", (cpu, None, cpu), "triton") == "triton"
    assert _dispatch.resolve("probe_op", (cpu,), "torch", extra_check=pytest.fail) == "torch"
    with pytest.raises(ops.BackendUnavailable, match="the head dim"):
        _dispatch.resolve("probe_op", (cpu,), "triton", extra_check=lambda b: "the head dim")
    with pytest.raises(ops.BackendUnavailable, match="need CUDA tensors|not built|no sources"):
        _dispatch.resolve("probe_op", (cpu,), "cuda", cuda_ops=("probe_op",))


# argument checks (_checks.py): each has a fast accept path in front of the full check; what
# passes and the errors raised must be the full check's

def test_check_tensor_accepts_and_rejects_as_before():
    from fastbert.ops._checks import REF_DTYPES, check_tensor
    x = torch.randn(2, 3)
    check_tensor("x", x, dtypes=REF_DTYPES, ndim=(2,), device=x.device)
    check_tensor("x", torch.nn.Parameter(x), dtypes=[torch.float32], ndim=[1, 2])
    check_tensor("x", None, dtypes=REF_DTYPES, optional=True)
    cases = [
        (dict(t=None), TypeError, "x must be a tensor, got None"),
        (dict(t=2.0), TypeError, "x must be a torch.Tensor, got float"),
        (dict(t=x.long(), dtypes=REF_DTYPES), TypeError,
         r"x must have dtype in \(float32, float16, bfloat16, float64\), got int64"),
        (dict(t=x, ndim=(1, 3)), ValueError, r"x must have 1 or 3 dimensions, got shape \(2, 3\)"),
        (dict(t=x, device=torch.device("meta")), ValueError, "x is on cpu, expected meta"),
    ]
    for kw, err, msg in cases:
        t = kw.pop("t")
        with pytest.raises(err, match=msg):
            check_tensor("x", t, **kw)


def test_check_shape_and_same_device_accept_and_reject_as_before():
    from fastbert.ops._checks import check_same_device, check_shape
    x = torch.randn(2, 3)
    check_shape("x", x, (2, 3))
    check_shape("x", x, [2, 3])  # a list: not equal to torch.Size, the full check passes it
    check_shape("x", None, (5,))
    with pytest.raises(ValueError, match=r"x must have shape \(3, 2\) \(why\), got \(2, 3\)"):
        check_shape("x", x, [3, 2], "why")
    assert check_same_device(a=x, b=None, c=x) == torch.device("cpu")
    assert check_same_device(a=None) is None
    with pytest.raises(ValueError, match="c is on meta but a is on cpu"):
        check_same_device(a=x, b=None, c=torch.empty(1, device="meta"))


def test_scalar_checks_accept_and_reject_as_before():
    import numpy as np
    from fastbert.ops._checks import check_eps, check_probability, check_size, kernel_dtype_reason
    for eps in (1e-5, 1, np.float32(1e-6), 1e300):
        check_eps("op", eps)
    for eps, err in ((0.0, ValueError), (-1e-5, ValueError), (float("nan"), ValueError),
                     (float("inf"), ValueError), (True, TypeError), ("1e-5", TypeError)):
        with pytest.raises(err, match="op: eps must be"):
            check_eps("op", eps)
    for p in (0.0, 0.5, 0, np.float64(0.1), 1.0, 1):
        check_probability("p", p)
    for p in (1.5, -0.1, float("nan"), 2):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
            check_probability("p", p)
    for n in (0, 7, np.int64(3)):
        check_size("n", n)
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        check_size("n", True)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        check_size("n", 2.0)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        check_size("n", -1)
    f32, f64 = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    ints = torch.zeros(1, dtype=torch.long)  # not floating: no reason
    assert kernel_dtype_reason(a=f32, b=None, c=f32.half(), d=ints) is None
    assert kernel_dtype_reason(a=f32, b=f64) == (
        "b is float64; the kernels take float32/float16/bfloat16")


def test_use_backend_inside_a_compiled_function_traces_without_a_break(monkeypatch, device):
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    x, w = torch.randn(4, 32, device=device), torch.randn(32, device=device)

    def f(x):
        with fastbert.use_backend("triton"):
            y = ops.layer_norm(x, w, None)
        return y + ops.layer_norm(x, w, None)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, f(x), rtol=1e-5, atol=1e-5)
    assert _dispatch.requested_backend(None) is None


def test_checkpoint_context_fn_serves_more_than_one_recomputation(monkeypatch, device):
    """backward(retain_graph=True) twice (or autograd.grad twice) recomputes twice: the
    context it hands checkpoint is entered once per recomputation."""
    from torch.utils.checkpoint import checkpoint
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    x = torch.randn(6, 32, device=device, requires_grad=True)
    w = torch.randn(32, device=device)
    torch.manual_seed(0)
    with fastbert.use_backend("triton"):
        y = checkpoint(lambda t: ops.layer_norm(t, w, None, dropout_p=0.3), x,
                       use_reentrant=False, context_fn=fastbert.checkpoint_context_fn)
    g1 = torch.autograd.grad(y.sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad(y.sum(), x)[0]
    assert torch.equal(g1, g2)
    assert _dispatch.requested_backend(None) is None


def test_a_block_inside_a_compiled_function_leaves_other_threads_blocks_alone(monkeypatch):
    """After a compiled graph runs, Dynamo writes back whole the global lists the traced code
    mutated: a use_backend block inside a compiled function must not rewrite the process-wide
    stack that another thread opened a block on meanwhile (DataParallel replicas, hooks)."""
    import threading
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    x, w = torch.randn(4, 32), torch.randn(32)
    opened, close, errors = threading.Event(), threading.Event(), []

    def other():
        try:
            with fastbert.use_backend("triton"):
                opened.set()
                close.wait(10)
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(repr(e))

    def backend(gm, example_inputs):
        def run(*args):
            out = gm.forward(*args)
            if not opened.is_set():   # the other thread opens its block while the graph runs
                threading.Thread(target=other).start()
                opened.wait(10)
            return out
        return run

    def f(x):
        with fastbert.use_backend("torch"):
            return ops.layer_norm(x, w, None)
    torch.compile(f, fullgraph=True, backend=backend)(x)
    assert _dispatch.requested_backend(None) == "triton"   # the other thread's block
    close.set()
    for th in threading.enumerate():
        if th is not threading.current_thread() and th.name.startswith("Thread"):
            th.join(10)
    assert errors == [] and _dispatch.requested_backend(None) is None


def test_torch_func_grad_transforms_take_the_reference_or_say_why(monkeypatch, device):
    """torch.func.grad / jvp cannot differentiate the kernels (their autograd.Function has no
    functorch rule): auto picks the PyTorch reference, an explicit kernel backend says to use
    backend='torch' (it raised torch's generic autograd.Function error), also with a vmap
    inside the grad. vmap alone still reaches the kernels."""
    from fastbert.ops import BackendUnavailable
    x = torch.randn(3, 32, device=device)
    f = lambda bk: (lambda t: ops.layer_norm(t, None, None, backend=bk).square().sum())
    fv = lambda bk: (lambda t: torch.func.vmap(f(bk))(t[:, None]).sum())
    for fn in (f, fv):
        with pytest.raises(BackendUnavailable, match="torch.func grad.*use backend='torch'"):
            torch.func.grad(fn("triton"))(x)
    # auto: on CPU tensors it takes the reference anyway; pretend they are CUDA tensors, where
    # it would take the kernels but for the transform
    monkeypatch.setattr(_dispatch, "_all_on", lambda tensors, cuda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "falling back to the reference"
        for fn in (f, fv):
            torch.testing.assert_close(torch.func.grad(fn(None))(x),
                                       torch.func.grad(fn("torch"))(x))
        _, tangent = torch.func.jvp(f(None), (x,), (torch.ones_like(x),))
    monkeypatch.undo()
    assert torch.isfinite(tangent)
    out = torch.func.vmap(lambda t: ops.layer_norm(t, None, None, backend="triton"))(x[:, None])
    torch.testing.assert_close(out[:, 0], ops.layer_norm(x, None, None, backend="torch"))


def test_forward_mode_ad_takes_the_reference_or_says_why(monkeypatch):
    """Inside torch.autograd.forward_ad.dual_level() the kernels' outputs carried no tangent,
    silently: auto takes the reference (which has one), an explicit kernel backend raises."""
    import torch.autograd.forward_ad as fwAD
    from fastbert.ops import BackendUnavailable
    x, t = torch.randn(3, 8), torch.randn(3, 8)
    with fwAD.dual_level():
        with pytest.raises(BackendUnavailable, match="forward-mode AD.*use backend='torch'"):
            ops.layer_norm(fwAD.make_dual(x, t), None, None, backend="triton")
        want = fwAD.unpack_dual(ops.layer_norm(fwAD.make_dual(x, t), None, None,
                                               backend="torch")).tangent
        monkeypatch.setattr(_dispatch, "_all_on", lambda tensors, cuda: True)  # as on CUDA
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "falling back to the reference"
            got = fwAD.unpack_dual(ops.layer_norm(fwAD.make_dual(x, t), None, None)).tangent
        monkeypatch.undo()
    assert got is not None
    torch.testing.assert_close(got, want)


def test_checks_run_while_another_thread_compiles(monkeypatch):
    """torch.compiler.is_compiling() is True in every thread while any thread compiles: the
    value checks that skip a trace asked it, so an eager call in another thread (a server
    warming up a compiled model) skipped them -- pad wrapped a negative index silently, the
    LSTM took lengths past the sequence, a bad cu_seqlens became a device assert. They now
    ask whether this thread traces."""
    from fastbert.models import LSTMSeq2Seq
    from fastbert.ops.lstm import check_lengths
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    if hasattr(torch.compiler, "_is_compiling_flag"):
        monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
    assert not _checks.tracing()
    with pytest.raises(ValueError, match="indices"):
        ops.pad(torch.ones(2, 1), torch.tensor([-1, 0]), 1, 2)
    with pytest.raises(ValueError, match="longer than the sequence"):
        check_lengths(torch.tensor([5, 1]), 2, 3)
    q = torch.randn(7, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        ops.attention_varlen(q, q, q, torch.tensor([0, 5, 3], dtype=torch.int32),
                             torch.tensor([0, 3, 7], dtype=torch.int32), 5, 4, backend="torch")
    model = LSTMSeq2Seq(10, 12, emb=8, hidden=8, layers=1, dropout=0.0, backend="torch")
    with pytest.raises(ValueError, match="src must hold token ids"):
        model(torch.tensor([[3, 10]]), torch.tensor([2]), torch.tensor([[1]]))
    assert not _checks.has_values(torch.empty(2, device="meta"))


@pytest.mark.parametrize("op", ["attention", "cross_entropy", "masked_lm_loss", "lstm_layer"])
@pytest.mark.parametrize("autocast", [False, True])
def test_autocast_query_compiles_fullgraph_where_dynamo_cannot_trace_is_autocast_available(
        monkeypatch, op, autocast):
    """torch 2.11's Dynamo cannot trace torch.amp.is_autocast_available (a C builtin it skips):
    every op that asks for the autocast dtype broke torch.compile(fullgraph=True) there, on
    both backends. Simulated here: the query raises while Dynamo traces."""
    real = torch.amp.is_autocast_available

    def untraceable(device_type):
        if torch.compiler.is_dynamo_compiling():
            raise RuntimeError("is_autocast_available traced")
        return real(device_type)

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    if op == "attention":
        q, k, v = (torch.randn(2, 5, 2, 16, generator=g) for _ in range(3))
        args, f = (q, k, v), lambda q, k, v: ops.attention(q, k, v, backend="torch")
    elif op == "cross_entropy":
        args = (torch.randn(5, 11, generator=g), torch.tensor([3, -100, 10, 0, 7]))
        f = lambda x, t: ops.cross_entropy(x, t, backend="torch")  # noqa: E731
    elif op == "masked_lm_loss":
        args = (torch.randn(5, 16, generator=g), torch.randn(11, 16, generator=g),
                torch.tensor([3, -100, 10, 0, 7]))
        f = lambda h, w, t: ops.masked_lm_loss(h, w, None, t, backend="torch")  # noqa: E731
    else:
        args = (torch.randn(4, 2, 8, generator=g), torch.zeros(2, 4), torch.zeros(2, 4),
                torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g))
        f = lambda x, h, c, wi, wh: ops.lstm_layer(x, h, c, wi, wh, backend="torch")[0]  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got, want = compiled(*args), f(*args)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)


def test_autocast_dtype_is_none_for_meta_tensors_in_eager_and_while_tracing():
    t = torch.empty(2, device="meta")
    assert _checks.autocast_dtype(t) is None
    assert torch.compile(lambda t: _checks.autocast_dtype(t) is None, fullgraph=True,
                         backend="eager")(t)
