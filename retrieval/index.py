"""AdapterIndex: adapters embedded as the normalized mean of their sample inputs, searched by inner product.

    idx = AdapterIndex.build(zoo)                 # or a mapping name -> sample inputs
    idx.search(["input text", ...], k=3)          # per text: [(adapter name, cosine score), ...] best first
    idx.save(folder); AdapterIndex.load(folder)   # index.faiss + manifest.json, written atomically

Configuration (IndexConfig) is separate from state: the faiss index, the name <-> id table and the embedder spec.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np

from lorahub_engine._io import OutputKind, atomic_dir, read_json
from retrieval import faiss_backend
from retrieval.config import IndexConfig
from retrieval.embedder import DEFAULT_NAME, Embedder, EmbedderSpec, resolve_embedder
from retrieval.errors import EmbedderMismatchError, RetrievalError
from retrieval.samples import adapter_samples, centroids, embed_samples, normalize

INDEX_FILE = "index.faiss"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
Hits = list[list[tuple[str, float]]]


def _is_index_output(path: Path) -> bool:
    """A folder of just index.faiss and an index manifest.json."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return ({p.name for p in path.iterdir()} == {INDEX_FILE, MANIFEST} and isinstance(manifest, dict)
            and {"format_version", "dimension", "embedder"} <= set(manifest))


INDEX_FOLDER = OutputKind("an index folder", _is_index_output)


class AdapterIndex:
    """Nearest-centroid retrieval of adapters. Build with `build` or `from_embeddings`, never with __init__."""

    def __init__(self, config: IndexConfig, kind: str, index: faiss.Index, names: dict[int, str],
                 spec: EmbedderSpec | None, embedder: Embedder | None = None):
        self.config = config
        self.kind = kind
        self._index = index
        self._names = names  # faiss id -> adapter name
        self._ids = {name: i for i, name in names.items()}
        self._spec = spec  # None: built from raw embeddings, texts cannot be searched until an embedder is given
        self._embedder = embedder

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def build(cls, source, embedder: Embedder | None = None, config: IndexConfig | None = None,
              progress: bool | None = None) -> AdapterIndex:
        """Index a zoo (or adapters, or a mapping name -> sample inputs) by the mean embedding of each one's samples."""
        config = config or IndexConfig()
        config, embedder = _embedder_for(config, embedder)
        samples = adapter_samples(source)
        vectors, owner = embed_samples(embedder, samples, progress)
        return cls.from_embeddings(list(samples), centroids(vectors, owner, len(samples)), config, embedder)

    @classmethod
    def from_embeddings(cls, names: Sequence[str], vectors: np.ndarray, config: IndexConfig | None = None,
                        embedder: Embedder | EmbedderSpec | None = None) -> AdapterIndex:
        """Index given adapter vectors [n, d] (normalized here). Without an embedder only embeddings can be searched."""
        config = config or IndexConfig()
        names = list(names)
        vectors = _vectors(vectors, len(names))
        _check_new_names(names, set())
        spec = embedder.spec if isinstance(embedder, Embedder) else embedder
        if spec is not None and spec.dimension != vectors.shape[1]:
            raise EmbedderMismatchError(f"vectors have dimension {vectors.shape[1]}, the embedder {spec.dimension}")
        kind = config.resolve_kind(len(names))
        ids = np.arange(len(names), dtype=np.int64)
        index = faiss_backend.new_index(kind, vectors, ids, config)
        loaded = embedder if isinstance(embedder, Embedder) else None
        return cls(config, kind, index, dict(enumerate(names)), spec, loaded)

    # ---- queries ------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Adapter names in insertion order (ids ascending)."""
        return [self._names[i] for i in sorted(self._names)]

    @property
    def dimension(self) -> int:
        return self._index.d

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    @property
    def embedder(self) -> Embedder:
        """The embedder for text queries; loaded on first use from the recorded spec."""
        if self._embedder is None:
            if self._spec is None:
                raise RetrievalError("this index was built from raw embeddings; load it with embedder= to search texts")
            self._embedder = resolve_embedder(self._spec)
        return self._embedder

    def embed(self, texts: Sequence[str], progress: bool | None = None) -> np.ndarray:
        return self.embedder.encode(texts, progress=progress)

    def search(self, texts: Sequence[str], k: int = 3, exclude: Collection[str] = (),
               progress: bool | None = None) -> Hits:
        """Per text, the k best adapters (name, score), best first; `exclude` names are never returned."""
        return self.search_embeddings(self.embed(texts, progress), k, exclude)

    def search_embeddings(self, queries: np.ndarray, k: int = 3, exclude: Collection[str] = ()) -> Hits:
        """As `search`, for query vectors [m, d] (normalized here). Approximate kinds may return fewer than k."""
        queries = _vectors(queries, None, self.dimension)
        excluded = {self._id(name) for name in exclude}
        if not isinstance(k, int) or k < 1:
            raise RetrievalError(f"k must be a positive int, got {k!r}")
        if k > len(self) - len(excluded):
            raise RetrievalError(f"k={k} but the index holds {len(self)} adapters ({len(excluded)} excluded)")
        if len(queries) == 0:
            return []
        scores, ids = self._index.search(queries, k + len(excluded))  # [m, k + e] each
        return [
            [(self._names[int(i)], float(s)) for s, i in zip(row_s, row_i) if i >= 0 and int(i) not in excluded][:k]
            for row_s, row_i in zip(scores, ids)
        ]

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the speed/recall trade-off of an approximate index without rebuilding it (kept on save)."""
        changes = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
        self.config = replace(self.config, **changes)
        faiss_backend.set_search_params(self._index, self.kind, self.config)

    # ---- changes without a rebuild ------------------------------------------------------------------------
    def add(self, source, progress: bool | None = None) -> None:
        """Add adapters (zoo, adapters or mapping name -> samples); names must be new."""
        names, vectors = self._embed_source(source, progress)
        self.add_embeddings(names, vectors)

    def add_embeddings(self, names: Sequence[str], vectors: np.ndarray) -> None:
        names = list(names)
        vectors = _vectors(vectors, len(names), self.dimension)
        _check_new_names(names, self._ids)
        start = max(self._names, default=-1) + 1
        ids = np.arange(start, start + len(names), dtype=np.int64)
        self._index.add_with_ids(vectors, ids)
        self._register(ids, names)

    def remove(self, names: Sequence[str]) -> None:
        """Drop adapters by name. Flat and IVF remove in place; HNSW rebuilds its graph (faiss cannot remove)."""
        ids = np.array([self._id(name) for name in names], dtype=np.int64)
        if len(ids) != len(set(ids.tolist())):
            raise RetrievalError("remove: a name is listed twice")
        self._index = faiss_backend.remove(self._index, self.kind, ids, self.config)
        for i in ids.tolist():
            del self._ids[self._names.pop(i)]

    def update(self, source, progress: bool | None = None) -> None:
        """Re-embed existing adapters (their samples changed); ids are kept."""
        names, vectors = self._embed_source(source, progress)
        self.update_embeddings(names, vectors)

    def update_embeddings(self, names: Sequence[str], vectors: np.ndarray) -> None:
        names = list(names)
        vectors = _vectors(vectors, len(names), self.dimension)
        ids = np.array([self._id(name) for name in names], dtype=np.int64)
        if len(ids) != len(set(ids.tolist())):
            raise RetrievalError("update: a name is listed twice")
        self._index = faiss_backend.remove(self._index, self.kind, ids, self.config)
        self._index.add_with_ids(vectors, ids)

    # ---- persistence --------------------------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write folder `path` (index.faiss + manifest.json) atomically; never pickles. It replaces an index folder
        this engine wrote; anything else at `path` only with `overwrite` (see lorahub_engine._io.atomic_dir)."""
        manifest = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_json(),
            "kind": self.kind,
            "metric": "inner_product",
            "normalized": True,
            "dimension": self.dimension,
            "embedder": None if self._spec is None else self._spec.to_json(),
            "adapters": [[i, self._names[i]] for i in sorted(self._names)],
        }
        with atomic_dir(path, kind=INDEX_FOLDER, overwrite=overwrite) as tmp:
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | None = None) -> AdapterIndex:
        """Read a saved index. A given `embedder` must match the recorded name, prefix and dimension."""
        folder = Path(path)
        manifest = _read_manifest(folder)
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as e:
            raise RetrievalError(f"{folder / INDEX_FILE}: cannot read the faiss index ({e})") from None
        config = IndexConfig.from_json(manifest["config"])
        kind = faiss_backend.kind_of(index)
        names = {int(i): str(name) for i, name in manifest["adapters"]}
        stored = faiss_backend.stored_ids(index, kind)
        if (kind != manifest["kind"] or index.d != manifest["dimension"] or index.ntotal != len(names)
                or set(stored.tolist()) != set(names)):
            raise RetrievalError(f"{folder}: index file and manifest disagree (kind, dimension or adapter ids)")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise RetrievalError(f"{folder}: the faiss index does not use inner product")
        faiss_backend.set_search_params(index, kind, config)
        spec = None if manifest["embedder"] is None else EmbedderSpec.from_json(manifest["embedder"])
        if embedder is not None:
            if spec is not None:
                spec.check_compatible(embedder.spec)
            elif embedder.dimension != index.d:
                raise EmbedderMismatchError(f"embedder dimension {embedder.dimension} != index dimension {index.d}")
            spec = embedder.spec
        return cls(config, kind, index, names, spec, embedder)

    # ---- helpers ------------------------------------------------------------------------------------------
    def _id(self, name: str) -> int:
        try:
            return self._ids[name]
        except KeyError:
            raise RetrievalError(f"no adapter named {name!r} in the index") from None

    def _register(self, ids: np.ndarray, names: list[str]) -> None:
        for i, name in zip(ids.tolist(), names):
            self._names[i] = name
            self._ids[name] = i

    def _embed_source(self, source, progress) -> tuple[list[str], np.ndarray]:
        samples = adapter_samples(source)
        vectors, owner = embed_samples(self.embedder, samples, progress)
        return list(samples), centroids(vectors, owner, len(samples))


def _embedder_for(config: IndexConfig, embedder: Embedder | None) -> tuple[IndexConfig, Embedder]:
    """The embedder `config` names, or the given one if it agrees; the config then records the embedder used."""
    if embedder is None:
        embedder = Embedder(config.embedder, prefix=config.prefix)
    if config.embedder is not None and str(Path(config.embedder).resolve()) != embedder.path:
        raise EmbedderMismatchError(f"config names embedder {config.embedder}, but {embedder.path} was given")
    if config.prefix is not None and config.prefix != embedder.prefix:
        raise EmbedderMismatchError(f"config prefix {config.prefix!r} differs from the embedder's {embedder.prefix!r}")
    path = None if embedder.name == DEFAULT_NAME else embedder.path
    return replace(config, embedder=path, prefix=embedder.prefix), embedder


def _vectors(vectors, n: int | None, dimension: int | None = None) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or (n is not None and len(vectors) != n):
        raise RetrievalError(f"expected vectors of shape [{n if n is not None else 'n'}, d], got {vectors.shape}")
    if dimension is not None and vectors.shape[1] != dimension:
        raise EmbedderMismatchError(f"vectors have dimension {vectors.shape[1]}, the index {dimension}")
    return normalize(vectors) if len(vectors) else np.zeros((0, vectors.shape[1]), dtype=np.float32)


def _check_new_names(names: list[str], existing) -> None:
    if not names:
        raise RetrievalError("no adapters given")
    if len(set(names)) != len(names):
        raise RetrievalError("adapter names must be unique")
    clash = [name for name in names if name in existing]
    if clash:
        raise RetrievalError(f"adapters already in the index: {clash[:5]}; use update() to re-embed them")


def _read_manifest(folder: Path) -> dict:
    """The manifest, each field checked (a typed error names the first bad one)."""
    for name in (MANIFEST, INDEX_FILE):
        if not (folder / name).is_file():
            raise RetrievalError(f"{folder}: {name} is missing; is this an index folder (AdapterIndex.save)?")
    path = folder / MANIFEST
    manifest = read_json(path, RetrievalError)
    if not isinstance(manifest, dict):
        raise RetrievalError(f"{path}: expected a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RetrievalError(f"{path}: format_version {manifest.get('format_version')!r}; this engine reads index "
                             f"manifests of version {FORMAT_VERSION}")
    missing = [key for key in ("config", "kind", "dimension", "embedder", "adapters") if key not in manifest]
    if missing:
        raise RetrievalError(f"{path}: missing field {missing[0]!r}")
    if not isinstance(manifest["config"], dict):
        raise RetrievalError(f"{path}: 'config' must be an object")
    dimension = manifest["dimension"]
    if not isinstance(dimension, int) or isinstance(dimension, bool) or dimension < 1:
        raise RetrievalError(f"{path}: 'dimension' must be a positive integer, got {dimension!r}")
    _check_embedder(path, manifest["embedder"])
    _check_entries(path, manifest["adapters"])
    return manifest


def _check_embedder(path: Path, spec) -> None:
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise RetrievalError(f"{path}: 'embedder' must be an object or null")
    for key, types in (("name", str), ("path", str), ("prefix", (str, type(None))), ("dimension", int)):
        if key not in spec:
            raise RetrievalError(f"{path}: embedder.{key} is missing")
        if not isinstance(spec[key], types) or isinstance(spec[key], bool):
            raise RetrievalError(f"{path}: embedder.{key} has the wrong type ({spec[key]!r})")


def _check_entries(path: Path, entries) -> None:
    """adapters: a list of [id, name] pairs, ids non-negative integers, ids and names unique."""
    if not isinstance(entries, list):
        raise RetrievalError(f"{path}: 'adapters' must be a list of [id, name] pairs")
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                and not isinstance(entry[0], bool) and entry[0] >= 0 and isinstance(entry[1], str) and entry[1]):
            raise RetrievalError(f"{path}: adapters[{i}] must be an [id, name] pair, got {entry!r}")
    for position, what in ((0, "ids"), (1, "names")):
        values = [entry[position] for entry in entries]
        if len(set(values)) != len(values):
            raise RetrievalError(f"{path}: adapter {what} must be unique")
