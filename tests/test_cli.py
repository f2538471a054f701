"""The command line: `fastbert selfcheck` (what `make demo` starts with) and `fastbert env`."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "fastbert.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_selfcheck_runs_every_op_against_fp64_and_passes():
    out = _run("selfcheck")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for op in ("layer_norm", "bias_gelu", "attention", "embedding_layer_norm", "cross_entropy",
               "masked_lm_loss", "lstm_layer", "LayerNorm-LSTM", "attention_varlen"):
        assert op in out.stdout
    assert "FAIL" not in out.stdout
    assert "ops agree with their fp64 references" in out.stdout


def test_env_subcommand():
    out = _run("env")
    assert out.returncode == 0 and "backends:" in out.stdout


def test_bench_outside_a_checkout_is_skipped_not_failed(monkeypatch, capsys):
    """An installed fastbert (a wheel) has no benchmarks/ package: `fastbert demo` runs the
    self-check and says the benchmark ships with the checkout, exit 0 (not 1)."""
    import argparse

    from fastbert import cli
    monkeypatch.setitem(sys.modules, "benchmarks", None)   # import benchmarks -> ImportError
    assert cli.cmd_bench(argparse.Namespace(device="cpu")) == 0
    assert "skipped" in capsys.readouterr().out


@pytest.mark.parametrize("module, usage", [("fastbert", "usage: fastbert [-h]"),
                                           ("fastbert.selfcheck", "usage: fastbert selfcheck")])
def test_python_m_entry_points_are_the_command_line(module, usage):
    """`python -m fastbert` is the CLI and `python -m fastbert.selfcheck` its selfcheck (the
    latter ran nothing and exited 0: a user could take it for a pass)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith(usage), out.stdout + out.stderr


def test_bad_device_argument_is_a_clear_error():
    out = _run("selfcheck", "--device", "gpu0")
    assert out.returncode == 2 and "expected cpu, cuda or cuda:N, got 'gpu0'" in out.stderr


def test_cuda_device_without_one_is_a_clear_error(capsys):
    import argparse

    import torch

    from fastbert import cli
    if torch.cuda.is_available():
        args = argparse.Namespace(device=f"cuda:{torch.cuda.device_count()}")
        assert cli.cmd_selfcheck(args) == 2
        assert "CUDA device(s)" in capsys.readouterr().err
    else:
        assert cli.cmd_selfcheck(argparse.Namespace(device="cuda")) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err


def test_selfcheck_reports_an_op_that_raises_as_a_fail_row_and_goes_on(monkeypatch, capsys):
    import torch

    from fastbert import selfcheck

    def boom():
        raise RuntimeError("kernel exploded\nsecond line")
    good = selfcheck.CheckResult("x", "2x2", "float32", "triton", 0.0, 0.0, 1e-4, 0.0)
    monkeypatch.setattr(selfcheck, "checks", lambda device: {"bad op": boom, "good op": lambda: good})
    results = selfcheck.run(torch.device("cpu"))
    assert [(r.op, r.ok) for r in results] == [("bad op", False), ("good op", True)]
    out = capsys.readouterr().out
    assert "bad op" in out and "FAIL: RuntimeError: kernel exploded second line" in out


def test_selfcheck_without_triton_says_why_and_does_not_fail(monkeypatch, capsys):
    """macOS / Windows (no triton installed): the kernels cannot run; the demo says so and
    goes on to the benchmark instead of a BackendUnavailable traceback."""
    import argparse

    from fastbert import cli
    from fastbert.ops import _dispatch
    monkeypatch.setattr(_dispatch, "triton_import_error",
                        lambda: "triton is not importable (ModuleNotFoundError: No module named 'triton')")
    assert cli.cmd_selfcheck(argparse.Namespace(device="cpu")) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "No module named 'triton'" in out


def test_selfcheck_with_a_triton_whose_interpreter_cannot_run_the_kernels(monkeypatch, capsys):
    """Triton 3.6's interpreter fails on every row-looping kernel (program_id is a (1,) array
    there): on CPU the self-check says so and does not fail, an explicit backend='triton'
    names the version, auto takes the reference."""
    import argparse

    import torch
    from fastbert import cli, ops
    from fastbert.ops import _dispatch
    if not _dispatch.interpreter_enabled():   # a GPU machine: the kernels are compiled there
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET)")
    monkeypatch.setattr(_dispatch, "_TRITON_VERSION", (3, 6))
    assert cli.cmd_selfcheck(argparse.Namespace(device="cpu")) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "Triton 3.6 interpreter cannot run" in out
    x = torch.randn(2, 8)
    with pytest.raises(ops.BackendUnavailable, match="Triton 3.6 interpreter.*>= 3.7"):
        ops.layer_norm(x, None, None, backend="triton")
    torch.testing.assert_close(ops.layer_norm(x, None, None),
                               torch.nn.functional.layer_norm(x, (8,)))
    monkeypatch.setattr(_dispatch, "_TRITON_VERSION", (3, 7))
    assert _dispatch.interpreter_version_error() is None


def test_selfcheck_on_cpu_with_the_interpreter_turned_off_says_so():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=ROOT, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "fastbert.cli", "selfcheck", "--device", "cpu"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    from fastbert.ops import _dispatch
    if _dispatch.interpreter_version_error() is not None:
        # a Triton whose interpreter cannot run the kernels at all (the GPU machine's 3.6):
        # that is what the check says first, and it skips rather than fails
        assert out.returncode == 0 and "interpreter cannot run fastbert's kernels" \
            in out.stdout, out.stdout + out.stderr
        return
    assert out.returncode == 1 and "not run: on CPU the Triton kernels run only in the " \
        "interpreter, which TRITON_INTERPRET='0' turns off" in out.stdout, out.stdout + out.stderr
