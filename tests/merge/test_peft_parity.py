"""Parity with PEFT's add_weighted_adapter on real PEFT folders, compared per module through PEFT's get_delta_weight."""

import copy

import pytest
import torch
from peft import PeftModel

import lorahub_engine as le
from lorahub_engine.merge import merge
from tests.merge.conftest import assert_deltas_equal, peft_deltas, peft_merge, peft_model_with


def pick(folders, *names):
    return {n: folders[n] for n in names}


@pytest.mark.parametrize("names,weights", [
    (("a", "b"), (1.0, -0.7)),
    (("a", "b", "c"), (0.5, 1.5, -1.0)),  # c targets other modules: union, missing contributes zero
    (("a", "d"), (1.0, 0.3)),  # mixed ranks 4 and 8
])
def test_cat_equals_peft(llama, folders, names, weights):
    ours = merge([folders[n] for n in names], weights, "cat")
    assert_deltas_equal(ours, peft_merge(llama, pick(folders, *names), weights, "cat"))
    a = ours.modules["model.layers.0.self_attn.q_proj"]
    assert a.scale == 1.0 and a.rank == sum(8 if n == "d" else 4 for n in names)


def test_svd_equals_peft_truncated(llama, folders):
    weights = (1.0, -0.7)
    ref = peft_merge(llama, pick(folders, "a", "b"), weights, "svd", svd_rank=3)
    ours = merge([folders["a"], folders["b"]], weights, "svd", rank=3)
    assert_deltas_equal(ours, ref)
    assert_deltas_equal(merge([folders["a"], folders["b"]], weights, "task_arithmetic", rank=3), ref)


@pytest.mark.parametrize("method,extra", [
    ("linear", {}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.25, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.5}),
])
def test_factor_space_equals_peft(llama, folders, method, extra):
    names, weights = ("a", "b", "c"), (0.8, -0.6, 1.3)
    ref = peft_merge(llama, pick(folders, *names), weights, method, **extra)
    ours = merge([folders[n] for n in names], weights, method, space="factors", **extra)
    assert_deltas_equal(ours, ref)
    assert {m.rank for m in ours.modules.values()} == {4}  # PEFT's result keeps the common rank, scale 1


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_delta_space_equals_peft_svd_variants(llama, folders, method):
    """PEFT's *_svd variants run the method on dW; with equal positive weights its sign election (unweighted)
    and ours (weighted) coincide, so the rank-16 truncations must match."""
    weights = (0.7, 0.7)
    ref = peft_merge(llama, pick(folders, "a", "b"), weights, f"{method}_svd", density=0.5, svd_rank=16)
    assert_deltas_equal(merge([folders["a"], folders["b"]], weights, method, density=0.5, rank=16), ref)


@pytest.mark.parametrize("method,space,extra", [
    ("cat", "delta", {}),
    ("ties", "factors", {"density": 0.5}),
    ("svd", "delta", {"rank": 2}),
])
def test_gpt2_fan_in_fan_out_equals_peft(gpt2, gpt2_folders, method, space, extra):
    weights = (1.0, 0.4)
    kwargs = {"svd_rank": extra["rank"]} if "rank" in extra else extra
    ref = peft_merge(gpt2, gpt2_folders, weights, method, fan_in_fan_out=True, **kwargs)
    ours = merge(list(gpt2_folders.values()), weights, method, space=space, **extra)
    assert ours.fan_in_fan_out
    assert_deltas_equal(ours, ref)


def folded_logits(base, adapter, x):
    """Independent reference: the base model with every merged dW added into its weight."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for path in adapter.modules:
            weight = model.get_submodule(path).weight
            delta = adapter.delta_weight(path)
            weight += delta.T if adapter.fan_in_fan_out else delta
    return model(x).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_merge_loads_in_peft(arch, llama, gpt2, folders, gpt2_folders, tmp_path):
    """Saved merges (mixed ranks per module: ties keeps each module's numerical rank) load in PEFT with the same
    deltas, and PEFT's logits equal ours through le.attach and the base with our deltas folded in."""
    base, srcs = (llama, [folders["a"], folders["c"]]) if arch == "llama" else (gpt2, list(gpt2_folders.values()))
    merged = merge(srcs, [1.0, -0.5], "ties", density=0.3, name="m")
    merged.save(tmp_path / "m")
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "m")
    assert_deltas_equal(merged, peft_deltas(model, "default", merged.fan_in_fan_out))
    x = torch.randint(0, 64, (2, 9))
    logits = model(x).logits
    torch.testing.assert_close(logits, folded_logits(base, merged, x), atol=1e-5, rtol=0)
    ours = le.attach(copy.deepcopy(base), [merged])(x, adapter_ids=torch.zeros(2, dtype=torch.long)).logits
    torch.testing.assert_close(ours, logits, atol=1e-5, rtol=0)


def test_merged_rslora_and_rank_pattern_save_with_plain_scaling(llama, folders, tmp_path):
    """PEFT's own merge of rsLoRA adapters keeps use_rslora and over-scales; ours saves scale 1 with rank/alpha
    patterns PEFT reads back exactly."""
    merged = merge([folders["rs"], folders["d"]], [1.0, -0.5], "svd", rank=3)
    merged.save(tmp_path / "m")
    model = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "m")
    assert_deltas_equal(merged, peft_deltas(model, "default"))
    sources = peft_model_with(llama, {"rs": folders["rs"], "d": folders["d"]})
    rs, d = peft_deltas(sources, "rs"), peft_deltas(sources, "d")
    for path in merged.modules:
        exact = rs.get(path, 0) - 0.5 * d.get(path, 0)
        U, S, Vh = torch.linalg.svd(exact.double())
        torch.testing.assert_close(merged.delta_weight(path), ((U[:, :3] * S[:3]) @ Vh[:3]).float(), atol=1e-5, rtol=0)
