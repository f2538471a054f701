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

_PLAIN = (Tensor, torch.nn.Parameter)


def _tensor_args(args):
    """The tensors among ``args`` and inside their list / tuple entries."""
    for a in args:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, Tensor))


def _scan(args) -> tuple[bool, bool]:
    """(every tensor argument is a plain Tensor / Parameter, some tensor requires grad)."""
    plain, grad = True, False
    for t in _tensor_args(args):
        plain = plain and type(t) in _PLAIN
        grad = grad or t.requires_grad
    return plain, grad


def _modes_active() -> bool:
    """Something that must see the custom op: torch.compile's tracing, a dispatch or
    torch-function mode, a functorch transform (vmap, grad, functionalize: their wrapped
    tensors look like plain ones), torch.jit.trace."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()
            or torch._C._get_tracing_state() is not None)


def direct_call_ok(args: Sequence[Any]) -> bool:
    """Whether an eager call may skip the dispatcher: not tracing, no mode active, plain
    tensors only."""
    return not _modes_active() and _scan(args)[0]


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
        if _modes_active():
            return self.op(*args)
        plain, grad = _scan(args)
        if not plain:
            return self.op(*args)
        if grad and torch.is_grad_enabled():
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
