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
