"""retrieve_and_compose: one batched run with per-row adapter sets equals each input alone on its merged adapter."""

import copy

import pytest
import torch

import lorahub_engine as le
import lorahub_engine.lora_layer as lora_layer
from lorahub_engine.compose import assignment, retrieve_and_compose
from lorahub_engine.merge import merge
from tests.tiny_models import tiny_llama_for, word_tokenizer

WORDS = "the a cat dog sat on mat what is plural of cats dogs answer input yes no red blue one two three".split()
INPUTS = ["what is the plural of cat answer", "input dog", "the cat sat on the mat", "red blue one two"]
NAMES = ["a", "b", "c", "d", "e"]
# Per input, the retrieval hits (best first); rows share few adapters, the batch's union is all five.
TABLE = {
    INPUTS[0]: [("a", 0.9), ("b", 0.5), ("c", 0.1), ("d", 0.0), ("e", -0.2)],
    INPUTS[1]: [("c", 0.8), ("d", 0.7), ("a", 0.3), ("b", 0.2), ("e", 0.1)],
    INPUTS[2]: [("e", 0.6), ("a", 0.2), ("b", 0.1), ("c", 0.0), ("d", -0.1)],
    INPUTS[3]: [("b", 0.4), ("e", 0.35), ("d", 0.3), ("a", 0.2), ("c", 0.1)],
}


class FakeIndex:
    """The duck-typed index: fixed hits per text."""

    def search(self, texts, k):
        return [TABLE[t][:k] for t in texts]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def base(tokenizer):
    return tiny_llama_for(tokenizer)


@pytest.fixture(scope="module")
def zoo(base):
    targets = [["q_proj", "v_proj", "up_proj"], ["q_proj", "down_proj"], ["v_proj", "o_proj", "up_proj"]]
    adapters = []
    for i, name in enumerate(NAMES):
        adapter = le.init_adapter(base, name, targets[i % 3], r=2 + i % 3, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        for m in adapter.modules.values():
            m.B.copy_(torch.randn(m.B.shape, generator=g))
        adapter.metadata = {"samples": [f"sample of {name}"]}
        adapters.append(adapter)
    return le.AdapterZoo(adapters)


def reference_model(base, zoo, names, weights, mode):
    """The base with the per-input merged adapter folded into its weights: no LoRA layer, no grouped op."""
    method = "task_arithmetic" if mode == "mixture" else "lorahub"
    merged = merge([zoo[n] for n in names], weights=weights, method=method)
    return le.merge_into_base(copy.deepcopy(base), merged)


def reference_loglik(model, tokenizer, prompt, option):
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(option, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        log_probs = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0].log_softmax(-1)
    return sum(float(log_probs[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(answer_ids))


def reference_answer(model, tokenizer, prompt, max_new_tokens):
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("mode", ["mixture", "fusion"])
def test_option_scores_equal_each_input_alone_on_its_merged_adapter(base, zoo, tokenizer, mode):
    model = copy.deepcopy(base)
    options = [["yes", "no"], ["cats", "dogs yes", "red"], ["one two"], ["blue", "the mat"]]
    out = retrieve_and_compose(model, tokenizer, zoo, FakeIndex(), INPUTS, k=3, mode=mode, gating="softmax",
                               temperature=0.5, options=options)
    assert le.attached_names(model) == NAMES
    for i, prompt in enumerate(INPUTS):
        names = [n for n, _ in TABLE[prompt][:3]]
        assert [n for n, _ in out.hits[i]] == names
        weights = torch.tensor([s for _, s in TABLE[prompt][:3]]).div(0.5).softmax(0).tolist()
        reference = reference_model(base, zoo, names, weights, mode)
        expected = [reference_loglik(reference, tokenizer, prompt, o) for o in options[i]]
        torch.testing.assert_close(torch.tensor(out.outputs[i]), torch.tensor(expected), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mixture", "fusion"])
def test_generation_equals_each_input_alone_on_its_merged_adapter(base, zoo, tokenizer, mode):
    out = retrieve_and_compose(copy.deepcopy(base), tokenizer, zoo, FakeIndex(), INPUTS, k=2, mode=mode,
                               max_new_tokens=6)
    for i, prompt in enumerate(INPUTS):
        names = [n for n, _ in TABLE[prompt][:2]]
        reference = reference_model(base, zoo, names, [0.5, 0.5], mode)
        assert out.outputs[i] == reference_answer(reference, tokenizer, prompt, 6)
    assert any(out.outputs[i] != out.outputs[0] for i in range(1, 4))  # rows really differ


def test_one_grouped_call_per_layer_with_k_slots(base, zoo, tokenizer, monkeypatch):
    calls = []
    original = lora_layer.grouped_lora_routed

    def spy(x, A, B, scale, routing, *args, **kwargs):
        idx = routing.idx
        calls.append((x.shape[0], idx.shape[1], set(idx.unique().tolist())))
        return original(x, A, B, scale, routing, *args, **kwargs)

    model = le.attach(copy.deepcopy(base), zoo)
    monkeypatch.setattr(lora_layer, "grouped_lora_routed", spy)
    retrieve_and_compose(model, tokenizer, zoo, FakeIndex(), INPUTS, k=2, options=["yes", "no"])
    n_layers = sum(isinstance(m, lora_layer.LoraLayer) for m in model.modules())
    assert len(calls) == n_layers  # one forward for all 8 (input, option) rows
    assert all(k == 2 for _, k, _ in calls)  # k slots per token, not the batch's union of adapters
    assert set().union(*(ids for _, _, ids in calls)) == {0, 1, 2, 3, 4}


def test_exclude_removes_an_adapter(base, zoo, tokenizer):
    model = copy.deepcopy(base)
    out = retrieve_and_compose(model, tokenizer, zoo, FakeIndex(), INPUTS, k=3, exclude={"a"}, options=["yes"])
    assert all("a" not in [n for n, _ in row] and len(row) == 3 for row in out.hits)
    assert not (out.idx == NAMES.index("a")).any()
    kept = [n for n, _ in TABLE[INPUTS[0]] if n != "a"][:3]
    reference = reference_model(base, zoo, kept, [1 / 3] * 3, "mixture")
    assert out.outputs[0][0] == pytest.approx(reference_loglik(reference, tokenizer, INPUTS[0], "yes"), abs=1e-4)


def test_assignment_pads_short_rows_and_softmaxes_scores():
    idx, gates = assignment([[("b", 2.0), ("a", 0.0)], [("c", 1.0)], []], ["a", "b", "c"], k=2, gating="softmax")
    assert idx.tolist() == [[1, 0], [2, -1], [-1, -1]]
    torch.testing.assert_close(gates[0], torch.tensor([2.0, 0.0]).softmax(0))
    assert gates[1].tolist() == [1.0, 0.0] and gates[2].tolist() == [0.0, 0.0]
    _, uniform = assignment([[("b", 2.0), ("a", 0.0)]], ["a", "b"], k=2)
    assert uniform.tolist() == [[0.5, 0.5]]


def test_bad_input_is_refused(base, zoo, tokenizer):
    model = le.attach(copy.deepcopy(base), [zoo["a"], zoo["b"]])  # an existing bank is used as it is
    with pytest.raises(le.AdapterError, match=r"\['c'\] are not attached"):
        retrieve_and_compose(model, tokenizer, zoo, FakeIndex(), [INPUTS[1]], k=1, options=["yes"])
    for kwargs, message in [({"k": 0}, "k must"), ({"mode": "sum"}, "mode"), ({"gating": "max"}, "gating"),
                            ({"temperature": 0.0}, "temperature"), ({"options": [["yes"]] * 3}, "options per input")]:
        with pytest.raises(le.AdapterError, match=message):
            retrieve_and_compose(model, tokenizer, zoo, FakeIndex(), INPUTS[:2], **kwargs)
    with pytest.raises(le.AdapterError, match="list of strings"):
        retrieve_and_compose(model, tokenizer, zoo, FakeIndex(), INPUTS[0])
