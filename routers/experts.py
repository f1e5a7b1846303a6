"""New trainable LoRA experts for SiRA and LoRAMoE: where they go, how many per layer, and their export.

    experts, config = new_experts(hf_model, SiRAConfig(num_experts=[4, 8]))   # expert i on the layers with > i experts

The bank of every LoRA layer holds max(num_experts) rows; a layer with fewer experts has zero rows (rank 0) for the
others, which its router never selects and which `export_experts` (routers.api) leaves out.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

import lorahub_engine as le
from lorahub_engine.lora_layer import linear_shape
from routers.errors import RouterError


def layer_index(path: str) -> int | None:
    """The index of the layer stack entry a module sits in: the first all-digit component of its path
    ("model.layers.3.mlp.up_proj" -> 3; "encoder.block.0.layer.1.DenseReluDense.wi" -> 0); None outside any stack."""
    return next((int(part) for part in path.split(".") if part.isdigit()), None)


def target_paths(model: nn.Module, target_modules) -> list[str]:
    """Module paths the experts wrap. None: every nn.Linear / Conv1D inside the layer stack (attention and MLP
    projections of any family), never the output embedding; names: modules whose path is or ends with one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    paths = []
    for path, module in model.named_modules():
        if linear_shape(module) is None or module is head:
            continue
        if target_modules is None:
            chosen = layer_index(path) is not None
        else:
            chosen = any(path == t or path.endswith("." + t) for t in target_modules)
        if chosen:
            paths.append(path)
    if not paths:
        what = "the layer stack" if target_modules is None else f"target_modules {list(target_modules)}"
        raise RouterError(f"no nn.Linear or Conv1D module of the model matches {what}")
    return paths


def experts_per_path(paths: list[str], num_experts) -> tuple[dict[str, int], tuple[int, ...] | int]:
    """Each path's expert count, and num_experts as JSON can hold it (an int, or one int per layer: a function of
    the layer index is evaluated on 0 .. layers - 1)."""
    if isinstance(num_experts, int):
        return {p: num_experts for p in paths}, num_experts
    index = {p: layer_index(p) for p in paths}
    outside = [p for p, i in index.items() if i is None]
    if outside:
        raise RouterError(f"num_experts per layer needs modules inside a layer stack; {outside[0]} is not")
    layers = max(index.values()) + 1
    if callable(num_experts):
        counts = tuple(num_experts(i) for i in range(layers))
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
            raise RouterError(f"the num_experts function must return positive ints, got {counts}")
    else:
        counts = tuple(num_experts)
        if len(counts) != layers:
            raise RouterError(f"num_experts has {len(counts)} entries; the model's targets span {layers} layers")
    return {p: counts[i] for p, i in index.items()}, counts


def new_experts(model: nn.Module, config):
    """Fresh experts for `config` (PEFT's initialization: A kaiming-uniform, B zero, scale alpha / rank), named
    expert0, expert1, ...; and the config with num_experts resolved to an int or one int per layer."""
    paths = target_paths(model, config.target_modules)
    counts, resolved = experts_per_path(paths, config.num_experts)
    experts = [le.init_adapter(model, f"expert{i}", [p for p in paths if counts[p] > i], r=config.rank,
                               alpha=config.alpha, seed=config.seed * 100_003 + i)
               for i in range(max(counts.values()))]
    return experts, replace(config, num_experts=resolved)
