"""MoLE gates: hand-computed balance loss and temperature gradient, top-k renormalization, masked experts,
gate gradients against a dense einsum reference of the same layer, padding excluded."""

import math

import pytest
import torch

import lorahub_engine as le
from lorahub_engine.dispatch import TokenLayout
from routers import MoLEConfig, attach_router, disable_experts
from routers.mole import MoLEGate, balance_loss
from tests.routers.conftest import fresh

CLOSE = {"atol": 1e-5, "rtol": 1e-5}


def gate_with(weight, config, temperature=1.0):
    gate = MoLEGate(weight.shape[1], weight.shape[0], config)
    with torch.no_grad():
        gate.weight.copy_(weight)
        gate.temperature.fill_(temperature)
    return gate


def test_balance_loss_is_minus_log_prod_of_mean_gates_over_real_tokens():
    # logits chosen so each real token's probabilities are known: ln of the wanted probabilities
    wanted = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4]])
    x = torch.cat([torch.eye(3), torch.tensor([[0.0, 0.0, 9.0]])])  # 4th token: padding, extreme
    gate = gate_with(wanted.log().T, MoLEConfig(balance_weight=0.5)).train()
    out = gate(x, TokenLayout(1, 4, torch.tensor([True, True, True, False])))
    torch.testing.assert_close(out.probs[:3], wanted)
    q = [0.5, 0.2, 0.3]  # column means of `wanted`
    assert float(out.aux["balance"].detach()) == pytest.approx(0.5 * -math.log(q[0] * q[1] * q[2]), rel=1e-6)
    assert float(balance_loss(torch.full((4,), 0.25))) == pytest.approx(4 * math.log(4), rel=1e-6)
    assert gate.eval()(x, TokenLayout(1, 4)).aux == {}  # evaluation: no auxiliary loss


def test_temperature_gradient_matches_the_hand_derivative():
    z = torch.tensor([[1.0, -0.5, 2.0]])  # logits W x for one token
    c = torch.tensor([0.3, -1.0, 2.0])  # loss = sum_i c_i G_i
    tau = 1.7
    gate = gate_with(z.T, MoLEConfig(), temperature=tau)
    probs = gate(torch.ones(1, 1), TokenLayout(1, 1)).probs[0]
    (probs * c).sum().backward()
    G = torch.softmax(z[0] / tau, 0)
    # dG_i/dtau = -G_i (z_i - sum_j G_j z_j) / tau^2
    expected = float(-(c * G * (z[0] - (G * z[0]).sum())).sum() / tau**2)
    assert float(gate.temperature.grad) == pytest.approx(expected, rel=1e-5)


def test_top_k_keeps_the_largest_and_renormalizes_and_disabled_experts_renormalize_the_rest():
    wanted = torch.tensor([[0.5, 0.3, 0.2]])
    gate = gate_with(wanted.log().T, MoLEConfig(top_k=2))
    out = gate(torch.ones(1, 1), TokenLayout(1, 1))
    assert out.indices.tolist() == [[0, 1]]
    torch.testing.assert_close(out.gates, torch.tensor([[0.625, 0.375]]))
    gate.disabled[0] = True
    out = gate(torch.ones(1, 1), TokenLayout(1, 1))
    assert out.indices.tolist() == [[1, 2]]
    torch.testing.assert_close(out.gates, torch.tensor([[0.6, 0.4]]))
    dense = gate_with(wanted.log().T, MoLEConfig())
    dense.disabled[1] = True
    out = dense(torch.ones(1, 1), TokenLayout(1, 1))
    assert out.indices.tolist() == [[0, -1, 2]]
    torch.testing.assert_close(out.gates, torch.tensor([[0.5 / 0.7, 0.0, 0.2 / 0.7]]))


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_gate_gradients_match_a_dense_einsum_reference_of_the_layer(llama, bank, top_k, granularity):
    model = attach_router(fresh(llama), MoLEConfig(top_k=top_k, granularity=granularity), bank)
    layer = model.model.layers[1].mlp.down_proj
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.router.weight.normal_(generator=g)
        layer.router.temperature.fill_(1.3)
    layer.router.train()
    x = torch.randn(2, 5, layer.lora_A.shape[2], generator=g)  # (rows, L, in)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    probe = torch.randn(2, 5, layer.lora_B.shape[1], generator=g)
    dispatch = model._lorahub_attached.dispatch
    dispatch.open(model, 2, 5, mask)
    try:
        y = layer(x)
    finally:
        dispatch.close(model)
    (y * probe).sum().backward()
    W = layer.router.weight.detach().clone().requires_grad_()
    tau = layer.router.temperature.detach().clone().requires_grad_()
    flat = x.reshape(10, -1)
    if granularity == "sequence":
        real = mask.reshape(2, 5, 1).float()
        pooled = (x * real).sum(1) / real.sum(1)  # (rows, in)
        logits = (pooled @ W.T / tau).repeat_interleave(5, dim=0)
    else:
        logits = flat @ W.T / tau  # (T, E)
    probs = logits.softmax(-1)
    if top_k is not None:  # dense weights with zeros outside each token's top k, renormalized
        keep = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
        probs = probs * keep / (probs * keep).sum(-1, keepdim=True)
    delta = torch.einsum("te,e,eor,eri,ti->to", probs, layer.lora_scale, layer.lora_B.detach(),
                         layer.lora_A.detach(), flat)  # (T, out)
    y_ref = layer.base(flat) + delta
    torch.testing.assert_close(y.reshape(10, -1), y_ref, **CLOSE)
    (y_ref * probe.reshape(10, -1)).sum().backward()
    torch.testing.assert_close(layer.router.weight.grad, W.grad, **CLOSE)
    torch.testing.assert_close(layer.router.temperature.grad, tau.grad, **CLOSE)


def test_padding_changes_no_routing_statistic_or_loss(llama, bank):
    model = attach_router(fresh(llama), MoLEConfig(top_k=2), bank)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.router.weight.normal_(generator=torch.Generator().manual_seed(1))
    layer.router.train()
    x = torch.randn(1, 4, 32)
    junk = torch.randn(1, 3, 32) * 50
    results = []
    for inputs, mask in ((x, None), (torch.cat([junk, x], 1), torch.tensor([[0, 0, 0, 1, 1, 1, 1]]))):
        layer.router.reset_usage()
        out = layer.router(inputs.reshape(-1, 32), TokenLayout(1, inputs.shape[1], None if mask is None
                                                                else mask.reshape(-1).bool()))
        results.append((out.aux["balance"], layer.router.usage_tokens.clone(), layer.router.usage_probs.clone(),
                        layer.router.usage_entropy.clone(), layer.router.usage_count.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **CLOSE)


def test_disable_experts_by_name_and_bad_names(llama, bank):
    model = attach_router(fresh(llama), MoLEConfig(disable=["e1"]), bank)
    router = model.model.layers[0].self_attn.q_proj.router
    assert router.disabled.tolist() == [False, True, False, False]
    disable_experts(model, [])
    assert not router.disabled.any()
    with pytest.raises(le.AdapterError, match="nope"):
        disable_experts(model, ["nope"])
