"""fastbert.kernels is importable under the fastbert name only, in a bare checkout too."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, cwd, env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_kernels_import_as_fastbert_kernels_never_top_level():
    import fastbert
    import fastbert.kernels.layer_norm as k
    assert os.path.samefile(os.path.dirname(k.__file__), os.path.join(ROOT, "kernels"))
    assert fastbert.kernels.layer_norm is k
    assert "kernels" not in sys.modules or not getattr(sys.modules["kernels"], "__file__", "").startswith(ROOT)


def test_bare_checkout_with_pythonpath(tmp_path):
    # what the GPU machine does: no install, PYTHONPATH=<checkout>, run from elsewhere
    out = _run("import fastbert, fastbert.kernels.layer_norm as k, sys; "
               "print(k.__name__, 'kernels' in sys.modules)", str(tmp_path), {"PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fastbert.kernels.layer_norm", "False"]


def _can_build_wheels_offline() -> bool:
    import importlib.util
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    # bdist_wheel moved into setuptools in 70.1; before that the wheel package provides it
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.skipif(not _can_build_wheels_offline(),
                    reason="no setuptools>=70.1 or wheel here to build a wheel without network "
                           "(the GPU machine); CI's venv has them")
def test_wheel_contains_fastbert_kernels_and_no_top_level_kernels(tmp_path):
    # build from a copy: an in-tree build would leave build/ in the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("fastbert", "kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    import zipfile
    (whl,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / whl).namelist()
    assert "fastbert/kernels/layer_norm.py" in names
    assert "fastbert/kernels/_common.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_without_triton_the_torch_backend_works_and_triton_says_why(tmp_path):
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, fastbert\n"
            "y = fastbert.ops.layer_norm(torch.randn(2, 4), None, None)\n"
            "try:\n"
            "    fastbert.ops.layer_norm(torch.randn(2, 4), None, None, backend='triton')\n"
            "except fastbert.ops.BackendUnavailable as e:\n"
            "    print('raised:', e)\n")
    out = _run(code, str(tmp_path), {"PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert "raised:" in out.stdout and "triton is not importable" in out.stdout
