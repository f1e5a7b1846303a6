"""IndexConfig: how an AdapterIndex is built and searched. Typed, validated on entry, serialized as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from retrieval.errors import RetrievalError

KINDS = ("auto", "flat", "ivf", "hnsw")


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"  # "flat" = exact inner product; "ivf"/"hnsw" approximate; "auto" picks by size
    threshold: int = 20_000  # "auto": exact up to this many adapters (a flat search of 20k x 384 is ~1 ms)
    approximate: str = "hnsw"  # "auto" above the threshold; HNSW rebuilds on remove/update, IVF removes in place
    nlist: int | None = None  # IVF cells; None = 4 sqrt(n), at most n / 39 (faiss wants >= 39 points per cell)
    nprobe: int = 128  # IVF cells visited per query: higher = better recall, slower (bench_retrieval)
    hnsw_m: int = 32  # HNSW links per node
    ef_construction: int = 80  # HNSW build-time beam width
    ef_search: int = 128  # HNSW query beam: recall@10 0.99 at 100k in < 1 ms (bench_retrieval)
    embedder: str | None = None  # sentence-transformers model folder; None = bundled all-MiniLM-L6-v2
    prefix: str | None = None  # instruction prepended to every text, e.g. retrieval.TASK_PREFIX

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RetrievalError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        if self.approximate not in ("ivf", "hnsw"):
            raise RetrievalError(f"approximate must be 'ivf' or 'hnsw', got {self.approximate!r}")
        for name in ("threshold", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RetrievalError(f"{name} must be a positive int, got {value!r}")
        if self.nlist is not None and (not isinstance(self.nlist, int) or isinstance(self.nlist, bool)
                                       or self.nlist < 1):
            raise RetrievalError(f"nlist must be a positive int or None, got {self.nlist!r}")
        for name in ("embedder", "prefix"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise RetrievalError(f"{name} must be a string or None, got {getattr(self, name)!r}")

    def resolve_kind(self, n: int) -> str:
        """The concrete kind ("flat", "ivf" or "hnsw") for an index of `n` adapters."""
        if self.kind != "auto":
            return self.kind
        return "flat" if n <= self.threshold else self.approximate

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> IndexConfig:
        if not isinstance(data, dict):
            raise RetrievalError(f"an index config must be a JSON object, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RetrievalError(f"unknown index config keys: {sorted(unknown)}")
        return cls(**data)
