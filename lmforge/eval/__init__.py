"""Evaluation: held-out loss, perplexity and tokenizer-independent bits per byte."""

from lmforge.eval.perplexity import evaluate, score_tokens

__all__ = ["evaluate", "score_tokens"]
