"""train_router moves only the gates; save/load round trip; router_stats over real tokens; generate with a KV cache
under a trained router equals a full recompute."""

import json

import pytest
import torch

import lorahub_engine as le
from routers import (ArrowConfig, MoLEConfig, RouterError, attach_router, load_router, reset_router_stats,
                     router_stats, save_router, train_router)
from tests.routers.conftest import assert_cached_generate_equals_recompute, experts, fresh
from tests.tiny_models import tiny_llama_for, word_tokenizer

WORDS = [f"w{i}" for i in range(20)]
EXAMPLES = [(f"w{i} w{(i * 3) % 20}", f"w{(i + 1) % 20}") for i in range(12)]


@pytest.fixture(scope="module")
def setup():
    tokenizer = word_tokenizer(WORDS)
    base = tiny_llama_for(tokenizer)
    return base, tokenizer, experts(base, n=3)


def test_training_moves_only_the_gates_and_lowers_the_loss(setup):
    base, tokenizer, bank = setup
    model = attach_router(fresh(base), MoLEConfig(top_k=2), bank)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    history = train_router(model, tokenizer, EXAMPLES, steps=30, lr=5e-2, batch_size=4, seed=0, progress=False)
    assert len(history.loss) == len(history.task) == len(history.usage) == len(history.aux["balance"]) == 30
    assert all(len(u) == 3 and sum(u) == pytest.approx(1.0, abs=1e-5) for u in history.usage)
    assert sum(history.task[-5:]) < sum(history.task[:5])
    moved = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    assert moved and all(name.endswith((".router.weight", ".router.temperature")) for name in moved)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    assert not any(m.training for m in model.modules() if hasattr(m, "usage_count"))  # routers back in eval
    with pytest.raises(RouterError, match="training-free"):
        train_router(attach_router(fresh(base), ArrowConfig(top_k=2), bank), tokenizer, EXAMPLES, steps=1)


@pytest.mark.parametrize("config", [MoLEConfig(top_k=2, granularity="token"), ArrowConfig(top_k=2, temperature=0.5)])
def test_save_and_load_give_equal_logits_and_refuse_other_experts(setup, tmp_path, config):
    base, tokenizer, bank = setup
    model = attach_router(fresh(base), config, bank)
    if isinstance(config, MoLEConfig):
        train_router(model, tokenizer, EXAMPLES, steps=5, lr=5e-2, batch_size=4, progress=False)
    save_router(model, tmp_path / "router")
    meta = json.loads((tmp_path / "router" / "router.json").read_text())
    assert meta["experts"] == ["e0", "e1", "e2"] and meta["config"]["method"] == config.method
    loaded = load_router(fresh(base), tmp_path / "router", experts=bank)
    x = torch.randint(4, 24, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    with pytest.raises(RouterError, match="trained over experts"):
        load_router(fresh(base), tmp_path / "router", experts=bank[::-1])
    with pytest.raises(RouterError, match="not a router folder"):
        load_router(fresh(base), tmp_path / "nothing", experts=bank)


def test_router_stats_count_real_tokens_per_layer(setup):
    base, _, bank = setup
    model = attach_router(fresh(base), ArrowConfig(top_k=2), bank)
    x = torch.randint(4, 24, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        model(x, attention_mask=mask)
    stats = router_stats(model)
    assert set(stats) == {p for p, m in model.named_modules() if isinstance(m, le.lora_layer.LoraLayer)}
    for layer in stats.values():
        assert layer["count"] == 8 and sum(layer["tokens"]) == 16  # 8 real tokens x 2 experts each
        assert sum(layer["mean_gate"]) == pytest.approx(1.0, abs=1e-5)
        assert 0 < layer["entropy"] <= torch.log(torch.tensor(2.0)).item() + 1e-6
    reset_router_stats(model)
    assert all(layer["count"] == 0 for layer in router_stats(model).values())


@pytest.mark.parametrize("config", [MoLEConfig(top_k=2), ArrowConfig(top_k=2)])
def test_generate_with_kv_cache_equals_a_full_recompute(setup, config):
    base, tokenizer, bank = setup
    model = attach_router(fresh(base), config, bank)
    if isinstance(config, MoLEConfig):
        train_router(model, tokenizer, EXAMPLES, steps=5, lr=5e-2, batch_size=4, progress=False)
    assert_cached_generate_equals_recompute(model)
