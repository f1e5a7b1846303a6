"""The trainable-expert MoE cases of bench_routers (SiRA, LoRAMoE) and the two baselines they are measured against.

Each MoE case is the same model, router and experts; only how the experts' deltas are computed differs:
    sira_top2    SiRA top-2 of 8 through the grouped op: only the selected (token, expert) pairs computed
    dense8       the same router and gates, all 8 experts computed for every token (the experts' ranks side by side:
                 x @ [A_1; ..; A_8]^T, gated, @ [B_1 .. B_8]^T: the cheapest dense form, as PEFT's Arrow computes)
    loop8        the same router and gates, a Python loop over the experts, each on the tokens routed to it
                 (torch.where, gather, B A x, index_add_: the approach of MoE-PEFT / mergoo)
    loramoe6     LoRAMoE, dense softmax over 6 experts through the grouped op (k = 6 slots)
    lora         one plain LoRA r=8 (the training-step reference: base + one LoRA of the same rank)
A forward is `model(ids)` under inference_mode, routers in eval mode; a training step is routers in training mode
(capacity, gate dropout), cross-entropy on random labels + the routers' aux losses, backward, one Adam step.
Index legend: T tokens, E experts, k slots, r rank.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import lorahub_engine as le
from lorahub_engine.attach import router_outputs
from lorahub_engine.dispatch import TokenLayout
from lorahub_engine.lora_layer import LoraLayer
from routers import LoRAMoEConfig, SiRAConfig, attach_router
from routers.api import router_parameters
from routers.base import Router
from routers.train import summarize

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 8


class BaselineLayer(nn.Module):
    """A SiRA LoraLayer's base, experts and router, with the deltas computed by `mode` ("dense" or "loop")."""

    def __init__(self, layer: LoraLayer, mode: str):
        super().__init__()
        self.base, self.router, self.mode = layer.base, layer.router, mode
        self.lora_A, self.lora_B = layer.lora_A, layer.lora_B  # (E, r, in), (E, out, r): shared parameters
        self.register_buffer("lora_scale", layer.lora_scale)
        self.aux: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (T, in)
        rows = x.shape[0] if x.dim() > 2 else 1
        out = self.router(tokens, TokenLayout(rows, tokens.shape[0] // rows))
        self.aux = out.aux
        y = self.base(tokens) + (self._dense if self.mode == "dense" else self._loop)(tokens, out.indices, out.gates)
        return y.view(*x.shape[:-1], -1)

    def _dense(self, x, idx, gates) -> torch.Tensor:
        E, r, d_in = self.lora_A.shape
        G = torch.zeros(x.shape[0], E, dtype=gates.dtype, device=x.device).scatter_add_(
            1, idx.clamp(min=0), torch.where(idx >= 0, gates, torch.zeros_like(gates)))  # (T, E)
        u = x @ self.lora_A.reshape(E * r, d_in).T  # (T, E*r): every expert
        w = (G * self.lora_scale).to(x.dtype).repeat_interleave(r, dim=1)  # (T, E*r)
        return (u * w) @ self.lora_B.permute(1, 0, 2).reshape(-1, E * r).T  # (T, out)

    def _loop(self, x, idx, gates) -> torch.Tensor:
        delta = torch.zeros(x.shape[0], self.lora_B.shape[1], dtype=x.dtype, device=x.device)
        for e in range(self.router.num_experts):
            token, slot = torch.where(idx == e)
            if token.numel() == 0:
                continue
            coef = (gates[token, slot] * self.lora_scale[e]).to(x.dtype)[:, None]
            delta = delta.index_add(0, token, (x[token] @ self.lora_A[e].T) @ self.lora_B[e].T * coef)
        return delta


def _swap(model: nn.Module, mode: str) -> nn.Module:
    """A copy of a SiRA model whose LoRA layers compute their experts the `mode` way."""
    model = copy.deepcopy(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, BaselineLayer(module, mode))
    return model


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    """Trained-looking experts (B nonzero) and routers, as the timing should see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_B", "router.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def moe_models(base: nn.Module, seed: int = 0) -> dict[str, nn.Module]:
    """The cases' models over copies of `base` (an eval-mode model with frozen weights)."""
    sira = _randomized(attach_router(copy.deepcopy(base), SiRAConfig(num_experts=8, top_k=2, rank=RANK,
                                                                      target_modules=TARGETS, seed=seed)), seed)
    loramoe = _randomized(attach_router(copy.deepcopy(base), LoRAMoEConfig(num_experts=6, rank=RANK,
                                                                            target_modules=TARGETS, seed=seed)), seed)
    lora = le.attach(copy.deepcopy(base), [le.init_adapter(base, "lora", TARGETS, r=RANK, seed=seed)])
    le.set_weights(lora, [1.0])
    return {"lora": lora, "sira_top2": sira, "dense8": _swap(sira, "dense"), "loop8": _swap(sira, "loop"),
            "loramoe6": loramoe}


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    """Experts and routers (the MoEs, ours or a baseline), or the plain LoRA's factors."""
    layers = [m for m in model.modules() if isinstance(m, BaselineLayer)]
    if layers:
        return [p for m in layers for p in (m.lora_A, m.lora_B, *m.router.parameters())]
    if any(hasattr(m, "router") for m in model.modules() if isinstance(m, LoraLayer)):
        return router_parameters(model)
    return [p for n, p in model.named_parameters() if "lora_" in n]


def _aux(model: nn.Module, records: list) -> torch.Tensor:
    """The step's aux loss: our routers' through routers.train.summarize, the baselines' from their layers."""
    layers = [m for m in model.modules() if isinstance(m, BaselineLayer)]
    if layers:
        return sum(v for m in layers for v in m.aux.values()) / len(layers)
    return sum(summarize(records)[0].values(), torch.zeros(())) if records else torch.zeros(())


def training_step(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor):
    """A closure running one training step of `model` (its trainable tensors, Adam, lr 1e-4)."""
    params = _trainable(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=1e-4)
    routed = [m for m in model.modules() if isinstance(m, Router)]

    def step():
        for r in routed:
            r.train()
        with router_outputs(model) as records:  # every case's model is attached (baselines: copies of SiRA's)
            logits = model(ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + _aux(model, records)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for r in routed:
            r.eval()

    return step

