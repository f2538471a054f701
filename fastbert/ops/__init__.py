"""Functional fused ops.

Every op takes ``backend=None | "triton" | "cuda" | "torch"``; the choice is made by
``fastbert.ops._dispatch.resolve`` (argument, then ``FASTBERT_BACKEND``, then
``fastbert.use_backend(...)``, then auto). Kernel backends run as ``torch.library`` custom
ops with fake implementations and registered autograd, so ``torch.compile(fullgraph=True)``
traces through them.
"""
from ._dispatch import BACKENDS, BackendUnavailable, use_backend
from .attention import attention, attention_ref, attention_varlen, pad, unpad
from .bias_gelu import bias_gelu, bias_gelu_ref
from .cross_entropy import cross_entropy, cross_entropy_ref, masked_lm_loss, masked_lm_loss_ref
from .embedding import embedding_layer_norm, embedding_layer_norm_ref
from .layer_norm import gelu_layer_norm, layer_norm, layer_norm_ref
from .lstm import lstm_layer, lstm_layer_ref

__all__ = [
    "BACKENDS", "BackendUnavailable", "use_backend",
    "attention", "attention_varlen", "unpad", "pad", "attention_ref",
    "layer_norm", "gelu_layer_norm", "layer_norm_ref",
    "bias_gelu", "bias_gelu_ref",
    "embedding_layer_norm", "embedding_layer_norm_ref",
    "cross_entropy", "masked_lm_loss", "cross_entropy_ref", "masked_lm_loss_ref",
    "lstm_layer", "lstm_layer_ref",
]
