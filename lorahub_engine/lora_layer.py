"""The one LoRA layer: wraps nn.Linear or Conv1D, holds a stacked expert bank, calls grouped_lora.

The layer holds no composition logic: which experts each token uses, with which gates, comes from the model's
`Dispatch` (per-row adapter ids, a fixed weight vector, a retrieval or population assignment).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorahub_engine.merge.lorahub_factors import lorahub_factors
from lorahub_engine.ops.grouped import TokenRouting, grouped_lora_routed

MODES = ("mixture", "fusion")


@dataclass(frozen=True)
class RowRouting:
    """Experts idx [N, k] (-1 = none) with gates [N, k] per batch row (N = rows; N = 1 broadcasts to every row)
    or per token (N = rows * tokens per row, mixture only).

    mode "mixture" sums the k experts' outputs; "fusion" first merges each row's k experts into one by the
    LoraHub factor rule (gates as weights), then applies that single expert. Equal rows share one merged expert
    (a LoraHub population repeats each candidate over its examples: merged once per candidate, not per row).
    """

    idx: torch.Tensor
    gates: torch.Tensor
    mode: str = "mixture"
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def per_token(self, rows: int, num_tokens: int) -> TokenRouting:
        """This routing expanded to the tokens of a batch of `rows` rows; built once, shared by every layer."""
        key = (rows, num_tokens)
        if key in self._cache:
            return self._cache[key]
        idx, gates = self.idx, self.gates
        if self.mode == "fusion":  # token t uses its row's merged expert
            if idx.shape[0] not in (1, rows):
                raise ValueError(f"fusion merges factors per batch row: routing needs 1 or {rows} rows, "
                                 f"got {idx.shape[0]}")
            idx = self.fused()[2][:, None]  # (N, 1)
            gates = torch.ones(idx.shape, device=idx.device)
        routing = TokenRouting(*_rows_to_tokens(idx, gates, rows, num_tokens))
        if not self.gates.requires_grad:  # learnable gates get a fresh graph every forward
            self._cache[key] = routing
        return routing

    def fused(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fusion's distinct rows: (idx [U, k], gates [U, k]) and, for each of the N rows, which one it is [N].
        Learnable gates keep every row (each row's gates get their own gradient)."""
        if self.gates.requires_grad:
            return self.idx, self.gates, torch.arange(len(self.idx), device=self.idx.device)
        if "fused" not in self._cache:
            key = torch.cat([self.idx.double(), self.gates.double()], dim=1)  # (N, 2k)
            _, inverse = torch.unique(key, dim=0, return_inverse=True)  # (N,) in [0, U)
            N, U = len(inverse), int(inverse.max()) + 1
            first = torch.full((U,), N, device=inverse.device).scatter_reduce_(
                0, inverse, torch.arange(N, device=inverse.device), "amin")  # a representative row of each
            self._cache["fused"] = self.idx[first], self.gates[first], inverse
        return self._cache["fused"]

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.idx.dim() != 2 or self.gates.shape != self.idx.shape:
            raise ValueError(f"idx and gates must both be [rows, k]; got {tuple(self.idx.shape)}, {tuple(self.gates.shape)}")


class Dispatch:
    """The routing every LoRA layer of one model reads during a forward: a stack, innermost wins."""

    def __init__(self):
        self.stack: list[RowRouting] = []
        self.default: RowRouting | None = None  # from set_weights

    @property
    def current(self) -> RowRouting | None:
        return self.stack[-1] if self.stack else self.default


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D (weight stored [in, out]); None otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


class LoraLayer(nn.Module):
    """y = base(x) + grouped_lora(x, A, B, scale, idx, gates) for a bank of E experts (zero-padded to rank r)."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, ranks: list[int],
                 dispatch: Dispatch):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(A, requires_grad=False)  # (E, r, in)
        self.lora_B = nn.Parameter(B, requires_grad=False)  # (E, out, r)
        self.register_buffer("lora_scale", scale)  # (E,)
        self.ranks = ranks  # true rank of each expert here; 0 = that adapter does not target this module
        self.dispatch = dispatch

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped module's weight (models such as T5 read `.weight` of their projections)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = self.dispatch.current
        if routing is None:
            return self.base(x, *args, **kwargs)
        rows = x.shape[0] if x.dim() > 1 else 1
        tokens = x.reshape(-1, x.shape[-1])  # (T, in), rows-major
        # The base runs on the flat tokens so that its output is a tensor of its own, not a view: the delta is added
        # into it in place, and autograd would copy the whole gradient back and forth for an in-place view.
        out = self.base(tokens, *args, **kwargs)  # (T, out)
        A, B, scale = self.lora_A, self.lora_B, self.lora_scale
        if routing.mode == "fusion":
            # One merged expert per distinct row: mix its k experts' factors (LoraHub rule, gates as weights).
            idx, gates, _ = routing.fused()  # (U, k)
            e, w = idx.clamp(min=0), torch.where(idx >= 0, gates, torch.zeros_like(gates))
            A, B = lorahub_factors(A[e], B[e], scale[e], w)  # (U, r, in), (U, out, r)
            scale = torch.ones(A.shape[0], dtype=scale.dtype, device=scale.device)
        token_routing = routing.per_token(rows, tokens.shape[0])
        out = grouped_lora_routed(tokens, A, B, scale, token_routing, out=out)
        return out.view(*x.shape[:-1], out.shape[-1])


def _rows_to_tokens(idx: torch.Tensor, gates: torch.Tensor, rows: int, num_tokens: int):
    """(idx, gates) [N, k] -> per token [T, k], T = rows * tokens per row: N = 1 broadcasts, N = rows repeats each
    row over its tokens, N = T is already per token."""
    if idx.shape[0] == 1:
        return idx.expand(num_tokens, -1), gates.expand(num_tokens, -1)
    if idx.shape[0] == rows:
        per_row = num_tokens // rows
        return idx.repeat_interleave(per_row, dim=0), gates.repeat_interleave(per_row, dim=0)
    if idx.shape[0] == num_tokens:
        return idx, gates
    raise ValueError(f"routing has {idx.shape[0]} rows; the batch has {rows} rows and {num_tokens} tokens")
