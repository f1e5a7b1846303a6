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
