"""Arrow (Ostapenko et al. 2024): training-free routing by each expert's prototype, per token and per layer.

    p_e = top right singular vector of dW_e = B_e A_e      (from the factors: two thin QRs and an r x r SVD)
    score[t, e] = |<x_t, p_e>|;  keep the top k;  gates = softmax(score_topk / T)

The same rule as PEFT's `ArrowConfig(top_k, router_temperature)` (which finds p_e by 15 power iterations and then
computes EVERY expert); here only the k chosen experts go through the grouped op. Prototypes are per expert, so
adding or removing an expert computes or drops only its own rows.
Index legend: T tokens, E experts, k slots, r rank.
"""

from __future__ import annotations

import torch

from lorahub_engine.dispatch import RouterOutput, TokenLayout
from routers.base import Router
from routers.config import ArrowConfig


def prototypes(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of each B_e A_e without forming it: A [E, r, in], B [E, out, r] -> [E, in] (fp32).

    B = Q1 R1 and A^T = Q2 R2 (thin QR) give B A = Q1 (R1 R2^T) Q2^T; with the core's SVD R1 R2^T = U S V^T, the
    right singular vectors of B A are Q2 V. The sign is arbitrary (scores use |.|). An expert absent from the layer
    (all zeros) gets a zero prototype: it scores 0 for every token.
    """
    A64, B64 = A.double(), B.double()
    _, R1 = torch.linalg.qr(B64)  # (E, r, r)
    Q2, R2 = torch.linalg.qr(A64.transpose(1, 2))  # (E, in, r), (E, r, r)
    _, S, Vh = torch.linalg.svd(R1 @ R2.transpose(1, 2))  # (E, r), (E, r, r)
    protos = (Q2 @ Vh[:, 0, :, None]).squeeze(-1)  # (E, in)
    return (protos * (S[:, :1] > 0)).float()


class ArrowRouter(Router):
    def __init__(self, protos: torch.Tensor, config: ArrowConfig):
        super().__init__(protos.shape[0])
        self.config = config
        self.register_buffer("prototypes", protos)  # (E, in)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> RouterOutput:
        scores = (x.to(self.prototypes.dtype) @ self.prototypes.T).abs()  # (T, E)
        scores = scores.masked_fill(self.disabled, float("-inf"))
        top, idx = scores.topk(min(self.config.top_k, self.num_experts), dim=-1)  # (T, k)
        gates = (top / self.config.temperature).softmax(-1)  # masked experts: exp(-inf) = 0
        idx = torch.where(torch.isfinite(top), idx, torch.full_like(idx, -1))
        probs = torch.zeros_like(scores).scatter_add_(1, idx.clamp(min=0), gates)  # (T, E), zero outside the top k
        out = RouterOutput(idx, gates, probs, {})
        self.count(out, layout)
        return out
