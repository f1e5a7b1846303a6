"""save_router / load_router: a router folder is router.json (config, expert names, layers) plus
router.safetensors (each layer's router tensors, keyed "<layer path>.<tensor>"; for SiRA and LoRAMoE also the
layer's trained experts, "<layer path>.lora_A" [E, r, in] and "<layer path>.lora_B" [E, out, r]). Never pickle."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lorahub_engine as le
from lorahub_engine._io import OutputKind, atomic_dir
from routers.api import attach_router, lora_layers, routers_of
from routers.config import config_from_json, config_to_json
from routers.errors import RouterError

FORMAT_VERSION = 1
CONFIG, TENSORS = "router.json", "router.safetensors"
EXPERT_TENSORS = ("lora_A", "lora_B")  # a LoRA layer's expert bank, saved where the router trained it


def _is_router_output(path: Path) -> bool:
    """A folder of just router.json (with a format_version) and router.safetensors."""
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return {p.name for p in path.iterdir()} == {CONFIG, TENSORS} and isinstance(meta, dict) and "format_version" in meta


ROUTER_FOLDER = OutputKind("a router folder", _is_router_output)


def save_router(model, path, overwrite: bool = False) -> None:
    """Write the model's router to the folder `path` atomically. It replaces a router folder this engine wrote;
    anything else at `path` only with `overwrite` (see lorahub_engine._io.atomic_dir)."""
    routers = routers_of(model)
    bank = le.attached_names(model)
    first = next(iter(routers.values()))
    widest = max(routers.values(), key=lambda router: router.num_experts)
    disabled = [name for name, off in zip(bank, widest.disabled.tolist()) if off]
    tensors = {f"{path_}.{name}": t.detach().cpu().contiguous()
               for path_, router in routers.items() for name, t in router.state_dict().items()}
    if first.config.trains_experts:
        tensors.update({f"{path_}.{name}": getattr(layer, name).detach().cpu().contiguous()
                        for path_, layer in lora_layers(model).items() for name in EXPERT_TENSORS})
    meta = {"format_version": FORMAT_VERSION, "config": config_to_json(replace(first.config, disable=tuple(disabled))),
            "experts": bank, "layers": sorted(routers)}
    with atomic_dir(path, kind=ROUTER_FOLDER, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def load_router(hf_model, path, experts=None):
    """Load the saved router into `hf_model`. MoLE, Arrow: over `experts` (the same names, in the saved order).
    SiRA, LoRAMoE: no `experts`; their trained experts come from the folder."""
    folder = Path(path)
    meta = _read_meta(folder)
    config = config_from_json(meta["config"])
    if config.trains_experts:
        if experts is not None:
            raise RouterError(f"{folder}: a {config.method} router holds its own experts; load it without experts=")
        model = attach_router(hf_model, config)
    else:
        if experts is None:
            raise RouterError(f"{folder}: a {config.method} router routes over given experts: pass experts=[...]")
        experts = list(experts)
        names = [e.name for e in experts]
        if names != meta["experts"]:
            raise RouterError(f"{folder}: the router was trained over experts {meta['experts']}, got {names}")
        model = attach_router(hf_model, config, experts)
    routers = routers_of(model)
    if sorted(routers) != meta["layers"]:
        raise RouterError(f"{folder}: saved for layers {meta['layers'][:3]}..., the experts attach {sorted(routers)[:3]}...")
    try:
        tensors = load_file(str(folder / TENSORS), device=str(next(model.parameters()).device))
    except (OSError, SafetensorError) as e:
        raise RouterError(f"{folder / TENSORS}: unreadable ({e})") from None
    for layer_path, router in routers.items():
        state = {name: tensors.pop(f"{layer_path}.{name}", None) for name in router.state_dict()}
        missing = [name for name, t in state.items() if t is None]
        if missing:
            raise RouterError(f"{folder / TENSORS}: {layer_path} lacks {missing}")
        router.load_state_dict(state)
    if config.trains_experts:
        _load_experts(model, tensors, folder)
    if tensors:
        raise RouterError(f"{folder / TENSORS}: unknown tensors {sorted(tensors)[:3]}")
    return model


def _load_experts(model, tensors: dict, folder: Path) -> None:
    """Copy each layer's saved expert bank into it (popped from `tensors`)."""
    for layer_path, layer in lora_layers(model).items():
        for name in EXPERT_TENSORS:
            saved, target = tensors.pop(f"{layer_path}.{name}", None), getattr(layer, name)
            if saved is None or saved.shape != target.shape:
                found = "nothing" if saved is None else tuple(saved.shape)
                raise RouterError(f"{folder / TENSORS}: {layer_path}.{name} should be {tuple(target.shape)}, "
                                  f"found {found}")
            with torch.no_grad():
                target.copy_(saved)


def saved_config(path):
    """The config a saved router was built with (its method and settings), read without loading any tensor."""
    return config_from_json(_read_meta(Path(path))["config"])


def saved_experts(path) -> list[str]:
    """The expert names a saved router was built over, in bank order."""
    return list(_read_meta(Path(path))["experts"])


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RouterError(f"{folder / CONFIG}: not a router folder ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or not {
            "config", "experts", "layers"} <= set(meta):
        raise RouterError(f"{folder / CONFIG}: not a router config of format {FORMAT_VERSION}")
    return meta
