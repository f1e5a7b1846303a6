"""The one LoRA layer: wraps nn.Linear or Conv1D, holds a stacked expert bank, calls grouped_lora.

The layer holds no composition logic: it asks the routing of the forward in progress (lorahub_engine.dispatch:
per-row adapter ids, a fixed weight vector, a retrieval or population assignment, fusion, a learned router) for
(A, B, scale, TokenRouting) of its tokens, and runs the grouped op with them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorahub_engine.ops.grouped import grouped_lora_routed
from lorahub_engine.dispatch import MODES, Dispatch, RowRouting

__all__ = ["MODES", "Dispatch", "LoraLayer", "RowRouting", "linear_shape"]


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D (weight stored [in, out]); None otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


class LoraLayer(nn.Module):
    """y = base(x) + grouped_lora(x, A, B, scale, idx, gates) for a bank of E experts (zero-padded to rank r).

    B [E, out, r] is best stored rank-major (a transposed view of an [E, r, out] tensor; attach builds it so): each
    expert's B^T is then one contiguous [r, out] matrix, which the expand multiplies by (at one token 2x, in the
    compiled walk at decode shapes 1.5x faster than through the transposed view: benchmarks/bench_b_layout.py), and the
    dense walk sees the bank's B^T as one [E*r, out] matrix without a copy.
    """

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, ranks: list[int],
                 dispatch: Dispatch, path: str = ""):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(A, requires_grad=False)  # (E, r, in)
        self.lora_B = nn.Parameter(B, requires_grad=False)  # (E, out, r)
        self.register_buffer("lora_scale", scale)  # (E,)
        self.ranks = ranks  # true rank of each expert here; 0 = that adapter does not target this module
        self.dispatch = dispatch
        self.path = path  # the wrapped module's path in the model: names this layer's router records

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped module's weight (models such as T5 read `.weight` of their projections)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def bank(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A [E, r, in], B [E, out, r], scale [E]), read from the module's tables directly (nn.Module's attribute
        fallback costs a microsecond a name, at every call of every layer)."""
        return self._parameters["lora_A"], self._parameters["lora_B"], self._buffers["lora_scale"]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ctx = self.dispatch.context_for(x)
        base = self._modules["base"]
        if ctx is None or ctx.spec is None:
            return base(x, *args, **kwargs)
        flat = x.dim() == 2
        tokens = x if flat else x.reshape(-1, x.shape[-1])  # (T, in), rows-major
        # The base runs on the flat tokens so that its output is a tensor of its own, not a view: the delta is added
        # into it in place, and autograd would copy the whole gradient back and forth for an in-place view.
        out = base(tokens, *args, **kwargs)  # (T, out)
        layout = ctx.layout(x)
        A, B, scale, token_routing = ctx.routing(layout).route(self, tokens, layout, ctx)
        out = grouped_lora_routed(tokens, A, B, scale, token_routing, out=out, check=False)
        return out if flat else out.view(*x.shape[:-1], out.shape[-1])
