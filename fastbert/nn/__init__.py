"""Drop-in modules built on fastbert.ops."""
from .layer_norm import LayerNorm
from .lstm import LSTM, LayerNormLSTM

__all__ = ["LayerNorm", "LSTM", "LayerNormLSTM"]
