"""SiRA: hand-computed capacity drops, gate dropout only in training, hand-computed Switch balance and z-loss,
gradients of x, experts and router against a dense einsum reference with the same drops, padding excluded, only the
k selected experts computed, a disabled expert out of the softmax and the top k, experts per layer (MoLA), default
targets."""

import pytest
import torch

import lorahub_engine.lora_layer as lora_layer
from lorahub_engine.dispatch import TokenLayout
from routers import RouterError, SiRAConfig, attach_router
from routers.sira import SiRARouter, capacity_keep
from tests.routers.conftest import assert_gradients_match, fresh, make_trainable, one_hot_router, run_layer

CLOSE = {"atol": 1e-5, "rtol": 1e-5}
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def router(E, **config):
    return SiRARouter(8, E, SiRAConfig(num_experts=E, **{"gate_dropout": 0.0, **config}), seed=0)


def test_capacity_keeps_the_highest_gates_then_the_earliest_tokens():
    idx = torch.tensor([[0, 1], [0, 2], [1, 0], [0, -1], [2, 1]])
    priority = torch.tensor([[0.5, 0.2], [0.7, 0.1], [0.6, 0.3], [0.5, 0.0], [0.4, 0.6]])
    # expert 0: t1 .7, t0 .5, t3 .5 (tie: t0 first), t2 .3 -> keep t1, t0. expert 1: t2 .6, t4 .6 (tie: t2), t0 .2
    # -> keep t2, t4. expert 2: t4 .4, t1 .1 -> both. The -1 pair stays -1 and takes no room.
    kept = capacity_keep(idx, priority, 2, num_experts=3)
    assert kept.tolist() == [[0, -1], [0, 2], [1, -1], [-1, -1], [2, 1]]
    assert capacity_keep(idx, priority, 4, num_experts=3).tolist() == idx.tolist()


# 5 real tokens and one padding token that would crowd expert 0; top-2 of 4
PROBS = torch.tensor([[0.50, 0.30, 0.10, 0.10],
                      [0.60, 0.10, 0.20, 0.10],
                      [0.40, 0.35, 0.15, 0.10],
                      [0.55, 0.10, 0.10, 0.25],
                      [0.45, 0.40, 0.10, 0.05],
                      [0.97, 0.01, 0.01, 0.01]])
MASK = torch.tensor([True, True, True, True, True, False])


def test_capacity_drops_by_hand_count_only_real_tokens_and_renormalize_the_kept_gates():
    r = one_hot_router(router(4, top_k=2, capacity_factor=0.8), PROBS).train()
    out = r(torch.eye(6, 8), TokenLayout(1, 6, MASK))
    # C = ceil(0.8 * 5 real tokens * 2 / 4) = 2 (with the padding token counted it would be 3).
    # expert 0 gets t1 .60, t3 .55, t0 .50, t4 .45, t2 .40 -> keeps t1, t3; expert 1 gets t4 .40, t2 .35, t0 .30 ->
    # keeps t4, t2; experts 2 and 3 one pair each. t0 loses both its pairs: base path only. Padding: no pair.
    assert out.indices.tolist() == [[-1, -1], [0, 2], [-1, 1], [0, 3], [-1, 1], [-1, -1]]
    expected = torch.tensor([[0, 0], [0.75, 0.25], [0, 1], [0.6875, 0.3125], [0, 1], [0, 0]])
    torch.testing.assert_close(out.gates, expected, **CLOSE)
    torch.testing.assert_close(out.probs, torch.cat([PROBS[:5], out.probs[5:]]), **CLOSE)
    assert r.usage_tokens.tolist() == [2, 2, 1, 1]  # kept pairs of real tokens only
    evaluation = r.eval()(torch.eye(6, 8), TokenLayout(1, 6, MASK))  # no capacity at inference by default
    assert evaluation.indices.tolist() == [[0, 1], [0, 2], [0, 1], [0, 3], [0, 1], [-1, -1]]
    capped = one_hot_router(router(4, top_k=2, eval_capacity_factor=0.8), PROBS).eval()
    assert capped(torch.eye(6, 8), TokenLayout(1, 6, MASK)).indices.tolist() == out.indices.tolist()


def test_a_disabled_expert_gets_no_probability_and_no_slot_and_the_rest_renormalize():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.4, 0.3, 0.2], [0.2, 0.6, 0.15, 0.05]])
    top2 = one_hot_router(router(4, top_k=2), probs).eval()
    top2.disabled[1] = True
    out = top2(torch.eye(3, 8), TokenLayout(1, 3))
    # without expert 1: (.4 .2 .1) / .7, (.1 .3 .2) / .6, (.2 .15 .05) / .4; each token's top 2 of those, renormalized
    rest = torch.tensor([[4 / 7, 0, 2 / 7, 1 / 7], [1 / 6, 0, 1 / 2, 1 / 3], [1 / 2, 0, 3 / 8, 1 / 8]])
    torch.testing.assert_close(out.probs, rest, **CLOSE)
    assert out.indices.tolist() == [[0, 2], [2, 3], [0, 2]]
    torch.testing.assert_close(out.gates, torch.tensor([[2 / 3, 1 / 3], [0.6, 0.4], [4 / 7, 3 / 7]]), **CLOSE)
    every = one_hot_router(router(4, top_k=4), probs).eval()
    every.disabled[1] = True
    out = every(torch.eye(3, 8), TokenLayout(1, 3))
    assert out.indices.tolist() == [[0, 2, 3, -1], [2, 3, 0, -1], [0, 2, 3, -1]]  # k > enabled experts: no slot
    torch.testing.assert_close(out.gates, torch.cat([rest[:, [0, 2, 3]].sort(-1, descending=True).values,
                                                     torch.zeros(3, 1)], 1), **CLOSE)


def test_gate_dropout_acts_in_training_only():
    r = router(4, top_k=2, capacity_factor=None, gate_dropout=0.3)
    with torch.no_grad():
        r.weight.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(1))
    layout = TokenLayout(1, 4000)
    ev1, ev2 = r.eval()(x, layout), r(x, layout)
    assert torch.equal(ev1.indices, ev2.indices) and torch.equal(ev1.gates, ev2.gates) and (ev1.indices >= 0).all()
    train = r.train()(x, layout)
    dropped = train.indices < 0
    assert 0.27 < float(dropped.float().mean()) < 0.33
    assert (train.gates[dropped] == 0).all()
    assert torch.equal(train.indices[~dropped], ev1.indices[~dropped])
    torch.testing.assert_close(train.gates[~dropped], ev1.gates[~dropped] / 0.7)


def test_switch_balance_and_z_loss_by_hand_over_real_tokens():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [9.0, -9.0]])  # the 4th token is padding
    r = router(2, top_k=1, capacity_factor=None, aux_loss_weight=0.5, z_loss_weight=0.25)
    with torch.no_grad():
        r.weight.copy_(torch.nn.functional.pad(logits.T, (0, 4)))
    layout = TokenLayout(1, 4, torch.tensor([True, True, True, False]))
    out = r.train()(torch.eye(4, 8), layout)
    # probabilities [.7311 .2689], [.1192 .8808], [.8808 .1192]; top-1 assignments e0, e1, e0 -> f = (2/3, 1/3);
    # P = (.5770, .4230); balance = E * sum f P = 2 * (2/3 * .5770 + 1/3 * .4230) = 1.05135
    assert float(out.aux["balance"].detach()) == pytest.approx(0.5 * 1.0513463508, rel=1e-6)
    # logsumexp per token 1.31326, 2.12693, 3.12693; mean of squares = 5.34205
    assert float(out.aux["z"].detach()) == pytest.approx(0.25 * 5.3420526034, rel=1e-6)
    assert r.eval()(torch.eye(4, 8), layout).aux == {}


def test_padding_changes_no_routing_statistic_or_loss():
    r = router(4, top_k=2, capacity_factor=0.5, aux_loss_weight=1.0, z_loss_weight=1.0)
    with torch.no_grad():
        r.weight.normal_(generator=torch.Generator().manual_seed(2))
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    junk = torch.randn(3, 8) * 50
    results = []
    for inputs, mask in ((x, None), (torch.cat([junk, x]), torch.tensor([False] * 3 + [True] * 6))):
        r.reset_usage()
        out = r.train()(inputs, TokenLayout(1, inputs.shape[0], mask))
        results.append((out.aux["balance"], out.aux["z"], out.indices[-6:], out.gates[-6:], r.usage_tokens.clone(),
                        r.usage_probs.clone(), r.usage_entropy.clone(), r.usage_count.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **CLOSE)


def test_gradients_of_x_experts_and_router_match_a_dense_einsum_reference_with_the_same_drops(llama, monkeypatch):
    config = SiRAConfig(num_experts=4, top_k=2, rank=3, capacity_factor=0.4, gate_dropout=0.0, aux_loss_weight=0.3,
                        z_loss_weight=0.2)
    model = attach_router(fresh(llama), config)
    layer = model.model.layers[1].mlp.down_proj
    g = torch.Generator().manual_seed(0)
    make_trainable(layer, g)
    x = torch.randn(2, 5, layer.lora_A.shape[2], generator=g, requires_grad=True)  # (rows, L, in)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    probe = torch.randn(2, 5, layer.lora_B.shape[1], generator=g)
    slots = []
    original = lora_layer.grouped_lora_routed
    monkeypatch.setattr(lora_layer, "grouped_lora_routed",
                        lambda *a, **kw: slots.append(a[4].idx.shape[1]) or original(*a, **kw))
    y, out = run_layer(model, layer, x, mask)
    assert slots == [2]  # the op gets the k slots, not the E experts
    ((y * probe).sum() + sum(out.aux.values())).backward()

    real = mask.reshape(-1).bool()
    assert ((out.indices < 0) & real[:, None]).any()  # capacity 0.4 * 7 * 2 / 4 -> 2 per expert: pairs dropped
    xr = x.detach().reshape(10, -1).clone().requires_grad_()
    W, A, B = (t.detach().clone().requires_grad_() for t in (layer.router.weight, layer.lora_A, layer.lora_B))
    logits = xr @ W.T  # (T, E)
    probs = logits.softmax(-1)
    kept = torch.zeros(10, 4).scatter_add_(1, out.indices.clamp(min=0), (out.indices >= 0).float())
    G = probs * kept
    G = G / G.sum(-1, keepdim=True).clamp_min(1e-30)  # renormalized over the kept experts
    delta = torch.einsum("te,e,eor,eri,ti->to", G, layer.lora_scale, B, A, xr)  # every expert, gated densely
    y_ref = layer.base(xr) + delta
    f = torch.zeros(4).index_add_(0, probs[real].topk(2).indices.reshape(-1), torch.ones(14)) / 14
    balance = 0.3 * 4 * (f * probs[real].mean(0)).sum()
    z = 0.2 * (torch.logsumexp(logits[real], -1) ** 2).mean()
    ((y_ref * probe.reshape(10, -1)).sum() + balance + z).backward()
    torch.testing.assert_close(y.reshape(10, -1), y_ref, **CLOSE)
    torch.testing.assert_close(out.aux["balance"], balance, **CLOSE)
    torch.testing.assert_close(out.aux["z"], z, **CLOSE)
    assert_gradients_match(x, layer, xr, W, A, B, **CLOSE)


def test_default_targets_are_the_layer_stacks_linears_and_experts_may_differ_by_layer(llama):
    model = attach_router(fresh(llama), SiRAConfig(num_experts=[2, 3], rank=4))
    layers = {p: m for p, m in model.named_modules() if hasattr(m, "router")}
    assert {p.rsplit(".", 1)[1] for p in layers} == PROJECTIONS and len(layers) == 14  # no lm_head
    for path, layer in layers.items():
        own = 2 if ".layers.0." in path else 3
        assert layer.router.num_experts == own and layer.lora_A.shape[0] == 3
        assert layer.ranks == [4] * own + [0] * (3 - own)
        assert not layer.lora_B.any() and layer.lora_A[:own].abs().max() <= layer.lora_A.shape[2] ** -0.5
        assert float(layer.lora_scale[0]) == 16.0 / 4
    by_function = attach_router(fresh(llama), SiRAConfig(num_experts=lambda i: 2 + i, rank=4))
    assert next(m for m in by_function.modules() if hasattr(m, "router")).router.config.num_experts == (2, 3)
    for p, m in by_function.named_modules():
        if hasattr(m, "router"):
            torch.testing.assert_close(m.lora_A, layers[p].lora_A, atol=0, rtol=0)  # same seed, same experts
    with pytest.raises(RouterError, match="2 layers"):
        attach_router(fresh(llama), SiRAConfig(num_experts=[2, 3, 4]))
    with pytest.raises(RouterError, match="without experts="):
        attach_router(fresh(llama), SiRAConfig(), experts=[])
    only_mlp = attach_router(fresh(llama), SiRAConfig(target_modules=("up_proj", "down_proj")))
    assert {p.rsplit(".", 1)[1] for p, m in only_mlp.named_modules() if hasattr(m, "router")} == {"up_proj",
                                                                                                  "down_proj"}


@pytest.mark.parametrize("bad", [dict(top_k=0), dict(num_experts=0), dict(num_experts=[2, 0]), dict(gate_dropout=1.0),
                                 dict(capacity_factor=-1.0), dict(rank=0), dict(aux_loss_weight=-1.0),
                                 dict(target_modules=[]), dict(num_experts="8")])
def test_bad_configs_are_refused_by_name(bad):
    with pytest.raises(RouterError, match=next(iter(bad))):
        SiRAConfig(**bad)
