"""LoRAMoE: the localized balancing constraint by hand (typed, untyped, mixed examples; padding excluded), gradients
of x, experts and router against a dense einsum reference, expert groups validated, a disabled expert out of the
softmax, sample types on the routers within their block only; the planted breaks these tests were checked with."""

import pytest
import torch

from lorahub_engine.dispatch import TokenLayout
from routers import LoRAMoEConfig, RouterError, attach_router, sample_types
from routers.api import routers_of
from routers.loramoe import LoRAMoERouter, localized_balance_loss
from tests.routers.conftest import assert_gradients_match, fresh, make_trainable, one_hot_router, run_layer

CLOSE = {"atol": 1e-5, "rtol": 1e-5}
# 2 examples x 2 positions; example 1's first position is padding (with probabilities that would skew Q)
PROBS = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.97, 0.01, 0.01, 0.01], [0.7, 0.1, 0.1, 0.1]])
LAYOUT = TokenLayout(2, 2, torch.tensor([True, True, False, True]))
GROUPS = torch.tensor([0, 0, 1, 1])  # expert_groups (2, 2)


@pytest.mark.parametrize("types,expected", [
    # Q[:, 0] = (.5 .5 .5 .5), Q[:, 1] = (.7 .1 .1 .1). Type 0 / type 1 with delta .1:
    # Z = (.55 .55 .45 .45 | .63 .09 .11 .11): mean .3675, unbiased var .051249... -> var / mean^2 = .379472
    ([0, 1], 0.3794715165),
    ([0, -1], 0.4114285714),  # example 1 untyped: I = 1 -> Z = (.55 .55 .45 .45 | .7 .1 .1 .1)
    (None, 0.16),  # no types: CV^2 of importance (1.2 .6 .6 .6): var .09 / mean^2 .5625
])
def test_localized_balance_loss_by_hand(types, expected):
    t = None if types is None else torch.tensor(types)
    assert float(localized_balance_loss(PROBS, LAYOUT, t, GROUPS, 0.1)) == pytest.approx(expected, rel=1e-6)
    assert float(localized_balance_loss(PROBS, LAYOUT, None, None, 0.1)) == pytest.approx(0.16, rel=1e-6)


def test_the_router_applies_beta_in_training_only_and_computes_every_expert_of_real_tokens():
    config = LoRAMoEConfig(num_experts=4, balance_weight=0.1, balance_delta=0.1, expert_groups=(2, 2))
    r = one_hot_router(LoRAMoERouter(8, 4, config, seed=0), PROBS)
    r.sample_types = torch.tensor([0, 1])
    out = r.train()(torch.eye(4, 8), LAYOUT)
    assert float(out.aux["balance"].detach()) == pytest.approx(0.1 * 0.3794715165, rel=1e-6)
    assert out.indices.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [-1, -1, -1, -1], [0, 1, 2, 3]]
    torch.testing.assert_close(out.gates[[0, 1, 3]], PROBS[[0, 1, 3]], **CLOSE)
    assert r.usage_tokens.tolist() == [3, 3, 3, 3] and int(r.usage_count) == 3
    assert r.eval()(torch.eye(4, 8), LAYOUT).aux == {}
    r.sample_types = torch.tensor([0, 1, 0])
    with pytest.raises(RouterError, match="3 sample types"):
        r.train()(torch.eye(4, 8), LAYOUT)


def test_gradients_of_x_experts_and_router_match_a_dense_einsum_reference(llama):
    config = LoRAMoEConfig(num_experts=4, rank=3, target_modules=("gate_proj", "up_proj", "down_proj"),
                           balance_weight=0.5, balance_delta=0.2, expert_groups=(1, 3))
    model = attach_router(fresh(llama), config)
    layer = model.model.layers[0].mlp.up_proj
    g = torch.Generator().manual_seed(0)
    make_trainable(layer, g)
    x = torch.randn(2, 5, layer.lora_A.shape[2], generator=g, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    probe = torch.randn(2, 5, layer.lora_B.shape[1], generator=g)
    with sample_types(model, [1, 0]):
        y, out = run_layer(model, layer, x, mask)
    ((y * probe).sum() + out.aux["balance"]).backward()

    real = mask.reshape(-1).float()
    xr = x.detach().reshape(10, -1).clone().requires_grad_()
    W, A, B = (t.detach().clone().requires_grad_() for t in (layer.router.weight, layer.lora_A, layer.lora_B))
    probs = (xr @ W.T).softmax(-1)  # (T, E)
    G = probs * real[:, None]  # padding computes nothing
    y_ref = layer.base(xr) + torch.einsum("te,e,eor,eri,ti->to", G, layer.lora_scale, B, A, xr)
    Q = G.view(2, 5, 4).sum(1).T  # (E, M)
    I = torch.tensor([[0.8, 1.2], [1.2, 0.8], [1.2, 0.8], [1.2, 0.8]])  # expert 0 group 0; example 0 of type 1
    Z = I * Q
    balance = 0.5 * Z.var() / Z.mean() ** 2
    ((y_ref * probe.reshape(10, -1)).sum() + balance).backward()
    torch.testing.assert_close(y.reshape(10, -1), y_ref, **CLOSE)
    torch.testing.assert_close(out.aux["balance"], balance, **CLOSE)
    assert_gradients_match(x, layer, xr, W, A, B, **CLOSE)


def test_expert_groups_and_sample_types_are_validated(llama):
    with pytest.raises(RouterError, match="expert_groups"):
        LoRAMoEConfig(num_experts=6, expert_groups=(3, 2))
    with pytest.raises(RouterError, match="expert_groups"):
        LoRAMoEConfig(num_experts=[6, 4], expert_groups=(3, 3))
    with pytest.raises(RouterError, match="balance_delta"):
        LoRAMoEConfig(balance_delta=1.5)
    model = attach_router(fresh(llama), LoRAMoEConfig(num_experts=4, expert_groups=(2, 2)))
    with pytest.raises(RouterError, match="expert-group indices"):
        with sample_types(model, [0, 2]):
            pass


# Planted breaks (issue 13), each alone in the code; the tests that fail (* = only tests added with this check):
#   softmax over tokens, not experts                         beta, gradients, disabled expert
#   a disabled expert not masked out (LoRAMoE / SiRA)        * disabled expert (this file / test_sira)
#   SiRA gives a disabled expert a zero-gate slot            * test_sira's disabled expert
#   padding tokens compute their experts                     beta, gradients
#   padding counted in Q                                     by hand (all 3), gradients
#   Q's tokens summed column-major (rows mixed)              by hand (typed), beta, gradients
#   untyped: CV^2 of Q's entries, not of the importance      by hand
#   groups interleaved (0 1 0 1), not blocks                 gradients (beta's example is symmetric to it)
#   type matched to the expert index, not its group          by hand, beta, gradients
#   delta's sign; mismatches weighted 1, not 1 - delta       by hand, beta, gradients
#   untyped rows weighted like mismatches; type 0 untyped    by hand (mixed); by hand, gradients
#   CV^2: biased variance; / mean; std, not var              by hand, gradients
#   beta not applied; balance at inference too               beta, gradients; beta
#   gates detached; balance detached from the router         gradients
#   usage not counted                                        beta, disabled expert
#   sample type range off by one; per-layer counts vs groups validated
#   train_router: no types passed                            the types reach their rows, * Adam step
#   train_router: aux left out of the loss / summed, not averaged over layers          * Adam step
#   types left on the routers after sample_types' block      * types within their block
#   experts not trained                                      training moves experts, export
#   JSON expert_groups stay a list; load resets the balance settings       * save/load's config check
#   saved experts not loaded; exported experts reordered     save/load logits; export
#   router width = the bank's, not the layer's own experts   test_sira's per-layer experts
#   expert scale alpha, not alpha / rank                     gradients, test_sira's per-layer experts


def test_a_disabled_expert_gets_no_probability_and_no_pair_and_the_rest_renormalize():
    r = one_hot_router(LoRAMoERouter(8, 4, LoRAMoEConfig(num_experts=4), seed=0), PROBS)
    r.disabled[1] = True
    out = r.eval()(torch.eye(4, 8), LAYOUT)
    # the real tokens' probabilities without expert 1, over their sum: (.4 .2 .1) / .7, (.1 .3 .4) / .8, (.7 .1 .1) / .9
    expected = torch.tensor([[4 / 7, 0, 2 / 7, 1 / 7], [1 / 8, 0, 3 / 8, 4 / 8], [7 / 9, 0, 1 / 9, 1 / 9]])
    torch.testing.assert_close(out.probs[[0, 1, 3]], expected, **CLOSE)
    torch.testing.assert_close(out.gates[[0, 1, 3]], expected, **CLOSE)
    assert out.indices.tolist() == [[0, -1, 2, 3], [0, -1, 2, 3], [-1, -1, -1, -1], [0, -1, 2, 3]]
    assert r.usage_tokens.tolist() == [3, 0, 3, 3]


def test_sample_types_reach_every_router_within_the_block_only(llama):
    model = attach_router(fresh(llama), LoRAMoEConfig(num_experts=4, expert_groups=(2, 2)))
    routers = routers_of(model).values()
    with sample_types(model, [1, None, 0]):
        assert all(r.sample_types.tolist() == [1, -1, 0] for r in routers)
    # left behind, they would reach the balance of a later training forward (another batch: a RouterError)
    assert all(r.sample_types is None for r in routers)
    with sample_types(model, [None, None]):
        assert all(r.sample_types is None for r in routers)  # no typed row: the plain CV^2
