"""fastbert: fused GPU kernels for BERT-family training.

Public entry points:
    fastbert.ops      -- functional ops (layer_norm, bias_gelu, ...) with backend dispatch
    fastbert.nn       -- drop-in modules (LayerNorm, ...)
    fastbert.use_backend(name) -- context manager choosing "triton", "cuda" or "torch"
    fastbert.checkpoint_context_fn -- ``context_fn`` for torch.utils.checkpoint that keeps
                      the forward's use_backend block for the recomputation
"""
import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _alias_checkout_kernels():
    """Expose ``<checkout>/kernels`` as ``fastbert.kernels``.

    A wheel installs the Triton kernels as the subpackage ``fastbert/kernels``. In a bare
    checkout (``PYTHONPATH=.``, as on the GPU test machine, which cannot pip-install) and in
    an editable install they live in the top-level ``kernels/`` folder instead; loading that
    folder under the name ``fastbert.kernels`` keeps a single import name everywhere and never
    creates a top-level ``kernels`` module (another package owns that name).
    """
    if "fastbert.kernels" in _sys.modules:
        return
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isfile(_os.path.join(here, "kernels", "__init__.py")):
        return  # installed wheel: the ordinary import finds it
    init = _os.path.join(_os.path.dirname(here), "kernels", "__init__.py")
    if not _os.path.isfile(init):
        return  # let ``import fastbert.kernels`` fail with the ordinary message
    spec = _ilu.spec_from_file_location(
        "fastbert.kernels", init, submodule_search_locations=[_os.path.dirname(init)]
    )
    module = _ilu.module_from_spec(spec)
    _sys.modules["fastbert.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del _sys.modules["fastbert.kernels"]
        raise
    globals()["kernels"] = module


_alias_checkout_kernels()

from .ops._dispatch import checkpoint_context_fn, use_backend  # noqa: E402
from . import ops  # noqa: E402
from . import nn  # noqa: E402

__all__ = ["ops", "nn", "use_backend", "checkpoint_context_fn", "__version__"]
