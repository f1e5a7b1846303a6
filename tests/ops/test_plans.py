"""The torch backend's cheap plans: routings the same for every token (UniformPlan), the compiled walk planned by one
device sort, and the op's no-grad path, each against the einsum reference (forward and the four gradients)."""

import pytest
import torch

from lorahub_engine.ops import grouped, grouped_lora, native, torch_backend
from lorahub_engine.ops.grouped import TokenRouting, grouped_lora_routed
from tests.ops.reference import grouped_lora_reference
from tests.ops.test_grouped_torch import (  # noqa: F401 (walk: a fixture)
    assert_adds_into_non_contiguous_out_and_takes_half, assert_matches_reference, make_case, walk)


def uniform_case(T, row, E=5, r=3, dtype=torch.float64, seed=0):
    """A case whose idx is one row expanded over T tokens (stride 0), per-token gates."""
    x, A, B, scale, _, gates = make_case(T, E, r, 11, 7, len(row), seed, dtype)
    return x, A, B, scale, torch.tensor([row]).expand(T, -1), gates


@pytest.mark.parametrize("T,row", [(1, [2]), (1, [0, 4, 0]), (1, [-1]), (1, [3, -1]), (9, [1]), (9, [4, 1, 4]),
                                   (9, [-1, 2]), (40, [-1, -1]), (300, [0])])
def test_uniform_routings_plan_one_matmul_and_match_reference(T, row):
    x, A, B, scale, idx, gates = uniform_case(T, row, seed=T + len(row))
    plan = torch_backend.plan(idx, A.shape[0])
    assert isinstance(plan, torch_backend.UniformPlan) and plan.walk(A.shape[1], x, A) == "uniform"
    assert_matches_reference(x, A, B, scale, idx, gates)


def test_uniform_routing_adds_into_out_and_takes_half_inputs():
    x, A, B, scale, idx, gates = uniform_case(6, [1, 3], dtype=torch.float32, seed=3)
    assert_adds_into_non_contiguous_out_and_takes_half(x, A, B, scale, idx, gates)


def test_materialized_equal_rows_take_the_general_plan_with_the_same_result():
    x, A, B, scale, idx, gates = uniform_case(20, [2, 0], seed=4)
    dense = idx.contiguous()  # the same routing, not known to be uniform without reading it
    assert isinstance(torch_backend.plan(dense, 5), torch_backend.SegmentPlan)
    torch.testing.assert_close(grouped_lora(x, A, B, scale, dense, gates, backend="torch"),
                               grouped_lora(x, A, B, scale, idx, gates, backend="torch"))


@pytest.mark.parametrize("T,k", [(3, 2), (200, 2)])  # one tile; several tiles (B^T copied once)
def test_compiled_walk_plans_without_host_side_segments(T, k, walk):
    if walk != "native":
        pytest.skip("the compiled walk only")
    x, A, B, scale, idx, gates = make_case(T, 6, 4, 40, 24, k, seed=T, dtype=torch.float32, none_share=0.3)
    routing = TokenRouting(idx, gates)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    out = grouped_lora_routed(*leaves, scale, routing, "torch")
    plan = routing.plan(torch_backend, 6)
    assert plan.walk(A.shape[1], x, A) == "compiled" and "sorted" not in vars(plan) and plan.runs is None
    refs = [t.double().requires_grad_() for t in (x, A, B)]  # fp64: the fp32 sums' rounding is ours alone
    ref = grouped_lora_reference(*refs, scale.double(), idx, gates.double())
    torch.testing.assert_close(out, ref.float())
    out.square().sum().backward()
    ref.square().sum().backward()
    for mine, theirs in zip(leaves, refs):  # sums of ~200 fp32 terms: errors relative to the gradient's size
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-4, atol=1e-5 * theirs.grad.abs().max())


@pytest.mark.parametrize("row_case", [True, False])
def test_no_grad_path_runs_outside_autograd_with_the_same_result(row_case):
    x, A, B, scale, idx, gates = uniform_case(7, [2]) if row_case else make_case(7, 4, 3, 11, 7, 2, seed=5)
    A.requires_grad_()
    with torch.no_grad():
        out = grouped_lora(x, A, B, scale, idx, gates, backend="torch")
    assert out.grad_fn is None
    plain = grouped_lora(x, A.detach(), B, scale, idx, gates, backend="torch")  # grad mode, nothing requires grad
    assert plain.grad_fn is None
    ref = grouped_lora_reference(x, A.detach(), B, scale, idx, gates)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(plain, ref)


def test_a_shared_routing_follows_its_gates_changed_in_place():
    x, A, B, scale, idx, gates = make_case(10, 4, 3, 11, 7, 2, seed=6)
    routing = TokenRouting(idx, gates)
    first = grouped_lora_routed(x, A, B, scale, routing, "torch")
    torch.testing.assert_close(first, grouped_lora_reference(x, A, B, scale, idx, gates))
    gates.mul_(3.0)
    torch.testing.assert_close(grouped_lora_routed(x, A, B, scale, routing, "torch"),
                               grouped_lora_reference(x, A, B, scale, idx, gates))


def test_strided_and_contiguous_weight_reads_agree(walk):
    """The compiled expand reads B transposed in place or a contiguous B^T: the same sums."""
    if walk != "native":
        pytest.skip("the compiled walk only")
    g = torch.Generator().manual_seed(7)
    T, E, r, m = 37, 5, 9, 70
    idx = torch.randint(-1, E, (T, 2), generator=g)
    plan = torch_backend.SegmentPlan(idx, E)
    pair, token, expert = plan.tiled
    u, coef = torch.randn(T * 2, r, generator=g), torch.rand(T * 2, generator=g)
    B = torch.randn(E, m, r, generator=g)
    outs = [torch.zeros(T, m) for _ in range(2)]
    native.expand(u, coef, B.transpose(1, 2), expert, token, pair, 128, outs[0])
    native.expand(u, coef, B.transpose(1, 2).contiguous(), expert, token, pair, 128, outs[1])
    expected = torch.zeros(T, m)
    for p, e in enumerate(idx.reshape(-1).tolist()):
        if e >= 0:
            expected[p // 2] += coef[p] * B[e] @ u[p]
    torch.testing.assert_close(outs[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,expert", [(1, 2), (7, 4), (7, -1)])
@pytest.mark.parametrize("with_out", [False, True])
def test_one_expert_folds_its_coefficient_into_the_matmul_and_matches_einsum(dtype, T, expert, with_out):
    """One expert for every token, one gate for all (a row expanded over T tokens, stride 0): the coefficient is a
    float (alpha of the matmul) on the CPU; the result against the einsum reference, with and without `out`, in a
    bank that is an nn.Parameter, and again after the bank and the scales change in place."""
    x, A, B, scale, _, _ = make_case(T, 5, 3, 11, 7, 1, seed=T, dtype=dtype)
    A, B = torch.nn.Parameter(A, requires_grad=False), torch.nn.Parameter(B, requires_grad=False)
    idx, gates = torch.tensor([[expert]]).expand(T, -1), torch.tensor([[0.7]]).expand(T, -1)
    routing = TokenRouting(idx, gates)
    expected = 0.0 if expert < 0 else 0.7 * float(scale[expert])
    assert routing.uniform_coefficients(scale) == pytest.approx((expected,))
    assert routing.plan(torch_backend, 5).float_coefficients
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else {}
    for _ in range(2):  # the second time: the same routing over a bank and scales changed in place
        base = torch.randn(T, 7, dtype=torch.float64).to(dtype)
        ref = grouped_lora_reference(x.double(), A.double(), B.double(), scale.double(), idx, gates.double())
        out = grouped_lora_routed(x, A, B, scale, routing, "torch", out=base.clone() if with_out else None)
        torch.testing.assert_close(out, (ref + (base.double() if with_out else 0)).to(dtype), **tol)
        with torch.no_grad():
            B.mul_(2)
            scale.mul_(0.5)  # read per call: the coefficient follows


def test_coefficients_are_computed_once_per_scale_and_follow_in_place_changes(monkeypatch):
    """One product per (routing, scale tensor), against gates * scale[idx] by hand; a scale or the gates changed in
    place, or another scale tensor with the same values, give their own; above KEPT_PAIRS pairs none is kept."""
    idx, gates = torch.tensor([[0, 2], [1, -1], [2, 0]]), torch.tensor([[0.5, 1.0], [2.0, 3.0], [0.25, 4.0]])
    scale = torch.tensor([1.0, 10.0, 100.0])
    routing = TokenRouting(idx, gates)

    def by_hand():
        return torch.tensor([g * float(scale[e]) if e >= 0 else 0.0
                             for e, g in zip(idx.reshape(-1).tolist(), gates.reshape(-1).tolist())])

    first = routing.coefficients(scale)
    torch.testing.assert_close(first, by_hand(), atol=0, rtol=0)
    assert routing.coefficients(scale) is first
    assert routing.coefficients(scale.clone()) is not first  # another tensor: its own product
    scale.mul_(2)
    torch.testing.assert_close(routing.coefficients(scale), by_hand(), atol=0, rtol=0)
    gates.mul_(3)
    torch.testing.assert_close(routing.coefficients(scale), by_hand(), atol=0, rtol=0)
    monkeypatch.setattr(grouped, "KEPT_PAIRS", 5)  # 6 pairs
    assert routing.coefficients(scale) is not routing.coefficients(scale)


def test_a_uniform_routing_binds_each_bank_once_and_rebinds_when_the_coefficients_change():
    """One token, one expert: each layer's bank is bound once (views and float coefficients), kept while the gates
    and its scale are unchanged; another bank gets its own, a scale or gates changed in place a new one."""
    _, A, B, scale, _, _ = make_case(1, 3, 2, 5, 4, 1, seed=0, dtype=torch.float32)
    gates = torch.tensor([[0.5]])
    routing = TokenRouting(torch.tensor([[2]]), gates)
    plan = routing.plan(torch_backend, 3)
    first = routing.bound(plan, A, B, scale)
    assert routing.bound(plan, A, B, scale) is first
    assert first.slots[0][2] == pytest.approx(0.5 * float(scale[2]))
    assert routing.bound(plan, A.clone(), B, scale) is not first
    scale.mul_(2)
    assert routing.bound(plan, A, B, scale).slots[0][2] == pytest.approx(0.5 * float(scale[2]))
    gates.mul_(3)
    assert routing.bound(plan, A, B, scale).slots[0][2] == pytest.approx(1.5 * float(scale[2]))
    per_token = TokenRouting(torch.tensor([[0], [2]]))
    assert per_token.bound(per_token.plan(torch_backend, 3), A, B, scale) is None  # per token: no floats


def test_per_token_gates_keep_the_tensor_coefficients():
    idx = torch.tensor([[1]]).expand(4, -1)
    assert TokenRouting(idx, torch.rand(4, 1)).uniform_coefficients(torch.ones(3)) is None  # gates differ per token
    rows = TokenRouting(torch.tensor([[0, 1]]).expand(4, -1), torch.tensor([[0.5, 2.0]]).expand(4, -1))
    assert rows.uniform_coefficients(torch.ones(3)) == (0.5, 2.0)
    assert not rows.plan(torch_backend, 3).float_coefficients  # 4 tokens, 2 experts: one matmul with B^T side by side
    wide = TokenRouting(torch.arange(torch_backend.FLOAT_SLOTS + 1)[None, :])  # one token, more experts than that
    assert not wide.plan(torch_backend, torch_backend.FLOAT_SLOTS + 1).float_coefficients


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("row", [[3, 0], [1, -1, 4], [2, 2, 0, 1]])
@pytest.mark.parametrize("with_out", [False, True])
def test_one_token_of_a_few_experts_takes_float_coefficients_and_matches_einsum(dtype, row, with_out):
    """One token routed to k <= FLOAT_SLOTS experts (a router's top-k in decoding): one matmul per slot on views of
    the bank with its coefficient as alpha (a slot without an expert adds nothing; an expert in two slots twice),
    in fp32 and into an fp16 output (scaled in fp32, then cast); against the einsum reference."""
    x, A, B, scale, _, _ = make_case(1, 5, 3, 11, 7, len(row), seed=len(row), dtype=dtype)
    idx, gates = torch.tensor([row]), torch.rand(1, len(row), dtype=dtype) + 0.5
    routing = TokenRouting(idx, gates)
    assert routing.plan(torch_backend, 5).float_coefficients
    assert routing.uniform_coefficients(scale) == pytest.approx(
        tuple(0.0 if e < 0 else float(gates[0, j]) * float(scale[e]) for j, e in enumerate(row)), rel=1e-3)
    base = torch.randn(1, 7, dtype=torch.float64).to(dtype)
    ref = grouped_lora_reference(x.double(), A.double(), B.double(), scale.double(), idx, gates.double())
    out = grouped_lora_routed(x, A, B, scale, routing, "torch", out=base.clone() if with_out else None)
    expected = ref + (base.double() if with_out else 0)
    # fp16: each slot's product rounded to fp16 before the sum of up to 4; errors relative to the largest output
    tol = dict(rtol=2e-3, atol=2e-3 * float(expected.abs().max())) if dtype == torch.float16 else {}
    torch.testing.assert_close(out, expected.to(dtype), **tol)


@pytest.mark.parametrize("E,r,k,T,walk_name", [(16, 8, 2, 32, "dense"), (8, 8, 1, 64, "dense"), (32, 4, 3, 40, "dense"),
                                               (16, 8, 2, 31, "compiled"), (16, 8, 1, 64, "compiled"),
                                               (17, 8, 2, 32, "compiled")])
def test_narrow_banks_walk_densely_by_default(E, r, k, T, walk_name, monkeypatch, one_thread):
    """E * r <= 64 * k columns and T * k >= 64 pairs (one thread): the whole bank as one matmul; wider banks and fewer
    pairs walk the pairs."""
    monkeypatch.setattr(torch_backend, "DENSE_COLUMNS_PER_SLOT", 64)
    monkeypatch.setattr(torch_backend, "DENSE_MIN_PAIRS", 64)
    x, A, B, scale, idx, gates = make_case(T, E, r, 12, 9, k, seed=E, dtype=torch.float32)
    plan = torch_backend.plan(idx, E)
    expected = walk_name if native.supports(x, A) or walk_name == "dense" else plan.torch_walk
    assert plan.walk(r, x, A) == expected
    assert_matches_reference(x, A, B, scale, idx, gates)


@pytest.mark.parametrize("E,walk_name", [(8, "dense"), (16, "compiled")])
def test_the_walk_does_not_depend_on_the_thread_count(E, walk_name, monkeypatch):
    """The compiled kernels split their work across torch's threads as the dense walk's matmuls do: a bank walks the
    same way at 1, 2 and 4 threads (64 columns per slot: 8 experts of rank 8 densely, 16 by their pairs)."""
    x, A, B, scale, idx, gates = make_case(64, E, 8, 12, 9, 1, seed=5, dtype=torch.float32)
    monkeypatch.setattr(torch_backend, "DENSE_COLUMNS_PER_SLOT", 64)
    monkeypatch.setattr(torch_backend, "DENSE_MIN_PAIRS", 64)
    plan, threads = torch_backend.plan(idx, E), torch.get_num_threads()
    try:
        walks = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            walks.append(plan.walk(8, x, A))
    finally:
        torch.set_num_threads(threads)
    expected = walk_name if native.supports(x, A) or walk_name == "dense" else plan.torch_walk
    assert walks == [expected] * 3
