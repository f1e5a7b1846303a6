"""SiRA (Zhu et al. 2023): sparse top-k routing over trainable LoRA experts, with a per-expert capacity.

    p = softmax(W x)                    W [E, in] per wrapped module (fp32), PyTorch Linear's initialization
    idx, top = top_k(p)                 per token; padding tokens get no pair
    capacity C = ceil(capacity_factor * n * k / E), n = real tokens of this layer call (the batch)
    per expert, pairs beyond C are dropped by priority: higher probability first, then earlier token (row-major
        order over the batch: earlier rows, then earlier positions); a dropped pair (index -1) computes nothing,
        the token keeps its base path for it (all k dropped: the base alone)
    gates = top over the kept slots / their sum     (renormalize=False: the raw probabilities)
    gate dropout (training only): each kept pair dropped with probability p, survivors' gates / (1 - p)
    y = base(x) + sum over kept slots of gate * s B_e A_e x     (the grouped op computes the kept pairs only)

Aux losses (training only, real tokens only, weighted): "balance" = E * sum_i f_i P_i (Switch; f_i = share of the
top-k assignments, before capacity, that go to expert i; P_i = mean probability of i: 1.0 when balanced) and
"z" = mean logsumexp(W x)^2 (router z-loss). Capacity applies in training; at inference only with
eval_capacity_factor (None: every token keeps its top k, so outputs do not depend on the rest of the batch).
Index legend: T tokens, E experts, k slots, P = T * k pairs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorahub_engine.dispatch import RouterOutput, TokenLayout
from routers.base import Router, masked_mean
from routers.config import SiRAConfig
from routers.distributed import process_rank

NONE = -1


def linear_router_weight(in_features: int, num_experts: int, seed: int) -> torch.Tensor:
    """A router weight [E, in] as nn.Linear initializes one (kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)))
    from its own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(num_experts, in_features, generator=g) * 2 - 1) * bound


def capacity(factor: float, real_tokens: torch.Tensor, k: int, num_experts: int) -> torch.Tensor:
    """C = ceil(factor * n * k / E) as a 0-d tensor (no host sync). The 1e-9 keeps a product that is an integer up to
    rounding (0.8 * 5 * 2 / 4) from rounding up to the next one."""
    return torch.ceil(real_tokens.double() * (factor * k / num_experts) - 1e-9)


def capacity_keep(idx: torch.Tensor, priority: torch.Tensor, limit: torch.Tensor | int, num_experts: int
                  ) -> torch.Tensor:
    """idx [T, k] (values in [-1, num_experts)) with the pairs over each expert's capacity `limit` set to -1. Within
    an expert, pairs rank by priority [T, k] (higher first), ties by flat pair order (earlier token first). Pairs
    already -1 take no room."""
    T, k = idx.shape
    flat = idx.reshape(-1)  # (P,), pair p = t * k + j
    E = num_experts + 1
    expert = torch.where(flat >= 0, flat, num_experts)  # pairs without an expert sort into a last bucket
    order = torch.argsort(-priority.reshape(-1).float(), stable=True)  # higher first, ties in pair order
    order = order[torch.argsort(expert[order], stable=True)]  # grouped by expert, keeping that order within
    counts = torch.zeros(E, dtype=expert.dtype, device=idx.device).index_add_(0, expert, torch.ones_like(expert))
    starts = torch.cumsum(counts, 0) - counts  # (E,) first sorted position of each expert
    rank = torch.empty_like(order)
    rank[order] = torch.arange(flat.numel(), device=idx.device) - starts[expert[order]]  # place within its expert
    keep = (flat >= 0) & (rank < limit)
    return torch.where(keep, flat, NONE).view(T, k)


def switch_balance_loss(probs: torch.Tensor, assigned: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i over real tokens: probs [T, E], assigned [T, k] (-1 = none). f_i = share of the real tokens'
    assignments that go to i (no gradient), P_i = mean probability of i over real tokens."""
    E = probs.shape[1]
    valid = (assigned >= 0) & real[:, None]
    counts = torch.zeros(E, device=probs.device).index_add_(0, assigned.clamp(min=0).reshape(-1),
                                                            valid.reshape(-1).float())  # (E,) no mask selection
    f = counts / counts.sum().clamp_min(1)  # (E,)
    return E * (f * masked_mean(probs, real)).sum()


def z_loss(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over real tokens of logsumexp(logits)^2 (logits [T, E])."""
    return masked_mean(torch.logsumexp(logits, -1) ** 2, real)


class SiRARouter(Router):
    def __init__(self, in_features: int, num_experts: int, config: SiRAConfig, seed: int):
        super().__init__(num_experts)
        self.config = config
        self.weight = nn.Parameter(linear_router_weight(in_features, num_experts, seed))  # (E, in)
        self.seed = seed
        self._generator: torch.Generator | None = None  # gate dropout's, on the inputs' device

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> RouterOutput:
        config, E = self.config, self.num_experts
        real = layout.real(x.device)  # (T,)
        logits = (x.float() @ self.weight.float().T).masked_fill(self.disabled, float("-inf"))  # (T, E)
        probs = logits.softmax(-1)
        k = min(config.top_k, E)
        top, assigned = probs.topk(k, dim=-1)  # (T, k)
        assigned = torch.where((top > 0) & real[:, None], assigned, NONE)  # masked experts, padding: no pair
        factor = config.capacity_factor if self.training else config.eval_capacity_factor
        idx = assigned if factor is None else capacity_keep(assigned, top, capacity(factor, real.sum(), k, E), E)
        gates = torch.where(idx >= 0, top, torch.zeros_like(top))
        if config.renormalize:
            gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-30)
        if self.training and config.gate_dropout > 0:
            idx, gates = self._dropout(idx, gates)
        aux = {}
        if self.training and config.aux_loss_weight > 0:
            aux["balance"] = config.aux_loss_weight * switch_balance_loss(probs, assigned, real)
        if self.training and config.z_loss_weight > 0:
            aux["z"] = config.z_loss_weight * z_loss(logits, real)
        out = RouterOutput(idx, gates, probs, aux)
        self.count(out, layout)
        return out

    def _dropout(self, idx: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop each pair with probability p (index -1: not computed); the survivors' gates / (1 - p)."""
        if self._generator is None or self._generator.device != idx.device:  # each data-parallel rank its own masks
            self._generator = torch.Generator(idx.device).manual_seed(self.seed + process_rank())
        p = self.config.gate_dropout
        drop = torch.rand(idx.shape, generator=self._generator, device=idx.device) < p
        return torch.where(drop, NONE, idx), torch.where(drop, torch.zeros_like(gates), gates / (1 - p))
