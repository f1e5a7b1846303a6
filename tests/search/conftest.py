"""Tiny causal and seq2seq models over one word tokenizer, few-shot examples, and adapters with mixed scales."""

import copy

import pytest
import torch
import transformers as tf

import lorahub_engine as le
from lorahub_engine.fewshot import encode_examples, example_losses
from tests.tiny_models import tiny_llama_for, word_tokenizer

NOUNS = "cat dog cow hen pig rat fox owl bee ant".split()
WORDS = ["plural", "of", "answer", *NOUNS, *(n + "s" for n in NOUNS)]
EXAMPLES = [(f"plural of {n} answer", f"{n}s") for n in NOUNS[:5]]


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer(WORDS)


def tiny_t5_for(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = tf.T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                         pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    return tf.T5ForConditionalGeneration(config).eval()


def tiny_gpt2_for(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = tf.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.GPT2LMHeadModel(config).eval()


MODELS = {"llama": (tiny_llama_for, ["q_proj", "v_proj", "up_proj"]),
          "gpt2": (tiny_gpt2_for, ["c_attn", "c_fc"]),
          "t5": (tiny_t5_for, ["q", "v", "wo"])}


def mixed_adapters(model, targets, seed=0):
    """Three adapters with different ranks and scales (2, 8 and rsLoRA 12/sqrt(3)); the third lacks a module."""
    specs = [dict(r=4, alpha=8.0), dict(r=2, alpha=16.0), dict(r=3, alpha=12.0, use_rslora=True)]
    adapters = []
    for i, spec in enumerate(specs):
        adapter = le.init_adapter(model, f"a{i}", targets if i < 2 else targets[:-1], seed=seed + i, **spec)
        g = torch.Generator().manual_seed(seed + 10 + i)
        for m in adapter.modules.values():
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.5)
        adapters.append(adapter)
    return adapters


def train_adapter(model, tokenizer, examples, targets, name="task", steps=30, seed=0):
    """A LoRA trained on the examples themselves (Adam through the engine), the adapter the search should find."""
    adapter = le.init_adapter(model, name, targets, r=4, alpha=8.0, seed=seed)
    model.requires_grad_(False)  # only the LoRA bank learns
    le.attach(model, [adapter], trainable=True)
    try:
        bank = [p for n, p in model.named_parameters() if "lora_" in n]
        optimizer = torch.optim.Adam(bank, lr=1e-2)
        batch = encode_examples(tokenizer, [x for x, _ in examples], [y for _, y in examples])
        ids = torch.zeros(len(examples), dtype=torch.long)
        with torch.enable_grad():
            for _ in range(steps):
                example_losses(model, batch, adapter_ids=ids).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        return le.read_adapters(model)[0]
    finally:
        le.detach(model)


@pytest.fixture(scope="module")
def base(tokenizer):
    """The tiny Llama the search tests compose adapters on."""
    return MODELS["llama"][0](tokenizer)


@pytest.fixture(scope="module")
def zoo(base, tokenizer):
    """One adapter trained on the examples' task among three that only add noise."""
    targets = MODELS["llama"][1]
    noise = mixed_adapters(base, targets, seed=5)
    return [noise[0], train_adapter(copy.deepcopy(base), tokenizer, EXAMPLES, targets), *noise[1:]]
