import pytest
import torch

import lorahub_engine as le
from tests.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def adapters():
    """Three adapters with random A and B (init_adapter's B is zero), different ranks, scales and targets."""
    base = tiny_llama()
    out = []
    specs = [dict(r=2, alpha=3.0), dict(r=4, alpha=8.0, use_rslora=True), dict(r=3, alpha=1.5)]
    targets = [["q_proj", "v_proj"], ["q_proj", "v_proj", "down_proj"], ["v_proj", "up_proj"]]
    for i, (name, spec, target) in enumerate(zip(["plural", "opposite", "count"], specs, targets)):
        a = le.init_adapter(base, name, target, seed=i, **spec)
        g = torch.Generator().manual_seed(100 + i)
        for m in a.modules.values():
            m.A.normal_(generator=g)
            m.B.normal_(generator=g)
        a.metadata = {"description": f"{name} task", "family": "words", "samples": [f"{name} {j}" for j in range(3)]}
        out.append(a)
    return out


def test_zoo_is_an_ordered_named_collection(adapters):
    zoo = le.AdapterZoo(adapters)
    assert len(zoo) == 3 and zoo.names == ["plural", "opposite", "count"]
    assert zoo["opposite"] is adapters[1] and "count" in zoo
    assert [a.name for a in zoo] == zoo.names
    with pytest.raises(le.AdapterError, match="no adapter named"):
        zoo["missing"]
    with pytest.raises(le.AdapterFormatError, match="unique"):
        le.AdapterZoo([adapters[0], adapters[0]])


@pytest.mark.parametrize("lazy", [False, True])
def test_zoo_round_trips(adapters, tmp_path, lazy):
    le.AdapterZoo(adapters).save(tmp_path / "zoo")
    zoo = le.AdapterZoo.load(tmp_path / "zoo", lazy=lazy)
    assert zoo.names == ["plural", "opposite", "count"]
    for original in adapters:
        loaded = zoo[original.name]
        assert loaded.metadata == original.metadata
        assert sorted(loaded.modules) == sorted(original.modules)
        for path, module in original.modules.items():
            got = loaded.modules[path]
            assert torch.equal(got.A, module.A) and torch.equal(got.B, module.B), path
            assert got.scale == pytest.approx(module.scale, rel=1e-12, abs=0), path


def test_zoo_load_errors(tmp_path):
    with pytest.raises(le.AdapterFileError, match="manifest.json is missing"):
        le.AdapterZoo.load(tmp_path)
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(le.AdapterFileError, match="not a valid zoo manifest"):
        le.AdapterZoo.load(tmp_path)
