"""AdapterZoo: named adapters plus one manifest (description, family, sample inputs per adapter)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from lorahub_engine._io import OutputKind, atomic_dir, read_json
from lorahub_engine.adapter import LoraAdapter
from lorahub_engine.errors import AdapterError, AdapterFileError, AdapterFormatError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _is_zoo_output(path: Path) -> bool:
    """A folder whose manifest.json is a zoo manifest (adapter entries are objects with a path)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    entries = manifest.get("adapters") if isinstance(manifest, dict) else None
    return (isinstance(entries, list) and "format_version" in manifest
            and all(isinstance(e, dict) and "path" in e for e in entries))


ZOO_FOLDER = OutputKind("a zoo folder", _is_zoo_output)


class AdapterZoo:
    """An ordered, name-unique collection of adapters: `zoo["name"]`, `len(zoo)`, iteration over adapters."""

    def __init__(self, adapters: Iterable[LoraAdapter]):
        self._adapters: dict[str, LoraAdapter] = {}
        for adapter in adapters:
            if adapter.name in self._adapters:
                raise AdapterFormatError(f"two adapters are named {adapter.name!r}; zoo names must be unique")
            self._adapters[adapter.name] = adapter

    def __getitem__(self, name: str) -> LoraAdapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise AdapterError(f"no adapter named {name!r} in the zoo") from None

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def __iter__(self) -> Iterator[LoraAdapter]:
        return iter(self._adapters.values())

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """One PEFT folder per adapter plus manifest.json, written atomically as a whole. It replaces a zoo folder
        this engine wrote; anything else at `path` only with `overwrite` (see _io.atomic_dir)."""
        entries = []
        with atomic_dir(path, kind=ZOO_FOLDER, overwrite=overwrite) as tmp:
            for adapter in self:
                adapter.save(tmp / check_name(adapter.name))
                entries.append({"name": adapter.name, "path": adapter.name, **adapter.metadata})
            manifest = {"format_version": FORMAT_VERSION, "adapters": entries}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    @classmethod
    def load(cls, path: str | Path, lazy: bool = False) -> AdapterZoo:
        """Read a zoo folder; metadata comes from the manifest. `lazy` defers reading tensors to first use."""
        folder = Path(path)
        adapters = []
        for entry in _read_manifest(folder):
            metadata = {k: v for k, v in entry.items() if k not in ("name", "path")}
            adapter = LoraAdapter.load(folder / entry["path"], name=entry["name"], lazy=lazy)
            adapter.metadata = metadata
            adapters.append(adapter)
        return cls(adapters)


def check_name(name: object) -> str:
    """A zoo adapter's name doubles as its folder's: one plain path component."""
    plain = isinstance(name, str) and name.strip() and not name.startswith(".")
    if not plain or any(c in name for c in "/\\\0"):
        raise AdapterFormatError(f"adapter name {name!r} cannot name a zoo folder (one path component, no leading dot)")
    return name


def _read_manifest(folder: Path) -> list[dict]:
    """The manifest's adapter entries, each checked: an object with a name and a path inside the zoo folder."""
    path = folder / MANIFEST
    if not path.is_file():
        raise AdapterFileError(f"{folder}: {MANIFEST} is missing; is this a zoo folder?")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("adapters"), list):
        raise AdapterFormatError(f"{path}: expected an object with an 'adapters' list")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{path}: format_version {manifest.get('format_version')!r}; this engine reads "
                                 f"zoo manifests of version {FORMAT_VERSION}")
    root = folder.resolve()
    for i, entry in enumerate(manifest["adapters"]):
        where = f"{path}: adapters[{i}]"
        if not isinstance(entry, dict):
            raise AdapterFormatError(f"{where} must be an object, got {entry!r}")
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise AdapterFormatError(f"{where} needs a non-empty string 'name'")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise AdapterFormatError(f"{where} ({entry['name']!r}) needs a non-empty string 'path'")
        target = (folder / entry["path"]).resolve()
        if target == root or root not in target.parents:
            raise AdapterFormatError(f"{where} ({entry['name']!r}): path {entry['path']!r} lies outside the zoo folder")
        samples = entry.get("samples")
        if samples is not None and (not isinstance(samples, list) or not all(isinstance(x, str) for x in samples)):
            raise AdapterFormatError(f"{where} ({entry['name']!r}): 'samples' must be a list of strings")
    return manifest["adapters"]
