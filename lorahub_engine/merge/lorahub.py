"""LoraHub's factor-space composition (Huang et al. 2023, https://arxiv.org/abs/2307.13269).

A = sum_e w_e sqrt(s_e) A_e and B = sum_e w_e sqrt(s_e) B_e, with scale 1. With equal scales s this is LoraHub's
exact rule, scaled by s: B A = s (sum_i w_i B_i)(sum_j w_j A_j). It is NOT task arithmetic: it adds the cross terms
B_i A_j (i != j) on purpose. Ranks must agree; mixed ranks are zero-padded to the largest.
The same function serves a static merge (one row of weights) and batched compositions at run time (one row per
population member or per input): rows of `weights` give independent merged experts.
"""

from __future__ import annotations

import torch


def lorahub_factors(
    A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [E,r,in], B [E,out,r], scale [E], weights [G,E] -> merged A [G,r,in], B [G,out,r] (scale 1)."""
    w = weights.to(A.dtype) * scale.to(A.dtype).sqrt()  # (G, E)
    return torch.einsum("ge,eri->gri", w, A), torch.einsum("ge,eor->gor", w, B)
