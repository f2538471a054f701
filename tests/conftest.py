"""Test setup shared by every test.

On a machine without a CUDA device, Triton kernels run in the interpreter on CPU tensors:
``TRITON_INTERPRET=1`` must be set before triton is imported, so it is set here, first.
On a GPU machine the same tests run the compiled kernels on CUDA tensors, and the tests
marked ``gpu`` run too.
"""
import os


def _has_cuda_device() -> bool:
    if os.environ.get("FASTBERT_TEST_DEVICE") == "cpu":
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


if not _has_cuda_device():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: CUDA when present, else CPU tensors under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """One intra-op CPU thread: tests of many tiny matmuls (LSTM steps) run far slower when
    torch's threads contend on a small, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Messages of CUDA errors after which the process's CUDA context is unusable: every later
# test in the process fails with the same error (on the H200, 2026-11-28, one device-side
# assert turned a pytest-xdist worker's next 234 tests into errors).
_CONTEXT_LOST = ("device-side assert triggered", "illegal memory access",
                 "unspecified launch failure", "an illegal instruction")


def cuda_context_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it chains from) is a CUDA error saying the context is
    lost: a RuntimeError (torch.AcceleratorError is one) with such a message, not, say, an
    assertion quoting a child process's output."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _CONTEXT_LOST):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# the node id of the test that lost this process's CUDA context, once one has
_lost_in: list = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if (call.excinfo is not None and outcome.get_result().failed
            and cuda_context_lost(call.excinfo.value)):
        _lost_in.append(item.nodeid)


def pytest_runtest_logfinish(nodeid, location):
    """Under pytest-xdist, a worker whose CUDA context a test lost exits once that test's
    report is sent: xdist starts a fresh worker for the rest (in one process the session
    goes on, and the later failures say why)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if _lost_in and worker:
        print(f"\n{worker}: the CUDA context was lost in {_lost_in[0]}; exiting so that a "
              "fresh worker runs the rest", flush=True)
        os._exit(3)
