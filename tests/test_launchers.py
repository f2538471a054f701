"""Every kernel launcher runs on its inputs' GPU (kernels._common.on_tensor_device)."""
import importlib
import inspect
import re

import pytest
import torch

from tests.aot_compile import kernel_modules


def _launches(fn) -> bool:
    """Whether ``fn``'s own code launches a kernel (Triton's ``kernel[grid](...)``, or
    ``launch`` / ``bind`` from kernels/_launch.py)."""
    src = inspect.getsource(inspect.unwrap(fn))
    return bool(re.search(r"\b(launch|bind)\(|_kernel\[[^\]]*\]\(", src))


def _launchers():
    """Every public function of the kernel modules that launches a kernel itself, and
    linear_cross_entropy (through helpers)."""
    out = []
    for name in kernel_modules() + ["_common"]:
        mod = importlib.import_module(f"fastbert.kernels.{name}")
        for fn_name, fn in vars(mod).items():
            if (inspect.isfunction(fn) and fn.__module__ == mod.__name__
                    and not fn_name.startswith("_")
                    and (_launches(fn) or fn_name == "linear_cross_entropy")):
                out.append((f"{name}.{fn_name}", fn))
    return out


def test_there_are_launchers_to_check():
    assert len(_launchers()) >= 16


@pytest.mark.parametrize("name,fn", _launchers(), ids=[n for n, _ in _launchers()])
def test_launcher_switches_to_its_tensors_device(name, fn):
    assert hasattr(fn, "__wrapped__"), f"{name} is not decorated with @on_tensor_device"


def test_on_tensor_device_passes_cpu_tensors_and_arguments_through():
    from fastbert.kernels._common import on_tensor_device

    @on_tensor_device
    def f(n, x, *, scale=1.0):
        """doc"""
        return x * scale + n

    assert f.__doc__ == "doc" and f.__name__ == "f"
    assert torch.equal(f(1, torch.ones(2), scale=2.0), torch.full((2,), 3.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two GPUs")
def test_launch_on_a_non_current_gpu_matches_the_current_one():
    from fastbert.ops import layer_norm
    x = torch.randn(8, 64, device="cuda:0")
    with torch.cuda.device(0):
        ref = layer_norm(x, None, None, backend="triton")
        got = layer_norm(x.to("cuda:1"), None, None, backend="triton")
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), ref.cpu())


def test_host_integer_helpers_match_triton():
    # kernels/_common.py's cdiv / next_power_of_2 replace triton's (ConstexprFunctions, ~5 us a
    # call) in the launchers: the same values
    import triton
    from fastbert.kernels._common import cdiv, next_power_of_2
    for a in list(range(0, 70)) + [1023, 1024, 1025, 30522, 2**31 + 5]:
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 16, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
