"""lmforge: multi-step optimization, training and prediction of language models."""

__version__ = "0.1.0"
