"""The suite's own hooks (tests/conftest.py): a pytest-xdist worker whose CUDA context a test
lost exits, and a fresh worker runs the rest (on the H200, 2026-11-28, one device-side assert
turned a worker's next 234 tests into errors)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cuda_context_lost


def test_cuda_context_lost_reads_the_message_and_its_chain():
    assert cuda_context_lost(RuntimeError("CUDA error: device-side assert triggered"))
    assert cuda_context_lost(RuntimeError("CUDA error: an illegal memory access was "
                                          "encountered"))
    assert not cuda_context_lost(RuntimeError("CUDA out of memory"))
    assert not cuda_context_lost(ValueError("target must hold class indices"))
    # an assertion quoting a child process's CUDA error: this process's context is fine
    assert not cuda_context_lost(AssertionError("... CUDA error: device-side assert triggered"))
    try:
        try:
            raise RuntimeError("CUDA error: unspecified launch failure")
        except RuntimeError as inner:
            raise AssertionError("wrapped") from inner
    except AssertionError as outer:
        assert cuda_context_lost(outer)


def test_an_xdist_worker_that_lost_its_cuda_context_is_replaced(tmp_path):
    pytest.importorskip("xdist")
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_lost.py").write_text(
        "def test_a():\n"
        "    raise RuntimeError('CUDA error: device-side assert triggered')\n"
        "def test_b():\n    pass\n"
        "def test_c():\n    pass\n"
        "def test_d():\n    raise RuntimeError('another error')\n")
    # (not the variables of the xdist worker this test may run in)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["FASTBERT_TEST_DEVICE"] = "cpu"
    def run(*xdist):
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", *xdist, "-p",
                            "no:cacheprovider", "test_lost.py"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        return r.stdout + r.stderr
    out = run("-n", "1")
    # the worker ended after test_a (xdist reports that as a crash of test_a), b and c
    # passed on a fresh one, and d's plain error did not end its worker
    assert "crashed while running 'test_lost.py::test_a'" in out, out
    assert "3 failed, 2 passed" in out, out
    # in one process (no xdist) the session goes on
    out = run()
    assert "2 failed, 2 passed" in out and "crashed" not in out, out
