"""Every benchmark script runs end to end (CPU quick mode: tiny shapes, reference paths).

This proves the scripts work, not how fast anything is: speed is measured by
``make gpu-check`` on a GPU and recorded under benchmarks/results/.
"""
import importlib

import pytest

from benchmarks.run_all import bench_modules


@pytest.mark.parametrize("name", bench_modules())
def test_bench_script_runs_in_quick_mode(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTBERT_RESULTS", str(tmp_path))
    mod = importlib.import_module(f"benchmarks.{name}")
    mod.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    assert " ms" in out
    written = sorted(p.name for p in tmp_path.iterdir())
    assert any(p.endswith(".csv") for p in written) and any(p.endswith(".md") for p in written)
