"""fit_weights: gradients through the routing's learnable gates equal autograd of the composition written by hand,
only the weights train, the fit finds the useful adapter, AdaMerging's entropy, validation, typed errors."""

import copy

import pytest
import torch

import lorahub_engine as le
from lorahub_engine.fewshot import encode_examples, example_losses
from lorahub_engine.search import FewShotObjective, SearchError, encode_pairs, first_token_entropy, fit_weights
from tests.search.conftest import EXAMPLES, MODELS, mixed_adapters

pytestmark = pytest.mark.usefixtures("one_thread")
MERGE = {"fusion": "lorahub", "mixture": "task_arithmetic"}


def reference_ce(base, tokenizer, adapters, weights, mode) -> float:
    """Independent: the composition merged (le.merge), folded into an fp64 copy of the base, each example run alone
    (no padding), the answer tokens' CE computed here in fp64 (transformers' own loss upcasts only to fp32)."""
    model = copy.deepcopy(base).double()
    model = le.merge_into_base(model, le.merge([a.to(torch.float64) for a in adapters], list(weights), MERGE[mode]))
    losses = []
    with torch.no_grad():
        for prompt, answer in EXAMPLES:
            x = tokenizer(prompt)["input_ids"]
            y = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if model.config.is_encoder_decoder:
                logits = model(input_ids=torch.tensor([x]), labels=torch.tensor([y])).logits[0]  # [len(y), v]
            else:
                logits = model(input_ids=torch.tensor([x + y])).logits[0, len(x) - 1:-1]  # predicting y
            losses.append(torch.nn.functional.cross_entropy(logits.double(), torch.tensor(y)).item())
    return sum(losses) / len(losses)


def by_hand_loss(base, tokenizer, adapters, weights: torch.Tensor, mode: str) -> torch.Tensor:
    """Independent of routing and the grouped op: each module's dW(w) written out (fusion: LoraHub's rule
    (sum_i w_i sqrt(s_i) B_i)(sum_i w_i sqrt(s_i) A_i), ranks zero-padded; mixture: sum_i w_i s_i B_i A_i), added
    to an fp64 copy of the base's weights through torch.func.functional_call, differentiable in `weights`."""
    model = copy.deepcopy(base).double()
    params = {}
    for path in sorted({p for a in adapters for p in a.modules}):
        module = model.get_submodule(path)
        present = [(w, a.modules[path]) for w, a in zip(weights, adapters) if path in a.modules]
        if mode == "fusion":
            r = max(m.rank for _, m in present)
            A = sum(w * m.scale ** 0.5 * torch.nn.functional.pad(m.A.double(), (0, 0, 0, r - m.rank)) for w, m in present)
            B = sum(w * m.scale ** 0.5 * torch.nn.functional.pad(m.B.double(), (0, r - m.rank)) for w, m in present)
            delta = B @ A  # (out, in)
        else:
            delta = sum(w * m.scale * (m.B.double() @ m.A.double()) for w, m in present)
        params[path + ".weight"] = module.weight + (delta if isinstance(module, torch.nn.Linear) else delta.t())
    losses = []
    for prompt, answer in EXAMPLES:
        x = tokenizer(prompt)["input_ids"]
        y = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if model.config.is_encoder_decoder:
            kwargs = dict(input_ids=torch.tensor([x]), labels=torch.tensor([y]))
            logits = torch.func.functional_call(model, params, args=(), kwargs=kwargs).logits[0]  # [len(y), v]
        else:
            kwargs = dict(input_ids=torch.tensor([x + y]))
            logits = torch.func.functional_call(model, params, args=(), kwargs=kwargs).logits[0, len(x) - 1:-1]
        losses.append(torch.nn.functional.cross_entropy(logits.double(), torch.tensor(y)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("mode", ["fusion", "mixture"])
def test_weight_gradient_equals_autograd_of_the_composition_written_by_hand(tokenizer, model_name, mode):
    factory, targets = MODELS[model_name]
    base = factory(tokenizer)
    adapters = mixed_adapters(base, targets)
    w = torch.tensor([0.7, -0.4, 0.9])
    model = le.attach(copy.deepcopy(base), adapters)
    objective = FewShotObjective(model, encode_pairs(model, tokenizer, EXAMPLES), mode=mode)
    weights = w.clone().requires_grad_(True)
    ce = objective.cross_entropy(weights[None], grad=True)[0]
    ce.backward()
    reference_w = w.double().requires_grad_(True)
    reference = by_hand_loss(base, tokenizer, adapters, reference_w, mode)
    reference.backward()
    assert ce.item() == pytest.approx(reference.item(), abs=1e-5)
    assert ce.item() == pytest.approx(reference_ce(base, tokenizer, adapters, w.tolist(), mode), abs=1e-5)
    torch.testing.assert_close(weights.grad.double(), reference_w.grad, rtol=1e-3, atol=1e-5)  # fp32 vs fp64
    assert weights.grad.abs().min() > 1e-3  # every weight matters


def test_fit_lowers_the_loss_and_weights_the_trained_adapter(base, tokenizer, zoo):
    for mode in ("fusion", "mixture"):
        result = fit_weights(base, tokenizer, zoo, EXAMPLES, mode=mode, steps=40, lr=0.1, progress=False)
        zero = reference_ce(base, tokenizer, zoo, [0.0] * 4, mode)
        assert result.cross_entropy < zero - 0.4, (mode, result.cross_entropy, zero)
        assert result.weights["task"] == max(result.weights.values(), key=abs)
        assert len(result.history) == 40 and result.loss == min(e.loss for e in result.history)
        expected = reference_ce(base, tokenizer, zoo, list(result.weights.values()), mode)
        assert result.cross_entropy == pytest.approx(expected, abs=1e-4)
        composed = le.merge_into_base(copy.deepcopy(base), result.adapter())  # the saved adapter is what was fit
        with torch.no_grad():
            ce = example_losses(composed, encode_pairs(composed, tokenizer, EXAMPLES)).mean().item()
        assert ce == pytest.approx(result.cross_entropy, abs=1e-5)


def test_only_the_weights_train_and_the_model_is_left_as_it_was(base, tokenizer, zoo):
    model = copy.deepcopy(base).train()
    model.lm_head.requires_grad_(False)  # a mix of flags, restored as found
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    factors = [{p: (m.A.clone(), m.B.clone()) for p, m in a.modules.items()} for a in zoo]
    fit_weights(model, tokenizer, zoo, EXAMPLES, steps=5, progress=False)
    assert model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for adapter, saved in zip(zoo, factors):
        assert all(torch.equal(m.A, saved[p][0]) and torch.equal(m.B, saved[p][1]) for p, m in adapter.modules.items())
    with pytest.raises(le.AdapterError, match="no adapters are attached"):
        le.attached_names(model)


def test_same_seed_same_fit(base, tokenizer, zoo):
    runs = [fit_weights(base, tokenizer, zoo, EXAMPLES, steps=6, seed=s, progress=False) for s in (3, 3, 4)]
    assert runs[0].history == runs[1].history and runs[2].history != runs[0].history


def test_first_token_entropy_by_hand(base, tokenizer, zoo):
    """Each prompt run alone (no padding): the entropy of the distribution after its last token."""
    prompts = [x for x, _ in EXAMPLES] + ["plural of cat"]  # a shorter prompt: the batch is left-padded
    batch = encode_examples(tokenizer, prompts, [""] * len(prompts))
    with torch.no_grad():
        got = first_token_entropy(base, batch)
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            p = torch.softmax(base(input_ids=ids).logits[0, -1].double(), -1)
            assert got[i].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)


def test_entropy_fit_needs_no_answers_and_lowers_the_entropy(base, tokenizer, zoo):
    """AdaMerging's objective on inputs alone; the head is sharpened (x10) so that the tiny model's first-token
    distribution is far from uniform and responds to the adapters."""
    sharp = copy.deepcopy(base)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(10)
    inputs = [x for x, _ in EXAMPLES]
    result = fit_weights(sharp, tokenizer, zoo, inputs, mode="mixture", loss="entropy", steps=30, l1=0.0,
                         progress=False)
    entropy = result.history[0].cross_entropy  # "cross_entropy" holds the objective: the mean entropy here
    assert result.cross_entropy < entropy - 0.5 and result.config.loss == "entropy"
    model = le.attach(copy.deepcopy(sharp), zoo)
    with torch.no_grad(), le.routing(model, torch.arange(4)[None], torch.tensor([list(result.weights.values())])):
        by_hand = first_token_entropy(model, encode_examples(tokenizer, inputs, [""] * 5)).mean().item()
    assert by_hand == pytest.approx(result.cross_entropy, abs=1e-5)


def test_validation_falls_back_when_nothing_beats_it(base, tokenizer, zoo):
    """Only noise adapters: no weighting of them beats w = 0 on held-out shots by much, whatever wins is recorded
    with the held-out CE of w = 0 computed by hand (leave-one-out: the mean of the per-example CEs)."""
    noise = [a for a in zoo if a.name != "task"]
    result = fit_weights(base, tokenizer, noise, EXAMPLES, steps=10, folds=5, validate="cross_entropy",
                         progress=False)
    held = {name: score["cross_entropy"] for name, score in result.validation["held_out"].items()}
    model = le.attach(copy.deepcopy(base), noise)
    per_example = FewShotObjective(model, encode_pairs(model, tokenizer, EXAMPLES)).example_losses(torch.zeros(1, 3))
    assert held["zero"] == pytest.approx(per_example.mean().item(), abs=1e-6)
    assert held["zero"] == min(held.values()) or result.validation["kind"] != "zero"
    if result.validation["kind"] == "zero":
        assert all(w == 0 for w in result.weights.values()) and len(result.history) == 1


def test_validation_keeps_the_useful_adapter(base, tokenizer, zoo):
    result = fit_weights(base, tokenizer, zoo, EXAMPLES, steps=20, folds=5, validate="cross_entropy", progress=False)
    assert result.validation["kind"] in ("search", "single")
    assert result.weights["task"] == max(result.weights.values(), key=abs)
    held = {name: score["cross_entropy"] for name, score in result.validation["held_out"].items()}
    assert held[min(held, key=held.get)] < held["zero"] - 0.3


@pytest.mark.parametrize("options,message", [
    (dict(steps=0), "steps must be a positive int"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(mode="sum"), "mode must be one of"),
    (dict(loss="kl"), "loss must be one of"),
    (dict(folds=1), "folds must be 0"),
    (dict(loss="entropy", folds=5), "validation needs answers"),
    (dict(folds=5, validate="ce"), "validate must be one of"),
    (dict(examples=[]), "at least one .input, answer. example"),
    (dict(examples=["no answer"]), r"examples\[0\] must be an \(input, answer\) pair"),
])
def test_bad_input_raises_typed_errors(base, tokenizer, zoo, options, message):
    examples = options.pop("examples", EXAMPLES)
    with pytest.raises(SearchError, match=message):
        fit_weights(base, tokenizer, zoo, examples, progress=False, **options)
    with pytest.raises(le.AdapterError, match="no adapters are attached"):
        le.attached_names(base)
