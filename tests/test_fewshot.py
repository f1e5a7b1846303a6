"""fewshot: batches, per-example answer losses and greedy answers, checked against hand-computed references."""

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from lorahub_engine.fewshot import IGNORE, Batch, encode_examples, example_losses, generate_answers
from tests.tiny_models import tiny_llama_for, word_tokenizer

WORDS = "the a cat dog sat on mat what is plural of cats dogs answer input yes no red blue one two three".split()
PROMPTS = ["what is the plural of cat answer", "input dog", "the cat sat on the mat what is the answer"]
ANSWERS = ["cats", "dogs yes", "red blue one"]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny_llama_for(tokenizer)


@pytest.fixture(scope="module")
def t5(tokenizer):
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                      initializer_factor=5.0)  # wider init: random answers that differ by prompt
    return T5ForConditionalGeneration(config).eval()


def causal_reference_loss(model, tokenizer, prompt, answer):
    """Mean CE of the answer (+eos) tokens given the prompt, from one unpadded forward."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    log_probs = model(input_ids=ids).logits[0].log_softmax(-1)  # [l, v]
    start = len(prompt_ids)
    picked = [log_probs[start - 1 + i, token] for i, token in enumerate(answer_ids)]
    return -torch.stack(picked).mean()


def test_causal_losses_match_hand_computed_cross_entropy(llama, tokenizer):
    batch = encode_examples(tokenizer, PROMPTS, ANSWERS)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    losses = example_losses(llama, batch)
    expected = torch.stack([causal_reference_loss(llama, tokenizer, p, a) for p, a in zip(PROMPTS, ANSWERS)])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_a_row_loss(llama, tokenizer):
    alone = example_losses(llama, encode_examples(tokenizer, PROMPTS[1:2], ANSWERS[1:2]))
    padded_batch = encode_examples(tokenizer, PROMPTS, ANSWERS)
    assert padded_batch.attention_mask[1].sum() < padded_batch.attention_mask.shape[1]  # row 1 is padded
    torch.testing.assert_close(example_losses(llama, padded_batch)[1:2], alone, rtol=1e-5, atol=1e-5)


def test_right_padded_batch_gives_the_same_losses(llama, tokenizer):
    """A hand-built right-padded batch (and a model without logits_to_keep) give the left-padded losses."""
    left = encode_examples(tokenizer, PROMPTS, ANSWERS)

    def to_right(t, fill):
        rows = [row[m.bool()] for row, m in zip(t, left.attention_mask)]
        return torch.stack([torch.cat([r, r.new_full((t.shape[1] - len(r),), fill)]) for r in rows])

    right = Batch(to_right(left.input_ids, 0), to_right(left.attention_mask, 0), to_right(left.labels, IGNORE), False)

    class NoKeep(torch.nn.Module):  # a forward(**kwargs) wrapper, as PEFT has: full logits path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    expected = example_losses(llama, left)
    torch.testing.assert_close(example_losses(llama, right), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(example_losses(NoKeep(llama), right), expected, rtol=1e-5, atol=1e-5)


class Recording(torch.nn.Module):
    """Stands for a model that takes an extra forward argument: records it, then runs the inner model."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.seen = inner, inner.config, []

    def forward(self, adapter_ids=None, **kwargs):
        self.seen.append(adapter_ids)
        return self.inner(**kwargs)


def test_losses_are_differentiable(llama, tokenizer):
    example_losses(llama, encode_examples(tokenizer, PROMPTS, ANSWERS)).sum().backward()
    assert llama.model.embed_tokens.weight.grad.abs().sum() > 0
    llama.zero_grad()


def test_forward_kwargs_reach_every_model_call(llama, tokenizer):
    model = Recording(llama)
    example_losses(model, encode_examples(tokenizer, PROMPTS, ANSWERS), adapter_ids="ids")
    generate_answers(model, tokenizer, PROMPTS, max_new_tokens=3, adapter_ids="ids")
    assert len(model.seen) >= 2 and set(model.seen) == {"ids"}


def test_seq2seq_losses_match_the_model_own_loss(t5, tokenizer):
    batch = encode_examples(tokenizer, PROMPTS, ANSWERS, is_seq2seq=True)
    losses = example_losses(t5, batch)
    for i, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
        enc = tokenizer(prompt, return_tensors="pt")
        labels = tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        labels = torch.cat([labels, torch.tensor([[tokenizer.eos_token_id]])], dim=1)
        torch.testing.assert_close(losses[i], t5(**enc, labels=labels).loss, rtol=1e-5, atol=1e-5)


def test_max_length_truncates_the_prompt_from_the_left(tokenizer):
    batch = encode_examples(tokenizer, PROMPTS, ANSWERS, max_length=6)
    assert batch.input_ids.shape[1] == 6
    assert tokenizer.convert_ids_to_tokens(batch.input_ids[2].tolist()) == ["the", "answer", "red", "blue", "one",
                                                                             "</s>"]
    assert (batch.labels[2] != IGNORE).sum() == 4  # the answer and eos are kept whole
    with pytest.raises(ValueError, match="no room"):
        encode_examples(tokenizer, PROMPTS, ANSWERS, max_length=4)


def test_bad_inputs_raise(tokenizer):
    with pytest.raises(ValueError, match="equal"):
        encode_examples(tokenizer, PROMPTS, ANSWERS[:2])
    with pytest.raises(ValueError, match="no tokens"):
        encode_examples(tokenizer, PROMPTS[:1], [""], add_eos=False)


@pytest.mark.parametrize("model_name", ["llama", "t5"])
def test_batched_generation_equals_unbatched_generate(model_name, tokenizer, request):
    model = request.getfixturevalue(model_name)
    answers = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=5)
    for prompt, answer in zip(PROMPTS, answers):
        enc = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=2)
        new = out[0] if model_name == "t5" else out[0, enc["input_ids"].shape[1]:]
        assert answer == tokenizer.decode(new, skip_special_tokens=True).strip()
    assert any(answers)
