"""An independent einsum reference for grouped_lora, differentiable by plain autograd."""

import torch


def grouped_lora_reference(x, A, B, scale, idx, gates):
    """delta[t] = sum_j gates[t,j] * scale[e] * B[e] @ A[e] @ x[t] via a dense gather (e = idx[t,j], -1 = none)."""
    valid = (idx >= 0).to(x.dtype)
    e = idx.clamp(min=0)
    u = torch.einsum("ti,tkri->tkr", x, A[e])  # (T, k, r)
    y = torch.einsum("tkor,tkr->tko", B[e], u)  # (T, k, out)
    w = gates.to(x.dtype) * scale.to(x.dtype)[e] * valid  # (T, k)
    return torch.einsum("tk,tko->to", w, y)
