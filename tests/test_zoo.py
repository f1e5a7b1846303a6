import pytest
import torch

import lorahub_engine as le
from tests.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def adapters():
    base = tiny_llama()
    out = []
    for i, name in enumerate(["plural", "opposite", "count"]):
        a = le.init_adapter(base, name, ["q_proj", "v_proj"], r=2, seed=i)
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
    assert zoo["count"].metadata == adapters[2].metadata
    path = "model.layers.1.self_attn.v_proj"
    torch.testing.assert_close(zoo["plural"].delta_weight(path), adapters[0].delta_weight(path))


def test_zoo_load_errors(tmp_path):
    with pytest.raises(le.AdapterFileError, match="manifest.json is missing"):
        le.AdapterZoo.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(le.AdapterFileError, match="not valid JSON"):
        le.AdapterZoo.load(tmp_path)
    (tmp_path / "manifest.json").write_text("[]")  # more in tests/test_inputs.py
    with pytest.raises(le.AdapterFormatError, match="expected an object with an 'adapters' list"):
        le.AdapterZoo.load(tmp_path)
