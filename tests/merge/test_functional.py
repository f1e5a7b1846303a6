"""The pure tensor functions against hand-computed values and properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorahub_engine.merge import functional
from lorahub_engine.merge.functional import (
    combine,
    dare_keep,
    disjoint_mean,
    keep_count,
    magnitude_keep,
    majority_sign,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), density=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_magnitude_keep_keeps_the_round_density_largest(rows, cols, density, seed):
    task = torch.randn(rows, cols, generator=gen(seed))
    kept = magnitude_keep(task, density)
    keep = round(density * rows * cols)
    assert kept.dtype == torch.bool and int(kept.sum()) == keep
    if 0 < keep < task.numel():
        assert task[kept].abs().min() >= task[~kept].abs().max()


def test_keep_count_rounds_instead_of_truncating():
    assert keep_count(0.29, 100) == 29  # PEFT's int(0.29 * 100) is 28
    assert keep_count(0.2, 7) == 1 and keep_count(1.0, 7) == 7


def test_magnitude_keep_hand_example():
    task = torch.tensor([[3.0, -1.0], [0.5, -4.0]])
    assert magnitude_keep(task, 0.5).tolist() == [[True, False], [False, True]]


def test_dare_keep_density_one_keeps_all_and_is_seeded():
    x = torch.randn(5, 7, generator=gen(1))
    assert dare_keep(x, 1.0, gen(0)).all()
    assert torch.equal(dare_keep(x, 0.3, gen(5)), dare_keep(x, 0.3, gen(5)))
    assert not torch.equal(dare_keep(x, 0.3, gen(5)), dare_keep(x, 0.3, gen(6)))


def dare(tasks, density, seed):
    return combine(lambda i, r: tasks[i, r], len(tasks), tasks.shape[1], torch.ones(len(tasks)), keep=dare_keep,
                   rescale=True, consensus=None, density=density, generator=gen(seed))


def test_dare_statistics():
    """Survivors are x / density; the kept share is binomial(density); the mean over draws is unbiased."""
    density, x = 0.3, torch.full((1, 200_000), 2.0)
    out = dare(x, density, 3)
    assert set(out.unique().tolist()) <= {0.0, torch.tensor(2.0 / density).item()}
    share = (out != 0).float().mean().item()
    assert abs(share - density) < 5 * (density * (1 - density) / x.numel()) ** 0.5
    y = torch.randn(1, 64, generator=gen(4))
    draws = torch.stack([dare(y, density, s) for s in range(2000)])
    sd = y[0].abs() * ((1 - density) / density / len(draws)) ** 0.5
    assert ((draws.mean(0) - y[0]).abs() <= 5 * sd + 1e-6).all()


def test_majority_sign_hand_example():
    tasks = torch.tensor([[1.0, -2.0, 0.0, 1.0], [-3.0, 1.0, 0.0, 1.0], [1.0, 0.5, 0.0, -5.0]])
    assert majority_sign(tasks, "total").tolist() == [-1.0, -1.0, 1.0, -1.0]  # mass -1, -0.5, 0 (tie: +1), -3
    assert majority_sign(tasks, "frequency").tolist() == [1.0, 1.0, 1.0, 1.0]  # signs +1, +1, 0, +1


def test_disjoint_mean_hand_example():
    weighted = torch.tensor([[2.0, -1.0, 0.0], [4.0, 3.0, 0.0], [-6.0, 5.0, 0.0]])
    agree = torch.tensor([[True, False, False], [True, True, False], [False, True, False]])
    assert disjoint_mean(weighted, agree).tolist() == [3.0, 4.0, 0.0]


def ties(tasks, weights, density, consensus="total"):
    return combine(lambda i, r: tasks[i, r], len(tasks), tasks.shape[1], weights, keep=magnitude_keep,
                   rescale=False, consensus=consensus, density=density, generator=gen())


def test_combine_ties_hand_example():
    """TIES by hand: trim to 2 of 3 per task, elect by total mass, weight, disjoint mean."""
    tasks = torch.tensor([[3.0, -1.0, 2.0], [-1.0, -4.0, 0.5], [2.0, 1.0, -3.0]])
    # trimmed: [3, 0, 2], [-1, -4, 0], [2, 0, -3]; mass [4, -4, -1] -> signs [+, -, -]
    weights = torch.tensor([1.0, 0.5, 2.0])
    # agreeing weighted entries: col 0: 3, 4 -> 3.5; col 1: -2 -> -2; col 2: -6 -> -6
    assert ties(tasks, weights, 2 / 3).tolist() == [3.5, -2.0, -6.0]


@pytest.mark.parametrize("keep,rescale", [(None, False), (magnitude_keep, False), (dare_keep, True)])
def test_combine_without_consensus_is_the_weighted_sum_at_density_one(keep, rescale):
    tasks, weights = torch.randn(3, 4, 5, generator=gen(2)), torch.tensor([0.5, -1.0, 2.0])
    out = combine(lambda i, r: tasks[i, r], 3, 4, weights, keep=keep, rescale=rescale, consensus=None, density=1.0,
                  generator=gen())
    torch.testing.assert_close(out, torch.einsum("n,nij->ij", weights, tasks))


def test_combine_blocks_do_not_change_the_result(monkeypatch):
    """Row blocks are an implementation detail: one row per block gives the same TIES as one block."""
    tasks, weights = torch.randn(4, 9, 6, generator=gen(3)), torch.tensor([1.0, -0.5, 0.7, 2.0])
    whole = ties(tasks, weights, 0.4)
    monkeypatch.setattr(functional, "BLOCK_ELEMENTS", 1)
    torch.testing.assert_close(ties(tasks, weights, 0.4), whole, atol=0, rtol=0)
