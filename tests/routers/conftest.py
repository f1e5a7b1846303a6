"""Tiny bases and expert banks for router tests (nothing downloaded)."""

import copy

import pytest
import torch

import lorahub_engine as le
from tests.tiny_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def experts(base, n=4, r=3, targets=TARGETS, gap=1.0):
    """n adapters with random nonzero A and B; gap > 1 stretches each one's first rank direction (a clear top
    singular vector, as power iterations need to converge)."""
    out = []
    for i in range(n):
        adapter = le.init_adapter(base, f"e{i}", targets, r=r, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        for m in adapter.modules.values():
            m.A.normal_(generator=g)
            m.B.normal_(generator=g).mul_(0.3)
            m.A[0].mul_(gap)
        out.append(adapter)
    return out


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bank(llama):
    return experts(llama)


def fresh(base):
    return copy.deepcopy(base)


def run_layer(model, layer, x, mask):
    """One LoRA layer's forward on x [rows, L, in] under a forward context with attention mask [rows, L], as the
    model's forward would open it; returns (y [rows, L, out], the layer's RouterOutput)."""
    from lorahub_engine.attach import router_outputs

    dispatch = model._lorahub_attached.dispatch
    with router_outputs(model) as records:
        dispatch.open(model, x.shape[0], x.shape[1], mask)
        try:
            y = layer(x)
        finally:
            dispatch.close(model)
    return y, records[0][layer.path].output


def one_hot_router(router, probs):
    """Set a linear router's weight [E, in >= T] so that one-hot input t gets probabilities probs[t] (logits =
    log probs; the other inputs' columns zero)."""
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, : probs.shape[0]] = probs.log().T
    return router


def make_trainable(layer, g: torch.Generator) -> None:
    """A fresh MoE layer ready for a gradient check: random B and router weights (B starts at zero), the router in
    training, A and B requiring grad."""
    with torch.no_grad():
        layer.lora_B.normal_(generator=g)
        layer.router.weight.normal_(generator=g)
    layer.router.train()
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)


def assert_gradients_match(x, layer, xr, W, A, B, **close) -> None:
    """The layer's gradients of x, A, B and the router weight equal the dense reference's (xr, W, A, B)."""
    torch.testing.assert_close(x.grad.reshape(xr.shape), xr.grad, **close)
    torch.testing.assert_close(layer.lora_A.grad, A.grad, **close)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, **close)
    torch.testing.assert_close(layer.router.weight.grad, W.grad, **close)


def assert_cached_generate_equals_recompute(model) -> None:
    """generate() with a KV cache over a left-padded batch gives each step's logits of a full recompute."""
    x = torch.tensor([[0, 0, 1, 5, 6], [1, 7, 8, 9, 10]])
    mask = (x != 0).long()
    out = model.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True)
    for step, logits in enumerate(out.logits):
        full = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], 1)
        with torch.no_grad():
            ref = model(out.sequences[:, : 5 + step], attention_mask=full,
                        position_ids=(full.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
