"""The pure tensor functions against hand-computed values and properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorahub_engine.merge.functional import (
    combine,
    dare_drop,
    disjoint_mean,
    keep_count,
    magnitude_prune,
    majority_sign,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), rows=st.integers(1, 9), cols=st.integers(1, 9), density=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**16))
def test_magnitude_prune_keeps_the_round_density_largest(n, rows, cols, density, seed):
    tasks = torch.randn(n, rows, cols, generator=gen(seed))
    pruned = magnitude_prune(tasks, density)
    keep = round(density * rows * cols)
    for t, p in zip(tasks, pruned):
        kept = p != 0
        assert int(kept.sum()) == keep
        assert torch.equal(p[kept], t[kept])  # survivors untouched
        if 0 < keep < t.numel():
            assert t[kept].abs().min() >= t[~kept].abs().max()


def test_keep_count_rounds_instead_of_truncating():
    assert keep_count(0.29, 100) == 29  # PEFT's int(0.29 * 100) is 28
    assert keep_count(0.2, 7) == 1 and keep_count(1.0, 7) == 7


def test_magnitude_prune_hand_example():
    tasks = torch.tensor([[[3.0, -1.0], [0.5, -4.0]]])
    assert torch.equal(magnitude_prune(tasks, 0.5), torch.tensor([[[3.0, 0.0], [0.0, -4.0]]]))


def test_dare_drop_density_one_is_identity_and_seeded():
    x = torch.randn(3, 5, 7, generator=gen(1))
    assert torch.equal(dare_drop(x, 1.0, gen(0)), x)
    assert torch.equal(dare_drop(x, 0.3, gen(5)), dare_drop(x, 0.3, gen(5)))
    assert not torch.equal(dare_drop(x, 0.3, gen(5)), dare_drop(x, 0.3, gen(6)))


def test_dare_drop_statistics():
    """Survivors are x / density; the kept share is binomial(density); the mean over draws is unbiased."""
    density, x = 0.3, torch.full((200_000,), 2.0)
    out = dare_drop(x, density, gen(3))
    assert set(out.unique().tolist()) <= {0.0, torch.tensor(2.0 / density).item()}
    share = (out != 0).float().mean().item()
    assert abs(share - density) < 5 * (density * (1 - density) / x.numel()) ** 0.5
    y = torch.randn(64, generator=gen(4))
    draws = torch.stack([dare_drop(y, density, gen(s)) for s in range(2000)])
    sd = y.abs() * ((1 - density) / density / len(draws)) ** 0.5
    assert ((draws.mean(0) - y).abs() <= 5 * sd + 1e-6).all()


def test_majority_sign_hand_example():
    tasks = torch.tensor([[1.0, -2.0, 0.0, 1.0], [-3.0, 1.0, 0.0, 1.0], [1.0, 0.5, 0.0, -5.0]])
    assert majority_sign(tasks, "total").tolist() == [-1.0, -1.0, 1.0, -1.0]  # mass -1, -0.5, 0 (tie: +1), -3
    assert majority_sign(tasks, "frequency").tolist() == [1.0, 1.0, 1.0, 1.0]  # signs +1, +1, 0, +1


def test_disjoint_mean_hand_example():
    weighted = torch.tensor([[2.0, -1.0, 0.0], [4.0, 3.0, 0.0], [-6.0, 5.0, 0.0]])
    agree = torch.tensor([[True, False, False], [True, True, False], [False, True, False]])
    assert disjoint_mean(weighted, agree).tolist() == [3.0, 4.0, 0.0]


def test_combine_ties_hand_example():
    """TIES by hand: trim to 2 of 3 per task, elect by total mass, weight, disjoint mean."""
    tasks = torch.tensor([[3.0, -1.0, 2.0], [-1.0, -4.0, 0.5], [2.0, 1.0, -3.0]])
    # trimmed: [3, 0, 2], [-1, -4, 0], [2, 0, -3]; mass [4, -4, -1] -> signs [+, -, -]
    weights = torch.tensor([1.0, 0.5, 2.0])
    # agreeing weighted entries: col 0: 3, 4 -> 3.5; col 1: -2 -> -2; col 2: -6 -> -6
    out = combine(tasks, weights, sparsify=magnitude_prune, consensus="total", density=2 / 3, generator=gen())
    assert out.tolist() == [3.5, -2.0, -6.0]


@pytest.mark.parametrize("sparsify", [None, magnitude_prune, dare_drop])
def test_combine_without_consensus_is_the_weighted_sum_at_density_one(sparsify):
    tasks, weights = torch.randn(3, 4, 5, generator=gen(2)), torch.tensor([0.5, -1.0, 2.0])
    out = combine(tasks, weights, sparsify=sparsify, consensus=None, density=1.0, generator=gen())
    torch.testing.assert_close(out, torch.einsum("n,nij->ij", weights, tasks))
