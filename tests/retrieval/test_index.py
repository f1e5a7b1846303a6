import json

import numpy as np
import pytest
import torch

from lorahub_engine import AdapterZoo, LoraAdapter, LoraModule
from retrieval import TASK_PREFIX, AdapterIndex, Embedder, EmbedderMismatchError, IndexConfig, RetrievalError
from tests.retrieval.conftest import clustered, exact_top_k

KINDS = ["flat", "ivf", "hnsw"]
SAMPLES = {
    "add": ["what is 3 plus 4?", "add 12 and 30", "compute 7 + 8", "sum of 21 and 5"],
    "french": ["translate 'cat' to French", "say 'good morning' in French", "French for 'house'?"],
    "sentiment": ["this film was wonderful", "I hated the ending", "the food was awful", "a delightful story"],
}


def names_of(n):
    return [f"a{i}" for i in range(n)]


def test_exact_search_equals_numpy_reference():
    vectors, queries = clustered(500, 24, 10, seed=0), clustered(40, 24, 10, seed=1)
    index = AdapterIndex.from_embeddings(names_of(500), vectors, IndexConfig(kind="flat"))
    hits = index.search_embeddings(queries, k=5)
    order, scores = exact_top_k(vectors, queries, 5)
    assert [[name for name, _ in row] for row in hits] == [[f"a{i}" for i in row] for row in order]
    np.testing.assert_allclose([[s for _, s in row] for row in hits], scores, atol=1e-5)


def test_build_uses_normalized_mean_of_sample_embeddings(embedder):
    index = AdapterIndex.build(SAMPLES, embedder)
    expected = np.stack([embedder.encode(texts).mean(0) for texts in SAMPLES.values()])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    queries = ["what is 10 plus 2?", "translate 'dog' to French", "an awful, boring film"]
    order, scores = exact_top_k(expected, embedder.encode(queries), 3)
    hits = index.search(queries, k=3)
    assert [[name for name, _ in row] for row in hits] == [[list(SAMPLES)[i] for i in row] for row in order]
    np.testing.assert_allclose([[s for _, s in row] for row in hits], scores, atol=1e-5)
    assert [row[0][0] for row in hits] == ["add", "french", "sentiment"]


def test_build_from_a_zoo_reads_metadata_samples(embedder):
    module = {"proj": LoraModule(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)}
    zoo = AdapterZoo(LoraAdapter(name, module, metadata={"samples": texts}) for name, texts in SAMPLES.items())
    index = AdapterIndex.build(zoo, embedder)
    assert index.names == list(SAMPLES) and index.kind == "flat"
    reference = AdapterIndex.build(SAMPLES, embedder)
    assert index.search(["add 1 and 1"], k=3) == reference.search(["add 1 and 1"], k=3)
    with pytest.raises(RetrievalError, match="'bare'.*samples"):
        AdapterIndex.build([LoraAdapter("bare", module)], embedder)


def test_prefix_from_config_reaches_the_embedder(embedder):
    index = AdapterIndex.build(SAMPLES, config=IndexConfig(prefix=TASK_PREFIX))
    reference = AdapterIndex.build(SAMPLES, Embedder(prefix=TASK_PREFIX))
    assert index.embedder.prefix == TASK_PREFIX and index.config.prefix == TASK_PREFIX
    assert index.search(["add 5 and 9"], k=3) == reference.search(["add 5 and 9"], k=3)
    with pytest.raises(EmbedderMismatchError, match="prefix"):
        AdapterIndex.build(SAMPLES, embedder, IndexConfig(prefix=TASK_PREFIX))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10(kind):
    vectors, queries = clustered(4000, 32, 40, seed=2), clustered(200, 32, 40, seed=3)
    config = IndexConfig(kind=kind, nprobe=8, ef_search=200)
    index = AdapterIndex.from_embeddings(names_of(4000), vectors, config)
    order, _ = exact_top_k(vectors, queries, 10)
    hits = index.search_embeddings(queries, k=10)
    assert recall_at_10(hits, order) >= 0.9
    index.set_search_params(nprobe=1, ef_search=10)  # fewer cells / a narrower beam: recall must drop
    assert recall_at_10(index.search_embeddings(queries, k=10), order) < 0.9
    assert index.config.nprobe == 1 and index.config.ef_search == 10


def recall_at_10(hits, order):
    return np.mean([len({n for n, _ in h} & {f"a{i}" for i in row}) / 10 for h, row in zip(hits, order)])


def test_auto_kind_switches_above_threshold():
    vectors = clustered(400, 16, 8, seed=4)
    assert AdapterIndex.from_embeddings(names_of(400), vectors).kind == "flat"
    small = IndexConfig(threshold=100, approximate="ivf")
    assert AdapterIndex.from_embeddings(names_of(400), vectors, small).kind == "ivf"
    assert AdapterIndex.from_embeddings(names_of(400), vectors, IndexConfig(threshold=100)).kind == "hnsw"


@pytest.mark.parametrize("kind", KINDS)
def test_add_remove_update_match_a_fresh_build(kind):
    vectors = clustered(300, 16, 6, seed=5)
    config = IndexConfig(kind=kind, nlist=4, nprobe=4)  # nprobe = nlist: IVF is exact here
    index = AdapterIndex.from_embeddings(names_of(200), vectors[:200], config)
    index.add_embeddings(names_of(300)[200:], vectors[200:])
    index.remove(["a3", "a250"])
    index.update_embeddings(["a7"], vectors[8:9])
    assert len(index) == 298 and "a3" not in index and "a250" not in index
    kept = [i for i in range(300) if i not in (3, 250)]
    expected = vectors.copy()
    expected[7] = vectors[8]
    fresh = AdapterIndex.from_embeddings([f"a{i}" for i in kept], expected[kept], IndexConfig(kind="flat"))
    queries = clustered(30, 16, 6, seed=6)
    got, want = index.search_embeddings(queries, k=5), fresh.search_embeddings(queries, k=5)
    assert [[n for n, _ in row] for row in got] == [[n for n, _ in row] for row in want]
    assert {n for n, _ in index.search_embeddings(vectors[8:9], k=2)[0]} == {"a7", "a8"}


def test_exclude_and_argument_errors():
    vectors = clustered(20, 8, 2, seed=7)
    index = AdapterIndex.from_embeddings(names_of(20), vectors, IndexConfig(kind="flat"))
    assert index.search_embeddings(vectors[:1], k=1)[0][0][0] == "a0"
    hits = index.search_embeddings(vectors[:1], k=19, exclude=["a0"])[0]
    assert len(hits) == 19 and "a0" not in {n for n, _ in hits}
    with pytest.raises(RetrievalError, match="k=20"):
        index.search_embeddings(vectors[:1], k=20, exclude=["a0"])
    with pytest.raises(RetrievalError, match="positive int"):
        index.search_embeddings(vectors[:1], k=0)
    with pytest.raises(RetrievalError, match="'zz'"):
        index.search_embeddings(vectors[:1], k=1, exclude=["zz"])
    with pytest.raises(EmbedderMismatchError, match="dimension"):
        index.search_embeddings(np.ones((1, 9), np.float32), k=1)
    with pytest.raises(RetrievalError, match="already in the index"):
        index.add_embeddings(["a1"], vectors[:1])
    with pytest.raises(RetrievalError, match="no adapter named 'nope'"):
        index.remove(["nope"])
    with pytest.raises(RetrievalError, match="raw embeddings"):
        index.search(["some text"], k=1)
    with pytest.raises(RetrievalError, match="nlist"):
        AdapterIndex.from_embeddings(names_of(20), vectors, IndexConfig(kind="ivf", nlist=50))
    with pytest.raises(RetrievalError, match="kind"):
        IndexConfig(kind="lsh")
    assert index.search_embeddings(np.zeros((0, 8), np.float32), k=1) == []


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    vectors, queries = clustered(500, 16, 8, seed=8), clustered(20, 16, 8, seed=9)
    index = AdapterIndex.from_embeddings(names_of(500), vectors, IndexConfig(kind=kind, nprobe=3, ef_search=40))
    index.remove(["a10"])
    index.save(tmp_path / "idx")
    loaded = AdapterIndex.load(tmp_path / "idx")
    assert loaded.kind == kind and loaded.config == index.config and loaded.names == index.names
    assert loaded.search_embeddings(queries, k=4) == index.search_embeddings(queries, k=4)
    loaded.add_embeddings(["new"], queries[:1])
    assert loaded.search_embeddings(queries[:1], k=1)[0][0][0] == "new"
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["metric"] == "inner_product" and manifest["normalized"] and manifest["dimension"] == 16
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.faiss", "manifest.json"]


def test_saved_text_index_reloads_its_embedder(embedder, tmp_path):
    index = AdapterIndex.build(SAMPLES, embedder)
    index.save(tmp_path / "idx")
    assert AdapterIndex.load(tmp_path / "idx").search(["add 2 and 2"], k=2) == index.search(["add 2 and 2"], k=2)
    with pytest.raises(EmbedderMismatchError, match="prefix"):
        AdapterIndex.load(tmp_path / "idx", embedder=Embedder(prefix=TASK_PREFIX))


def test_load_errors(embedder, tmp_path):
    with pytest.raises(RetrievalError, match="manifest.json is missing"):
        AdapterIndex.load(tmp_path / "none")
    raw = AdapterIndex.from_embeddings(names_of(10), clustered(10, 16, 2, seed=10), IndexConfig(kind="flat"))
    raw.save(tmp_path / "raw")
    with pytest.raises(EmbedderMismatchError, match="dimension 384"):
        AdapterIndex.load(tmp_path / "raw", embedder=embedder)
    (tmp_path / "raw" / "index.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(RetrievalError, match="cannot read"):
        AdapterIndex.load(tmp_path / "raw")
    raw.save(tmp_path / "raw")  # saving over an existing folder replaces it whole
    assert AdapterIndex.load(tmp_path / "raw").names == names_of(10)
    (tmp_path / "raw" / "manifest.json").write_text("{")
    with pytest.raises(RetrievalError, match="manifest.json: not valid JSON"):
        AdapterIndex.load(tmp_path / "raw")
    (tmp_path / "raw" / "index.faiss").unlink()
    with pytest.raises(RetrievalError, match="index.faiss is missing"):
        AdapterIndex.load(tmp_path / "raw")
