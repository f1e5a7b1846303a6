"""The Triton backend against the einsum reference (run by TRITON_INTERPRET=1 from tests/conftest.py on CPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorahub_engine.ops import grouped_lora, torch_backend, triton_backend
from tests.cuda_sync import assert_never_syncs
from tests.ops.reference import grouped_lora_reference
from tests.ops.test_grouped_torch import make_case

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}


def run_both(x, A, B, scale, idx, gates):
    """Triton output and grads of (x, A, B, gates), and the fp64 reference's on the same (rounded) inputs."""
    ours = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    refs = [t.detach().double().requires_grad_() for t in (x, A, B, gates)]
    out = grouped_lora(ours[0], ours[1], ours[2], scale, idx, ours[3], backend="triton")
    ref = grouped_lora_reference(refs[0], refs[1], refs[2], scale.double(), idx, refs[3])
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)
    return out, ref, [t.grad for t in ours], [t.grad for t in refs]


def assert_close_scaled(mine, theirs, dtype):
    """Half precision is compared relative to the tensor's magnitude (its rounding error scales with it)."""
    scale = theirs.abs().max().clamp(min=1.0) if dtype == torch.float16 else 1.0
    torch.testing.assert_close(mine.double() / scale, theirs / scale, **TOL[dtype])


@pytest.mark.parametrize(
    "T,E,r,k,d_in,d_out,dtype",
    [
        (1, 1, 1, 1, 5, 3, torch.float32),
        (37, 5, 3, 2, 11, 7, torch.float32),  # T and every dim off the block sizes
        (70, 16, 8, 4, 40, 33, torch.float32),
        (19, 3, 16, 3, 17, 40, torch.float32),
        (53, 4, 8, 1, 24, 20, torch.float16),
        (29, 6, 3, 2, 9, 13, torch.float16),
        (64, 2, 16, 4, 32, 16, torch.float16),
    ],
)
def test_matches_reference_forward_and_grads(T, E, r, k, d_in, d_out, dtype):
    case = make_case(T, E, r, d_in, d_out, k, seed=T + E + r, dtype=dtype)
    out, ref, grads, ref_grads = run_both(*case)
    assert out.dtype == dtype
    assert_close_scaled(out, ref, dtype)
    for mine, theirs in zip(grads, ref_grads):
        assert_close_scaled(mine, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rank_major_bank_is_read_in_place_and_matches_reference(dtype, monkeypatch):
    """B stored rank-major, as attach stores a bank (a transposed view of [E, r, out]): the expand reads it in place,
    no copy, and output and gradients match the reference as for a contiguous B."""
    x, A, B, scale, idx, gates = make_case(37, 5, 8, 11, 24, 2, seed=11, dtype=dtype)
    B = B.transpose(1, 2).contiguous().transpose(1, 2)  # (E, out, r), rank-major
    copies = []
    contiguous = torch.Tensor.contiguous

    def spy(t, *args, **kwargs):
        if not t.is_contiguous():  # a real copy
            copies.append(tuple(t.shape))
        return contiguous(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    out, ref, grads, ref_grads = run_both(x, A, B, scale, idx, gates)
    assert (5, 24, 8) not in copies and (5, 8, 24) not in copies  # neither B (forward) nor B^T (backward) copied
    assert_close_scaled(out, ref, dtype)
    for mine, theirs in zip(grads, ref_grads):
        assert_close_scaled(mine, theirs, dtype)


def test_rank_over_one_tile_and_many_experts():
    """r = 80 needs two rank tiles (shrink) and a rank loop (expand); E = 256 with few tokens leaves most empty."""
    case = make_case(20, 256, 80, 12, 9, 2, seed=7, dtype=torch.float32)
    out, ref, grads, ref_grads = run_both(*case)
    assert_close_scaled(out, ref, torch.float32)
    for mine, theirs in zip(grads, ref_grads):
        assert_close_scaled(mine, theirs, torch.float32)


def test_empty_experts_get_zero_weight_grads():
    x, A, B, scale, idx, gates = make_case(41, 8, 3, 10, 6, 2, seed=3, dtype=torch.float32, none_share=0.0)
    idx = torch.where(idx % 2 == 0, 0, 5)  # only experts 0 and 5 are used
    out, ref, grads, ref_grads = run_both(x, A, B, scale, idx, gates)
    assert_close_scaled(out, ref, torch.float32)
    unused = [1, 2, 3, 4, 6, 7]
    assert torch.count_nonzero(grads[1][unused]) == 0 and torch.count_nonzero(grads[2][unused]) == 0
    for mine, theirs in zip(grads, ref_grads):
        assert_close_scaled(mine, theirs, torch.float32)


def test_all_none_gives_zero_and_zero_grads():
    x, A, B, scale, idx, gates = make_case(23, 4, 2, 5, 6, 3, seed=0, dtype=torch.float32)
    out, _, grads, _ = run_both(x, A, B, scale, torch.full_like(idx, -1), gates)
    assert torch.count_nonzero(out) == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_one_expert_takes_every_token_equals_plain_lora():
    x, A, B, scale, _, _ = make_case(67, 3, 4, 8, 5, 1, seed=1, dtype=torch.float32)
    out = grouped_lora(x, A, B, scale, torch.full((67, 1), 2), backend="triton")
    torch.testing.assert_close(out, scale[2] * x @ A[2].T @ B[2].T, **TOL[torch.float32])


def test_mixed_ranks_by_zero_padding_equal_each_adapter_alone():
    g = torch.Generator().manual_seed(4)
    ranks, d_in, d_out, T = [1, 3, 8], 12, 10, 30
    As = [torch.randn(r, d_in, generator=g) for r in ranks]
    Bs = [torch.randn(d_out, r, generator=g) for r in ranks]
    A = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, 8 - a.shape[0])) for a in As])  # (E, 8, in)
    B = torch.stack([torch.nn.functional.pad(b, (0, 8 - b.shape[1])) for b in Bs])  # (E, out, 8)
    x = torch.randn(T, d_in, generator=g)
    idx = torch.randint(0, 3, (T, 1), generator=g)
    scale = torch.tensor([0.5, 1.0, 2.0])
    out = grouped_lora(x, A, B, scale, idx, backend="triton")
    expected = torch.stack([scale[e] * Bs[e] @ As[e] @ x[t] for t, e in enumerate(idx[:, 0].tolist())])
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_backend_functions_match_torch_backend():
    """The protocol functions one by one, including outer's per-expert sums, against the CPU backend."""
    x, A, B, scale, idx, gates = make_case(45, 6, 5, 14, 9, 3, seed=9, dtype=torch.float32)
    left = torch.randn(45 * 3, 5, generator=torch.Generator().manual_seed(1))
    coef = torch.rand(45 * 3, generator=torch.Generator().manual_seed(2))
    ours, ref = triton_backend.plan(idx, 6), torch_backend.plan(idx, 6)
    u_ours, u_ref = triton_backend.shrink(x, A, ours), torch_backend.shrink(x, A, ref)
    torch.testing.assert_close(u_ours, u_ref, **TOL[torch.float32])
    start = torch.randn(45, 9, generator=torch.Generator().manual_seed(3))  # expand adds into its output
    torch.testing.assert_close(triton_backend.expand(u_ref, B, coef, ours, start.clone()),
                               torch_backend.expand(u_ref, B, coef, ref, start.clone()))
    torch.testing.assert_close(triton_backend.outer(left, x, ours), torch_backend.outer(left, x, ref))


def test_outer_sums_many_chunks_of_one_expert():
    """600 pairs of one expert span three CHUNKs, so outer's chunk partials and their reduction are exercised."""
    T, k = 300, 2
    idx = torch.zeros(T, k, dtype=torch.long)
    idx[::7, 1] = -1
    gen = torch.Generator().manual_seed(6)
    left, right = torch.randn(T * k, 3, generator=gen), torch.randn(T, 5, generator=gen)
    g = triton_backend.outer(left, right, triton_backend.plan(idx, 2))
    valid = (idx.reshape(-1) >= 0).float()[:, None]
    expected = (left * valid).T @ right.repeat_interleave(k, 0)
    torch.testing.assert_close(g[0], expected, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(g[1]) == 0


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(0, 90), k=st.integers(1, 4), E=st.integers(1, 300),
    none_share=st.floats(0, 1), seed=st.integers(0, 99),
)
def test_plan_cuts_each_expert_into_single_expert_runs(T, k, E, none_share, seed):
    """Blocks cover every pair once (the -1 pairs last, as expert E), chunks every valid pair once; stable order."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, E, (T, k), generator=g)
    idx[torch.rand(T, k, generator=g) < none_share] = -1
    plan = triton_backend.plan(idx, E)
    flat = torch.where(idx < 0, E, idx).reshape(-1)
    for table, size, last in ((plan.blocks, plan.block_m, E + 1), (plan.chunks, triton_backend.CHUNK, E)):
        seen = []
        for row, (e, s, t) in enumerate(zip(table.expert.tolist(), table.start.tolist(), table.end.tolist())):
            if e < 0:
                continue
            pairs = plan.order[s:t].long()
            assert 0 < t - s <= size and torch.all(flat[pairs] == e)
            if e < E:
                assert table.first[e] <= row < table.first[e] + table.count[e]
            seen.append(pairs)
        covered = torch.cat(seen) if seen else torch.empty(0, dtype=torch.long)
        expected = torch.cat([torch.nonzero(flat == e).flatten() for e in range(last)])  # by expert, stable
        assert torch.equal(covered, expected)


def test_rejects_float64_and_cpu_without_interpreter(monkeypatch):
    x, A, B, scale, idx, gates = make_case(4, 2, 2, 6, 3, 1, seed=3)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        grouped_lora(x, A, B, scale, idx, gates, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        triton_backend.plan(idx, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_plan_does_not_sync_the_host_on_cuda():
    idx = torch.randint(-1, 16, (512, 2), device="cuda")
    assert_never_syncs(lambda: triton_backend.plan(idx, 16))


def test_one_row_expanded_over_the_tokens():
    """idx with stride 0 over tokens (how a layer routes every token alike) reads as any other idx here."""
    x, A, B, scale, _, gates = make_case(21, 4, 8, 24, 20, 2, seed=12, dtype=torch.float32)
    idx = torch.tensor([[3, -1]]).expand(21, -1)
    out, ref, grads, ref_grads = run_both(x, A, B, scale, idx, gates)
    assert_close_scaled(out, ref, torch.float32)
    for mine, theirs in zip(grads, ref_grads):
        assert_close_scaled(mine, theirs, torch.float32)
