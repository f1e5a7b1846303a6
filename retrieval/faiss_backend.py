"""The faiss indexes behind AdapterIndex. Every kind stores unit vectors under int64 ids, metric inner product.

flat: IndexIDMap2(IndexFlatIP), exact. ivf: IndexIVFFlat (k-means cells, ids native, supports remove).
hnsw: IndexIDMap2(IndexHNSWFlat); faiss cannot remove from an HNSW graph, so removal rebuilds it (see remove()).
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from retrieval.config import IndexConfig
from retrieval.errors import RetrievalError


def ivf_cells(n: int, config: IndexConfig) -> int:
    if config.nlist is None:
        return max(1, min(round(4 * math.sqrt(n)), n // 39))
    if config.nlist > n:
        raise RetrievalError(f"nlist={config.nlist} needs at least that many adapters to train on, got {n}")
    return config.nlist


def new_index(kind: str, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig) -> faiss.Index:
    """A trained, filled index of `kind` over vectors [n, d] with ids [n]."""
    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    elif kind == "hnsw":
        graph = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = config.ef_construction
        index = faiss.IndexIDMap2(graph)
    elif kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, ivf_cells(n, config), faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    else:
        raise RetrievalError(f"unknown index kind {kind!r}")
    set_search_params(index, kind, config)
    index.add_with_ids(vectors, ids)
    return index


def set_search_params(index: faiss.Index, kind: str, config: IndexConfig) -> None:
    if kind == "ivf":
        index.nprobe = config.nprobe
    elif kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = config.ef_search


def remove(index: faiss.Index, kind: str, ids: np.ndarray, config: IndexConfig) -> faiss.Index:
    """The index without `ids`: in place for flat and ivf; hnsw is rebuilt from its stored vectors (O(n log n))."""
    if kind != "hnsw":
        index.remove_ids(np.asarray(ids, dtype=np.int64))
        return index
    all_ids = faiss.vector_to_array(index.id_map)
    keep = all_ids[~np.isin(all_ids, ids)]
    vectors = faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal)  # [n, d], in insertion order
    vectors = vectors[~np.isin(all_ids, ids)]
    return new_index(kind, np.ascontiguousarray(vectors), keep, config)


def stored_ids(index: faiss.Index, kind: str) -> np.ndarray:
    """The ids held by an index of our kinds (IDMap2's table, or every IVF cell's list)."""
    if kind == "ivf":
        lists = index.invlists
        return np.concatenate([np.zeros(0, dtype=np.int64)] + [
            faiss.rev_swig_ptr(lists.get_ids(c), lists.list_size(c)).copy() for c in range(index.nlist)])
    return faiss.vector_to_array(index.id_map)


def kind_of(index: faiss.Index) -> str:
    """The kind of an index read from disk, or RetrievalError for any other faiss index type."""
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    if isinstance(index, faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexFlatIP):
            return "flat"
        if isinstance(inner, faiss.IndexHNSWFlat):
            return "hnsw"
    raise RetrievalError(f"unexpected faiss index type {type(index).__name__} in the index file")
