"""Triton kernels of fastbert, imported as ``fastbert.kernels``.

Each module holds kernels and their launchers only (no autograd, no modules, nothing runs at
import beyond defining functions). ``fastbert.ops`` decides which backend runs and makes the
kernels differentiable.
"""
