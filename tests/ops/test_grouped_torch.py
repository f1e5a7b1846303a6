import pytest
import torch

from lorahub_engine.ops import grouped_lora
from lorahub_engine.ops.grouped import TokenRouting, grouped_lora_routed
from tests.ops.reference import grouped_lora_reference


def make_case(T, E, r, d_in, d_out, k, seed, dtype=torch.float64, none_share=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g, dtype=dtype)
    A = torch.randn(E, r, d_in, generator=g, dtype=dtype)
    B = torch.randn(E, d_out, r, generator=g, dtype=dtype)
    scale = torch.rand(E, generator=g, dtype=dtype) + 0.5
    idx = torch.randint(0, E, (T, k), generator=g)
    idx[torch.rand(T, k, generator=g) < none_share] = -1
    gates = torch.rand(T, k, generator=g, dtype=dtype)
    return x, A, B, scale, idx, gates


@pytest.mark.parametrize("T,E,r,k", [(1, 1, 1, 1), (37, 5, 3, 2), (64, 16, 8, 4), (19, 3, 16, 3)])
def test_matches_reference_forward_and_grads(T, E, r, k):
    x, A, B, scale, idx, gates = make_case(T, E, r, 11, 7, k, seed=T + E)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    ours = grouped_lora(leaves[0], leaves[1], leaves[2], scale, idx, leaves[3], backend="torch")
    refs = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    ref = grouped_lora_reference(refs[0], refs[1], refs[2], scale, idx, refs[3])
    torch.testing.assert_close(ours, ref)
    grad_out = torch.randn_like(ref)
    ours.backward(grad_out)
    ref.backward(grad_out)
    for mine, theirs in zip(leaves, refs):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_all_none_gives_zero_and_zero_grads():
    x, A, B, scale, idx, gates = make_case(9, 4, 2, 5, 6, 2, seed=0)
    idx.fill_(-1)
    A.requires_grad_()
    out = grouped_lora(x, A, B, scale, idx, gates, backend="torch")
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert torch.count_nonzero(A.grad) == 0


def test_one_expert_takes_every_token_equals_plain_lora():
    x, A, B, scale, _, _ = make_case(13, 3, 4, 8, 5, 1, seed=1)
    idx = torch.full((13, 1), 2)
    out = grouped_lora(x, A, B, scale, idx, backend="torch")
    torch.testing.assert_close(out, scale[2] * x @ A[2].T @ B[2].T)


def test_float32_inputs_keep_dtype():
    x, A, B, scale, idx, gates = make_case(8, 2, 2, 4, 4, 2, seed=2, dtype=torch.float32)
    assert grouped_lora(x, A, B, scale, idx, gates, backend="torch").dtype == torch.float32


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(idx=torch.full((4, 1), 7)), "idx values"),
        (lambda c: c.update(gates=torch.ones(4, 2)), "gates must match"),
        (lambda c: c.update(scale=torch.ones(5)), "scale must have shape"),
        (lambda c: c.update(x=torch.randn(4, 3, dtype=torch.float64)), "do not chain"),
        (lambda c: c.update(backend="cuda"), "backend must be"),
    ],
)
def test_bad_input_is_rejected(mutate, message):
    x, A, B, scale, idx, gates = make_case(4, 2, 2, 6, 3, 1, seed=3)
    case = dict(x=x, A=A, B=B, scale=scale, idx=idx, gates=gates, backend="torch")
    mutate(case)
    with pytest.raises(ValueError, match=message):
        grouped_lora(**case)


def test_out_accumulates_in_place_and_passes_gradients_through_a_view():
    x, A, B, scale, idx, gates = make_case(12, 3, 2, 5, 4, 2, seed=4)
    W = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    base = (leaves[0] @ W.T).view(3, 4, 4)  # a layer's output: the delta goes into its flattened view
    out = grouped_lora_routed(leaves[0], leaves[1], leaves[2], scale, TokenRouting(idx, gates), "torch",
                              out=base.view(12, 4))
    refs = [t.clone().requires_grad_() for t in (x, A, B)]
    ref = refs[0] @ W.T.detach() + grouped_lora_reference(refs[0], refs[1], refs[2], scale, idx, gates)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    base.backward(grad.view(3, 4, 4))
    ref.backward(grad)
    for mine, theirs in zip(leaves, refs):
        torch.testing.assert_close(mine.grad, theirs.grad)
