"""Token-level routers through the core's routing interface and grouped op: over a zoo of frozen LoRA experts
(MoLE, Arrow), or over new LoRA experts that train with their routers (SiRA, LoRAMoE).

    from routers import attach_router, train_router, save_router, load_router, router_stats, MoLEConfig, ArrowConfig
    model = attach_router(hf_model, MoLEConfig(), experts=adapters)            # frozen experts, gates learn
    model = attach_router(hf_model, ArrowConfig(top_k=3, temperature=1.0), experts=adapters)   # no training
    model = attach_router(hf_model, SiRAConfig(num_experts=8, top_k=2))        # sparse top-2 of 8 new experts
    model = attach_router(hf_model, LoRAMoEConfig(num_experts=6, expert_groups=(3, 3)))   # dense, localized balance
    history = train_router(model, tokenizer, examples, steps=300, lr=5e-3, batch_size=8, seed=0)
    save_router(model, "router/"); model = load_router(hf_model, "router/", experts=adapters)  # SiRA: no experts=
    router_stats(model)    # per layer: tokens per expert, mean gate, entropy (real tokens only)
    adapters = export_experts(model)   # SiRA / LoRAMoE: each trained expert as a LoraAdapter (PEFT folder via .save)
"""

from routers.api import (attach_router, disable_experts, export_experts, reset_router_stats, router_stats,
                         sample_types, update_experts)
from routers.config import ArrowConfig, LoRAMoEConfig, MoLEConfig, SiRAConfig
from routers.errors import RouterError
from routers.storage import load_router, save_router
from routers.train import RouterHistory, train_router

__all__ = ["ArrowConfig", "LoRAMoEConfig", "MoLEConfig", "RouterError", "RouterHistory", "SiRAConfig",
           "attach_router", "disable_experts", "export_experts", "load_router", "reset_router_stats", "router_stats",
           "sample_types", "save_router", "train_router", "update_experts"]
