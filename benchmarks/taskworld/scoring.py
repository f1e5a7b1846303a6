"""Normalized exact match, per example (the core's, lorahub_engine.fewshot) and per task."""

from collections.abc import Sequence

from lorahub_engine.fewshot import exact_match, normalize_answer

__all__ = ["accuracy", "exact_match", "normalize_answer"]


def accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of predictions that exactly match their answer after normalization."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"need equal, non-zero numbers of predictions and answers, got {len(predictions)} "
                         f"and {len(answers)}")
    return sum(map(exact_match, predictions, answers)) / len(answers)
