"""On CUDA (skipped elsewhere; benchmarks/gpu_checks.sh runs it): a routed forward of every router never waits for
the GPU, and its training step neither (the first H200 run found a host sync at every layer)."""

import pytest
import torch

from routers import ArrowConfig, LoRAMoEConfig, MoLEConfig, SiRAConfig, attach_router
from tests.cuda_sync import assert_never_syncs
from tests.routers.conftest import fresh

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIGS = {
    "mole_dense": MoLEConfig(),
    "mole_top2": MoLEConfig(top_k=2),
    "arrow": ArrowConfig(top_k=2),
    "sira": SiRAConfig(num_experts=4, top_k=2, rank=3, target_modules=("q_proj", "v_proj")),
    "loramoe": LoRAMoEConfig(num_experts=4, rank=3, target_modules=("q_proj", "v_proj")),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_routed_forward_and_step_never_sync(llama, bank, name):
    config = CONFIGS[name]
    experts = None if isinstance(config, (SiRAConfig, LoRAMoEConfig)) else bank
    model = attach_router(fresh(llama), config, experts).cuda().to(torch.bfloat16)
    ids = torch.randint(0, llama.config.vocab_size, (2, 16), device="cuda")
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step():  # no attention mask: transformers' own mask code reads it back (TokenLayout reads it once a forward)
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        if trainable:
            model.train()
            model(input_ids=ids).logits.float().square().mean().backward()

    assert_never_syncs(step)
