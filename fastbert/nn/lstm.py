"""``fastbert.nn.LSTM`` (a drop-in for ``torch.nn.LSTM``) and ``fastbert.nn.LayerNormLSTM``.

Both run ``fastbert.ops.lstm_layer`` per layer and direction: on CUDA the fused Triton
recurrence (kernels/lstm.py), with variable lengths handled inside the kernel, so a
``PackedSequence`` or a padded batch with ``lengths=`` costs the same as a padded batch.

They subclass ``torch.nn.Module``, not ``torch.nn.LSTM``: torch.compile refuses to trace
``torch.nn.LSTM`` instances (and their subclasses), while these compile with fullgraph=True.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .. import ops
from ..ops import _checks
from ..ops._checks import autocast_dtype, check_eps
from ..ops.lstm import _zero_past_lengths, check_lengths, check_not_capturing


class _ShapeError(ValueError, RuntimeError):
    """A wrong input or state shape: a ValueError, and a RuntimeError as torch.nn.LSTM raises
    for the same mistake (so code written against torch catches it)."""


class _DtypeError(ValueError, TypeError):
    """An input whose dtype is not the parameters': a ValueError as torch.nn.LSTM raises, and a
    TypeError as fastbert's other argument checks raise."""


class LSTM(torch.nn.Module):
    """Same constructor, defaults, parameter names, initialization and state_dict as
    ``torch.nn.LSTM``; returns ``(output, (h_n, c_n))`` exactly like it.

    Args (as torch.nn.LSTM):
        input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
        bidirectional=False, proj_size=0, device=None, dtype=None.
    Extra (keyword-only):
        backend: "triton", "torch" or None (auto), passed to ``fastbert.ops.lstm_layer``.

    ``forward(input, hx=None, *, lengths=None, enforce_sorted=True)``:
        input: (T, B, input_size) (or (B, T, input_size) with batch_first), unbatched
            (T, input_size), or a ``PackedSequence`` (the output is then a PackedSequence;
            eager only: its layout is host data, which neither torch.compile(fullgraph=True)
            nor a CUDA graph capture can take -- pass padded input with ``lengths`` there).
        hx: optional (h_0, c_0) of shapes (num_layers * D, B, proj_size or hidden_size) and
            (num_layers * D, B, hidden_size), D = 2 if bidirectional else 1.
        lengths: with a padded input, the valid length of each sequence, an integer tensor
            (B,) (or a list) with values in [0, T]; outputs past a sequence's length are zero and
            h_n / c_n are taken after its last valid step, in both directions.
        enforce_sorted: like ``pack_padded_sequence``: when True, ``lengths`` must be
            sorted in decreasing order (the kernels do not need it; pass False).
    """

    mode = "LSTM"  # as torch.nn.LSTM (RNNBase.mode), for code that reads it

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if (not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1
                or isinstance(dropout, bool)):
            raise ValueError("dropout should be a number in range [0, 1] representing the "
                             "probability of an element being zeroed")
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers), ("proj_size", proj_size)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} should be of type int, got: {type(v).__name__}")
        for name, v in (("bias", bias), ("batch_first", batch_first)):
            if not isinstance(v, bool):  # as torch: "False" from a config file is truthy
                raise TypeError(f"{name} should be of type bool, got: {type(v).__name__}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.backend = backend
        num_dirs = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        gate_size = 4 * hidden_size
        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            for d in range(num_dirs):
                layer_in = input_size if layer == 0 else real_hidden * num_dirs
                suffix = self._suffix(layer, d)
                params = [("weight_ih", (gate_size, layer_in)), ("weight_hh", (gate_size, real_hidden))]
                if bias:
                    params += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    params += [("weight_hr", (proj_size, hidden_size))]
                names = []
                for stem, shape in params:
                    name = stem + suffix
                    setattr(self, name, torch.nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    @staticmethod
    def _suffix(layer: int, direction: int) -> str:
        return f"_l{layer}" + ("_reverse" if direction == 1 else "")

    def reset_parameters(self) -> None:
        """uniform(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) for every weight, like torch."""
        # every stored parameter, as torch.nn.LSTM: where a parametrization is registered on a
        # weight (parametrize, weight_norm, spectral_norm, prune) its originals, not the
        # computed weight that getattr would give
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for name, p in self.named_parameters():
            self._reset_parameter(name, p, stdv)

    def _reset_parameter(self, name: str, p: torch.nn.Parameter, stdv: float) -> None:
        torch.nn.init.uniform_(p, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """Nothing to flatten: the kernels read each weight where it is (kept for
        code written against torch.nn.LSTM, which calls it)."""

    @property
    def _flat_weights(self) -> List[torch.nn.Parameter]:
        """The parameters in torch.nn.LSTM's flat order (read-only here: the kernels read each
        parameter by name, so code that replaces this list changes nothing)."""
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> List[List[torch.nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    # torch.nn.LSTM's input and state checks and its state permutation, the same functions,
    # for code that subclasses or wraps torch.nn.LSTM and calls them (forward checks on its
    # own, with the same error types)
    check_input = torch.nn.RNNBase.check_input
    get_expected_hidden_size = torch.nn.RNNBase.get_expected_hidden_size
    check_hidden_size = torch.nn.RNNBase.check_hidden_size
    get_expected_cell_size = torch.nn.LSTM.get_expected_cell_size
    check_forward_args = torch.nn.LSTM.check_forward_args
    permute_hidden = torch.nn.LSTM.permute_hidden

    def __setstate__(self, state) -> None:
        """Unpickling: what a pickle lacks gets its default, as torch.nn.LSTM does for older
        ones -- a whole torch.nn.LSTM saved with torch.save(model) and loaded as this class has
        no ``backend`` (nor, before torch 1.8, ``proj_size``); its ``_flat_weights`` list is
        this class's property."""
        super().__setstate__(state)
        self.__dict__.pop("_flat_weights", None)
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("proj_size", 0)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.backend:
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)

    def _layer_norm_params(self, suffix: str) -> dict:
        return {}

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None, *,
                lengths: Optional[Tensor] = None, enforce_sorted: bool = True):
        num_dirs = 2 if self.bidirectional else 1
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths must be None when input is a PackedSequence "
                                 "(the lengths are in its batch_sizes)")
            # its layout is host data (batch_sizes, and the rows built from them)
            check_not_capturing(input.data, "a PackedSequence")
            rows, lens = _packed_layout(input)
            # (T, B, I) in the PackedSequence's sorted batch order, as torch.nn.LSTM runs it:
            # hx is permuted into that order below and h_n / c_n back out of it, on the
            # device (sorted_indices is never read on the host: no sync)
            x, _ = _unpack(input, (rows, lens))
            batched = True
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
            lens = lengths
            if isinstance(lens, (list, tuple)):
                # a (B,) mask's tolist() or list() would read as lengths 0 / 1 (refused as a
                # bool tensor)
                if any(isinstance(v, (bool, np.bool_)) or (isinstance(v, Tensor)
                                                           and v.dtype == torch.bool)
                       for v in lens):
                    raise TypeError("lengths must hold integers, got bools (a mask?)")
                try:
                    lens = torch.as_tensor(lens, dtype=torch.int64)  # as pack_padded_sequence
                except (RuntimeError, TypeError, ValueError, OverflowError) as e:
                    raise ValueError(f"lengths must be a list of integer lengths: {e}") from None
            if lens is not None:
                if not batched:
                    raise ValueError("lengths needs a batched (3-D) input")
                if isinstance(lens, Tensor) and lens.is_cpu:
                    check_not_capturing(x, "lengths on the CPU")
                elif (isinstance(lens, Tensor) and lens.is_cuda
                      and not _checks.tracing() and not _checks.capturing(lens)):
                    # one host read, here: every layer's check of the values then reads the
                    # CPU copy without waiting for the GPU (while a CUDA graph is captured
                    # they stay on the device, checked there)
                    lens = lens.cpu()
                check_lengths(lens, x.shape[1], x.shape[0], sorted_desc=enforce_sorted)
        if x.shape[-1] != self.input_size:
            raise _ShapeError(f"input.size(-1) must be equal to input_size. "
                             f"Expected {self.input_size}, got {x.shape[-1]}")
        w0 = self.weight_ih_l0
        if x.dtype != w0.dtype and autocast_dtype(x) is None:
            # under autocast lstm_layer runs everything in the autocast dtype (torch skips
            # this check then too)
            raise _DtypeError(f"RNN input dtype ({x.dtype}) does not match weight dtype "
                              f"({w0.dtype}). Convert input: input.to({w0.dtype}), or convert "
                              f"model: model.to({x.dtype})")
        n_batch = x.shape[1]
        h_shape = (self.num_layers * num_dirs, n_batch, real_hidden)
        c_shape = (self.num_layers * num_dirs, n_batch, self.hidden_size)
        if hx is None:
            h0 = x.new_zeros(h_shape)
            c0 = x.new_zeros(c_shape)
        else:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError("hx must be a tuple (h_0, c_0)")
            h0, c0 = hx
            if not batched:
                if h0.dim() != 2 or c0.dim() != 2:
                    raise _ShapeError(f"For unbatched 2-D input, hx and cx should also be 2-D "
                                      f"but got ({h0.dim()}-D, {c0.dim()}-D) tensors")
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            elif h0.dim() != 3 or c0.dim() != 3:
                raise _ShapeError(f"For batched 3-D input, hx and cx should also be 3-D but "
                                  f"got ({h0.dim()}-D, {c0.dim()}-D) tensors")
            if tuple(h0.shape) != h_shape:
                raise _ShapeError(f"Expected hidden[0] size {h_shape}, got {tuple(h0.shape)}")
            if tuple(c0.shape) != c_shape:
                raise _ShapeError(f"Expected hidden[1] size {c_shape}, got {tuple(c0.shape)}")
            if packed and input.sorted_indices is not None:
                order = input.sorted_indices.to(h0.device)   # a no-op on the same device
                h0, c0 = h0.index_select(1, order), c0.index_select(1, order)
        # past each length the first layer's input is zeroed once here (a PackedSequence
        # unpacks with zeros there), and every layer's output is zero there: no layer needs
        # lstm_layer's own masked copy
        layer_input = x if packed or lens is None else _zero_past_lengths(x, lens)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(num_dirs):
                idx = layer * num_dirs + d
                suffix = self._suffix(layer, d)
                p = lambda stem: getattr(self, stem + suffix, None)
                y, h, c = ops.lstm_layer(
                    layer_input, h0[idx], c0[idx], p("weight_ih"), p("weight_hh"),
                    p("bias_ih"), p("bias_hh"), p("weight_hr"), lengths=lens, reverse=d == 1,
                    backend=self.backend, _padding_zeroed=True,
                    **self._layer_norm_params(suffix))
                outs.append(y)
                h_n.append(h)
                c_n.append(c)
            layer_input = outs[0] if num_dirs == 1 else torch.cat(outs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = layer_input
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if packed:
            output = _repack(output, input, rows)
            if input.unsorted_indices is not None:
                back = input.unsorted_indices.to(h_n.device)
                h_n, c_n = h_n.index_select(1, back), c_n.index_select(1, back)
        elif not batched:
            output, h_n, c_n = output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)


def _packed_layout(packed: PackedSequence) -> Tuple[Tensor, Tensor]:
    """(rows, lengths) of a PackedSequence in its sorted batch order (the order of the
    sequences in ``packed.data``, longest first): where each row of ``packed.data`` lives in
    the padded layout flattened to (T * B) -- row t * B + i for step t of the i-th sorted
    sequence -- on the data's device, and the lengths (B,) int64 on the CPU, non-increasing.

    Built on the host from ``batch_sizes`` alone (a CPU tensor, checked here), so that
    unpacking and repacking are one scatter / gather each, forward and backward
    (``pad_packed_sequence`` and a per-step slice + cat cost a copy, and through autograd a
    full-size zero fill and add, per time step). ``sorted_indices`` is not read on the host
    (pack_padded_sequence leaves it on the GPU: reading it would wait for every kernel queued
    before the call); a CUDA one is checked to be a permutation by a device-side assert. The
    rows go to the GPU from pinned memory, without a wait."""
    sizes = packed.batch_sizes
    data = packed.data
    # (PackedSequence's constructor already refuses a batch_sizes off the CPU)
    if sizes.dim() != 1 or sizes.dtype != torch.int64:
        # int64 as torch.nn.LSTM wants it (the output PackedSequence carries it on, into
        # pad_packed_sequence, which wants it too)
        raise ValueError("PackedSequence.batch_sizes must be a 1-D int64 tensor on the CPU "
                         f"(as pack_padded_sequence makes it), got {sizes.dtype} of shape "
                         f"{tuple(sizes.shape)}")
    n_steps = sizes.numel()
    n_batch = int(sizes[0]) if n_steps else 0
    if n_steps and (int(sizes[-1]) < 1 or bool((sizes[1:] > sizes[:-1]).any())):
        raise ValueError("PackedSequence.batch_sizes must be positive and non-increasing (the "
                         f"number of sequences still running at each step), got "
                         f"{sizes.tolist()}")
    if int(sizes.sum()) != data.shape[0]:
        raise ValueError(f"PackedSequence.batch_sizes sums to {int(sizes.sum())} rows, but its "
                         f"data has {data.shape[0]}")
    order = packed.sorted_indices
    if order is not None:
        # torch.nn.LSTM trusts it; here one that is not a permutation is an error, found
        # without a host read of a CUDA tensor (unsorted_indices, which only orders h_n and
        # c_n back, is taken as given, as torch does)
        if (order.dim() != 1 or order.shape[0] != n_batch
                or order.dtype not in (torch.int64, torch.int32)):
            raise ValueError(f"PackedSequence.sorted_indices must be a permutation of "
                             f"0..{n_batch - 1} (batch_sizes[0] = {n_batch} sequences), got "
                             f"{str(order.dtype).replace('torch.', '')} of shape "
                             f"{tuple(order.shape)}")
        if order.device.type == "cpu":
            if not torch.equal(order.sort().values, torch.arange(n_batch)):
                raise ValueError(f"PackedSequence.sorted_indices must be a permutation of "
                                 f"0..{n_batch - 1} (batch_sizes[0] = {n_batch} sequences), "
                                 f"got {order.tolist()}")
        elif not _checks.tracing() and not _checks.capturing(order):
            ok = (order.sort().values == torch.arange(n_batch, device=order.device)).all()
            torch._assert_async(ok, f"PackedSequence.sorted_indices must be a permutation of "
                                    f"0..{n_batch - 1}")
    keep = torch.arange(n_batch)[None, :] < sizes[:, None]  # (T, B), sorted batch order
    rows = keep.reshape(-1).nonzero().reshape(-1)
    lengths = keep.sum(0)
    if data.is_cuda:
        # a copy from pageable memory this size would wait for the queued kernels
        rows = rows.pin_memory().to(data.device, non_blocking=True)
    else:
        rows = rows.to(data.device)
    return rows, lengths


def _unpack(packed: PackedSequence, layout: Optional[Tuple[Tensor, Tensor]] = None):
    """(padded (T, B, *) in the PackedSequence's sorted batch order, zeros past each end;
    lengths (B,) int64 on the CPU, non-increasing), in one scatter: ``pad_packed_sequence``'s
    result with the batch indexed by ``sorted_indices``. ``layout``:
    ``_packed_layout(packed)`` when already made."""
    rows, lengths = layout if layout is not None else _packed_layout(packed)
    data, sizes = packed.data, packed.batch_sizes
    n_steps, n_batch = sizes.numel(), lengths.numel()
    flat = data.new_zeros((n_steps * n_batch,) + data.shape[1:])
    padded = flat.index_copy(0, rows, data)
    return padded.view((n_steps, n_batch) + data.shape[1:]), lengths


def _repack(padded: Tensor, like: PackedSequence,
            rows: Optional[Tensor] = None) -> PackedSequence:
    """Pack ``padded`` (T, B, *) (the sorted batch order of ``like``) with the layout of
    ``like``, in one gather. ``rows``: ``_packed_layout(like)[0]`` when already made."""
    if rows is None:
        rows = _packed_layout(like)[0]
    flat = padded.reshape((-1,) + padded.shape[2:])
    data = flat.index_select(0, rows)
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class LayerNormLSTM(LSTM):
    """LSTM with LayerNorm on the gate pre-activations and on the cell (haste's
    LayerNormLSTM, Ba et al. 2016):

        gates = LN(W_ih x) * g_ih + b_ih + LN(W_hh h) * g_hh + b_hh
        c' = f * c + i * g,   h' = o * tanh(LN(c') * g_c + b_c)   (then h' = W_hr h' with
                                                                 proj_size, as in LSTM)

    Same constructor and call as ``LSTM`` (plus ``eps``); the LSTM weights have torch's
    names, and each layer / direction adds ``layer_norm_ih_weight_l{k}``,
    ``layer_norm_hh_weight_l{k}`` (4H,), ``layer_norm_cell_weight_l{k}`` and
    ``layer_norm_cell_bias_l{k}`` (H,) (``_reverse`` for the reverse direction), initialized
    to ones / zeros. On "triton" the recurrence runs on the fused LayerNorm-LSTM row kernels,
    with or without ``proj_size`` (hidden <= 2048; past that auto falls back to the PyTorch
    recurrence).
    """

    _LN_STEMS = ("layer_norm_ih_weight", "layer_norm_hh_weight", "layer_norm_cell_weight",
                 "layer_norm_cell_bias")

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, eps: float = 1e-5,
                 backend: Optional[str] = None):
        check_eps("LayerNormLSTM", eps)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype, backend=backend)
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self._ln_names: List[str] = []
        for layer in range(num_layers):
            for d in range(2 if bidirectional else 1):
                suffix = self._suffix(layer, d)
                for stem in self._LN_STEMS:
                    n = 4 * hidden_size if stem in ("layer_norm_ih_weight", "layer_norm_hh_weight") \
                        else hidden_size
                    setattr(self, stem + suffix, torch.nn.Parameter(torch.empty(n, **factory)))
                    self._ln_names.append(stem + suffix)
        self._reset_layer_norm()

    def _reset_layer_norm(self) -> None:
        # the stored parameters (a parametrization's originals too: see LSTM.reset_parameters)
        for name, p in self.named_parameters():
            if any(stem in name for stem in self._LN_STEMS):
                self._reset_parameter(name, p, 0.0)

    def _reset_parameter(self, name: str, p: torch.nn.Parameter, stdv: float) -> None:
        # one pass in LSTM.reset_parameters: the LayerNorm parameters draw nothing from the
        # generator, so the LSTM weights take the same draws as torch.nn.LSTM's
        if "layer_norm_cell_bias" in name:
            torch.nn.init.zeros_(p)
        elif any(stem in name for stem in self._LN_STEMS):
            torch.nn.init.ones_(p)
        else:
            super()._reset_parameter(name, p, stdv)

    def _layer_norm_params(self, suffix: str) -> dict:
        return {"ln_ih_weight": getattr(self, "layer_norm_ih_weight" + suffix),
                "ln_hh_weight": getattr(self, "layer_norm_hh_weight" + suffix),
                "ln_cell_weight": getattr(self, "layer_norm_cell_weight" + suffix),
                "ln_cell_bias": getattr(self, "layer_norm_cell_bias" + suffix),
                "eps": self.eps}

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", eps={self.eps}" if self.eps != 1e-5 else "")
