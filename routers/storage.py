"""save_router / load_router: a router folder is router.json (config, expert names, layers) plus
router.safetensors (each layer's router tensors, keyed "<layer path>.<tensor>"). Never pickle."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lorahub_engine as le
from lorahub_engine._io import atomic_dir
from routers.api import attach_router, routers_of
from routers.config import config_from_json, config_to_json
from routers.errors import RouterError

FORMAT_VERSION = 1
CONFIG, TENSORS = "router.json", "router.safetensors"


def save_router(model, path) -> None:
    """Write the model's router to the folder `path` (replaced atomically as a whole)."""
    routers = routers_of(model)
    bank = le.attached_names(model)
    first = next(iter(routers.values()))
    disabled = [name for name, off in zip(bank, first.disabled.tolist()) if off]
    tensors = {f"{path_}.{name}": t.detach().cpu().contiguous()
               for path_, router in routers.items() for name, t in router.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "config": config_to_json(replace(first.config, disable=tuple(disabled))),
            "experts": bank, "layers": sorted(routers)}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def load_router(hf_model, path, experts):
    """Attach `experts` to `hf_model` (the same names, in the saved order) and load the saved router into it."""
    folder = Path(path)
    meta = _read_meta(folder)
    experts = list(experts)
    names = [e.name for e in experts]
    if names != meta["experts"]:
        raise RouterError(f"{folder}: the router was trained over experts {meta['experts']}, got {names}")
    model = attach_router(hf_model, config_from_json(meta["config"]), experts)
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
    if tensors:
        raise RouterError(f"{folder / TENSORS}: unknown tensors {sorted(tensors)[:3]}")
    return model


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
