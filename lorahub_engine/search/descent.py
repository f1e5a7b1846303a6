"""descend: Adam on the N composition weights through the grouped op's backward (fit_weights, and lorahub_search's
optimizer="adam"). Only the weights train: they are the gates of the objective's routing."""

from __future__ import annotations

import torch

from lorahub_engine.progress import progress_bar
from lorahub_engine.search.config import FitConfig
from lorahub_engine.search.result import Evaluation

@torch.enable_grad()  # also under a caller's no_grad
def descend(objective, config: FitConfig, progress: bool = True) -> list[Evaluation]:
    """`config.steps` Adam steps on the weights; each step's point (before the update) and its objective.
    objective: anything with num_adapters and cross_entropy(weights [1, N], grad=True) -> [1]."""
    N = objective.num_adapters
    start = torch.zeros(N, dtype=torch.float64)
    if config.mode == "fusion":
        start = torch.randn(N, generator=torch.Generator().manual_seed(config.seed), dtype=torch.float64) * config.init
    weights = torch.nn.Parameter(start.clamp(-config.bound, config.bound).float())
    optimizer = torch.optim.Adam([weights], lr=config.lr)
    history: list[Evaluation] = []
    for _ in progress_bar(range(config.steps), desc="fit weights", unit="step", progress=progress):
        cross_entropy = objective.cross_entropy(weights[None], grad=True)[0]
        loss = cross_entropy + config.l1 * weights.abs().mean()
        history.append(Evaluation(tuple(weights.detach().double().tolist()), loss.item(), cross_entropy.item()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            weights.clamp_(-config.bound, config.bound)
    return history
