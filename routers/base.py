"""What every router shares: the interface, top-k selection, masked experts, padding-aware usage counters.

A router is an nn.Module attached to one LoRA layer: forward(x [T, in], layout) -> RouterOutput(indices [T, k],
gates [T, k], probs [T, E], aux {name: weighted scalar loss}). Auxiliary losses are computed in training mode only.
Index legend: T tokens, E experts, k slots.
"""

from __future__ import annotations

import torch
from torch import nn

from lorahub_engine.dispatch import RouterOutput, TokenLayout


USAGE = ("usage_tokens", "usage_probs", "usage_entropy", "usage_count")


class Router(nn.Module):
    """Base of MoLE gates and Arrow routers: a bank of `num_experts`, some of them maskable at inference.

    Running usage over real (non-padding) tokens since the last reset: tokens routed to each expert, summed
    probabilities, summed per-token entropy (read by router_stats; not saved).
    """

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("disabled", torch.zeros(num_experts, dtype=torch.bool), persistent=False)
        self.register_buffer("usage_tokens", torch.zeros(num_experts), persistent=False)
        self.register_buffer("usage_probs", torch.zeros(num_experts), persistent=False)
        self.register_buffer("usage_entropy", torch.zeros(()), persistent=False)
        self.register_buffer("usage_count", torch.zeros(()), persistent=False)
        self.sample_types: torch.Tensor | None = None  # [rows] of this forward (-1 = untyped); see api.sample_types

    def reset_usage(self) -> None:
        for name in USAGE:
            getattr(self, name).zero_()

    def _apply(self, fn, recurse=True):
        """Usage counters follow the model to its device but stay fp32 (in bf16 a count stops growing at 256)."""
        counters = {name: self._buffers.pop(name) for name in USAGE}
        super()._apply(fn, recurse)
        for name, counter in counters.items():
            self.register_buffer(name, counter.to(self.disabled.device), persistent=False)
        return self

    @torch.no_grad()
    def count(self, out: RouterOutput, layout: TokenLayout) -> None:
        """Add this call's real tokens to the usage counters. Masks multiply instead of selecting: selecting by a
        mask waits for the GPU at every layer."""
        real = layout.real(out.probs.device)  # (T,)
        chosen = (out.indices >= 0) & (out.gates > 0) & real[:, None]  # (T, k)
        self.usage_tokens.index_add_(0, out.indices.clamp(min=0).reshape(-1), chosen.reshape(-1).float())
        weight = real.float()  # (T,)
        probs = torch.where(real[:, None], out.probs.float(), 0.0)  # (T, E): a padding row may hold NaN
        self.usage_probs += weight @ probs
        self.usage_entropy += weight @ entropy(probs)
        self.usage_count += weight.sum()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each distribution [..., E] -> [...]; 0 log 0 = 0."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def top_k_renormalized(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable experts of each token and their probabilities renormalized to sum 1: [T, k] each.
    Experts of probability 0 (masked) are dropped (index -1, gate 0)."""
    top, idx = probs.topk(min(k, probs.shape[-1]), dim=-1)  # (T, k)
    gates = top / top.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.where(top > 0, idx, torch.full_like(idx, -1)), gates


def all_experts(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense routing: every expert is a slot (k = E), gated by its probability; masked experts get index -1."""
    T, E = probs.shape
    idx = torch.arange(E, device=probs.device).expand(T, E)
    return torch.where(probs > 0, idx, torch.full_like(idx, -1)), probs


def masked_mean(values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens of values [T, ...] (real [T] bool)."""
    weights = real.to(values.dtype)
    return torch.einsum("t,t...->...", weights, values) / weights.sum().clamp_min(1)


def row_means(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Each row's mean over its real tokens: x [T, d] -> [rows, d]."""
    real = layout.real(x.device).to(x.dtype).view(layout.rows, layout.length, 1)
    x = x.view(layout.rows, layout.length, -1)  # (rows, L, d)
    return (x * real).sum(1) / real.sum(1).clamp_min(1)
