import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

import lorahub_engine as le
from tests.tiny_models import make_peft_adapter, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def patterned(llama, tmp_path_factory):
    """A PEFT adapter with rsLoRA, a rank pattern and an alpha pattern."""
    folder = tmp_path_factory.mktemp("patterned") / "a"
    return make_peft_adapter(llama, folder, 0, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                             use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})


def test_delta_weights_equal_peft(llama, patterned):
    adapter = le.LoraAdapter.load(patterned)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(llama), patterned)
    assert adapter.name == "a" and len(adapter.modules) == 6
    assert adapter.modules["model.layers.0.self_attn.v_proj"].rank == 2
    assert adapter.modules["model.layers.0.mlp.down_proj"].scale == pytest.approx(3 / 2)  # alpha / sqrt(r)
    for path in adapter.modules:
        ref = peft_model.base_model.model.get_submodule(path).get_delta_weight("default")
        torch.testing.assert_close(adapter.delta_weight(path), ref, atol=1e-6, rtol=0)


def test_save_round_trips_through_peft(llama, patterned, tmp_path):
    adapter = le.LoraAdapter.load(patterned)
    adapter.metadata = {"description": "d", "family": "f", "samples": ["x", "y"]}
    adapter.save(tmp_path / "out")
    again = le.LoraAdapter.load(tmp_path / "out")
    assert again.metadata == adapter.metadata
    x = torch.randint(0, 64, (2, 7))
    ref = PeftModel.from_pretrained(copy.deepcopy(llama), patterned)(x).logits
    got = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "out")(x).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_conv1d_adapter_keeps_fan_in_fan_out(tmp_path):
    base = tiny_gpt2()
    make_peft_adapter(base, tmp_path / "g", 0, ["c_attn"], fan_in_fan_out=True)
    adapter = le.LoraAdapter.load(tmp_path / "g")
    assert adapter.fan_in_fan_out
    assert adapter.delta_weight("transformer.h.0.attn.c_attn").shape == (96, 32)  # nn.Linear orientation
    adapter.save(tmp_path / "g2")
    assert json.loads((tmp_path / "g2" / "adapter_config.json").read_text())["fan_in_fan_out"]


def test_lazy_load_reads_the_same_tensors(patterned):
    eager, lazy = le.LoraAdapter.load(patterned), le.LoraAdapter.load(patterned, lazy=True)
    assert list(eager.modules) == list(lazy.modules)
    for path in eager.modules:
        torch.testing.assert_close(lazy.delta_weight(path), eager.delta_weight(path))



def test_to_casts_factors_and_keeps_everything_else(patterned):
    adapter = le.LoraAdapter.load(patterned)
    half = adapter.to(torch.float16)
    assert half.name == adapter.name and half.metadata == adapter.metadata and list(half.modules) == list(adapter.modules)
    for path, m in adapter.modules.items():
        assert half.modules[path].A.dtype == half.modules[path].B.dtype == torch.float16
        assert half.modules[path].scale == m.scale
        torch.testing.assert_close(half.modules[path].B, m.B.half(), rtol=0, atol=0)

def copy_adapter(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def rewrite_weights(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = dict(le.LoraAdapter.load(folder).modules)
    flat = {}
    for m, lora in tensors.items():
        flat[f"base_model.model.{m}.lora_A.weight"] = lora.A
        flat[f"base_model.model.{m}.lora_B.weight"] = lora.B
    edit(flat)
    save_file(flat, path)


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (lambda f: (f / "adapter_config.json").unlink(), le.AdapterFileError, "adapter_config.json is missing"),
        (lambda f: (f / "adapter_config.json").write_text("{oops"), le.AdapterFileError, "not valid JSON"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), le.AdapterFileError, "safetensors is missing"),
        (lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"), le.AdapterFileError, "never unpickle"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:300]),
         le.AdapterFileError, "unreadable safetensors"),
        (lambda f: edit_config(f, use_dora=True), le.UnsupportedFeatureError, "DoRA"),
        (lambda f: edit_config(f, lora_bias=True), le.UnsupportedFeatureError, "lora_bias"),
        (lambda f: edit_config(f, modules_to_save=["lm_head"]), le.UnsupportedFeatureError, "modules_to_save"),
        (lambda f: edit_config(f, peft_type="IA3"), le.UnsupportedFeatureError, "not LORA"),
        (lambda f: edit_config(f, r=3), le.AdapterFormatError, "config says r=3"),
        (lambda f: edit_config(f, r=0), le.AdapterFormatError, "positive integer"),
        (lambda f: rewrite_weights(f, lambda t: t.update({"base_model.model.embed.lora_embedding_A": torch.ones(2, 2)})),
         le.UnsupportedFeatureError, "embedding LoRA"),
        (lambda f: rewrite_weights(f, lambda t: t.update({"base_model.model.x.weight": torch.ones(2)})),
         le.AdapterFormatError, "unexpected key"),
        (lambda f: rewrite_weights(f, lambda t: t.pop("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")),
         le.AdapterFormatError, "lacks lora_B"),
        (lambda f: rewrite_weights(f, lambda t: t["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].fill_(float("nan"))),
         le.NonFiniteError, "NaN or inf"),
    ],
)
def test_bad_files_raise_typed_errors(patterned, tmp_path, damage, error, message):
    folder = copy_adapter(patterned, tmp_path / "bad")
    damage(folder)
    with pytest.raises(error, match=message):
        le.LoraAdapter.load(folder)


def test_missing_folder_and_failed_save_leave_nothing(patterned, tmp_path):
    with pytest.raises(le.AdapterFileError, match="no such adapter folder"):
        le.LoraAdapter.load(tmp_path / "nope")
    adapter = le.LoraAdapter.load(patterned)
    path = "model.layers.0.self_attn.q_proj"
    broken = adapter.with_modules({**adapter.modules, path: le.LoraModule(adapter.modules[path].A, adapter.modules[path].B, float("inf"))})
    with pytest.raises(le.NonFiniteError):
        broken.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_its_own_earlier_folder_whole_and_nothing_else(patterned, tmp_path):
    adapter = le.LoraAdapter.load(patterned)
    adapter.with_modules(dict(list(adapter.modules.items())[:1])).save(tmp_path / "out")
    adapter.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert len(le.LoraAdapter.load(tmp_path / "out").modules) == len(adapter.modules)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "out" / "stale.txt").write_text("old")  # no longer only an engine output (see tests/test_io.py)
    with pytest.raises(le.AdapterError, match="pass --overwrite"):
        adapter.save(tmp_path / "out")
