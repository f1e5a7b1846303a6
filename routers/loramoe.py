"""LoRAMoE (Dou et al. 2024): a dense token softmax router per wrapped module over E trainable LoRA experts.

    p = softmax(W x)                    W [E, in] (fp32), PyTorch Linear's initialization
    y = base(x) + sum_e p_e s B_e A_e x every expert of every real token through the grouped op (padding: none)

Localized balancing constraint (training only, weight beta = balance_weight), over the M examples (batch rows) of
the forward and their real tokens:
    Q[n, m] = sum of p_n over example m's tokens                                        (E, M)
    I[n, m] = 1 + delta if expert n's group is example m's type, 1 - delta otherwise, 1 for an untyped example
    Z = I * Q;   loss = var(Z) / mean(Z)^2     (the squared coefficient of variation of Z's entries)
Without types or groups: the squared coefficient of variation of the experts' importance sum_m Q[n, m] (E,).
var is the unbiased sample variance, as in LoRAMoE's release (its cv_squared). Unlike the release, the experts read
x without dropout (the grouped op reads each token's x once for all its experts). Types reach the routers through
`routers.api.sample_types` (train_router passes each example's optional third field).
Index legend: T tokens, E experts, M examples (rows), L tokens per row.
"""

from __future__ import annotations

import torch
from torch import nn

from lorahub_engine.dispatch import RouterOutput, TokenLayout
from routers.base import Router, all_experts
from routers.config import LoRAMoEConfig
from routers.errors import RouterError
from routers.sira import NONE, linear_router_weight


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """var / mean^2 of all entries (unbiased variance; 0 for a single entry)."""
    values = values.float().reshape(-1)
    if values.numel() < 2:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + 1e-10)


def expert_group_ids(groups: tuple[int, ...]) -> torch.Tensor:
    """Group index of each expert in bank order: (3, 3) -> [0, 0, 0, 1, 1, 1]."""
    return torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(groups))


def localized_balance_loss(probs: torch.Tensor, layout: TokenLayout, types: torch.Tensor | None,
                           groups: torch.Tensor | None, delta: float) -> torch.Tensor:
    """LoRAMoE's constraint: probs [T, E] of rows x L tokens, types [M] (-1 = untyped) or None, groups [E] or None."""
    real = layout.real(probs.device).to(probs.dtype)  # (T,)
    Q = (probs * real[:, None]).view(layout.rows, layout.length, -1).sum(1).T  # (E, M)
    if types is None or groups is None:
        return cv_squared(Q.sum(1))
    if types.shape != (layout.rows,):
        raise RouterError(f"got {types.numel()} sample types for a batch of {layout.rows} rows")
    types, groups = types.to(probs.device), groups.to(probs.device)
    match = groups[:, None] == types[None, :]  # (E, M)
    weight = torch.where(match, 1 + delta, 1 - delta)
    weight = torch.where(types[None, :] < 0, torch.ones_like(weight), weight)
    return cv_squared(weight * Q)


class LoRAMoERouter(Router):
    def __init__(self, in_features: int, num_experts: int, config: LoRAMoEConfig, seed: int):
        super().__init__(num_experts)
        self.config = config
        self.weight = nn.Parameter(linear_router_weight(in_features, num_experts, seed))  # (E, in)
        groups = None if config.expert_groups is None else expert_group_ids(config.expert_groups)
        self.register_buffer("groups", groups, persistent=False)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> RouterOutput:
        real = layout.real(x.device)  # (T,)
        logits = (x.float() @ self.weight.float().T).masked_fill(self.disabled, float("-inf"))  # (T, E)
        probs = logits.softmax(-1)
        idx, gates = all_experts(probs)  # (T, E) each
        idx = torch.where(real[:, None], idx, NONE)  # padding computes nothing
        aux = {}
        if self.training and self.config.balance_weight > 0:
            aux["balance"] = self.config.balance_weight * localized_balance_loss(
                probs, layout, self.sample_types, self.groups, self.config.balance_delta)
        out = RouterOutput(idx, gates, probs, aux)
        self.count(out, layout)
        return out
