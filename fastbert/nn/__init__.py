"""Drop-in modules built on fastbert.ops."""
from .layer_norm import LayerNorm

__all__ = ["LayerNorm"]
