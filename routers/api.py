"""attach_router / router_stats / disable_experts / export_experts: a router per LoRA layer of a model.

    model = attach_router(hf_model, MoLEConfig(), experts=adapters)   # attaches the bank, one gate per LoRA layer
    model = attach_router(hf_model, ArrowConfig(top_k=3), experts=adapters)
    model = attach_router(hf_model, SiRAConfig(num_experts=8, top_k=2))   # new trainable experts, no experts=
    router_stats(model)   # {layer path: {"tokens": [E], "mean_gate": [E], "entropy": float}} over real tokens
    adapters = export_experts(model)   # SiRA / LoRAMoE: each trained expert as a LoraAdapter
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

import lorahub_engine as le
from lorahub_engine.attach import set_router
from lorahub_engine.lora_layer import LoraLayer
from routers.arrow import ArrowRouter, prototypes
from routers.base import Router
from routers.config import ArrowConfig, LoRAMoEConfig, MoLEConfig, SiRAConfig
from routers.errors import RouterError
from routers.experts import new_experts
from routers.loramoe import LoRAMoERouter
from routers.mole import MoLEGate
from routers.sira import SiRARouter

Config = MoLEConfig | ArrowConfig | SiRAConfig | LoRAMoEConfig


def attach_router(hf_model: nn.Module, config: Config, experts: Iterable[le.LoraAdapter] | None = None
                  ) -> nn.Module:
    """Give every LoRA layer of `hf_model` (in place) a router. MoLE and Arrow: over `experts`, attached frozen in
    this order. SiRA and LoRAMoE: over new experts (expert0, expert1, ...; see routers.experts), no `experts`."""
    if not isinstance(config, (MoLEConfig, ArrowConfig, SiRAConfig, LoRAMoEConfig)):
        raise RouterError(f"config must be a MoLEConfig, ArrowConfig, SiRAConfig or LoRAMoEConfig, got "
                          f"{type(config).__name__}")
    if config.trains_experts:
        if experts is not None:
            raise RouterError(f"{config.method} trains its own new experts: call attach_router without experts=")
        experts, config = new_experts(hf_model, config)
    elif experts is None:
        raise RouterError(f"{config.method} routes over given experts: pass experts=[...]")
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
    if next(iter(routers.values())).config.trains_experts:
        raise RouterError("update_experts changes a bank of given experts (MoLE, Arrow); SiRA and LoRAMoE own theirs")
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


def build_router(layer: LoraLayer, config: Config) -> Router:
    """A fresh router for one LoRA layer, on the layer's device (Arrow: prototypes from the layer's bank; SiRA and
    LoRAMoE: over the layer's own experts, a prefix of the bank, from a generator seeded by seed and path)."""
    E, _, d_in = layer.lora_A.shape
    if isinstance(config, MoLEConfig):
        router = MoLEGate(d_in, E, config)
    elif config.trains_experts:
        own = sum(r > 0 for r in layer.ranks)
        seed = config.seed * 100_003 + zlib.crc32(layer.path.encode())
        router = (SiRARouter if isinstance(config, SiRAConfig) else LoRAMoERouter)(d_in, own, config, seed)
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
    off = torch.tensor([n in names for n in bank])
    for router in routers_of(model).values():
        router.disabled.copy_(off[: router.num_experts])  # SiRA / LoRAMoE: a layer may have fewer experts


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
    """What train_router trains: every router's tensors (MoLE: gate weights and temperatures; Arrow: none; SiRA,
    LoRAMoE: router weights) and, where the router trains its experts, each layer's expert factors."""
    routers = routers_of(model)
    params = [p for router in routers.values() for p in router.parameters()]
    if next(iter(routers.values())).config.trains_experts:
        params += [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    return params


@contextlib.contextmanager
def sample_types(model: nn.Module, types: Sequence[int | None] | None):
    """Within the block, every router knows the type of each batch row (LoRAMoE's localized balance reads it; other
    routers ignore it): an expert-group index, or None for an untyped row. types None: no types."""
    routers = routers_of(model)
    config = next(iter(routers.values())).config
    groups = getattr(config, "expert_groups", None)
    if types is not None and groups is not None:
        bad = [t for t in types if t is not None and not 0 <= t < len(groups)]
        if bad:
            raise RouterError(f"sample types must be expert-group indices in [0, {len(groups)}), got {bad[:3]}")
    tensor = None if types is None or all(t is None for t in types) else torch.tensor(
        [-1 if t is None else t for t in types], device=next(model.parameters()).device)
    try:
        for router in routers.values():
            router.sample_types = tensor
        yield model
    finally:
        for router in routers.values():
            router.sample_types = None


def export_experts(model: nn.Module) -> list[le.LoraAdapter]:
    """Each trained expert of a SiRA or LoRAMoE model as a LoraAdapter over the modules that have it (bank order;
    `.save(folder)` writes a PEFT folder). Attached alone, expert i gives the MoE's forward with every gate on i."""
    config = next(iter(routers_of(model).values())).config
    if not config.trains_experts:
        raise RouterError(f"export_experts exports the experts a router trained (SiRA, LoRAMoE); {config.method} "
                          "routes over the experts you attached")
    model_id = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "") or None
    adapters = []
    for adapter in le.read_adapters(model):
        conv1d = any(not isinstance(model.get_submodule(p).base, nn.Linear) for p in adapter.modules)
        adapters.append(adapter.with_modules(adapter.modules, base_model=model_id, fan_in_fan_out=conv1d))
    return adapters
