"""``fast_op``: a ``torch.library.custom_op`` that eager calls reach without the dispatcher.

Every op of fastbert is a custom op, so that ``torch.compile(fullgraph=True)``, opcheck and
the dispatcher's modes see it. But a custom op's eager call is slow on the host: measured on
an H200 machine (torch 2.11, benchmarks/profile_overhead.py, 2026-11-26), a LayerNorm
forward+backward over 8192 x 768 took 1183 us of host time for 58 us of GPU time (eager
PyTorch: 187 us), cProfile pointing at torch/_library/custom_ops.py's ``backend_impl`` and the
autograd wrapper. Skipping them took attention's forward+backward from 1628 to 920 us of host
time there (benchmarks/results/overhead_nvidia-h200*.txt): part of the cost, not all.

``fast_op(name, mutates_args=...)`` is used as ``torch.library.custom_op`` is, and registers
exactly that custom op (``torch.ops.fastbert.<name>``, its fake implementation, its autograd).
Called from Python, it runs the undecorated function directly -- wrapped in an equivalent
``torch.autograd.Function`` (the same ``setup_context`` and ``backward``) when a gradient is
needed -- unless something must see the custom op: torch.compile's tracing, a dispatch or
torch-function mode (FakeTensorMode, FlopCounterMode, ...), or a tensor subclass argument
(FakeTensor, FunctionalTensor, DTensor); then it calls the custom op. Backward functions call
other fast ops the same way, so an eager backward stays on the direct path while
AOTAutograd's trace of it (fake, functional tensors) records the custom ops.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

# The direct path's checks run on every eager call of every op, so each is one C-level query
# (or a type identity test) bound to a module global: ~0.05 us apiece here, where a
# torch.compiler.is_compiling() call costs 0.15 us and a generator over the arguments 2 us.
_Parameter = torch.nn.Parameter
# torch.compile's trace: Dynamo evaluates is_dynamo_compiling() to True (it does not run it);
# _is_compiling_flag is what torch.compiler.is_compiling() returns when really run: True under
# torch.export (and, in recent torch, during a whole compile session)
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling


class _CompilingFlag:
    """Stands in for torch.compiler where a torch lacks its private ``_is_compiling_flag``
    (present in 2.11-2.14): the public query instead, a little slower."""

    @property
    def _is_compiling_flag(self) -> bool:
        return torch.compiler.is_compiling()


_compiler = torch.compiler if hasattr(torch.compiler, "_is_compiling_flag") else _CompilingFlag()
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_functorch_active = torch._C._are_functorch_transforms_active
_tracing_state = torch._C._get_tracing_state
_grad_enabled = torch._C.is_grad_enabled
# argument types that are never tensors nor hold any: skipped without an isinstance call
_LEAVES = frozenset((type(None), bool, int, float, str, torch.dtype, torch.device))


def _modes_active() -> bool:
    """Something that must see the custom op: torch.compile's tracing (or torch.export's), a
    dispatch or torch-function mode, a functorch transform (vmap, grad, functionalize: their
    wrapped tensors look like plain ones), torch.jit.trace."""
    return (_is_dynamo_compiling() or _compiler._is_compiling_flag or _dispatch_stack_len() > 0
            or _function_mode_enabled() or _functorch_active()
            or _tracing_state() is not None)


def _scan(args, grad_mode: bool) -> Optional[bool]:
    """None when some tensor among ``args`` (or inside a list / tuple entry) is not a plain
    Tensor / Parameter (a subclass: FakeTensor, FunctionalTensor, DTensor, ...); else
    whether one requires grad, looked at only when ``grad_mode`` is True."""
    grad = False
    for a in args:
        tp = type(a)
        if tp is Tensor or tp is _Parameter:
            if grad_mode and not grad:
                grad = a.requires_grad
        elif tp in _LEAVES:
            pass
        elif isinstance(a, (list, tuple)):
            for t in a:
                tp = type(t)
                if tp is Tensor or tp is _Parameter:
                    if grad_mode and not grad:
                        grad = t.requires_grad
                elif isinstance(t, Tensor):
                    return None
        elif isinstance(a, Tensor):
            return None
    return grad


def direct_call_ok(args: Sequence[Any]) -> bool:
    """Whether an eager call may skip the dispatcher: not tracing, no mode active, plain
    tensors only."""
    return not _modes_active() and _scan(args, False) is not None


class FastOp:
    """A custom op and its direct eager path (see the module docstring)."""

    def __init__(self, name: str, fn: Callable, mutates_args):
        self.name = name
        self.fn = fn
        self.op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        self._function: Optional[type] = None
        # positions of the arguments the op writes in place: the direct path bumps their
        # version counters, as the dispatcher does for a mutating custom op (autograd's check
        # that a saved tensor was not modified relies on it)
        names = list(inspect.signature(fn).parameters)
        self._mutated = tuple(names.index(n) for n in mutates_args)

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self.fn

        # the old style (ctx first in forward, setup inside it): a Function that defines
        # setup_context binds its arguments with inspect.signature at every apply (~100 us)
        def forward(ctx, *args):
            out = fn(*args)
            setup_context(ctx, args, out)
            return out

        self._function = type(
            f"{self.name.split('::')[-1]}_function", (torch.autograd.Function,), {
                "forward": staticmethod(forward),
                "backward": staticmethod(backward),
            })

    def __call__(self, *args):
        # _modes_active(), inlined: this runs once per op call on the hot path
        if (_is_dynamo_compiling() or _compiler._is_compiling_flag or _dispatch_stack_len() > 0
                or _function_mode_enabled() or _functorch_active()
                or _tracing_state() is not None):
            return self.op(*args)
        grad = _scan(args, _grad_enabled())
        if grad is None:
            return self.op(*args)
        if grad:
            # an op without autograd (the backward ops) under a graph being recorded (double
            # backward, create_graph=True): the custom op, which raises that it has no
            # derivative, rather than outputs silently without one
            if self._function is None:
                return self.op(*args)
            return self._function.apply(*args)
        out = self.fn(*args)
        for i in self._mutated:
            if isinstance(args[i], Tensor):
                torch.autograd.graph.increment_version(args[i])
        return out


def fast_op(name: str, *, mutates_args) -> Callable[[Callable], FastOp]:
    """Decorator: ``torch.library.custom_op(name, mutates_args=...)`` with a direct eager path."""
    def wrap(fn: Callable) -> FastOp:
        return FastOp(name, fn, mutates_args)
    return wrap
