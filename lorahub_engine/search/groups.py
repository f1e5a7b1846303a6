"""The forwards of one objective evaluation: the examples in groups of equal length, each trimmed of its padding.

A padded batch computes every pad position of every layer for nothing (the 5 `navigate` shots on SmolLM2 are
85 / 79 / 73 / 97 / 97 tokens: 11% of a padded forward is padding). Grouping the examples by length and trimming each
group to its own length removes that work; a candidate's losses stay the same (padding is masked out either way).
Index legend: n examples, n_g examples of one group, l length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorahub_engine.fewshot import IGNORE, Batch


@dataclass(frozen=True)
class Group:
    """Examples `examples` [n_g] (indices into the whole batch) and their tokens `batch`, padding trimmed."""

    examples: torch.Tensor  # [n_g] long
    batch: Batch


def length_groups(batch: Batch) -> list[Group]:
    """One group per distinct input length (seq2seq: encoder length), longest first; each group's batch holds only
    the columns its rows use (causal batches are left-padded: the last columns; seq2seq: the first ones)."""
    lengths = batch.attention_mask.sum(-1)  # [n]
    groups = []
    for length in sorted(set(lengths.tolist()), reverse=True):
        examples = torch.nonzero(lengths == length).flatten()
        groups.append(Group(examples, trim(take(batch, examples))))
    return groups


def whole_batch(batch: Batch) -> list[Group]:
    """The batch as one group, padding and all (one forward per chunk of rows)."""
    return [Group(torch.arange(batch.input_ids.shape[0]), batch)]


def take(batch: Batch, rows: torch.Tensor) -> Batch:
    """Rows `rows` of the batch (all columns)."""
    return Batch(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows], batch.is_seq2seq)


def trim(batch: Batch) -> Batch:
    """The batch without the columns that are padding in every row."""
    width = int(batch.attention_mask.sum(-1).max())
    if not batch.is_seq2seq:  # left-padded: prompt + answer end at the last column
        return Batch(batch.input_ids[:, -width:], batch.attention_mask[:, -width:], batch.labels[:, -width:], False)
    answer = (batch.labels != IGNORE).long()  # [n, l_answer], right-padded
    answer_width = int((answer * torch.arange(1, answer.shape[1] + 1)).max())  # last answer column + 1
    return Batch(batch.input_ids[:, :width], batch.attention_mask[:, :width], batch.labels[:, :answer_width], True)
