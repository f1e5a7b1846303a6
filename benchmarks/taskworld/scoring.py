"""Normalized exact match, per example and per task."""

import re
from collections.abc import Sequence

_EDGE_PUNCTUATION = " \t\n.,;:!?\"'`"


def normalize_answer(text: str) -> str:
    """Lowercase, collapse whitespace, and strip quotes and punctuation at both ends ("Cats." -> "cats")."""
    return re.sub(r"\s+", " ", text.lower()).strip(_EDGE_PUNCTUATION)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of predictions that exactly match their answer after normalization."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"need equal, non-zero numbers of predictions and answers, got {len(predictions)} "
                         f"and {len(answers)}")
    return sum(map(exact_match, predictions, answers)) / len(answers)
