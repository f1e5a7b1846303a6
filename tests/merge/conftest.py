"""Tiny bases, real PEFT adapter folders, and PEFT's own merge (`add_weighted_adapter`) as a reference."""

import copy
import os

import pytest
import torch
from peft import PeftModel

from tests.tiny_models import make_peft_adapter, tiny_gpt2, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="session")
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="session")
def folders(llama, tmp_path_factory):
    """PEFT folders on the tiny Llama. a, b, c: rank 4, different alphas, c with different target modules;
    d: rank 8; rs: rsLoRA with a rank pattern (adapters PEFT's merge gets wrong)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_peft_adapter(llama, root / "a", 1, ATTN, r=4, lora_alpha=8),
        "b": make_peft_adapter(llama, root / "b", 2, ATTN, r=4, lora_alpha=4),
        "c": make_peft_adapter(llama, root / "c", 3, ["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=16),
        "d": make_peft_adapter(llama, root / "d", 4, ["q_proj", "down_proj"], r=8, lora_alpha=8),
        "rs": make_peft_adapter(llama, root / "rs", 5, ["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True,
                                rank_pattern={"v_proj": 2}),
    }


@pytest.fixture(scope="session")
def gpt2_folders(gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    targets = ["c_attn", "c_proj", "c_fc"]
    return {n: make_peft_adapter(gpt2, root / n, s, targets, r=4, lora_alpha=a, fan_in_fan_out=True)
            for n, s, a in (("a", 11, 8), ("b", 12, 2))}


def peft_model_with(base, folders):
    """A PeftModel holding each folder under its key as adapter name."""
    names = list(folders)
    model = PeftModel.from_pretrained(copy.deepcopy(base), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    return model


def peft_deltas(model, adapter, fan_in_fan_out=False):
    """{module path: dW in nn.Linear orientation [out, in]} of one adapter of a PeftModel, by PEFT's get_delta_weight."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            delta = module.get_delta_weight(adapter).detach()
            deltas[name] = delta.T if fan_in_fan_out else delta
    return deltas


def peft_merge(base, folders, weights, combination_type, fan_in_fan_out=False, **kwargs):
    """PEFT's add_weighted_adapter on the folders -> its merged per-module deltas."""
    model = peft_model_with(base, folders)
    model.add_weighted_adapter(list(folders), list(weights), "merged", combination_type=combination_type, **kwargs)
    return peft_deltas(model, "merged", fan_in_fan_out)


def assert_deltas_equal(merged, reference, atol=1e-5):
    """Our merged adapter's deltas equal the reference's on every module (same module set)."""
    assert sorted(merged.modules) == sorted(reference)
    for path, ref in reference.items():
        torch.testing.assert_close(merged.delta_weight(path), ref.float(), atol=atol, rtol=0, msg=path)
