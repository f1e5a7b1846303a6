"""LoRA training through our engine: many fresh adapters attached as one bank and trained jointly.

    adapters = train_adapters(base, {"plural": pairs, "add": pairs, ...}, TrainSpec(steps=300))

Every step takes `rows_per_adapter` rows of each dataset into one batch; row n routes to its dataset's adapter
(`adapter_ids`), so one forward/backward trains all of them through the grouped op. Only the bank factors are
optimized, with AdamW (per-element state, no weight decay): each adapter receives gradients only from its own
rows, so joint training equals separate runs over the same batches, at the cost of one batched run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lorahub_engine.progress import progress_bar
import lorahub_engine as le
from lorahub_engine.fewshot import encode_examples, example_losses

Pairs = Sequence[tuple[str, str]]  # (prompt as the model reads it, answer)


@dataclass(frozen=True)
class TrainSpec:
    """How one adapter is trained; part of the zoo's content hash."""

    r: int = 4  # small: the shipped tiny zoo stays a few MB
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q_proj", "v_proj", "up_proj", "down_proj")  # attention + MLP, no embeddings
    steps: int = 200
    rows_per_adapter: int = 8  # rows of each adapter's data in every joint batch
    lr: float = 2e-3
    max_length: int = 256  # prompt tokens kept (from the end) per row
    seed: int = 0


def train_adapters(base, datasets: Mapping[str, Pairs], spec: TrainSpec, progress: bool = True,
                   desc: str = "training adapters", on_step: Callable[[float], None] | None = None,
                   ) -> tuple[list[le.LoraAdapter], list[float]]:
    """Train one fresh adapter per dataset (name -> pairs) jointly; returns the adapters and the loss per step.

    `on_step(loss)` is called after every step (e.g. to drive a progress bar over several trainings). The base
    model is left as it was (adapters detached, parameters' requires_grad restored).
    """
    model, tokenizer = base.model, base.tokenizer
    names = list(datasets)
    fresh = [le.init_adapter(model, name, spec.targets, r=spec.r, alpha=spec.alpha, seed=spec.seed + i)
             for i, name in enumerate(names)]
    rng = random.Random(spec.seed)
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    try:
        with le.attached(model, fresh, trainable=True):
            bank = [p for p in model.parameters() if p.requires_grad]  # lora_A / lora_B of every LoRA layer
            optimizer = torch.optim.AdamW(bank, lr=spec.lr, weight_decay=0.0)
            losses = []
            bar = progress_bar(range(spec.steps), desc=desc, progress=progress, leave=False)
            for _ in bar:
                rows = [(e, pair) for e, name in enumerate(names)
                        for pair in _draw(rng, datasets[name], spec.rows_per_adapter)]
                ids = torch.tensor([e for e, _ in rows])
                batch = encode_examples(tokenizer, [p for _, (p, _) in rows], [a for _, (_, a) in rows],
                                        is_seq2seq=base.is_seq2seq, max_length=spec.max_length)
                loss = example_losses(model, batch, adapter_ids=ids).mean() * len(names)  # each adapter: its mean
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item() / len(names))
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
                if on_step is not None:
                    on_step(losses[-1])
            return le.read_adapters(model), losses
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)


def _draw(rng: random.Random, pairs: Pairs, n: int) -> list[tuple[str, str]]:
    """n pairs without repetition while the data lasts (5 shots: each step sees all 5, reshuffled)."""
    pairs = list(pairs)
    if len(pairs) <= n:
        return rng.sample(pairs, len(pairs))
    return rng.sample(pairs, n)


@torch.no_grad()
def mean_losses(base, adapters: Sequence[le.LoraAdapter], pairs: Pairs) -> list[float]:
    """Mean answer loss of every adapter on the same pairs, one batched forward (rows = adapters x pairs)."""
    model = base.model
    prompts = [p for _ in adapters for p, _ in pairs]
    answers = [a for _ in adapters for _, a in pairs]
    ids = torch.arange(len(adapters)).repeat_interleave(len(pairs))
    batch = encode_examples(base.tokenizer, prompts, answers, is_seq2seq=base.is_seq2seq)
    with le.attached(model, adapters):
        losses = example_losses(model, batch, adapter_ids=ids)  # [adapters * pairs]
    return losses.reshape(len(adapters), len(pairs)).mean(-1).tolist()
