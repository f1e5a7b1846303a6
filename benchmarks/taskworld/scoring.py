"""Normalized exact match, per example (the core's, lorahub_engine.fewshot) and per task."""

from collections.abc import Sequence

from lorahub_engine.fewshot import exact_match, normalize_answer

__all__ = ["accuracy", "balanced_accuracy", "exact_match", "normalize_answer"]

MAX_CLASSES = 8  # answer sets up to this size are classes (yes/no, positive/negative, the digits of a count)


def accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of predictions that exactly match their answer after normalization."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"need equal, non-zero numbers of predictions and answers, got {len(predictions)} "
                         f"and {len(answers)}")
    return sum(map(exact_match, predictions, answers)) / len(answers)


def balanced_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float | None:
    """Accuracy within each distinct (normalized) answer, averaged over the answers: one answer given to every input
    scores 1 / classes whatever the test set's mix. None for tasks with more than MAX_CLASSES distinct answers."""
    accuracy(predictions, answers)  # the same checks
    per_class: dict[str, list[bool]] = {}
    for prediction, answer in zip(predictions, answers):
        per_class.setdefault(normalize_answer(answer), []).append(exact_match(prediction, answer))
    if len(per_class) > MAX_CLASSES:
        return None
    return sum(sum(hits) / len(hits) for hits in per_class.values()) / len(per_class)
