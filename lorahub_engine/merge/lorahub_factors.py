"""LoraHub's factor-space composition (Huang et al. 2023, https://arxiv.org/abs/2307.13269).

A = sum_i w_i sqrt(s_i) A_i and B = sum_i w_i sqrt(s_i) B_i, with scale 1. With equal scales s this is LoraHub's
exact rule, scaled by s: B A = s (sum_i w_i B_i)(sum_j w_j A_j). It is NOT task arithmetic: it adds the cross terms
B_i A_j (i != j) on purpose. Ranks must agree; mixed ranks are zero-padded to the largest.
The same function serves a static merge (no batch dims) and batched compositions at run time (one group per
population member or per input), where each group gathers its own n experts.
"""

from __future__ import annotations

import torch


def lorahub_factors(
    A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [..., n, r, in], B [..., n, out, r], scale [..., n], weights [..., n] -> A [..., r, in], B [..., out, r]."""
    w = weights.to(A.dtype) * scale.to(A.dtype).sqrt()  # (..., n)
    return torch.einsum("...n,...nri->...ri", w, A), torch.einsum("...n,...nor->...or", w, B)
