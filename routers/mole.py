"""MoLE (Wu, Huang, Wei, ICLR 2024): a learned gate per LoRA layer over frozen experts.

    G = softmax(W x / tau)                      W [E, in] zero at start (all experts equal), tau learnable
    y = base(x) + sum_i G_i s_i B_i A_i x       dense (top_k None): every expert through the grouped op
    L_balance = -log prod_i q_i = -sum_i log q_i,  q_i = mean of G_i over the layer's real tokens (weight 0.5)

The paper gates per block and per sequence from its experts' outputs; here the gate reads the wrapped module's
input (one gate per wrapped module), per token by default or per row from its real tokens' mean
(granularity="sequence"; it pools the tokens of the current forward, so in cached decoding each step gates from
its own token: use it to score or train whole sequences, "token" for generate). top_k = k keeps the k largest G_i per token and renormalizes them. Experts masked at
inference (`disabled`) get logit -inf: the others renormalize without retraining.
Index legend: T tokens, E experts, k slots.
"""

from __future__ import annotations

import torch
from torch import nn

from lorahub_engine.dispatch import RouterOutput, TokenLayout
from routers.base import Router, all_experts, masked_mean, row_means, top_k_renormalized
from routers.config import MoLEConfig


class MoLEGate(Router):
    def __init__(self, in_features: int, num_experts: int, config: MoLEConfig):
        super().__init__(num_experts)
        self.config = config
        self.weight = nn.Parameter(torch.zeros(num_experts, in_features))  # (E, in)
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature)))

    def logits(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """W x / tau per token [T, E] (fp32, also in a half-precision model); with granularity "sequence" each row's
        logits from its mean input."""
        weight = self.weight.float()
        if self.config.granularity == "sequence":
            pooled = row_means(x.float(), layout)  # (rows, in)
            z = (pooled @ weight.T)[layout.row.to(x.device)]  # (T, E): each token gets its row's logits
        else:
            z = x.float() @ weight.T  # (T, E)
        return z / self.temperature.float().clamp_min(1e-3)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> RouterOutput:
        logits = self.logits(x, layout).masked_fill(self.disabled, float("-inf"))
        probs = logits.softmax(-1)  # (T, E)
        k = self.config.top_k
        indices, gates = all_experts(probs) if k is None else top_k_renormalized(probs, k)
        aux = {}
        if self.training and self.config.balance_weight > 0:
            q = masked_mean(probs, layout.real(x.device))  # (E,)
            aux["balance"] = self.config.balance_weight * balance_loss(q.masked_fill(self.disabled, 1.0))  # log 1 = 0
        out = RouterOutput(indices, gates, probs, aux)
        self.count(out, layout)
        return out


def balance_loss(q: torch.Tensor) -> torch.Tensor:
    """MoLE's -log prod_i q_i for mean gates q [E] (sum of logs: no underflow of the product)."""
    return -q.clamp_min(1e-30).log().sum()
