"""train_router: fit a router on (input, answer) or (input, answer, type) examples; the base stays frozen.

    history = train_router(model, tokenizer, examples, steps=300, lr=5e-3, batch_size=8, seed=0)

What trains is `routers.api.router_parameters`: the gates over frozen experts (MoLE), or the routers and their own
experts together (SiRA, LoRAMoE). loss = mean answer-token cross-entropy (lorahub_engine.fewshot, as LoraHub's
objective) + the routers' auxiliary losses (each already weighted, summed by name and averaged over the LoRA
layers). An example's optional third field is its type (an expert-group index or None; LoRAMoE's localized balance
reads it). Padding never counts: answers are masked by their labels, routing statistics by the attention mask.

Data-parallel (started by torchrun or accelerate launch; routers.distributed): each of the W ranks runs this same
call with the same examples and arguments. A step draws one global batch of batch_size x W examples (the stream
one process with batch_size x W draws) and rank r takes its r-th contiguous slice of batch_size; the trainable
gradients are averaged over the ranks before each (identical) Adam step, so every rank ends with the same weights.
The task loss is a mean over examples, so its gradient is exactly the one process's on the global batch; the
auxiliary losses (and per-batch limits such as a capacity) are computed on each rank's own batch, as in Switch /
GShard, and their gradients averaged. `history` holds each value's mean over the ranks, equal on every rank; only
rank 0 shows progress. torch's global generator is seeded with seed + rank (what draws from it differs by rank).
One process needs no process group and communicates nothing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lorahub_engine.attach import router_outputs
from lorahub_engine.fewshot import example_losses
from lorahub_engine.progress import progress_bar
from lorahub_engine.search.objective import encode_pairs
from routers.api import router_parameters, routers_of, sample_types
from routers.base import masked_mean
from routers.distributed import Ranks, join
from routers.errors import RouterError


@dataclass
class RouterHistory:
    """Per step: total loss, task loss, each auxiliary loss, and usage (mean gate of each expert over layers)."""

    loss: list[float] = field(default_factory=list)
    task: list[float] = field(default_factory=list)
    aux: dict[str, list[float]] = field(default_factory=dict)
    usage: list[list[float]] = field(default_factory=list)


def train_router(model, tokenizer, examples: Sequence[tuple], steps: int = 300, lr: float = 5e-3,
                 batch_size: int = 8, seed: int = 0, progress: bool = True) -> RouterHistory:
    """Adam on `router_parameters(model)` only, `steps` batches of `batch_size` examples (per rank, see above) drawn
    without replacement (reshuffled each pass, `random.Random(seed)`). Every other tensor of the model is left
    bit-identical."""
    examples = _checked(examples, steps, batch_size, lr)
    params = router_parameters(model)
    if not params:
        raise RouterError("this router has nothing to train (Arrow is training-free)")
    ranks = join()
    ranks.broadcast_(params)
    torch.manual_seed(seed + ranks.rank)
    optimizer = torch.optim.Adam(params, lr=lr)
    flags = {p: p.requires_grad for p in model.parameters()}
    routers = list(routers_of(model).values())
    history = RouterHistory()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for router in routers:
            router.train()
        draws = _batches(len(examples), batch_size * ranks.world, random.Random(seed))
        for _ in progress_bar(range(steps), progress=progress and ranks.main, desc="router"):
            rows = [examples[i] for i in ranks.shard(next(draws))]
            batch = encode_pairs(model, tokenizer, [row[:2] for row in rows])
            batch = batch.to(next(model.parameters()).device)
            with router_outputs(model) as records, sample_types(model, [row[2] for row in rows]):
                task = example_losses(model, batch).mean()
            aux, usage = summarize(records)
            loss = task + sum(aux.values(), torch.zeros(()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ranks.average_gradients_(params)
            optimizer.step()
            _log(history, ranks, loss, task, aux, usage)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for router in routers:
            router.eval()
    return history


def summarize(records: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Auxiliary losses by name (summed over forwards, averaged over layers) and usage [E] (each expert's mean
    probability over real tokens, averaged over layers; E the most experts of any layer) of the router records of
    one or more forwards."""
    calls = [record for forward in records for record in forward.values()]
    if not calls:
        raise RouterError("no router ran in the forward: is a routing(...) block overriding the router?")
    aux: dict[str, torch.Tensor] = {}
    for output, _ in calls:
        for name, value in output.aux.items():
            aux[name] = aux.get(name, 0) + value / len(calls)
    means = [masked_mean(output.probs.detach().float(), layout.real(output.probs.device)) for output, layout in calls]
    width = max(len(m) for m in means)  # experts may differ by layer (MoLA): a layer's missing experts count 0
    usage = torch.stack([torch.nn.functional.pad(m, (0, width - len(m))) for m in means]).mean(0)
    return aux, usage


def _log(history: RouterHistory, ranks: Ranks, loss, task, aux, usage) -> None:
    """Append the step's values, each averaged over the ranks (one all-reduce)."""
    values = ranks.mean(torch.cat([torch.stack([loss, task, *aux.values()]).float(), usage.to(loss.device)]))
    history.loss.append(float(values[0]))
    history.task.append(float(values[1]))
    for name, value in zip(aux, values[2:].tolist()):
        history.aux.setdefault(name, []).append(value)
    history.usage.append(values[2 + len(aux):].tolist())


def _batches(n: int, size: int, rng: random.Random):
    """Endless batches of indices in [0, n): passes over a fresh shuffle; a batch may span two passes."""
    pool: list[int] = []
    while True:
        while len(pool) < size:
            order = list(range(n))
            rng.shuffle(order)
            pool += order
        yield pool[:size]
        pool = pool[size:]


def _checked(examples, steps, batch_size, lr) -> list[tuple[str, str, int | None]]:
    """Examples as (input, answer, type) triples (type None where the example has none)."""
    examples = [tuple(e) for e in examples]
    if not examples or any(len(e) not in (2, 3) or not all(isinstance(s, str) for s in e[:2]) for e in examples):
        raise RouterError("examples must be a non-empty list of (input, answer) or (input, answer, type) tuples")
    examples = [e if len(e) == 3 else (*e, None) for e in examples]
    if any(e[2] is not None and (isinstance(e[2], bool) or not isinstance(e[2], int)) for e in examples):
        raise RouterError("an example's type (its third field) must be an int expert-group index or None")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RouterError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise RouterError(f"lr must be > 0, got {lr!r}")
    return examples
