import pytest
import torch

from lorahub_engine.ops import grouped_lora, native, torch_backend
from lorahub_engine.ops.grouped import TokenRouting, grouped_lora_routed
from tests.ci import skip_or_fail
from tests.ops.reference import grouped_lora_reference


@pytest.fixture(params=["native", "torch", "dense"], autouse=True)
def walk(request, monkeypatch):
    """Every test three times: walked by the compiled kernels, by torch ops alone (no compiler: runs where the routing
    has them, else segments or blocks), and densely over the whole bank (which the backend picks for narrow banks:
    forced here for every bank); the first and the last take row-routed cases too (no runs)."""
    monkeypatch.setattr(torch_backend, "DENSE_COLUMNS_PER_SLOT", 10**9 if request.param == "dense" else 0)
    monkeypatch.setattr(torch_backend, "DENSE_MIN_PAIRS", 0)
    if request.param != "torch":  # runs come first where a routing has them
        monkeypatch.setattr(torch_backend, "MIN_RUN", 10**9)
    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    elif request.param == "native" and native.library() is None:
        skip_or_fail("no C++ compiler here: the compiled kernels cannot be built")
    return request.param


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


def assert_matches_reference(x, A, B, scale, idx, gates):
    """The torch backend's output and its gradients in x, A, B and gates equal the einsum reference's."""
    leaves = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    ours = grouped_lora(leaves[0], leaves[1], leaves[2], scale, idx, leaves[3], backend="torch")
    refs = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    ref = grouped_lora_reference(refs[0], refs[1], refs[2], scale, idx, refs[3])
    torch.testing.assert_close(ours, ref)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=ref.dtype)
    ours.backward(grad_out)
    ref.backward(grad_out)
    for mine, theirs in zip(leaves, refs):
        torch.testing.assert_close(mine.grad, theirs.grad)


@pytest.mark.parametrize("T,E,r,k", [(1, 1, 1, 1), (37, 5, 3, 2), (64, 16, 8, 4), (19, 3, 16, 3)])
def test_matches_reference_forward_and_grads(T, E, r, k):
    x, A, B, scale, idx, gates = make_case(T, E, r, 11, 7, k, seed=T + E)
    assert_matches_reference(x, A, B, scale, idx, gates)


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


def row_routed_case(rows, run, k, E, r, seed, dtype=torch.float64):
    """A case whose routing is constant over each row of `run` tokens (as attach routes a batch), some slots empty."""
    x, A, B, scale, _, _ = make_case(rows * run, E, r, 11, 7, k, seed, dtype)
    g = torch.Generator().manual_seed(seed)
    row_idx = torch.randint(0, E, (rows, k), generator=g)
    row_idx[torch.rand(rows, k, generator=g) < 0.25] = -1
    if rows > 2:
        row_idx[1] = row_idx[0]  # two equal neighbours make one longer run: the plan must cut it back to `run`
    gates = torch.rand(rows, k, generator=g, dtype=dtype).repeat_interleave(run, 0)
    return x, A, B, scale, row_idx.repeat_interleave(run, 0), gates


@pytest.mark.parametrize("rows,run,k,E,r", [(1, 16, 1, 1, 1), (4, 16, 2, 3, 3), (6, 24, 3, 5, 8), (3, 32, 4, 16, 16)])
def test_row_routed_batches_find_their_runs_and_match_reference(rows, run, k, E, r, walk):
    x, A, B, scale, idx, gates = row_routed_case(rows, run, k, E, r, seed=rows + run)
    chosen = torch_backend.plan(idx, E)
    if walk == "torch":  # (the other two walk them without runs)
        assert chosen.runs is not None and chosen.runs.run % run == 0
    assert_matches_reference(x, A, B, scale, idx, gates)


def test_run_layout_walks_chunks_in_groups_when_gathered_weights_are_large(monkeypatch, walk):
    if walk != "torch":
        pytest.skip("the torch walk of runs only: the compiled and dense walks gather no weights")
    monkeypatch.setattr(torch_backend, "GATHER_BYTES", 1)  # one chunk per bmm
    x, A, B, scale, idx, gates = row_routed_case(5, 16, 2, 4, 3, seed=11)
    assert torch_backend.plan(idx, 4).runs is not None
    assert_matches_reference(x, A, B, scale, idx, gates)


def all_layouts(idx, E, monkeypatch):
    """The same routing in each layout and torch walk the backend has (the run layout only where idx has runs)."""
    layouts = []
    for min_segment in (0, 10**9):  # one mm per segment; padded blocks (fixed at a plan's first use of .blocks)
        with monkeypatch.context() as m:
            m.setattr(torch_backend, "MIN_SEGMENT", min_segment)
            layout = torch_backend.SegmentPlan(idx, E)
            assert (layout.blocks is None) == (min_segment == 0)
            layouts.append(layout)
    runs = torch_backend.plan(idx, E).runs
    return layouts + [runs] if runs is not None else layouts


@pytest.mark.parametrize("case", [row_routed_case(5, 16, 2, 4, 3, seed=7), make_case(50, 4, 3, 11, 7, 3, seed=8)])
def test_layouts_agree_primitive_by_primitive(case, monkeypatch):
    x, A, B, scale, idx, gates = case
    E, P = A.shape[0], idx.numel()
    g = torch.Generator().manual_seed(0)
    coef = torch.rand(P, generator=g, dtype=x.dtype)
    u = torch.randn(P, A.shape[1], generator=g, dtype=x.dtype)
    start = torch.randn(x.shape[0], B.shape[1], generator=g, dtype=x.dtype)
    left = torch.randn(P, 3, generator=g, dtype=x.dtype) * (idx.reshape(-1, 1) >= 0)  # rows of empty pairs are 0
    first, *others = all_layouts(idx, E, monkeypatch)
    for other in others:
        torch.testing.assert_close(other.shrink(x, A), first.shrink(x, A))
        torch.testing.assert_close(other.expand(u, B, coef, start.clone()), first.expand(u, B, coef, start.clone()))
        torch.testing.assert_close(other.expand(u, B, coef, None), first.expand(u, B, coef, None))  # a new output
        torch.testing.assert_close(other.outer(left, x), first.outer(left, x))


@pytest.mark.parametrize("T,E,k,blocks",
                         [(300, 3, 2, False), (64, 16, 2, True), (40, 6, 1, True), (300, 256, 2, True),
                          (10800, 256, 2, False)])
def test_per_token_routings_walk_blocks_when_experts_get_few_tokens(T, E, k, blocks):
    x, A, B, scale, idx, gates = make_case(T, E, 4, 11, 7, k, seed=T)
    chosen = torch_backend.plan(idx, E)
    assert chosen.runs is None and (chosen.blocks is not None) == blocks
    assert_matches_reference(x, A, B, scale, idx, gates)


@pytest.mark.parametrize("idx", [
    torch.arange(40)[:, None] % 3,  # per-token routing: runs of 1
    torch.arange(4).repeat_interleave(8)[:, None],  # runs of 8 < MIN_RUN
    torch.zeros(15, 1, dtype=torch.long),  # fewer tokens than MIN_RUN
])
def test_short_runs_take_a_per_token_layout(idx):
    assert torch_backend.plan(idx, 4).runs is None


def test_run_layout_adds_into_a_non_contiguous_out_and_half_inputs():
    x, A, B, scale, idx, gates = row_routed_case(2, 16, 2, 3, 4, seed=9, dtype=torch.float32)
    assert_adds_into_non_contiguous_out_and_takes_half(x, A, B, scale, idx, gates)


def assert_adds_into_non_contiguous_out_and_takes_half(x, A, B, scale, idx, gates):
    """The op adds into a transposed (non-contiguous) `out` in place, and runs fp16 inputs near the fp32 reference."""
    ref = grouped_lora_reference(x, A, B, scale, idx, gates)
    base = torch.randn(B.shape[1], x.shape[0])  # out is its transpose: not contiguous
    before = base.t().clone()
    out = grouped_lora_routed(x, A, B, scale, TokenRouting(idx, gates), "torch", out=base.t())
    torch.testing.assert_close(base.t(), before + ref)
    assert out.data_ptr() == base.data_ptr()
    half = grouped_lora(x.half(), A.half(), B.half(), scale, idx, gates, backend="torch")
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("T,E", [(400, 3), (40, 6)])  # segment and block layouts
def test_per_token_layouts_take_half_inputs(T, E):
    x, A, B, scale, idx, gates = make_case(T, E, 4, 16, 8, 2, seed=5, dtype=torch.float32)
    ref = grouped_lora_reference(x, A, B, scale, idx, gates)
    half = grouped_lora(x.half(), A.half(), B.half(), scale, idx, gates, backend="torch")
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, rtol=2e-2, atol=5e-2)


def test_gates_made_under_inference_mode_route_as_any_other():
    """A learned router's gates under torch.inference_mode are inference tensors (no version counter)."""
    x, A, B, scale, idx, gates = make_case(T=12, E=4, r=3, d_in=8, d_out=6, k=2, seed=5)
    expected = grouped_lora_reference(x, A, B, scale, idx, gates)
    with torch.inference_mode():
        routing = TokenRouting(idx.clone(), gates.clone())  # made in the mode, as a router's output is
        torch.testing.assert_close(grouped_lora_routed(x, A, B, scale, routing), expected)
        routing.gates.mul_(2)  # and changed in place there: the next call follows
        torch.testing.assert_close(grouped_lora_routed(x, A, B, scale, routing), 2 * expected)


@pytest.mark.parametrize("T", [1, 5])
def test_one_expert_for_every_token_under_inference_mode(T):
    """The uniform plan's float coefficient reads no version counter from inference tensors (gates and a scale made
    in the mode, changed in place there)."""
    x, A, B, scale, _, _ = make_case(T=T, E=3, r=2, d_in=8, d_out=6, k=1, seed=7)
    idx = torch.full((1, 1), 2).expand(T, 1)  # one row expanded over its tokens (stride 0), as a layer routes it
    expected = grouped_lora_reference(x, A, B, scale, idx, torch.ones(T, 1))
    with torch.inference_mode():
        gates, scale = torch.ones(1, 1).expand(T, 1), scale.clone()
        routing = TokenRouting(idx, gates)
        torch.testing.assert_close(grouped_lora_routed(x, A, B, scale, routing), expected)
        scale.mul_(3)
        torch.testing.assert_close(grouped_lora_routed(x, A, B, scale, routing), 3 * expected)
