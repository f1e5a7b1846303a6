import numpy as np
import pytest

from lorahub_engine.errors import AdapterError
from retrieval import DEFAULT_NAME, TASK_PREFIX, Embedder, EmbedderMismatchError, RetrievalError


def test_encode_shape_dtype_and_unit_norm(embedder):
    vectors = embedder.encode(["translate this sentence to French", "what is 3 plus 4?"])
    assert vectors.shape == (2, embedder.dimension) == (2, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_vectors_equal_sentence_transformers_own_encode(embedder):
    """A separately loaded SentenceTransformer of the same folder, its own pooling and normalization: the reference
    (wrong pooling, a lost normalization or a truncated text would differ)."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(embedder.path, device="cpu", local_files_only=True)
    assert reference is not embedder._model
    texts = ["translate this sentence to French", "what is 3 plus 4?", "a b", "count the vowels " * 40]
    expected = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(embedder.encode(texts), expected, atol=1e-5, rtol=0)
    prefixed = Embedder(prefix=TASK_PREFIX).encode(texts[:2])
    expected = reference.encode([TASK_PREFIX + t for t in texts[:2]], normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(prefixed, expected, atol=1e-5, rtol=0)


def test_name_and_spec_of_the_bundled_model(embedder):
    assert embedder.name == DEFAULT_NAME
    assert embedder.spec.dimension == 384 and embedder.spec.prefix is None


def test_model_is_loaded_once_per_path(embedder):
    assert Embedder(prefix=TASK_PREFIX)._model is embedder._model


def test_prefix_is_prepended(embedder):
    prefixed = Embedder(prefix=TASK_PREFIX)
    texts = ["reverse the word apple", "count the vowels in banana"]
    np.testing.assert_allclose(prefixed.encode(texts), embedder.encode([TASK_PREFIX + t for t in texts]), atol=1e-6)
    assert not np.allclose(prefixed.encode(texts), embedder.encode(texts), atol=1e-3)


def test_similar_tasks_embed_closer(embedder):
    a, b, c = embedder.encode(["add 12 and 30", "what is 7 plus 5", "is this movie review positive"])
    assert a @ b > a @ c


def test_bad_inputs_raise_typed_errors(embedder, tmp_path):
    with pytest.raises(RetrievalError, match="list of strings"):
        embedder.encode("a single string")
    with pytest.raises(RetrievalError, match="does not exist"):
        Embedder(tmp_path / "nowhere")
    with pytest.raises(RetrievalError, match="cannot load"):
        Embedder(tmp_path)  # an empty folder is no sentence-transformers model
    assert issubclass(EmbedderMismatchError, RetrievalError) and issubclass(RetrievalError, AdapterError)


def test_spec_compatibility(embedder):
    embedder.spec.check_compatible(Embedder().spec)
    with pytest.raises(EmbedderMismatchError, match="prefix"):
        embedder.spec.check_compatible(Embedder(prefix=TASK_PREFIX).spec)


def test_an_index_of_the_bundled_model_resolves_to_this_installs_copy(tmp_path):
    """A shipped index records the bundled model's path in the install that built it; another install (whose path
    differs, or where that path holds something else) must use its own copy."""
    from retrieval.embedder import EmbedderSpec, resolve_embedder

    elsewhere = tmp_path / "model"  # an existing folder at the recorded path that is not this install's model
    elsewhere.mkdir()
    for path in (elsewhere, tmp_path / "absent"):
        embedder = resolve_embedder(EmbedderSpec(DEFAULT_NAME, str(path), None, 384))
        assert embedder.name == DEFAULT_NAME and embedder.path != str(path)
