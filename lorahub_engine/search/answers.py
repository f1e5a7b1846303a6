"""The examples' greedy answers under rows of composition weights, in one batched generate, scored by normalized
exact match (the cross-task benchmark's scoring, `lorahub_engine.fewshot.exact_match`).

    answers = HeldOutAnswers(model, tokenizer, examples, mode="fusion")     # model: the adapters attached
    hits = answers.exact_match(weights, rows)    # weights [R, N], rows: R example indices -> R bools

Row r decodes example rows[r]'s input, tokenized as the objective encodes it (fewshot's prompt tokens, the
tokenizer's special tokens added), under the composition weights[r]: the N attached adapters routed per batch row
through the grouped op (`le.routing`, "fusion" or "mixture" as the objective). Equal (example, weights) rows are
decoded once. Index legend: R rows, U distinct rows, N adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorahub_engine.attach import attached_names
from lorahub_engine.fewshot import exact_match, generate_answers
from lorahub_engine.search.objective import weighted

MARGIN = 8  # new tokens decoded past the longest answer (eos included): room for the spacing and edge punctuation
#             that normalization strips; an answer still running then cannot match


class HeldOutAnswers:
    """Greedy answers of `examples` ((input, answer) pairs) under composition weights; batch_size: rows per
    generate (None: all distinct rows in one)."""

    def __init__(self, model, tokenizer, examples: Sequence[tuple[str, str]], mode: str = "fusion",
                 batch_size: int | None = None):
        self.model, self.tokenizer, self.mode, self.batch_size = model, tokenizer, mode, batch_size
        self.examples = list(examples)
        self.num_adapters = len(attached_names(model))
        longest = max(len(tokenizer(y, add_special_tokens=False)["input_ids"]) for _, y in self.examples)
        self.max_new_tokens = longest + 1 + MARGIN

    def answers(self, weights: torch.Tensor, rows: Sequence[int]) -> list[str]:
        """weights [R, N], rows: the example each row answers -> R greedy answers (decoded, stripped)."""
        weights = torch.as_tensor(weights, dtype=torch.float32).cpu()
        if weights.dim() != 2 or weights.shape != (len(rows), self.num_adapters):
            raise ValueError(f"weights must be [{len(rows)}, {self.num_adapters}], got {tuple(weights.shape)}")
        keys = [(int(e), tuple(w)) for e, w in zip(rows, weights.tolist())]
        distinct = list(dict.fromkeys(keys))  # U (example, weights), in first-seen order
        gates = torch.tensor([w for _, w in distinct], dtype=torch.float32)  # [U, N]
        size = self.batch_size or len(distinct)
        decoded: list[str] = []
        for start in range(0, len(distinct), size):
            prompts = [self.examples[e][0] for e, _ in distinct[start:start + size]]
            with weighted(self.model, gates[start:start + size], self.mode):
                decoded += generate_answers(self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens)
        found = dict(zip(distinct, decoded))
        return [found[key] for key in keys]

    def exact_match(self, weights: torch.Tensor, rows: Sequence[int]) -> list[bool]:
        """Whether each row's greedy answer matches its example's answer (normalized exact match)."""
        return [exact_match(a, self.examples[e][1]) for a, e in zip(self.answers(weights, rows), rows)]


def answers_for(validate: str, model, tokenizer, examples: Sequence[tuple[str, str]], mode: str,
                batch_size: int | None = None) -> HeldOutAnswers | None:
    """What cross_validate ranks by under the rule `validate`: held-out answers for "exact_match" and
    "exact_match_fallback", None (held-out cross-entropy alone) for "cross_entropy"."""
    return None if validate == "cross_entropy" else HeldOutAnswers(model, tokenizer, examples, mode, batch_size)
