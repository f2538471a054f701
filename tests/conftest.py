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
