"""AdapterZoo: named adapters plus one manifest (description, family, sample inputs per adapter)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from lorahub_engine._io import OutputKind, atomic_dir
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
                adapter.save(tmp / adapter.name)
                entries.append({"name": adapter.name, "path": adapter.name, **adapter.metadata})
            manifest = {"format_version": FORMAT_VERSION, "adapters": entries}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    @classmethod
    def load(cls, path: str | Path, lazy: bool = False) -> AdapterZoo:
        """Read a zoo folder; metadata comes from the manifest. `lazy` defers reading tensors to first use."""
        folder = Path(path)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise AdapterFileError(f"{folder}: {MANIFEST} is missing; is this a zoo folder?")
        try:
            manifest = json.loads(manifest_path.read_text())
            entries = manifest["adapters"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise AdapterFileError(f"{manifest_path}: not a valid zoo manifest ({e})") from None
        adapters = []
        for entry in entries:
            metadata = {k: v for k, v in entry.items() if k not in ("name", "path")}
            adapter = LoraAdapter.load(folder / entry["path"], name=entry["name"], lazy=lazy)
            adapter.metadata = metadata
            adapters.append(adapter)
        return cls(adapters)
