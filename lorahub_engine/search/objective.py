"""LoraHub's objective on a model with the candidate adapters attached: only the fusion gates change.

    batch = encode_pairs(model, tokenizer, examples)
    objective = FewShotObjective(model, batch)                 # model: le.attach(model, adapters) done
    ce = objective.cross_entropy(weights)                       # weights [P, N] -> [P] mean answer CE
    loss = ce + l1_penalty(weights, 0.05)                       # LoraHub: + 0.05 * mean |w|

Candidate p's weights become the "fusion" gates of its rows: every LoRA layer mixes the N adapters' factors by
LoraHub's rule (A = sum_i w_i sqrt(s_i) A_i, B likewise, see le.merge(method="lorahub")) and applies the result
through the grouped op; mode="mixture" applies each adapter's delta with its weight (sum_i w_i dW_i). P candidates x n examples are one batch of P*n rows (candidate-major), so a population
costs one forward (or ceil(P*n / batch_size) forwards), never a merge of state dicts.
Index legend: P candidates, N adapters, n examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorahub_engine.attach import attached_names, routing
from lorahub_engine.fewshot import Batch, encode_examples, example_losses


class FewShotObjective:
    """Mean answer cross-entropy of the examples under each candidate weight vector (no l1 term).

    row_losses(model, batch) -> [rows] is what each example scores (default: its mean answer-token CE; the
    unsupervised fit passes the entropy of the first answer token instead)."""

    def __init__(self, model, batch: Batch, batch_size: int | None = None, mode: str = "fusion",
                 row_losses=example_losses):
        self.model = model
        self.mode = mode  # "fusion": LoraHub's factor mix; "mixture": sum_i w_i dW_i
        self.row_losses = row_losses
        self.num_adapters = len(attached_names(model))
        self.device = next(model.parameters()).device
        self.batch = batch  # the n examples, encoded once
        self.batch_size = batch_size

    @property
    def num_examples(self) -> int:
        return self.batch.input_ids.shape[0]

    def cross_entropy(self, weights: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """weights [P, N] -> [P] float32: mean over the examples of each example's mean answer-token CE."""
        return self.example_losses(weights, grad).mean(-1)

    def example_losses(self, weights: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """weights [P, N] -> [P, n] float32: each example's mean answer-token CE under each candidate;
        differentiable in the weights with grad=True (the gates of the routing then require grad)."""
        with torch.set_grad_enabled(grad):
            return self._example_losses(torch.as_tensor(weights, dtype=torch.float32, device=self.device))

    def _example_losses(self, weights: torch.Tensor) -> torch.Tensor:
        if weights.dim() != 2 or weights.shape[1] != self.num_adapters:
            raise ValueError(f"weights must be [candidates, {self.num_adapters}], got {tuple(weights.shape)}")
        P, n = weights.shape[0], self.num_examples
        rows = P * n
        size = self.batch_size or rows
        losses = torch.cat([self._losses(weights, start, min(start + size, rows)) for start in range(0, rows, size)])
        return losses.view(P, n)

    def _losses(self, weights: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Per-row losses of rows start..stop-1; row j is example j % n under candidate j // n."""
        row = torch.arange(start, stop, device=self.device)
        candidate, example = row // self.num_examples, (row % self.num_examples).cpu()
        batch = _take(self.batch, example).to(self.device)
        if weights.shape[0] == 1:  # one candidate: one routing row that every batch row shares
            idx, gates = torch.arange(self.num_adapters, device=self.device)[None, :], weights
        else:
            gates = weights[candidate]  # [rows, N]
            idx = torch.arange(self.num_adapters, device=self.device).expand_as(gates)
        with routing(self.model, idx, gates, mode=self.mode):
            return self.row_losses(self.model, batch)


def encode_pairs(model, tokenizer, examples: Sequence[tuple[str, str]]) -> Batch:
    """(input, answer) pairs as one batch for `model` (causal or seq2seq); answers end with eos when there is one."""
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    return encode_examples(tokenizer, [x for x, _ in examples], [y for _, y in examples], is_seq2seq=is_seq2seq,
                           add_eos=tokenizer.eos_token_id is not None)


def l1_penalty(weights: torch.Tensor, l1: float) -> torch.Tensor:
    """LoraHub's regularizer: l1 * mean_i |w_i| per candidate; weights [P, N] -> [P]."""
    return l1 * torch.as_tensor(weights).abs().mean(-1)


def _take(batch: Batch, rows: torch.Tensor) -> Batch:
    return Batch(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows], batch.is_seq2seq)
