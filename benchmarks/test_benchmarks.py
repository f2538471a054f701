"""The benchmarks under pytest-benchmark, for users who live in pytest:

    pytest benchmarks/ --benchmark-only

Every Case of every ``bench_*.py`` becomes one parametrized benchmark per implementation. The
timed function synchronizes the device, so the time is the work's, not the launch's.
"""
import importlib

import pytest
import torch

from benchmarks._harness import sync
from benchmarks.run_all import bench_modules

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type != "cuda"


def _params():
    out = []
    for mod_name in bench_modules():
        mod = importlib.import_module(f"benchmarks.{mod_name}")
        if not hasattr(mod, "cases"):   # bench_translation: training runs, not timed calls
            continue
        for case in mod.cases(DEVICE, QUICK):
            tag = "-".join(f"{v}" for v in case.params.values())
            for impl, fn in case.impls.items():
                out.append(pytest.param(fn, id=f"{mod_name}-{case.name}-{tag}-{impl}".replace(" ", "_")))
    return out


@pytest.mark.parametrize("fn", _params())
def test_benchmark(benchmark, fn):
    def timed():
        fn()
        sync(DEVICE)

    benchmark(timed)


def test_results_dir_keeps_cpu_runs_out_of_the_committed_results(monkeypatch, tmp_path):
    """Only GPU measurements belong in benchmarks/results: a CPU run (make bench on a laptop)
    writes to the git-ignored _scratch/ unless $FASTBERT_RESULTS says otherwise."""
    import os

    from benchmarks import _harness as h
    monkeypatch.setattr(h, "DEFAULT_RESULTS", str(tmp_path))
    monkeypatch.delenv(h.RESULTS_ENV, raising=False)
    assert h.results_dir(torch.device("cpu")) == os.path.join(str(tmp_path), "_scratch")
    assert h.results_dir(torch.device("cuda", 0)) == str(tmp_path)
    monkeypatch.setenv(h.RESULTS_ENV, str(tmp_path / "x"))
    assert h.results_dir(torch.device("cpu")) == str(tmp_path / "x")
