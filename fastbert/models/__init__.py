"""Models built from fastbert.nn layers and fastbert.ops."""
from .lstm_seq2seq import LSTMSeq2Seq
from .transformer_seq2seq import Seq2SeqTransformer

__all__ = ["LSTMSeq2Seq", "Seq2SeqTransformer"]
