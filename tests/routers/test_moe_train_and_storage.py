"""SiRA and LoRAMoE end to end: train_router trains experts and routers together (the base bit-identical), aux losses
in the history, sample types from the examples, a LoRAMoE step = Adam's first step on the task loss plus the layers'
mean balance; save/load without experts= (the config too) and export_experts round-trip to equal logits (an exported
expert attached alone = the MoE with every gate on it; PEFT reads the export); router_stats; generate with a KV cache
under SiRA equals a full recompute."""

import pytest
import torch
from peft import PeftModel

import lorahub_engine as le
from lorahub_engine.attach import router_outputs
from lorahub_engine.fewshot import example_losses
from lorahub_engine.search.objective import encode_pairs
from routers import (LoRAMoEConfig, MoLEConfig, RouterError, SiRAConfig, attach_router, export_experts, load_router,
                     reset_router_stats, router_stats, sample_types, save_router, train_router)
from routers.api import lora_layers, router_parameters, routers_of
from tests.routers.conftest import assert_cached_generate_equals_recompute, experts, fresh
from tests.tiny_models import tiny_llama_for, word_tokenizer

WORDS = [f"w{i}" for i in range(20)]
EXAMPLES = [(f"w{i} w{(i * 3) % 20}", f"w{(i + 1) % 20}", i % 2) for i in range(12)]
CONFIGS = [SiRAConfig(num_experts=[2, 4], top_k=2, rank=4, capacity_factor=1.0, gate_dropout=0.1),
           LoRAMoEConfig(num_experts=4, rank=4, target_modules=("gate_proj", "up_proj", "down_proj"),
                         balance_weight=0.05, balance_delta=0.2, expert_groups=(2, 2))]  # balance off its defaults


@pytest.fixture(scope="module")
def setup():
    tokenizer = word_tokenizer(WORDS)
    return tiny_llama_for(tokenizer), tokenizer


@pytest.fixture(scope="module", params=CONFIGS, ids=["sira", "loramoe"])
def trained(request, setup):
    base, tokenizer = setup
    model = attach_router(fresh(base), request.param)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    history = train_router(model, tokenizer, EXAMPLES, steps=25, lr=2e-2, batch_size=4, seed=0, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    return model, before, history


def test_training_moves_experts_and_routers_and_leaves_the_base_bit_identical(trained):
    model, before, history = trained
    config = next(m.router.config for m in model.modules() if hasattr(m, "router"))
    assert set(history.aux) == ({"balance", "z"} if config.method == "sira" else {"balance"})
    assert all(len(v) == 25 for v in history.aux.values()) and len(history.loss) == 25
    assert sum(history.task[-5:]) < sum(history.task[:5])
    moved = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    assert all(name.endswith((".router.weight", ".lora_A", ".lora_B")) for name in moved)
    assert any(n.endswith(".lora_B") for n in moved) and any(n.endswith(".router.weight") for n in moved)
    assert not any(m.training for m in model.modules() if hasattr(m, "usage_count"))


def test_save_and_load_need_no_experts_and_give_equal_logits(trained, setup, tmp_path):
    model, _, _ = trained
    base, _ = setup
    save_router(model, tmp_path / "router")
    loaded = load_router(fresh(base), tmp_path / "router")
    x = torch.randint(4, 24, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    saved = routers_of(model)
    # the training-only settings too (LoRAMoE's balance_weight, balance_delta, expert_groups), which logits do not show
    assert all(router.config == saved[path].config for path, router in routers_of(loaded).items())
    with pytest.raises(RouterError, match="without experts="):
        load_router(fresh(base), tmp_path / "router", experts=experts(base, n=2))


def test_each_exported_expert_alone_equals_the_moe_with_every_gate_on_it(trained, setup, tmp_path):
    model, _, _ = trained
    base, _ = setup
    adapters = export_experts(model)
    assert [a.name for a in adapters] == le.attached_names(model)
    x = torch.randint(4, 24, (2, 6))
    for e, adapter in enumerate(adapters):
        alone = le.attach(fresh(base), [adapter])
        with torch.no_grad(), le.routing(model, torch.tensor([[e]])):
            forced = model(x).logits
        with torch.no_grad():
            # fp32, two walks (one expert per row; the bank's routing forced): equal to their rounding
            torch.testing.assert_close(alone(x, adapter_ids=[0, 0]).logits, forced, atol=1e-5, rtol=1e-5)
        adapter.save(tmp_path / adapter.name)
    with torch.no_grad():
        peft = PeftModel.from_pretrained(fresh(base), str(tmp_path / adapters[-1].name))(x).logits
        torch.testing.assert_close(peft, le.attach(fresh(base), [adapters[-1]])(x, adapter_ids=[0, 0]).logits,
                                   atol=1e-5, rtol=1e-5)
    if isinstance(model.model.layers[0].mlp.up_proj.router.config, SiRAConfig):  # experts (2, 4) per layer
        assert all(".layers.1." in p for a in adapters[2:] for p in a.modules)
        assert any(".layers.0." in p for p in adapters[1].modules)
    assert (torch.stack([m.B.abs().sum() for m in adapters[0].modules.values()]) > 0).any()  # trained, not init


def test_router_stats_count_kept_pairs_of_real_tokens(trained):
    model, _, _ = trained
    x = torch.randint(4, 24, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    reset_router_stats(model)
    with torch.no_grad():
        model(x, attention_mask=mask)
    for path, layer in router_stats(model).items():
        config = model.get_submodule(path).router.config
        k = len(layer["tokens"]) if config.method == "loramoe" else config.top_k  # eval: no capacity, no dropout
        assert layer["count"] == 8 and sum(layer["tokens"]) == 8 * k
        assert sum(layer["mean_gate"]) == pytest.approx(1.0, abs=1e-5)


def test_export_refuses_a_router_over_given_experts(setup):
    base, _ = setup
    model = attach_router(fresh(base), MoLEConfig(), experts(base, n=2))
    with pytest.raises(RouterError, match="export_experts"):
        export_experts(model)


def test_generate_with_kv_cache_under_sira_equals_a_full_recompute(trained):
    model, _, _ = trained
    assert_cached_generate_equals_recompute(model)


def test_a_loramoe_training_step_is_adams_first_step_on_the_task_loss_plus_the_layers_mean_balance(setup):
    """train_router's loss is the mean answer cross-entropy plus the routers' balance averaged over the layer calls,
    with each example's type on its row. Adam's first step moves each parameter by -lr g / (|g| + eps) (bias-corrected
    m = g, v = g^2): g is that loss's gradient, computed here on the same four examples."""
    base, tokenizer = setup
    config = LoRAMoEConfig(num_experts=4, rank=2, target_modules=("up_proj", "down_proj"), balance_weight=1.0,
                           balance_delta=0.5, expert_groups=(1, 3))
    typed = [(f"w{i} w{i + 3}", f"w{i + 1}", i % 2) for i in range(4)]

    def build():
        model = attach_router(fresh(base), config)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # B = 0 at start would give A no gradient
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(generator=g)
        return model

    reference, model = build(), build()
    params = [p.requires_grad_(True) for p in router_parameters(reference)]
    for router in routers_of(reference).values():
        router.train()
    with router_outputs(reference) as records, sample_types(reference, [t for _, _, t in typed]):
        task = example_losses(reference, encode_pairs(reference, tokenizer, [e[:2] for e in typed])).mean()
    balances = [output.aux["balance"] for forward in records for output, _ in forward.values()]
    assert len(balances) == 4  # up_proj and down_proj of 2 layers
    loss = task + sum(balances) / len(balances)
    grads = torch.autograd.grad(loss, params)

    before = [p.detach().clone() for p in router_parameters(model)]
    lr = 1e-3
    history = train_router(model, tokenizer, typed, steps=1, lr=lr, batch_size=4, progress=False)  # all 4, shuffled
    assert history.loss[0] == pytest.approx(float(loss.detach()), rel=1e-5)
    for p, old, g in zip(router_parameters(model), before, grads):
        torch.testing.assert_close(p.detach() - old, -lr * g / (g.abs() + 1e-8), atol=lr * 1e-3, rtol=0)


def test_each_examples_type_reaches_the_loramoe_balance_of_its_row(setup, monkeypatch):
    import routers.loramoe as loramoe
    import routers.train as train

    base, tokenizer = setup
    seen, rows = [], []
    original, encode = loramoe.localized_balance_loss, train.encode_pairs
    monkeypatch.setattr(loramoe, "localized_balance_loss",
                        lambda probs, layout, types, *a: seen.append(types) or original(probs, layout, types, *a))
    monkeypatch.setattr(train, "encode_pairs", lambda m, t, pairs: rows.append(list(pairs)) or encode(m, t, pairs))
    model = attach_router(fresh(base), CONFIGS[1])
    typed = [(f"w{i}", f"w{i + 1}", i % 2) for i in range(6)]
    train_router(model, tokenizer, typed, steps=1, batch_size=4, progress=False)  # 4 of 6, shuffled
    kind = {x: t for x, _, t in typed}
    assert seen and all(t.tolist() == [kind[x] for x, _ in rows[0]] for t in seen)
    seen.clear()
    train_router(model, tokenizer, [e[:2] for e in typed], steps=1, batch_size=4, progress=False)
    assert seen and all(t is None for t in seen)
    with pytest.raises(RouterError, match="expert-group"):
        train_router(model, tokenizer, [("w1", "w2", 5)], steps=1, batch_size=1, progress=False)
    with pytest.raises(RouterError, match="third field"):
        train_router(model, tokenizer, [("w1", "w2", "group")], steps=1, batch_size=1, progress=False)
