"""Delta-space semantics against independent dense references (numpy, float64), and the properties the math implies.
Source deltas come from PEFT's get_delta_weight of each adapter alone, not from our loader."""

import numpy as np
import pytest
import torch

from lorahub_engine import LoraAdapter, LoraModule
from lorahub_engine.merge import merge
from tests.merge.conftest import assert_deltas_equal, peft_deltas, peft_model_with

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def sources(llama, folders):
    """{adapter name: {module: dW float64 numpy}} from PEFT."""
    model = peft_model_with(llama, folders)
    return {n: {p: d.double().numpy() for p, d in peft_deltas(model, n).items()} for n in folders}


def trim(u: np.ndarray, density: float) -> np.ndarray:
    keep = int(np.floor(density * u.size + 0.5))
    order = np.argsort(-np.abs(u).ravel(), kind="stable")
    out = np.zeros(u.size)
    out[order[:keep]] = u.ravel()[order[:keep]]
    return out.reshape(u.shape)


def ref_task_arithmetic_family(us: list[np.ndarray], density: float, prune: bool, consensus: str | None):
    """TIES / magnitude prune on already weighted task vectors u_i, entry by entry."""
    ts = np.stack([trim(u, density) if prune else u for u in us])
    if consensus is None:
        return ts.sum(0)
    votes = ts.sum(0) if consensus == "total" else np.sign(ts).sum(0)
    elected = np.where(votes >= 0, 1.0, -1.0)
    agree = np.sign(ts) == elected
    return (ts * agree).sum(0) / np.maximum(agree.sum(0), 1)


def weighted(sources, names, weights, path):
    return [w * sources[n][path] for n, w in zip(names, weights) if path in sources[n]]


def modules_of(sources, names):
    return sorted({p for n in names for p in sources[n]})


@pytest.mark.parametrize("method,prune,consensus,extra", [
    ("ties", True, "total", {"density": 0.3}),
    ("ties", True, "frequency", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", True, None, {"density": 0.45}),
    ("ties", True, "total", {"density": 1.0}),  # density 1: no trimming, still the disjoint mean
])
@pytest.mark.parametrize("names,weights", [(("a", "b", "c"), (1.0, -0.6, 0.8)), (("a", "d", "rs"), (0.5, 1.2, -1.0))])
def test_delta_methods_equal_dense_reference(folders, sources, method, prune, consensus, extra, names, weights):
    merged = merge([folders[n] for n in names], weights, method, **extra)
    ref = {p: torch.from_numpy(ref_task_arithmetic_family(weighted(sources, names, weights, p), extra["density"],
                                                          prune, consensus)).float()
           for p in modules_of(sources, names)}
    assert_deltas_equal(merged, ref)


@pytest.mark.parametrize("names,weights", [(("a", "b", "c"), (1.0, -0.6, 0.8)), (("a", "d", "rs"), (0.5, 1.2, -1.0))])
@pytest.mark.parametrize("method", ["task_arithmetic", "cat", "linear", "svd"])
def test_task_arithmetic_is_exact_with_mixed_ranks_rslora_and_rank_patterns(folders, sources, method, names, weights):
    """PEFT's merge over-scales rsLoRA adapters and breaks on rank patterns ("rs"); ours is the plain sum."""
    merged = merge([folders[n] for n in names], weights, method)
    ref = {p: torch.from_numpy(sum(weighted(sources, names, weights, p))).float() for p in modules_of(sources, names)}
    assert_deltas_equal(merged, ref)


@pytest.mark.parametrize("method,extra", [("task_arithmetic", {}), ("ties", {"density": 0.4}),
                                          ("knots", {"density": 0.4}), ("lorahub", {})])
def test_rank_k_is_the_best_rank_k_of_the_exact_result(folders, method, extra):
    srcs, weights = [folders["a"], folders["b"]], [1.0, 0.7]
    exact = merge(srcs, weights, method, **extra)
    truncated = merge(srcs, weights, method, rank=3, **extra)
    for path, module in truncated.modules.items():
        assert module.rank <= 3
        U, S, Vt = np.linalg.svd(exact.delta_weight(path).double().numpy())
        np.testing.assert_allclose(truncated.delta_weight(path).numpy(), (U[:, :3] * S[:3]) @ Vt[:3], atol=1e-5)


def test_svd_equals_task_arithmetic_recompressed(folders):
    srcs = [folders["a"], folders["d"]]
    assert_deltas_equal(merge(srcs, [1, 2], "svd", rank=5),
                        {p: m.delta_weight() for p, m in merge(srcs, [1, 2], rank=5).modules.items()})


def test_one_hot_weights_return_that_adapter(folders, sources):
    for method in ("task_arithmetic", "svd", "lorahub", "linear"):
        merged = merge([folders["a"], folders["b"], folders["d"]], [0.0, 1.0, 0.0], method)
        for path in sources["b"]:
            torch.testing.assert_close(merged.delta_weight(path), torch.from_numpy(sources["b"][path]).float(),
                                       atol=1e-5, rtol=0)
    single = merge([folders["d"]], [1.0], "lorahub")
    assert_deltas_equal(single, {p: torch.from_numpy(d).float() for p, d in sources["d"].items()})


@pytest.mark.parametrize("method", ["magnitude_prune", "dare_linear"])
def test_density_one_is_task_arithmetic(folders, method):
    srcs, weights = [folders["a"], folders["c"]], [0.9, -0.4]
    exact = merge(srcs, weights)
    assert_deltas_equal(merge(srcs, weights, method, density=1.0),
                        {p: m.delta_weight() for p, m in exact.modules.items()})


def test_density_one_dare_ties_is_ties(folders):
    srcs, weights = [folders["a"], folders["b"]], [0.9, -0.4]
    ties = merge(srcs, weights, "ties", density=1.0)
    assert_deltas_equal(merge(srcs, weights, "dare_ties", density=1.0),
                        {p: m.delta_weight() for p, m in ties.modules.items()})


def test_factor_space_density_one_is_factor_linear(folders):
    srcs, weights = [folders["a"], folders["b"]], [0.9, -0.4]
    linear = merge(srcs, weights, "linear", space="factors")
    for method in ("magnitude_prune", "dare_linear"):
        assert_deltas_equal(merge(srcs, weights, method, space="factors", density=1.0),
                            {p: m.delta_weight() for p, m in linear.modules.items()})


def test_dare_is_unbiased_in_delta_space(folders, sources):
    """E[dare_linear] = task arithmetic; the spread matches Var = sum_i u_i^2 (1 - d) / d."""
    a = LoraAdapter.load(folders["a"]).with_modules({Q0: LoraAdapter.load(folders["a"]).modules[Q0]})
    b = LoraAdapter.load(folders["b"]).with_modules({Q0: LoraAdapter.load(folders["b"]).modules[Q0]})
    density, weights, n = 0.4, [1.0, -0.5], 300
    draws = np.stack([merge([a, b], weights, "dare_linear", density=density, seed=s).delta_weight(Q0).numpy()
                      for s in range(n)])
    us = weighted(sources, "ab", weights, Q0)
    sd = np.sqrt(sum(u**2 for u in us) * (1 - density) / density)
    assert np.all(np.abs(draws.mean(0) - sum(us)) <= 5 * sd / np.sqrt(n) + 1e-5)
    ratio = draws.std(0).mean() / sd.mean()
    assert 0.9 < ratio < 1.1


def test_dare_is_reproducible_and_independent_of_module_order(folders):
    srcs, weights = [folders["a"], folders["b"]], [1.0, 0.5]
    one = merge(srcs, weights, "dare_ties", density=0.3, seed=7)
    again = merge(srcs, weights, "dare_ties", density=0.3, seed=7)
    other = merge(srcs, weights, "dare_ties", density=0.3, seed=8)
    a, b = (LoraAdapter.load(f) for f in srcs)
    reversed_subset = [x.with_modules(dict(reversed([(p, x.modules[p]) for p in list(x.modules)[2:6]])))
                       for x in (a, b)]
    subset = merge(reversed_subset, weights, "dare_ties", density=0.3, seed=7)
    for path in one.modules:
        assert torch.equal(one.delta_weight(path), again.delta_weight(path))
        assert not torch.equal(one.delta_weight(path), other.delta_weight(path))
    for path in subset.modules:
        assert torch.equal(subset.delta_weight(path), one.delta_weight(path))


def ref_knots(us: list[np.ndarray], density: float, consensus: str | None) -> np.ndarray:
    """KnOTS by hand: dense SVD of [u_1 ... u_n], coordinates per task, TIES / sum on them, back."""
    U, S, Vt = np.linalg.svd(np.concatenate(us, axis=1), full_matrices=False)
    k = int((S > S[0] * 1e-5).sum())  # sources are fp32: drop their rounding-noise directions
    coords = np.split(Vt[:k], len(us), axis=1)  # each (k, in)
    merged = ref_task_arithmetic_family(coords, density, consensus is not None, consensus)
    return (U[:, :k] * S[:k]) @ merged


@pytest.mark.parametrize("inner,consensus", [("ties", "total"), ("linear", None)])
def test_knots_equals_dense_reference(folders, sources, inner, consensus):
    names, weights = ("a", "b", "c"), (1.0, 0.6, -0.8)
    density = 0.3 if consensus else 1.0
    merged = merge([folders[n] for n in names], weights, "knots", density=density, knots_method=inner)
    ref = {p: torch.from_numpy(ref_knots(weighted(sources, names, weights, p), density, consensus)).float()
           for p in modules_of(sources, names)}
    assert_deltas_equal(merged, ref, atol=5e-5)  # entries up to ~3, through an fp32 SVD
    assert merged.modules[Q0].rank == 12  # the concatenated rank: the result stays low-rank


def test_negate_flips_b(folders, sources):
    a = LoraAdapter.load(folders["a"])
    neg = merge([a], method="negate")
    torch.testing.assert_close(neg.modules[Q0].B, -a.modules[Q0].B)
    torch.testing.assert_close(neg.modules[Q0].A, a.modules[Q0].scale * a.modules[Q0].A)
    both = merge([folders["a"], folders["c"]], [1.0, 0.5], "negate")
    ref = {p: -torch.from_numpy(sum(weighted(sources, "ac", [1.0, 0.5], p))).float()
           for p in modules_of(sources, "ac")}
    assert_deltas_equal(both, ref)


def test_lorahub_keeps_the_cross_terms(folders):
    """B A = (sum_i w_i sqrt(s_i) B_i)(sum_j w_j sqrt(s_j) A_j), mixed ranks zero-padded, by hand on one module."""
    srcs = [LoraAdapter.load(folders[n]) for n in ("a", "d")]
    weights = [0.7, -1.2]
    merged = merge(srcs, weights, "lorahub")
    ma, md = (s.modules[Q0] for s in srcs)
    B = torch.cat([weights[0] * ma.scale**0.5 * ma.B, torch.zeros(32, 4)], 1) + weights[1] * md.scale**0.5 * md.B
    A = torch.cat([weights[0] * ma.scale**0.5 * ma.A, torch.zeros(4, 32)], 0) + weights[1] * md.scale**0.5 * md.A
    torch.testing.assert_close(merged.delta_weight(Q0), B @ A, atol=1e-5, rtol=0)
    ta = merge(srcs, weights).delta_weight(Q0)
    assert (merged.delta_weight(Q0) - ta).abs().max() > 0.1  # the cross terms are really there


BF16_EPS = 2.0**-7  # bf16 keeps 8 significant bits: spacing 2^-7 relative to the binade


def bf16_half_ulp(x: np.ndarray) -> np.ndarray:
    """Half the bf16 spacing at x (fp64): the most one round-to-nearest to bf16 can move x."""
    return 0.5 * BF16_EPS * np.exp2(np.floor(np.log2(np.maximum(np.abs(x), 1e-300))))


def bf16_sources():
    """Two bf16 modules with unequal scales (irrational square roots), and their exact fp64 values."""
    g = torch.Generator().manual_seed(0)
    half = [LoraAdapter(f"x{i}", {"m": LoraModule(torch.randn(4, 24, generator=g).bfloat16(),
                                                  torch.randn(16, 4, generator=g).bfloat16(), s)})
            for i, s in enumerate((0.3, 1.7))]
    exact = [(a.modules["m"].A.double().numpy(), a.modules["m"].B.double().numpy(), a.modules["m"].scale) for a in half]
    return half, exact


def assert_one_bf16_rounding(got: torch.Tensor, ref: np.ndarray, magnitude: np.ndarray):
    """got (bf16) is ref (fp64) rounded once to bf16: within half a bf16 spacing, plus fp32 work on `magnitude`
    (the sum of the absolute terms, so cancellation is covered) and the fp32 -> bf16 double rounding."""
    assert got.dtype == torch.bfloat16
    err = np.abs(got.double().numpy() - ref)
    bound = bf16_half_ulp(ref) + 2.0**-21 * magnitude
    assert np.all(err <= bound), f"max error / bound {np.max(err / bound):.2f}"


def test_bf16_adapters_merge_in_fp32_and_stay_bf16():
    """Merging bf16 adapters rounds once, at the end: the factors of exact methods equal the fp64 reference's up to
    one bf16 rounding (a merge carried out in bf16 rounds the weights and every partial sum: several roundings)."""
    half, exact = bf16_sources()
    weights = [0.7, -1.3]
    merged = merge(half, weights, "lorahub").modules["m"]  # A = sum_i w_i sqrt(s_i) A_i, B likewise
    terms_A = [w * np.sqrt(s) * A for w, (A, _, s) in zip(weights, exact)]
    terms_B = [w * np.sqrt(s) * B for w, (_, B, s) in zip(weights, exact)]
    assert_one_bf16_rounding(merged.A, sum(terms_A), sum(np.abs(t) for t in terms_A))
    assert_one_bf16_rounding(merged.B, sum(terms_B), sum(np.abs(t) for t in terms_B))

    cat = merge(half, weights, "task_arithmetic").modules["m"]  # B = [B_1 B_2], A = [w_1 s_1 A_1; w_2 s_2 A_2]
    np.testing.assert_array_equal(cat.B.double().numpy(), np.concatenate([B for _, B, _ in exact], axis=1))
    scaled = np.concatenate([w * s * A for w, (A, _, s) in zip(weights, exact)], axis=0)
    assert_one_bf16_rounding(cat.A, scaled, np.abs(scaled))


def test_bf16_dense_merge_is_the_fp64_reference_rounded_once():
    """TIES (dense, then best rank 4) of bf16 adapters: the same merge of their exact fp32 copies equals numpy's fp64
    reference to fp32 precision, and the bf16 merge's factors are exactly those fp32 factors rounded once to bf16
    (a merge that rounds anything to bf16 before the end differs from them)."""
    half, exact = bf16_sources()
    weights = [1.0, 0.6]
    dense = ref_task_arithmetic_family([w * s * B @ A for w, (A, B, s) in zip(weights, exact)], 0.5, True, "total")
    U, S, Vt = np.linalg.svd(dense)
    ref = (U[:, :4] * S[:4]) @ Vt[:4]
    full = merge([a.to(torch.float32) for a in half], weights, "ties", density=0.5, rank=4).modules["m"]
    np.testing.assert_allclose((full.B.double() @ full.A.double()).numpy(), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    merged = merge(half, weights, "ties", density=0.5, rank=4).modules["m"]
    assert torch.equal(merged.A, full.A.bfloat16()) and torch.equal(merged.B, full.B.bfloat16())


def test_paths_and_objects_merge_alike_and_record_provenance(folders):
    from_paths = merge([folders["a"], folders["b"]], [1.0, 0.5], "ties", density=0.5, name="m")
    from_objects = merge([LoraAdapter.load(folders["a"]), LoraAdapter.load(folders["b"])], [1.0, 0.5], "ties",
                         density=0.5)
    assert_deltas_equal(from_paths, {p: m.delta_weight() for p, m in from_objects.modules.items()})
    assert from_paths.name == "m"
    assert from_paths.metadata["merge"] == {"method": "ties", "sources": ["a", "b"], "weights": [1.0, 0.5],
                                            "space": "delta", "rank": None, "seed": 0, "density": 0.5}
