"""Arrow: prototypes from the factors, logits equal to PEFT's create_arrow_model, only the top k experts computed,
adding or removing an expert touches only its own prototypes."""

import copy

import pytest
import torch
from peft import ArrowConfig as PeftArrowConfig
from peft import create_arrow_model

import lorahub_engine as le
import lorahub_engine.lora_layer as lora_layer
from routers import ArrowConfig, attach_router
from routers.arrow import prototypes
from tests.routers.conftest import experts, fresh


def test_prototypes_are_the_top_right_singular_vectors_of_B_A():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 3, 16, generator=g), torch.randn(5, 12, 3, generator=g)
    A[2] = 0  # an expert absent from this layer
    protos = prototypes(A, B)
    for e in (0, 1, 3, 4):
        v = torch.linalg.svd((B[e] @ A[e]).double()).Vh[0].float()
        torch.testing.assert_close(protos[e].abs(), v.abs(), atol=1e-6, rtol=1e-5)
        assert abs(float(protos[e] @ v)) == pytest.approx(1.0, abs=1e-6)
    assert not protos[2].any()


@pytest.mark.parametrize("top_k,temperature", [(2, 1.0), (3, 0.5)])
def test_logits_equal_peft_arrow_while_only_top_k_experts_are_computed(llama, tmp_path, monkeypatch, top_k,
                                                                      temperature):
    bank = experts(llama, n=5, gap=10.0)  # a clear top singular direction: PEFT's 15 power iterations converge
    paths = []
    for adapter in bank:
        adapter.save(tmp_path / adapter.name)
        paths.append(str(tmp_path / adapter.name))
    peft_model = create_arrow_model(copy.deepcopy(llama), paths,
                                    PeftArrowConfig(top_k=top_k, router_temperature=temperature))
    model = attach_router(fresh(llama), ArrowConfig(top_k=top_k, temperature=temperature), bank)
    x = torch.randint(0, 64, (3, 7))
    slots = []
    original = lora_layer.grouped_lora_routed

    def spy(x, A, B, scale, routing, **kwargs):
        slots.append(routing.idx.shape[1])
        return original(x, A, B, scale, routing, **kwargs)

    monkeypatch.setattr(lora_layer, "grouped_lora_routed", spy)
    with torch.no_grad():
        ours, theirs, plain = model(x).logits, peft_model(x).logits, llama(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the experts really act
    assert slots == [top_k] * 6  # 2 layers x 3 modules, k slots each, not 5


def test_adding_or_removing_an_expert_updates_only_its_prototypes(llama, monkeypatch):
    bank = experts(llama, n=4)
    model = attach_router(fresh(llama), ArrowConfig(top_k=2), bank[:3])
    before = {p: m.router.prototypes.clone() for p, m in model.named_modules() if hasattr(m, "router")}
    import routers.api as api

    computed = []
    original = api.prototypes
    monkeypatch.setattr(api, "prototypes", lambda A, B: computed.append(A.shape[0]) or original(A, B))
    from routers import update_experts

    update_experts(model, add=[bank[3]], remove=["e1"])
    assert le.attached_names(model) == ["e0", "e2", "e3"]
    assert set(computed) == {1}  # one new expert per layer, nothing recomputed for the others
    for path, protos in before.items():
        now = model.get_submodule(path).router.prototypes
        torch.testing.assert_close(now[:2], protos[[0, 2]], atol=0, rtol=0)
    fresh_model = attach_router(fresh(llama), ArrowConfig(top_k=2), [bank[0], bank[2], bank[3]])
    x = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, fresh_model(x).logits, atol=1e-6, rtol=1e-6)
