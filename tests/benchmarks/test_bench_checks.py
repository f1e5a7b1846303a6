"""The benchmarks' own equality checks on tiny shapes, so they run in CI: bench_grouped's baselines (per-expert loop,
dense all experts, dense one expert at a time) and model-level comparisons (PEFT adapter_names=, dense hooks) against
the op and the einsum reference; bench_retrieval's k slots per row against the batch's union.
(bench_merge's ours-vs-PEFT check: tests/merge/test_bench_merge.py.)"""

import copy

import pytest
import torch
import transformers as tf

import lorahub_engine as le
from benchmarks import bench_retrieval
from benchmarks.grouped import cases as bench_grouped
from lorahub_engine.ops import grouped_lora
from tests.ops.reference import grouped_lora_reference

pytestmark = pytest.mark.usefixtures("one_thread")
BASELINES = [bench_grouped.per_expert_loop, bench_grouped.dense_all_experts, bench_grouped.dense_each_expert]


def routings(T, E, g):
    """bench_grouped's two scenarios at size T: one expert per token (16 distinct), top-2 with softmax gates."""
    top = torch.rand(T, E, generator=g).topk(2, dim=1).indices
    top[::5, 1] = -1  # some empty slots
    return {"distinct": (torch.arange(T)[:, None] % E, torch.ones(T, 1)),
            "top2": (top, torch.softmax(torch.randn(T, 2, generator=g), dim=1))}


@pytest.mark.parametrize("scenario", ["distinct", "top2"])
@pytest.mark.parametrize("baseline", BASELINES, ids=lambda f: f.__name__)
def test_grouped_baselines_equal_the_op_and_the_reference(baseline, scenario):
    g = torch.Generator().manual_seed(0)
    T, E, r, d_in, d_out = 37, 5, 3, 19, 11
    x = torch.randn(T, d_in, generator=g)
    A, B = torch.randn(E, r, d_in, generator=g), torch.randn(E, d_out, r, generator=g)
    scale = torch.rand(E, generator=g) + 0.5
    idx, gates = routings(T, E, g)[scenario]
    got = baseline(x, A, B, scale, idx, gates)
    ref = grouped_lora_reference(x.double(), A.double(), B.double(), scale.double(), idx, gates.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, grouped_lora(x, A, B, scale, idx, gates), rtol=1e-5, atol=1e-5)


def test_a_wrong_gate_breaks_the_baselines_check():
    """The op-level check compares with the op's output: a baseline that drops the gates would be caught."""
    g = torch.Generator().manual_seed(1)
    x, A, B = torch.randn(20, 8, generator=g), torch.randn(4, 2, 8, generator=g), torch.randn(4, 6, 2, generator=g)
    scale = torch.ones(4)
    idx, gates = routings(20, 4, g)["top2"]
    with pytest.raises(AssertionError):
        torch.testing.assert_close(bench_grouped.dense_all_experts(x, A, B, scale, idx, torch.ones_like(gates)),
                                   grouped_lora(x, A, B, scale, idx, gates), rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def body_and_adapters():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    body = tf.LlamaModel(config).eval().requires_grad_(False)
    return body, bench_grouped.random_adapters(body, 4, torch.Generator().manual_seed(1))


def test_model_level_ours_equals_peft_adapter_names(body_and_adapters):
    body, adapters = body_and_adapters
    ours = le.attach(copy.deepcopy(body), adapters)
    peft = bench_grouped.peft_model(copy.deepcopy(body), adapters)
    ids, rows = torch.randint(0, 64, (4, 7)), torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        got = ours(ids, adapter_ids=rows).last_hidden_state
        ref = peft(input_ids=ids, adapter_names=[adapters[i].name for i in rows.tolist()]).last_hidden_state
        assert (got - body(ids).last_hidden_state).abs().max() > 1e-2  # the adapters really act
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_model_level_ours_per_token_equals_dense_hooks(body_and_adapters):
    body, adapters = body_and_adapters
    ours = le.attach(copy.deepcopy(body), adapters)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (3, 5), generator=g)
    idx, gates = routings(15, 4, g)["top2"]
    dense = copy.deepcopy(body)
    bench_grouped.DenseHooks(dense, adapters, idx, gates, trainable=False)
    with torch.no_grad(), le.routing(ours, idx, gates):
        got = ours(ids).last_hidden_state
    torch.testing.assert_close(got, dense(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_retrieval_compose_check_k_slots_equal_the_union():
    """compose_cost asserts k slots == union before timing; tiny sizes, one timed pass."""
    result = bench_retrieval.compose_cost(n_adapters=6, rows=4, seq=5, k=2, repeats=1)
    assert result["union"] <= 6 and set(result["seconds"]) == {"base", "k slots", "union"}


def test_retrieval_compose_check_fails_on_a_wrong_union(monkeypatch):
    """Dropping the union's gates (every adapter of the union at weight 1) must trip compose_cost's check."""
    routing = le.routing

    def union_without_gates(model, idx, gates=None, mode="mixture"):
        wide = idx.shape[1] > 2  # the union case: more slots than k
        return routing(model, idx, torch.ones_like(gates) if wide else gates, mode)

    monkeypatch.setattr(le, "routing", union_without_gates)
    with pytest.raises(AssertionError):
        bench_retrieval.compose_cost(n_adapters=6, rows=4, seq=5, k=2, repeats=1)


def test_bench_walks_forces_each_walk_and_restores_the_defaults(monkeypatch):
    from benchmarks import bench_walks
    from lorahub_engine.ops import torch_backend

    names = ("DENSE_COLUMNS_PER_SLOT", "DENSE_MIN_PAIRS", "MIN_RUN")
    defaults = [getattr(torch_backend, n) for n in names]
    seen = []
    for plan in (torch_backend.DensePlan, torch_backend.RunPlan):
        monkeypatch.setattr(plan, "shrink", lambda self, x, A, f=plan.shrink, n=plan.__name__: seen.append(n)
                            or f(self, x, A))
    args = bench_walks.case(4, 2, 512, 1, "row", torch.Generator().manual_seed(0))  # 8 rows of 64 tokens
    ref = grouped_lora_reference(*args)
    for walk, plan in [("compiled", None), ("runs", "RunPlan"), ("dense", "DensePlan")]:
        seen.clear()
        torch.testing.assert_close(bench_walks.walked(walk, *args), ref, rtol=1e-4, atol=1e-5)
        assert seen == ([plan] if plan else [])
        assert [getattr(torch_backend, n) for n in names] == defaults
