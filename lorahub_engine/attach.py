"""attach / detach / set_weights / routing / merge_into_base over any transformers model.

`attach` swaps every targeted nn.Linear / Conv1D for a LoraLayer holding all adapters as one stacked bank, and
installs one Dispatch that tells every layer which experts each batch row uses:
    model(input_ids, adapter_ids=torch.tensor([0, 1, -1]))        one adapter per row (-1 = base only)
    with routing(model, idx, gates, mode="mixture"): ...          per-row experts (generate() included) or per-token
    set_weights(model, [0.7, 0.3])                                a fixed weighted mix for every row
    set_router(model, {path: router, ...})                        a learned router per layer (routers/ builds them)
Each forward of the model (and of an encoder-decoder's encoder and decoder) opens a ForwardContext from its inputs
(rows, attention mask), see lorahub_engine.dispatch; `router_outputs(model)` collects what learned routers return.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import PurePath

import torch
from torch import nn

from lorahub_engine.adapter import LoraAdapter, LoraModule
from lorahub_engine.errors import AdapterError, IncompatibleModelError, UnsupportedFeatureError
from lorahub_engine.lora_layer import LoraLayer, linear_shape
from lorahub_engine.dispatch import AutoRouting, Dispatch, LearnedRouting, PerTokenRouting, RowRouting

_STATE = "_lorahub_attached"


class _Attached:
    """What attach leaves on a model: bank names, the shared dispatch, hook handles, wrapped module paths."""

    def __init__(self, names: list[str], dispatch: Dispatch, paths: list[str]):
        self.names, self.dispatch, self.paths, self.hooks = names, dispatch, paths, []


def attach(model: nn.Module, adapters: Iterable[LoraAdapter], trainable: bool = False) -> nn.Module:
    """Wrap the adapters' target modules of `model` (in place) in LoRA layers; returns the model.

    The bank's expert order is the order of `adapters`. `trainable=True` makes the stacked factors parameters
    that receive gradients (each adapter only from the rows routed to it).
    """
    adapters = list(adapters)
    if not adapters:
        raise AdapterError("attach needs at least one adapter")
    if hasattr(model, _STATE):
        raise AdapterError("the model already has adapters attached; call detach(model) first")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter names must be unique, got {names}")
    _check_base_model(model, adapters)
    paths = sorted({path for a in adapters for path in a.modules})
    dispatch = Dispatch()
    layers = {path: _build_layer(model, path, adapters, dispatch) for path in paths}
    for path, layer in layers.items():
        layer.lora_A.requires_grad_(trainable)
        layer.lora_B.requires_grad_(trainable)
        _set_submodule(model, path, layer)
    state = _Attached(names, dispatch, paths)
    state.hooks = _install_forward_hooks(model, dispatch)
    setattr(model, _STATE, state)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Put the original modules back and remove every trace of attach."""
    state = _state(model)
    for path in state.paths:
        _set_submodule(model, path, model.get_submodule(path).base)
    for hook in state.hooks:
        hook.remove()
    delattr(model, _STATE)
    return model


def attached_names(model: nn.Module) -> list[str]:
    """Names of the attached adapters, in bank order (the ids that adapter_ids and routing refer to)."""
    return list(_state(model).names)


def set_weights(model: nn.Module, weights: Sequence[float] | torch.Tensor | None, mode: str = "mixture") -> None:
    """Every row uses all adapters with these weights (mixture = exact sum_i w_i dW_i); None clears it."""
    state = _state(model)
    if weights is None:
        state.dispatch.default = None
        return
    gates = torch.as_tensor(weights, dtype=torch.float32, device=_device(model)).reshape(1, -1)
    if gates.shape[1] != len(state.names):
        raise AdapterError(f"got {gates.shape[1]} weights for {len(state.names)} attached adapters")
    idx = torch.arange(len(state.names), device=gates.device)[None, :]
    state.dispatch.default = RowRouting(idx, gates, mode)


@contextlib.contextmanager
def routing(model: nn.Module, idx: torch.Tensor, gates: torch.Tensor | None = None, mode: str = "mixture",
            per: str | None = None):
    """Within the block, batch row n uses experts idx[n] with gates[n] (default 1) in every forward.

    per="row": idx [rows, k] (or [1, k] for every row); per="token": idx [rows * tokens, k], row-major, each token
    on its own (mixture only); None: decided once per forward from the batch's shape (rows or rows * tokens).
    """
    state = _state(model)
    idx = torch.as_tensor(idx, device=_device(model))
    if idx.dim() == 1:
        idx = idx[:, None]
    gates = torch.ones(idx.shape, device=idx.device) if gates is None else torch.as_tensor(gates, device=idx.device)
    if idx.numel() and int(idx.max()) >= len(state.names):
        raise AdapterError(f"adapter id {int(idx.max())} out of range for {len(state.names)} attached adapters")
    idx, gates = idx.long(), gates.reshape(idx.shape)
    if per == "token" and mode != "mixture":
        raise AdapterError("per-token routing is mixture only (fusion merges factors per batch row)")
    kinds = {None: AutoRouting, "row": RowRouting, "token": lambda i, g, m: PerTokenRouting(i, g)}
    if per not in kinds:
        raise AdapterError(f"per must be 'row', 'token' or None, got {per!r}")
    state.dispatch.stack.append(kinds[per](idx, gates, mode))
    try:
        yield model
    finally:
        state.dispatch.stack.pop()


def set_router(model: nn.Module, routers: dict[str, nn.Module] | None) -> None:
    """Give each LoRA layer (by module path) its learned router and make learned routing the default of every
    forward (it replaces set_weights'); None removes the routers. Routers become submodules (`<path>.router`), so
    they move with the model; a router maps (x [T, in], TokenLayout) to a RouterOutput."""
    state = _state(model)
    if routers is not None and set(routers) != set(state.paths):
        missing, extra = set(state.paths) - set(routers), set(routers) - set(state.paths)
        raise AdapterError(f"routers must cover exactly the LoRA layers; missing {sorted(missing)[:3]}, "
                           f"unknown {sorted(extra)[:3]}")
    for path in state.paths:
        layer = model.get_submodule(path)
        if routers is None:
            layer.__dict__.pop("router", None)
            layer._modules.pop("router", None)
        else:
            layer.router = routers[path]
    state.dispatch.default = None if routers is None else LearnedRouting()


@contextlib.contextmanager
def router_outputs(model: nn.Module):
    """Within the block, every forward of the model appends {layer path: RouterRecord(output, layout)} of its
    learned routers to the yielded list (nothing is kept once the block ends)."""
    dispatch = _state(model).dispatch
    collected: list[dict] = []
    dispatch.collectors.append(collected)
    try:
        yield collected
    finally:
        dispatch.collectors.remove(collected)


def read_adapters(model: nn.Module) -> list[LoraAdapter]:
    """The attached bank as adapters again (e.g. after training), padded ranks removed."""
    state = _state(model)
    modules: list[dict[str, LoraModule]] = [{} for _ in state.names]
    for path in state.paths:
        layer = model.get_submodule(path)
        for e, r in enumerate(layer.ranks):
            if r:
                A = layer.lora_A[e, :r].detach().clone(memory_format=torch.contiguous_format)
                B = layer.lora_B[e, :, :r].detach().clone(memory_format=torch.contiguous_format)  # the bank: rank-major
                modules[e][path] = LoraModule(A, B, float(layer.lora_scale[e]))
    return [LoraAdapter(name, mods) for name, mods in zip(state.names, modules)]


def init_adapter(model: nn.Module, name: str, target_modules: Sequence[str], r: int = 8, alpha: float = 16.0,
                 use_rslora: bool = False, seed: int = 0) -> LoraAdapter:
    """A fresh adapter as PEFT initializes one: A ~ kaiming_uniform(a=sqrt(5)), B = 0; targets matched by suffix."""
    g = torch.Generator().manual_seed(seed)
    scale = alpha / (math.sqrt(r) if use_rslora else r)
    modules, conv1d = {}, False
    for path, module in model.named_modules():
        shape = linear_shape(module)
        if shape is None or not any(path == t or path.endswith("." + t) for t in target_modules):
            continue
        d_in, d_out = shape
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform with a = sqrt(5) on a [r, in] weight
        A = (torch.rand(r, d_in, generator=g) * 2 - 1) * bound
        modules[path] = LoraModule(A, torch.zeros(d_out, r), scale)
        conv1d |= not isinstance(module, nn.Linear)
    if not modules:
        raise IncompatibleModelError(f"no nn.Linear or Conv1D module matches target_modules {list(target_modules)}")
    return LoraAdapter(name, modules, base_model=_model_id(model) or None, fan_in_fan_out=conv1d)


@torch.no_grad()
def merge_into_base(model: nn.Module, adapter: LoraAdapter, weight: float = 1.0) -> nn.Module:
    """Fold weight * dW of each module into the base weight (transposed for Conv1D). Returns the model."""
    _check_base_model(model, [adapter])
    for path in adapter.modules:
        module = _target(model, path)
        if isinstance(module, LoraLayer):
            module = module.base
        d_in, d_out = _linear_shape_or_raise(module, path)
        delta = weight * adapter.delta_weight(path)  # (out, in)
        if delta.shape != (d_out, d_in):
            raise IncompatibleModelError(f"{adapter.name}: {path} has dW {tuple(delta.shape)}, model expects {(d_out, d_in)}")
        if not isinstance(module, nn.Linear):
            delta = delta.t()  # Conv1D stores [in, out]
        module.weight.add_(delta.to(module.weight.dtype))
    return model


def _build_layer(model: nn.Module, path: str, adapters: list[LoraAdapter], dispatch: Dispatch) -> LoraLayer:
    base = _target(model, path)
    if isinstance(base, LoraLayer):
        raise AdapterError(f"{path} is already a LoRA layer")
    d_in, d_out = _linear_shape_or_raise(base, path)
    present = [a.modules.get(path) for a in adapters]
    r = max(m.rank for m in present if m is not None)
    weight = base.weight
    A = torch.zeros(len(adapters), r, d_in, dtype=weight.dtype, device=weight.device)
    B = torch.zeros(len(adapters), r, d_out, dtype=weight.dtype, device=weight.device).transpose(1, 2)  # rank-major
    scale = torch.zeros(len(adapters), dtype=torch.float32, device=weight.device)
    for e, (adapter, lora) in enumerate(zip(adapters, present)):
        if lora is None:
            continue
        if lora.A.shape[1] != d_in or lora.B.shape[0] != d_out:
            raise IncompatibleModelError(
                f"{adapter.name}: {path} has A {tuple(lora.A.shape)} and B {tuple(lora.B.shape)}, "
                f"but the model's module maps {d_in} -> {d_out}"
            )
        A[e, : lora.rank] = lora.A
        B[e, :, : lora.rank] = lora.B
        scale[e] = lora.scale
    ranks = [0 if m is None else m.rank for m in present]
    return LoraLayer(base, A, B, scale, ranks, dispatch, path)


def _target(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise IncompatibleModelError(f"the model has no module {path!r} (unknown target module)") from None


def _linear_shape_or_raise(module: nn.Module, path: str) -> tuple[int, int]:
    shape = linear_shape(module)
    if shape is None:
        raise UnsupportedFeatureError(f"{path} is a {type(module).__name__}; only nn.Linear and Conv1D are supported")
    return shape


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _install_forward_hooks(model: nn.Module, dispatch: Dispatch) -> list:
    """Open a ForwardContext before each forward of the model, and of its encoder and decoder (they run alone in
    generate() and see their own inputs and masks); close it after, exceptions included."""
    modules = [model]
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        modules += [m for m in (model.get_encoder(), model.get_decoder()) if m is not model]
    hooks = []
    for module in modules:
        hooks.append(module.register_forward_pre_hook(_open_forward(dispatch, module is model), with_kwargs=True))
        hooks.append(module.register_forward_hook(_close_forward(dispatch), always_call=True))
    return hooks


_INPUTS = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")


def _open_forward(dispatch: Dispatch, takes_adapter_ids: bool):
    names: list[str] = []

    def hook(module, args, kwargs):
        if not names:
            names.extend(inspect.signature(module.forward).parameters)
        override = None
        ids = kwargs.pop("adapter_ids", None) if takes_adapter_ids else None
        if ids is not None:
            ids = torch.as_tensor(ids, device=_device(module)).long().reshape(-1, 1)
            override = RowRouting(ids, torch.ones(ids.shape, device=ids.device))
        inputs = {**dict(zip(names, args)), **kwargs}
        first = next((inputs[n] for n in _INPUTS if torch.is_tensor(inputs.get(n))), None)
        rows, length = (first.shape[0], first.shape[1]) if first is not None and first.dim() >= 2 else (None, None)
        mask = inputs.get("attention_mask")
        encoder = inputs.get("encoder_hidden_states")
        sources = [(encoder, inputs.get("encoder_attention_mask"))] if torch.is_tensor(encoder) else []
        dispatch.open(module, rows, length, mask if torch.is_tensor(mask) else None, sources, override)
        return args, kwargs

    return hook


def _close_forward(dispatch: Dispatch):
    def hook(module, args, output):
        dispatch.close(module)

    return hook


def _state(model: nn.Module) -> _Attached:
    state = getattr(model, _STATE, None)
    if state is None:
        raise AdapterError("no adapters are attached to this model; call attach(model, adapters) first")
    return state


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_id(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def _check_base_model(model: nn.Module, adapters: list[LoraAdapter]) -> None:
    """Refuse adapters made for another base: compared by the last path component, when both sides name one."""
    ours = PurePath(_model_id(model)).name.lower()
    for adapter in adapters:
        theirs = PurePath(adapter.base_model or "").name.lower()
        if ours and theirs and ours != theirs:
            raise IncompatibleModelError(
                f"adapter {adapter.name!r} was trained on {adapter.base_model!r}, the model is {_model_id(model)!r}"
            )


@contextlib.contextmanager
def attached(model: nn.Module, adapters: Iterable[LoraAdapter], trainable: bool = False) -> Iterator[nn.Module]:
    """`attach` for the block: `with attached(model, adapters): ...`; the adapters are detached on exit, errors too."""
    attach(model, adapters, trainable=trainable)
    try:
        yield model
    finally:
        detach(model)
