"""The objective a search evaluates: fusion gates on the attached bank == the base with le.merge(..., "lorahub")
folded in, for mixed ranks and scales, causal and seq2seq; a population is one forward equal to P separate ones."""

import copy

import pytest
import torch

import lorahub_engine as le
from lorahub_engine.fewshot import example_losses
from lorahub_engine.search import FewShotObjective, encode_pairs, l1_penalty
from tests.search.conftest import EXAMPLES, MODELS, mixed_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


def merged_base_loss(base, tokenizer, adapters, weights):
    """Reference: mean answer CE of a copy of the base with the LoraHub merge folded into its weights."""
    model = le.merge_into_base(copy.deepcopy(base), le.merge(adapters, list(weights), method="lorahub"))
    return example_losses(model, encode_pairs(model, tokenizer, EXAMPLES)).mean()


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request, tokenizer):
    factory, targets = MODELS[request.param]
    base = factory(tokenizer)
    return base, mixed_adapters(base, targets)


@pytest.fixture
def objective(setup, tokenizer):
    base, adapters = setup
    model = le.attach(copy.deepcopy(base), adapters)
    return FewShotObjective(model, encode_pairs(model, tokenizer, EXAMPLES))


WEIGHTS = torch.tensor([[0.8, -0.4, 1.2], [-1.5, 0.3, 0.0], [0.0, 0.0, 0.0], [0.2, 1.1, -0.7]])


@torch.no_grad()
def test_fusion_gates_equal_the_lorahub_merge_folded_into_the_base(setup, tokenizer, objective):
    base, adapters = setup
    expected = torch.stack([merged_base_loss(base, tokenizer, adapters, w.tolist()) for w in WEIGHTS])
    separate = torch.cat([objective.cross_entropy(w[None]) for w in WEIGHTS])  # one candidate per forward
    population = objective.cross_entropy(WEIGHTS)  # all candidates x examples in one forward
    torch.testing.assert_close(separate, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(population, separate, atol=1e-5, rtol=1e-5)
    assert expected.unique().numel() == len(WEIGHTS)  # the weights matter


@torch.no_grad()
def test_equal_scales_follow_lorahubs_rule_by_hand(tokenizer):
    """LoraHub (equal alpha/r): A = sum w_i A_i, B = sum w_i B_i, dW = s B A; folded in by hand, no le.merge."""
    factory, targets = MODELS["llama"]
    base = factory(tokenizer)
    adapters = [le.init_adapter(base, f"e{i}", targets, r=4, alpha=8.0, seed=i) for i in range(3)]
    for i, adapter in enumerate(adapters):
        for m in adapter.modules.values():
            m.B.copy_(torch.randn(m.B.shape, generator=torch.Generator().manual_seed(i)) * 0.5)
    w = [0.9, -0.6, 0.4]
    reference = copy.deepcopy(base)
    for path in targets_of(adapters):
        A = sum(wi * a.modules[path].A for wi, a in zip(w, adapters))
        B = sum(wi * a.modules[path].B for wi, a in zip(w, adapters))
        reference.get_submodule(path).weight += 2.0 * B @ A  # s = alpha / r = 2
    expected = example_losses(reference, encode_pairs(reference, tokenizer, EXAMPLES)).mean()
    model = le.attach(copy.deepcopy(base), adapters)
    got = FewShotObjective(model, encode_pairs(model, tokenizer, EXAMPLES)).cross_entropy(torch.tensor([w]))
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)


def peft_with_factors(base, adapters, weights):
    """PEFT's own LoRA model (scale 1) holding, per module, the weighted factor sums by hand (fp64, ranks
    zero-padded): lora_A = sum_i w_i sqrt(s_i) A_i, lora_B = sum_i w_i sqrt(s_i) B_i; absent modules add 0."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    paths = targets_of(adapters)
    r = max(m.rank for a in adapters for m in a.modules.values())
    config = LoraConfig(r=r, lora_alpha=r, target_modules=paths, lora_dropout=0.0,
                        fan_in_fan_out=any(a.fan_in_fan_out for a in adapters))
    model = get_peft_model(copy.deepcopy(base), config)
    state = {}
    for path in paths:
        present = [(w, a.modules[path]) for w, a in zip(weights, adapters) if path in a.modules]
        A = sum(torch.nn.functional.pad(w * m.scale**0.5 * m.A.double(), (0, 0, 0, r - m.rank)) for w, m in present)
        B = sum(torch.nn.functional.pad(w * m.scale**0.5 * m.B.double(), (0, r - m.rank)) for w, m in present)
        state[f"base_model.model.{path}.lora_A.weight"] = A.float()
        state[f"base_model.model.{path}.lora_B.weight"] = B.float()
    result = set_peft_model_state_dict(model, state)
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    return model.eval()


def peft_loss(model, tokenizer, examples):
    """Mean over the examples of PEFT's own loss (labels = the answer + eos, the prompt ignored), one at a time."""
    losses = []
    for prompt, answer in examples:
        x = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        y = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if model.config.is_encoder_decoder:
            out = model(input_ids=torch.tensor([x]), labels=torch.tensor([y]))
        else:
            out = model(input_ids=torch.tensor([x + y]), labels=torch.tensor([[-100] * len(x) + y]))
        losses.append(out.loss)
    return torch.stack(losses).mean()


@torch.no_grad()
def test_objective_equals_peft_forward_and_loss_with_unequal_scales(setup, tokenizer, objective):
    """Scales 2, 8 and 12/sqrt(3), ranks 4, 2, 3, one adapter lacking a module: PEFT's LoRA model with the weighted
    factor sums loaded by set_peft_model_state_dict, its forward and loss, no engine code in the reference."""
    base, adapters = setup
    assert len({m.scale for a in adapters for m in a.modules.values()}) == 3
    for w in WEIGHTS[[0, 1, 3]]:
        expected = peft_loss(peft_with_factors(base, adapters, w.tolist()), tokenizer, EXAMPLES)
        torch.testing.assert_close(objective.cross_entropy(w[None])[0], expected, atol=1e-5, rtol=1e-5)


def targets_of(adapters):
    return sorted({path for a in adapters for path in a.modules})


@torch.no_grad()
def test_one_hot_weights_give_that_adapter_alone(setup, tokenizer, objective):
    base, adapters = setup
    for i, adapter in enumerate(adapters):
        alone = le.merge_into_base(copy.deepcopy(base), adapter)
        expected = example_losses(alone, encode_pairs(alone, tokenizer, EXAMPLES)).mean()
        one_hot = torch.nn.functional.one_hot(torch.tensor([i]), len(adapters)).float()
        torch.testing.assert_close(objective.cross_entropy(one_hot)[0], expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_zero_weights_give_the_base(setup, tokenizer, objective):
    base, adapters = setup
    expected = example_losses(base, encode_pairs(base, tokenizer, EXAMPLES)).mean()
    torch.testing.assert_close(objective.cross_entropy(torch.zeros(1, len(adapters)))[0], expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_batch_size_splits_rows_without_changing_losses(objective):
    whole = objective.cross_entropy(WEIGHTS)
    objective.batch_size = 3  # 4 candidates x 5 examples = 20 rows in 7 forwards, chunks cross candidates
    torch.testing.assert_close(objective.cross_entropy(WEIGHTS), whole, atol=1e-6, rtol=1e-6)


def test_l1_penalty_is_lorahubs_mean_absolute_weight():
    w = torch.tensor([[1.0, -0.5, 0.0, 0.5], [-1.5, -1.5, 1.5, 1.5]])
    torch.testing.assert_close(l1_penalty(w, 0.05), torch.tensor([0.05 * 2.0 / 4, 0.05 * 1.5]))


def test_weights_of_the_wrong_shape_are_refused(objective):
    with pytest.raises(ValueError, match=r"weights must be \[candidates, 3\]"):
        objective.cross_entropy(torch.zeros(2, 4))


@torch.no_grad()
def test_mixture_gates_equal_the_exact_sum_folded_into_the_base(setup, tokenizer):
    """mode="mixture": each adapter's delta with its weight, = le.merge(..., "task_arithmetic") folded in."""
    base, adapters = setup
    model = le.attach(copy.deepcopy(base), adapters)
    objective = FewShotObjective(model, encode_pairs(model, tokenizer, EXAMPLES), mode="mixture")
    expected = []
    for w in WEIGHTS.tolist():
        merged = le.merge_into_base(copy.deepcopy(base), le.merge(adapters, w, method="task_arithmetic"))
        expected.append(example_losses(merged, encode_pairs(merged, tokenizer, EXAMPLES)).mean())
    torch.testing.assert_close(objective.cross_entropy(WEIGHTS), torch.stack(expected), atol=1e-5, rtol=1e-5)
    fusion = FewShotObjective(model, objective.batch).cross_entropy(WEIGHTS)
    assert not torch.allclose(fusion[:2], objective.cross_entropy(WEIGHTS)[:2], atol=1e-3)  # two different spaces
