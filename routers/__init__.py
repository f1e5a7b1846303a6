"""Token-level routers over a zoo of frozen LoRA experts, through the core's routing interface and grouped op.

    from routers import attach_router, train_router, save_router, load_router, router_stats, MoLEConfig, ArrowConfig
    model = attach_router(hf_model, MoLEConfig(), experts=adapters)            # frozen experts, gates learn
    model = attach_router(hf_model, ArrowConfig(top_k=3, temperature=1.0), experts=adapters)   # no training
    history = train_router(model, tokenizer, examples, steps=300, lr=5e-3, batch_size=8, seed=0)
    save_router(model, "router/"); model = load_router(hf_model, "router/", experts=adapters)
    router_stats(model)    # per layer: tokens per expert, mean gate, entropy (real tokens only)
"""

from routers.api import attach_router, disable_experts, reset_router_stats, router_stats, update_experts
from routers.config import ArrowConfig, MoLEConfig
from routers.errors import RouterError
from routers.storage import load_router, save_router
from routers.train import RouterHistory, train_router

__all__ = ["ArrowConfig", "MoLEConfig", "RouterError", "RouterHistory", "attach_router", "disable_experts",
           "load_router", "reset_router_stats", "router_stats", "save_router", "train_router",
           "update_experts"]
