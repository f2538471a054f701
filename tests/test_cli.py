"""The command line: `fastbert selfcheck` (what `make demo` starts with) and `fastbert env`."""
import os
import subprocess
import sys

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
               "masked_lm_loss", "lstm_layer"):
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
