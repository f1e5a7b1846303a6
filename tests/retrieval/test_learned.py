import numpy as np
import pytest

from retrieval import LearnedConfig, LearnedRetriever, RetrievalError, compare_with_centroids
from tests.retrieval.conftest import clustered


def toy(n_per_class, seed):
    """Three separable classes in 8-d: unit vectors around three random directions."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((3, 8))
    labels = np.repeat(np.arange(3), n_per_class)
    vectors = centres[labels] + 0.4 * rng.standard_normal((len(labels), 8))
    return vectors.astype(np.float32), [f"c{i}" for i in labels]


def test_learned_retriever_beats_chance_on_a_separable_set():
    train, train_labels = toy(20, seed=1)
    test, test_labels = toy(30, seed=2)
    retriever = LearnedRetriever().fit_embeddings(train, train_labels)
    hits = retriever.search_embeddings(test, k=2)
    accuracy = np.mean([h[0][0] == t for h, t in zip(hits, test_labels)])
    assert accuracy >= 0.9  # chance is 1/3
    assert all(h[0][1] >= h[1][1] for h in hits)
    probs = retriever.model_.predict_proba(test / np.linalg.norm(test, axis=1, keepdims=True))
    np.testing.assert_allclose([h[0][1] for h in hits], probs.max(1), rtol=1e-6)


def test_exclude_and_errors():
    train, labels = toy(10, seed=3)
    retriever = LearnedRetriever(LearnedConfig(C=1.0)).fit_embeddings(train, labels)
    hits = retriever.search_embeddings(train[:5], k=2, exclude=["c0"])
    assert all(name != "c0" for row in hits for name, _ in row) and all(len(row) == 2 for row in hits)
    with pytest.raises(RetrievalError, match="k=3"):
        retriever.search_embeddings(train[:1], k=3, exclude=["c0"])
    with pytest.raises(RetrievalError, match="'zz'"):
        retriever.search_embeddings(train[:1], k=1, exclude=["zz"])
    with pytest.raises(RetrievalError, match="not fitted"):
        LearnedRetriever().search_embeddings(train[:1], k=1)
    with pytest.raises(RetrievalError, match="at least two"):
        LearnedRetriever().fit_embeddings(train[:3], ["c0"] * 3)
    with pytest.raises(RetrievalError, match="C must be"):
        LearnedConfig(C=0)


def test_compare_with_centroids_on_text_tasks(embedder):
    train = {
        "add": ["what is 3 plus 4?", "add 12 and 30", "compute 7 + 8", "sum of 21 and 5", "9 plus 6 equals?"],
        "french": ["translate 'cat' to French", "say 'good morning' in French", "French for 'house'?",
                   "how do you say 'thank you' in French", "translate 'red' into French"],
        "sentiment": ["this film was wonderful", "I hated the ending", "the food was awful", "a delightful story",
                      "worst service ever"],
    }
    queries = {"add": ["add 40 and 2", "what is 8 plus 8?"], "french": ["translate 'bread' to French"],
               "sentiment": ["the acting was terrible", "what a lovely evening"]}
    result = compare_with_centroids(train, queries, embedder)
    assert result["queries"] == 5 and result["adapters"] == 3
    assert result["centroid_top1"] >= 0.8 and result["logreg_top1"] >= 0.8  # chance is 1/3
    with pytest.raises(RetrievalError, match="without training samples"):
        compare_with_centroids(train, {"german": ["translate to German"]}, embedder)
    vectors = clustered(4, 384, 2, seed=0)
    fitted = LearnedRetriever(embedder=embedder).fit(train)
    assert fitted.names_ == sorted(train) and fitted.search(["add 1 and 2"], k=1)[0][0][0] == "add"
    assert len(fitted.search_embeddings(vectors, k=3)) == 4
