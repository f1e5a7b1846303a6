"""lorahub_search end to end on a tiny Llama: exact objective, it finds the useful adapter, determinism,
population batching, a clean model afterwards, typed errors."""

import copy
import gc
import math
import threading
import warnings

import numpy as np
import pytest
import torch

import lorahub_engine as le
from lorahub_engine.fewshot import example_losses
from lorahub_engine.search import FewShotObjective, SearchConfig, SearchError, encode_pairs, lorahub_search
from lorahub_engine.search.optimizers import NevergradOptimizer
from tests.search.conftest import EXAMPLES

pytestmark = pytest.mark.usefixtures("one_thread")


LORAHUB = dict(optimizer="NGOpt", start="zero", population=1)  # LoraHub's released setting


def search(base, tokenizer, adapters, **options):
    return lorahub_search(base, tokenizer, adapters, EXAMPLES, progress=False, **options)


def objective_of(base, tokenizer, adapters, weights) -> float:
    """The objective at `weights`, independently: the merge folded into a copy of the base, + 0.05 mean |w|."""
    model = le.merge_into_base(copy.deepcopy(base), le.merge(adapters, list(weights), method="lorahub"))
    with torch.no_grad():
        ce = example_losses(model, encode_pairs(model, tokenizer, EXAMPLES)).mean().item()
    return ce + 0.05 * sum(abs(w) for w in weights) / len(weights)


CMA = dict(optimizer="cma", start="random")


@pytest.mark.parametrize("options", [LORAHUB, CMA], ids=["lorahub", "cma"])
def test_every_evaluation_is_the_merged_base_loss_plus_the_l1_term(base, tokenizer, zoo, options):
    result = search(base, tokenizer, zoo, budget=8, l1=0.05, **options)
    assert len(result.history) == 8
    if options is LORAHUB:
        assert result.history[0].weights == (0.0,) * 4 and result.config.optimizer == "NGOpt"  # LoraHub: from 0
    else:  # cma's first population is spread around a random start, one candidate per row of a batched forward
        assert len({e.weights for e in result.history}) == 8 and all(any(e.weights) for e in result.history)
    for e in result.history:
        assert e.loss == e.cross_entropy + 0.05 * float(np.abs(np.array(e.weights)).mean())  # added exactly
        assert e.loss == pytest.approx(objective_of(base, tokenizer, zoo, e.weights), abs=1e-5)


def test_search_beats_zero_and_uniform_weights_within_budget(base, tokenizer, zoo):
    result = search(base, tokenizer, zoo, **LORAHUB)
    zero, uniform = objective_of(base, tokenizer, zoo, [0.0] * 4), objective_of(base, tokenizer, zoo, [0.25] * 4)
    assert len(result.history) == 40
    assert result.loss < zero - 0.5 and result.loss < uniform - 0.5, (result.loss, zero, uniform)
    assert result.weights["task"] == max(result.weights.values(), key=abs)  # the trained adapter carries it
    assert all(abs(w) <= 1.5 for e in result.history for w in e.weights)
    assert result.loss == min(e.loss for e in result.history)
    composed = result.adapter()  # what users save or merge: its loss is the one found
    model = le.merge_into_base(copy.deepcopy(base), composed)
    with torch.no_grad():
        ce = example_losses(model, encode_pairs(model, tokenizer, EXAMPLES)).mean().item()
    assert ce == pytest.approx(result.cross_entropy, abs=1e-5)


def test_bound_is_respected(base, tokenizer, zoo):
    result = search(base, tokenizer, zoo, budget=16, bound=0.3, optimizer="CMA", population=4)
    assert all(abs(w) <= 0.3 for e in result.history for w in e.weights)
    assert max(abs(w) for e in result.history for w in e.weights) > 0.1  # it does explore


def test_same_seed_same_search_other_seed_other_search(base, tokenizer, zoo):
    runs = [search(base, tokenizer, zoo, budget=12, optimizer="CMA", population=3, seed=s) for s in (7, 7, 8)]
    assert runs[0].history == runs[1].history and runs[0].weights == runs[1].weights
    assert runs[2].history != runs[0].history
    cobyla = [search(base, tokenizer, zoo, budget=10, seed=s, **LORAHUB).history for s in (0, 0)]
    assert cobyla[0] == cobyla[1]
    cma = [search(base, tokenizer, zoo, budget=10, seed=s, **CMA).history for s in (0, 0, 1)]
    assert cma[0] == cma[1] and cma[2] != cma[0]


def test_population_evaluations_equal_separate_evaluations(base, tokenizer, zoo):
    result = search(base, tokenizer, zoo, budget=10, optimizer="TwoPointsDE", population=4)  # rounds of 4, 4, 2
    assert len(result.history) == 10
    model = le.attach(copy.deepcopy(base), zoo)
    objective = FewShotObjective(model, encode_pairs(model, tokenizer, EXAMPLES))
    for e in result.history:
        alone = objective.cross_entropy(torch.tensor([e.weights]))[0].item()
        assert e.cross_entropy == pytest.approx(alone, abs=1e-5)


def test_model_is_left_clean_also_on_error(base, tokenizer, zoo, monkeypatch):
    model = copy.deepcopy(base).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    search(model, tokenizer, zoo, budget=3)
    assert model.training  # mode restored
    with pytest.raises(le.AdapterError, match="no adapters are attached"):
        le.attached_names(model)

    def fail(self, weights, grad=False):
        raise RuntimeError("boom")

    monkeypatch.setattr(FewShotObjective, "cross_entropy", fail)
    with pytest.raises(RuntimeError, match="boom"):
        search(model, tokenizer, zoo, budget=3)
    with pytest.raises(le.AdapterError, match="no adapters are attached"):
        le.attached_names(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


def test_no_optimizer_thread_outlives_the_search(base, tokenizer, zoo):
    """NGOpt runs COBYLA on a background thread; a thread left waiting would hang the interpreter at exit."""
    before = set(threading.enumerate())
    search(base, tokenizer, zoo, budget=5, **LORAHUB)  # COBYLA wants more than 5 evaluations: its thread is stopped
    gc.collect()
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_result_is_json_and_a_peft_adapter(base, tokenizer, zoo, tmp_path):
    result = search(base, tokenizer, zoo, budget=6)  # the default: Adam, 6 // 3 steps
    record = result.to_json()
    assert record["names"] == ["a0", "task", "a1", "a2"] and len(record["history"]) == 2
    assert SearchConfig.from_json(record["config"]) == result.config
    result.adapter("composed").save(tmp_path / "composed")
    loaded = le.LoraAdapter.load(tmp_path / "composed")
    expected = le.merge(zoo, list(result.weights.values()), method="lorahub")
    assert loaded.metadata["lorahub_search"]["weights"] == result.weights
    for path in expected.modules:
        torch.testing.assert_close(loaded.delta_weight(path), expected.delta_weight(path))


def test_composed_adapter_of_fp16_adapters_is_what_the_search_evaluated(base, tokenizer, zoo):
    """A zoo stored in fp16 (as the shipped one): the search mixes the factors in the fp32 bank, and so must the
    composed adapter; le.merge alone rounds the mix to fp16."""
    half = [a.to(torch.float16) for a in zoo]
    result = search(base, tokenizer, half, budget=6, optimizer="CMA", population=3)
    weights = list(result.weights.values())
    exact = le.merge([a.to(torch.float32) for a in half], weights, method="lorahub")  # fp16 values, mixed in fp32
    rounded = le.merge(half, weights, method="lorahub")
    composed, small = result.adapter(), result.adapter(dtype=torch.float16)
    for path in exact.modules:
        torch.testing.assert_close(composed.delta_weight(path), exact.delta_weight(path), rtol=1e-6, atol=1e-7)
        assert not torch.allclose(rounded.delta_weight(path), exact.delta_weight(path), rtol=1e-6, atol=1e-7)
        assert small.modules[path].A.dtype == torch.float16
    model = le.merge_into_base(copy.deepcopy(base), composed)
    with torch.no_grad():
        ce = example_losses(model, encode_pairs(model, tokenizer, EXAMPLES)).mean().item()
    assert ce == pytest.approx(result.cross_entropy, abs=1e-5)


@pytest.mark.parametrize("options,message", [
    (dict(adapters=[]), "at least one adapter"),
    (dict(examples=[]), "at least one .input, answer. example"),
    (dict(examples=[("plural of cat answer",)]), r"examples\[0\] must be an \(input, answer\) pair"),
    (dict(bound=0.0), "bound must be a finite number > 0"),
    (dict(bound=math.inf), "bound must be a finite number > 0"),
    (dict(l1=-1.0), "l1 must be a finite number >= 0"),
    (dict(budget=0), "budget must be a positive int"),
    (dict(population=50), r"population \(50\) must not exceed the budget \(40\)"),
    (dict(batch_size=0), "batch_size must be a positive int"),
    (dict(optimizer="NGOtp"), "unknown optimizer 'NGOtp' .did you mean NGOpt.*Valid names include cma, NGOpt, CMA"),
    (dict(start="middle"), "start must be one of"),
    (dict(mode="sum"), "mode must be one of"),
    (dict(step=0.0), "step must be a finite number > 0"),
    (dict(folds=1), "folds must be 0 .no validation. or an int >= 2"),
    (dict(folds=2, examples=EXAMPLES[:1]), "validation needs at least 2 examples"),
    (dict(folds=5, validate="accuracy"), "validate must be one of"),
    (dict(optimizer="Cobyla", population=2), "optimizer 'Cobyla' is sequential: it needs population=1, got 2"),
    (dict(optimizer="adam", start="random"), "optimizer 'adam' descends from its own start"),
    (dict(optimizer="adam", population=4), "start must be 'zero' and population None"),
    (dict(optimizer="adam", lr=0.0), "lr must be a finite number > 0"),
])
def test_bad_input_raises_typed_errors_before_touching_the_model(base, tokenizer, zoo, options, message):
    arguments = dict(adapters=zoo, examples=EXAMPLES)
    arguments.update(options)
    adapters, examples = arguments.pop("adapters"), arguments.pop("examples")
    with pytest.raises(SearchError, match=message):
        lorahub_search(base, tokenizer, adapters, examples, progress=False, **arguments)
    with pytest.raises(le.AdapterError, match="no adapters are attached"):
        le.attached_names(base)


def test_a_single_adapter_or_a_model_with_adapters_is_refused(base, tokenizer, zoo):
    with pytest.raises(SearchError, match="list of adapters, got a single one"):
        lorahub_search(base, tokenizer, zoo[0], EXAMPLES, progress=False)
    model = le.attach(copy.deepcopy(base), zoo[:1])
    with pytest.raises(le.AdapterError, match="already has adapters attached"):
        lorahub_search(model, tokenizer, zoo, EXAMPLES, progress=False)
    assert le.attached_names(model) == [zoo[0].name]  # someone else's bank stays


def test_nevergrad_meta_model_failure_is_a_search_error():
    """nevergrad 1.0.12's meta-model calls float() on a 1-element array, an error from numpy 2.4 on; NGOpt uses it
    with population > 1 on few weights. It must surface as a SearchError and leave no thread behind."""
    optimizer = NevergradOptimizer(SearchConfig(budget=40, population=2, optimizer="NGOpt"), dimension=3)
    target = np.array([0.3, -0.5, 1.0])
    before = set(threading.enumerate())
    numpy_2_4 = tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4)
    try:
        for _ in range(20):
            points = optimizer.ask(2)
            optimizer.tell(((points - target) ** 2).sum(-1).tolist())
    except SearchError as e:
        assert numpy_2_4 and "numpy >= 2.4" in str(e) and "'cma'" in str(e)
    else:
        assert not numpy_2_4
    gc.collect()
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_cobyla_under_a_short_budget_warns_nothing():
    """NGOpt's COBYLA asked for fewer evaluations than its first simplex (d + 2) gets scipy's MAXFUN warning from
    the optimizer's thread: harmless, and a user of a short search must not see it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = NevergradOptimizer(SearchConfig.lorahub(budget=10), dimension=20)
        for _ in range(10):
            optimizer.tell([float((optimizer.ask(1) ** 2).sum())])
        optimizer.close()
        gc.collect()
    assert [str(w.message) for w in caught if "COBYLA" in str(w.message)] == []


def test_mixture_search_composes_the_exact_sum(base, tokenizer, zoo):
    result = search(base, tokenizer, zoo, budget=16, mode="mixture")
    weights = list(result.weights.values())
    model = le.merge_into_base(copy.deepcopy(base), le.merge(zoo, weights, method="task_arithmetic"))
    with torch.no_grad():
        ce = example_losses(model, encode_pairs(model, tokenizer, EXAMPLES)).mean().item()
    assert ce == pytest.approx(result.cross_entropy, abs=1e-5)
    composed = result.adapter()
    exact = le.merge(zoo, weights, method="task_arithmetic")
    for path in exact.modules:
        torch.testing.assert_close(composed.delta_weight(path), exact.delta_weight(path))
    assert result.to_json()["config"]["mode"] == "mixture"


def test_validation_compares_held_out_shots_and_runs_what_wins(base, tokenizer, zoo):
    """Leave-one-out over the 5 examples: w = 0's held-out CE is the mean of its per-example CEs (by hand); the
    final search runs with the l1 and budget picked; with noise adapters alone it falls back when nothing beats.
    Ranked by held-out CE alone (validate="cross_entropy"; exact match: tests/search/test_validate.py)."""
    result = search(base, tokenizer, zoo, budget=12, folds=5, validate="cross_entropy", **LORAHUB)
    held = {name: score["cross_entropy"] for name, score in result.validation["held_out"].items()}
    model = le.attach(copy.deepcopy(base), zoo)
    per_example = FewShotObjective(model, encode_pairs(model, tokenizer, EXAMPLES)).example_losses(torch.zeros(1, 4))
    assert held["zero"] == pytest.approx(per_example.mean().item(), abs=1e-6)
    assert set(held) == {"zero", "single"} | {f"l1={l1:g} evaluations={t}" for l1 in (0.05, 0.5) for t in (3, 6, 12)}
    kind = result.validation["kind"]
    assert held[min(held, key=held.get)] < held["zero"] and kind != "zero"
    if kind == "search":
        assert (result.config.l1, result.config.budget) == (result.validation["l1"], result.validation["evaluations"])
        assert len(result.history) == result.config.budget
    else:
        assert kind == "single" and result.weights == {n: float(n == "task") for n in result.names}
    noise = [a for a in zoo if a.name != "task"]
    fallback = search(base, tokenizer, noise, budget=12, folds=5, validate="cross_entropy", **LORAHUB)
    if fallback.validation["kind"] == "zero":
        assert set(fallback.weights.values()) == {0.0} and len(fallback.history) == 1


def test_start_single_scans_the_adapters_then_searches_from_the_best(base, tokenizer, zoo):
    result = search(base, tokenizer, zoo, budget=12, optimizer="cma", start="single")
    assert [e.weights for e in result.history[:4]] == [tuple(float(i == j) for j in range(4)) for i in range(4)]
    assert min(result.history[:4], key=lambda e: e.loss).weights == (0.0, 1.0, 0.0, 0.0)  # the trained adapter
    assert len(result.history) == 12 and result.loss <= result.history[1].loss
    assert search(base, tokenizer, zoo, budget=3, optimizer="cma", start="single").history[-1].weights[2] == 1.0


def test_adam_descends_through_the_op_at_three_evaluations_a_step_and_records_each_step(base, tokenizer, zoo):
    """optimizer="adam": budget 121 buys 40 Adam steps (the same as fit_weights' descent with lr, l1 and seed), each
    step's point evaluated exactly (the merged base's loss + the l1 term); it finds the trained adapter."""
    result = search(base, tokenizer, zoo, budget=121, optimizer="adam", lr=0.1, seed=2)
    assert len(result.history) == 121 // 3 == result.config.history_length
    fit = le.fit_weights(base, tokenizer, zoo, EXAMPLES, steps=40, lr=0.1, seed=2, progress=False)
    assert result.history == fit.history
    for e in result.history[::6]:
        assert e.loss == pytest.approx(objective_of(base, tokenizer, zoo, e.weights), abs=1e-5)
    assert result.loss < objective_of(base, tokenizer, zoo, [0.0] * 4) - 0.4
    assert result.weights["task"] == max(result.weights.values(), key=abs)


def test_adam_validation_picks_steps_and_runs_them(base, tokenizer, zoo):
    """With folds the options are numbers of steps (a quarter, half, all of budget // 3); the final descent runs the
    steps picked, recorded as their budget."""
    result = search(base, tokenizer, zoo, budget=24, optimizer="adam", folds=5, validate="cross_entropy")
    names = {f"l1={l1:g} evaluations={t}" for l1 in (0.05, 0.5) for t in (2, 4, 8)}
    assert set(result.validation["held_out"]) == {"zero", "single"} | names
    if result.validation["kind"] == "search":
        assert result.config.budget == 3 * result.validation["evaluations"]
        assert len(result.history) == result.validation["evaluations"]
    else:  # a fallback: its one evaluation
        assert len(result.history) == 1
