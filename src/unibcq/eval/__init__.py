"""Evaluation: perplexity and KL divergence against a reference model."""

from unibcq.eval.perplexity import WindowStats, evaluate_windows

__all__ = ["WindowStats", "evaluate_windows"]
