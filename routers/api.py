"""attach_router / router_stats / disable_experts: a router over a model's frozen expert bank.

    model = attach_router(hf_model, MoLEConfig(), experts=adapters)   # attaches the bank, one gate per LoRA layer
    model = attach_router(hf_model, ArrowConfig(top_k=3), experts=adapters)
    router_stats(model)   # {layer path: {"tokens": [E], "mean_gate": [E], "entropy": float}} over real tokens
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

import lorahub_engine as le
from lorahub_engine.attach import set_router
from lorahub_engine.lora_layer import LoraLayer
from routers.arrow import ArrowRouter, prototypes
from routers.base import Router
from routers.config import ArrowConfig, MoLEConfig
from routers.errors import RouterError
from routers.mole import MoLEGate


def attach_router(hf_model: nn.Module, config: MoLEConfig | ArrowConfig, experts: Iterable[le.LoraAdapter]
                  ) -> nn.Module:
    """Attach `experts` (frozen, in this order) to `hf_model` in place and give every LoRA layer a router."""
    if not isinstance(config, (MoLEConfig, ArrowConfig)):
        raise RouterError(f"config must be a MoLEConfig or an ArrowConfig, got {type(config).__name__}")
    experts = list(experts)
    le.attach(hf_model, experts)
    layers = lora_layers(hf_model)
    set_router(hf_model, {path: build_router(layer, config) for path, layer in layers.items()})
    disable_experts(hf_model, config.disable)
    return hf_model


def update_experts(model: nn.Module, add: Iterable[le.LoraAdapter] = (), remove: Sequence[str] = ()) -> nn.Module:
    """Remove experts from and append experts to a routed model's bank, in place. The bank is rebuilt; each router
    keeps its learned or computed rows for the experts that stay, and only the new experts get new rows (Arrow:
    their own prototypes; MoLE: zero gate rows)."""
    routers, names = routers_of(model), le.attached_names(model)
    unknown = sorted(set(remove) - set(names))
    if unknown:
        raise RouterError(f"cannot remove {unknown}: not among the attached experts {names}")
    add = list(add)
    keep = [i for i, name in enumerate(names) if name not in set(remove)]
    bank = le.read_adapters(model)
    config = next(iter(routers.values())).config
    le.detach(model)
    le.attach(model, [bank[i] for i in keep] + add)
    new = {}
    for path, layer in lora_layers(model).items():
        old = routers.get(path)
        new[path] = build_router(layer, config) if old is None else _resized(old, keep, layer, len(add))
    set_router(model, new)
    return model


def _resized(old: Router, keep: list[int], layer: LoraLayer, added: int) -> Router:
    """`old`'s rows for the kept experts, then rows for the `added` last experts of the layer's bank."""
    if isinstance(old, ArrowRouter):
        fresh = prototypes(layer.lora_A[-added:].detach(), layer.lora_B[-added:].detach()) if added else None
        rows = old.prototypes[keep] if fresh is None else torch.cat([old.prototypes[keep], fresh.to(old.prototypes)])
        router = ArrowRouter(rows, old.config)
    else:
        router = MoLEGate(old.weight.shape[1], len(keep) + added, old.config)
        with torch.no_grad():
            router.weight[: len(keep)] = old.weight[keep]
            router.temperature.copy_(old.temperature)
    router.disabled[: len(keep)] = old.disabled[keep]
    return router.to(old.disabled.device).train(old.training)


def build_router(layer: LoraLayer, config: MoLEConfig | ArrowConfig) -> Router:
    """A fresh router for one LoRA layer, on the layer's device (Arrow: prototypes from the layer's bank)."""
    E, _, d_in = layer.lora_A.shape
    if isinstance(config, MoLEConfig):
        router = MoLEGate(d_in, E, config)
    else:
        router = ArrowRouter(prototypes(layer.lora_A.detach(), layer.lora_B.detach()), config)
    return router.to(layer.lora_A.device).eval()


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {path: module for path, module in model.named_modules() if isinstance(module, LoraLayer)}


def routers_of(model: nn.Module) -> dict[str, Router]:
    """Each LoRA layer's router, by layer path."""
    found = {path: getattr(layer, "router", None) for path, layer in lora_layers(model).items()}
    if not found or any(r is None for r in found.values()):
        raise RouterError("the model has no router; call attach_router(model, config, experts=...) first")
    return found


def disable_experts(model: nn.Module, names: Sequence[str]) -> None:
    """Mask these experts out of every router (the rest renormalize); an empty list enables all again."""
    bank = le.attached_names(model)
    unknown = sorted(set(names) - set(bank))
    if unknown:
        raise RouterError(f"cannot disable {unknown}: not among the attached experts {bank}")
    for router in routers_of(model).values():
        router.disabled.copy_(torch.tensor([n in names for n in bank]))


def router_stats(model: nn.Module) -> dict[str, dict]:
    """Per layer, over the real (non-padding) tokens seen since the router was attached or last reset: tokens
    routed to each expert, mean gate (probability) of each expert, and mean per-token routing entropy (nats)."""
    stats = {}
    for path, router in routers_of(model).items():
        n = float(router.usage_count)
        stats[path] = {
            "tokens": router.usage_tokens.tolist(),
            "mean_gate": (router.usage_probs / max(n, 1.0)).tolist(),
            "entropy": float(router.usage_entropy) / max(n, 1.0),
            "count": int(n),
        }
    return stats


def reset_router_stats(model: nn.Module) -> None:
    for router in routers_of(model).values():
        router.reset_usage()


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors of every router (MoLE: gate weights and temperatures; Arrow: none)."""
    return [p for router in routers_of(model).values() for p in router.parameters()]
