"""Models built from fastbert.nn layers."""
from .lstm_seq2seq import LSTMSeq2Seq

__all__ = ["LSTMSeq2Seq"]
