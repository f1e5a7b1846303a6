"""Every router in a model cast to bf16 after attach (`model.to(torch.bfloat16)`, as users do for GPUs) runs (SiRA,
LoRAMoE and MoLE multiplied bf16 inputs by fp32-only weights and failed), and its usage counters stay fp32 and exact
past 256 tokens (a bf16 counter stops there). Logits are not compared: a bf16 rounding flips top-k choices."""

import copy

import pytest
import torch

from routers import ArrowConfig, LoRAMoEConfig, MoLEConfig, SiRAConfig, attach_router, router_stats
from tests.routers.conftest import fresh

TOKENS = 3 * 100  # > 256: a bf16 counter would stop counting exactly there

CONFIGS = {  # config, slots per token
    "mole_dense": (MoLEConfig(), 4),
    "mole_top2": (MoLEConfig(top_k=2), 2),
    "arrow": (ArrowConfig(top_k=2), 2),
    "sira": (SiRAConfig(num_experts=4, top_k=2, rank=3, target_modules=("q_proj", "v_proj")), 2),
    "loramoe": (LoRAMoEConfig(num_experts=4, rank=3, target_modules=("q_proj", "v_proj")), 4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_bf16_model_runs_and_counts_exactly(llama, bank, name):
    config, slots = CONFIGS[name]
    experts = None if isinstance(config, (SiRAConfig, LoRAMoEConfig)) else bank
    model = attach_router(fresh(llama), config, experts).eval()
    with torch.no_grad():  # trained-looking routers and experts (B and MoLE's gates start at zero)
        for path, p in model.named_parameters():
            if path.endswith(("lora_B", "router.weight")):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(path))) * 0.5)
    half = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.randint(0, llama.config.vocab_size, (3, TOKENS // 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = half(ids).logits
    assert logits.dtype == torch.bfloat16 and bool(logits.isfinite().all())
    for stats in router_stats(half).values():
        assert stats["count"] == TOKENS
        assert sum(stats["tokens"]) == TOKENS * slots
    for path, buffer in half.named_buffers():
        if ".usage_" in path:
            assert buffer.dtype == torch.float32, path


def test_usage_counters_skip_padding_rows_even_when_they_hold_nan():
    from lorahub_engine.dispatch import RouterOutput, TokenLayout
    from routers.base import Router

    router = Router(3)
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [float("nan")] * 3])  # token 2 is padding
    indices, gates = torch.tensor([[0], [2], [1]]), torch.tensor([[1.0], [1.0], [float("nan")]])
    router.count(RouterOutput(indices, gates, probs, {}), TokenLayout(1, 3, torch.tensor([True, True, False])))
    assert router.usage_tokens.tolist() == [1.0, 0.0, 1.0] and float(router.usage_count) == 2.0
    assert torch.allclose(router.usage_probs, torch.tensor([0.7, 0.8, 0.5]))
    assert bool(router.usage_entropy.isfinite())
