"""LoraAdapter: per-module factors A [r, in], B [out, r] and a scale; PEFT folder I/O (safetensors only).

Everything else (delta weights, ranks, the PEFT config written back) derives from those three per module.
Factors are always kept in nn.Linear orientation; `fan_in_fan_out` (GPT-2 Conv1D) only matters where a delta is
folded into a stored weight, and is kept so a saved adapter round-trips.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lorahub_engine._io import OutputKind, atomic_dir, read_json
from lorahub_engine.errors import (
    AdapterError,
    AdapterFileError,
    AdapterFormatError,
    NonFiniteError,
    UnsupportedFeatureError,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
_METADATA_KEY = "lorahub_engine.metadata"


@dataclass
class LoraModule:
    """One target module: dW = scale * B @ A, in nn.Linear orientation [out, in]."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B.float() @ self.A.float())


@dataclass
class LoraAdapter:
    """A LoRA adapter as plain data: `modules` maps module paths (as in the model) to their factors."""

    name: str
    modules: Mapping[str, LoraModule]
    base_model: str | None = None
    task_type: str | None = None
    fan_in_fan_out: bool = False
    metadata: dict = field(default_factory=dict)  # "description", "family", "samples" (list of inputs)

    def delta_weight(self, module: str) -> torch.Tensor:
        """Scaled dW of one module in nn.Linear orientation [out, in], fp32."""
        return self.modules[module].delta_weight()

    def with_modules(self, modules: Mapping[str, LoraModule], **changes) -> LoraAdapter:
        return replace(self, modules=dict(modules), **changes)

    def to(self, dtype: torch.dtype) -> LoraAdapter:
        """The same adapter with its factors cast to `dtype` (scales are plain floats and stay)."""
        return self.with_modules({path: LoraModule(m.A.to(dtype), m.B.to(dtype), m.scale)
                                  for path, m in self.modules.items()})

    @classmethod
    def load(cls, path: str | Path, name: str | None = None, lazy: bool = False) -> LoraAdapter:
        """Read a PEFT LoRA folder. `lazy=True` reads each module's tensors only when it is accessed."""
        folder = Path(path)
        config = _read_config(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            if (folder / "adapter_model.bin").is_file():
                raise AdapterFileError(
                    f"{folder}: only adapter_model.bin (a pickle) is present; we never unpickle adapter files. "
                    "Convert it to adapter_model.safetensors with a tool you trust."
                )
            raise AdapterFileError(f"{folder}: {WEIGHTS_FILE} is missing")
        reader = _SafetensorsModules(weights, config)
        modules = reader if lazy else {m: reader[m] for m in reader}
        return cls(
            name=name or folder.name,
            modules=modules,
            base_model=config.get("base_model_name_or_path"),
            task_type=config.get("task_type"),
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            metadata=reader.metadata,
        )

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write a PEFT folder (config + safetensors) atomically: it appears whole or not at all. It replaces an
        adapter folder this engine wrote; anything else at `path` only with `overwrite` (see _io.atomic_dir)."""
        if not self.modules:
            raise AdapterFormatError(f"adapter {self.name!r} has no modules to save")
        tensors, ranks, alphas = {}, {}, {}
        for module, lora in self.modules.items():
            _check_finite(self.name, module, lora)
            tensors[f"{PREFIX}{module}.lora_A.weight"] = lora.A.contiguous()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = lora.B.contiguous()
            ranks[module], alphas[module] = lora.rank, lora.scale * lora.rank
        with atomic_dir(path, kind=ADAPTER_FOLDER, overwrite=overwrite) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(self._peft_config(ranks, alphas), indent=2))
            save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", _METADATA_KEY: json.dumps(self.metadata)})

    def _peft_config(self, ranks: dict[str, int], alphas: dict[str, float]) -> dict:
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(a for m, a in alphas.items() if ranks[m] == r).most_common(1)[0][0]
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model,
            "r": r,
            "lora_alpha": alpha,
            "use_rslora": False,
            "rank_pattern": {re.escape(m): n for m, n in ranks.items() if n != r},
            "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != alpha},
            "target_modules": sorted(self.modules),
            "fan_in_fan_out": self.fan_in_fan_out,
            "lora_dropout": 0.0,
            "bias": "none",
            "use_dora": False,
            "modules_to_save": None,
            "inference_mode": True,
        }


def _is_adapter_output(path: Path) -> bool:
    """A folder of just a config and weights whose safetensors header carries this engine's metadata key."""
    if not path.is_dir() or set(p.name for p in path.iterdir()) != {CONFIG_FILE, WEIGHTS_FILE}:
        return False
    try:
        with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
            return _METADATA_KEY in (f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError):  # RuntimeError: the file vanished (a concurrent save's rename)
        return False


ADAPTER_FOLDER = OutputKind("an adapter folder", _is_adapter_output)


def pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def module_scale(config: Mapping, module: str) -> tuple[int, float]:
    """(rank, scale) of a module under a PEFT LoRA config: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r = int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


# adapter_config.json, field by field. A field in none of these lists is refused by name when it is set (not null,
# false or empty): a new PEFT feature may change the math, so it is refused until it is implemented here.
_MATH_FIELDS = {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "target_modules"}
_NO_MATH_FIELDS = {  # what they describe does not change a loaded adapter's dW (training, bookkeeping, selection)
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "layers_to_transform",
    "layers_pattern", "exclude_modules", "runtime_config", "megatron_config", "megatron_core", "ensure_weight_tying",
    "qalora_group_size",
}
_UNSUPPORTED = {  # implemented by PEFT, not here: refused when set
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "arrow_config": "Arrow routing (arrow_config)",
}


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise AdapterFileError(f"{folder}: no such adapter folder")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterFileError(f"{folder}: {CONFIG_FILE} is missing")
    config = read_json(path)
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedFeatureError(f"{path}: peft_type {config['peft_type']!r} is not LORA")
    for key, feature in _UNSUPPORTED.items():
        if config.get(key):
            raise UnsupportedFeatureError(f"{path}: {feature} is not supported")
    if config.get("bias", "none") not in ("none", None):
        raise UnsupportedFeatureError(f"{path}: bias {config['bias']!r} (trained base biases) is not supported")
    unknown = sorted(k for k, v in config.items() if k not in _MATH_FIELDS | _NO_MATH_FIELDS | set(_UNSUPPORTED)
                     and k != "bias" and v not in (None, False, "", [], {}))
    if unknown:
        raise UnsupportedFeatureError(f"{path}: field {unknown[0]!r} is not understood by this engine (it may change "
                                      "the adapter's math); refusing rather than ignoring it")
    _check_math_fields(path, config)
    return config


def _positive(value, integer: bool) -> bool:
    number = int if integer else (int, float)
    return isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_math_fields(path: Path, config: dict) -> None:
    """Types and values of the fields that set dW, each refused by name."""
    for key, integer in (("r", True), ("lora_alpha", False)):
        if not _positive(config.get(key), integer):
            kind = "a positive integer" if integer else "a positive number"
            raise AdapterFormatError(f"{path}: {key!r} must be {kind}, got {config.get(key)!r}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            raise AdapterFormatError(f"{path}: {key!r} must be true or false, got {config[key]!r}")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise AdapterFormatError(f"{path}: {key!r} must be an object of pattern -> value, got {patterns!r}")
        for pattern, value in patterns.items():
            if not _positive(value, integer):
                kind = "a positive integer" if integer else "a positive number"
                raise AdapterFormatError(f"{path}: {key}[{pattern!r}] must be {kind}, got {value!r}")
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as e:
                raise AdapterFormatError(f"{path}: {key} key {pattern!r} is not a valid regex ({e})") from None
    targets = config.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or (isinstance(targets, list)
                                                                  and all(isinstance(t, str) for t in targets))):
        raise AdapterFormatError(f"{path}: 'target_modules' must be a list of names or a regex, got {targets!r}")
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as e:
            raise AdapterFormatError(f"{path}: 'target_modules' {targets!r} is not a valid regex ({e})") from None


def _check_targets(weights: Path, config: dict, modules: Collection[str]) -> None:
    """Every name (or the regex) in target_modules must select a module that has tensors (PEFT's suffix match)."""
    targets = config.get("target_modules")
    if isinstance(targets, list):
        absent = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
        if absent:
            raise AdapterFormatError(f"{weights}: 'target_modules' names {absent[:5]}, but the file has no tensors "
                                     "for them (truncated or mismatched files?)")
    elif isinstance(targets, str) and targets != "all-linear" and not any(re.fullmatch(targets, m) for m in modules):
        raise AdapterFormatError(f"{weights}: 'target_modules' regex {targets!r} selects none of the file's modules")


class _SafetensorsModules(Mapping):
    """Module path -> LoraModule, read from a safetensors file on access (validated there)."""

    def __init__(self, weights: Path, config: dict):
        self.weights, self.config = weights, config
        try:
            with safe_open(weights, framework="pt") as f:
                keys = list(f.keys())
                header = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise AdapterFileError(f"{weights}: unreadable safetensors file ({e})") from None
        self.metadata = _header_metadata(weights, header)
        self._keys: dict[str, dict[str, str]] = {}
        for key in keys:
            match = _KEY.match(key)
            if match is None:
                raise _unknown_key(weights, key)
            self._keys.setdefault(match["module"], {})[match["factor"]] = key
        for module, factors in self._keys.items():
            if set(factors) != {"A", "B"}:
                raise AdapterFormatError(f"{weights}: module {module!r} lacks lora_{({'A', 'B'} - set(factors)).pop()}")
        if not self._keys:
            raise AdapterFormatError(f"{weights}: no LoRA weights found")
        _check_targets(weights, config, self._keys)

    def __getitem__(self, module: str) -> LoraModule:
        keys = self._keys[module]
        try:
            with safe_open(self.weights, framework="pt") as f:
                A, B = f.get_tensor(keys["A"]), f.get_tensor(keys["B"])
        except (SafetensorError, OSError) as e:
            raise AdapterFileError(f"{self.weights}: cannot read {module!r} ({e})") from None
        r, scale = module_scale(self.config, module)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterFormatError(
                f"{self.weights}: {module!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                "expected [r, in] and [out, r]"
            )
        if A.shape[0] != r:
            raise AdapterFormatError(f"{self.weights}: {module!r} has rank {A.shape[0]} but the config says r={r}")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise AdapterFormatError(f"{self.weights}: {module!r} has factors of type {A.dtype} / {B.dtype}; "
                                     "LoRA factors must be floating point")
        lora = LoraModule(A, B, scale)
        _check_finite(str(self.weights), module, lora)
        return lora

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _header_metadata(weights: Path, header: dict) -> dict:
    """The engine's metadata (a JSON object) from the safetensors header; {} when absent."""
    try:
        metadata = json.loads(header.get(_METADATA_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{weights}: header field {_METADATA_KEY!r} is not valid JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise AdapterFormatError(f"{weights}: header field {_METADATA_KEY!r} must be a JSON object")
    return metadata


def _unknown_key(weights: Path, key: str) -> AdapterError:
    for marker, feature in (
        ("lora_embedding_", "embedding LoRA"),
        ("lora_magnitude_vector", "DoRA"),
        ("lora_B.bias", "LoRA bias"),
        ("modules_to_save", "modules_to_save"),
    ):
        if marker in key:
            return UnsupportedFeatureError(f"{weights}: {feature} is not supported (key {key!r})")
    return AdapterFormatError(f"{weights}: unexpected key {key!r}")


def _check_finite(where: str, module: str, lora: LoraModule) -> None:
    for factor, t in (("A", lora.A), ("B", lora.B)):
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"{where}: {module!r} lora_{factor} holds NaN or inf")
    if not math.isfinite(lora.scale):
        raise NonFiniteError(f"{where}: {module!r} has a non-finite scale {lora.scale}")
