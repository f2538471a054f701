"""Build script.

The default install is pure Python: ``fastbert`` plus the Triton kernels in ``kernels/``,
installed as ``fastbert.kernels`` (never as a top-level ``kernels`` module: a different
package owns that name).

The CUDA C++ kernels in ``csrc/`` are built only when asked for, because that build needs
the CUDA toolkit and the CUDA build of torch already installed::

    FASTBERT_BUILD_CUDA=1 pip install --no-build-isolation -e .

It produces the extension module ``fastbert._C``; ``fastbert.ops`` reports the "cuda"
backend usable only when that module imports.
"""
import glob
import os

from setuptools import setup

PACKAGES = [
    "fastbert",
    "fastbert.ops",
    "fastbert.nn",
    "fastbert.models",
    "fastbert.data",
    "fastbert.train",
    "fastbert.kernels",
]
PACKAGE_DIR = {"fastbert.kernels": "kernels"}


def cuda_extensions():
    if os.environ.get("FASTBERT_BUILD_CUDA", "0") != "1":
        return [], {}
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        raise RuntimeError("FASTBERT_BUILD_CUDA=1 but csrc/ holds no .cu or .cpp sources")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        name="fastbert._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math",
                     "-gencode=arch=compute_80,code=sm_80",
                     "-gencode=arch=compute_90,code=sm_90"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
