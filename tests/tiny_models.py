"""Tiny transformers models built from configs, and PEFT adapters for them saved to disk. Nothing is downloaded."""

from __future__ import annotations

import copy

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

VOCAB = 64


def _build(config_cls, model_cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=VOCAB, **kwargs))
    return model.eval()


def tiny_llama(seed=0):
    return _build(tf.LlamaConfig, tf.LlamaForCausalLM, seed, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_qwen2(seed=0):
    return _build(tf.Qwen2Config, tf.Qwen2ForCausalLM, seed, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_mistral(seed=0):
    return _build(tf.MistralConfig, tf.MistralForCausalLM, seed, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_gpt2(seed=0):
    return _build(tf.GPT2Config, tf.GPT2LMHeadModel, seed, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def tiny_t5(seed=0):
    return _build(tf.T5Config, tf.T5ForConditionalGeneration, seed, d_model=32, d_ff=48, d_kv=8, num_layers=2,
                  num_heads=4, decoder_start_token_id=0)


def tiny_bert(seed=0):
    return _build(tf.BertConfig, tf.BertModel, seed, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)


# (factory, target modules, fan_in_fan_out, PEFT task type)
ARCHITECTURES = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False, "CAUSAL_LM"),
    "qwen2": (tiny_qwen2, ["q_proj", "v_proj", "down_proj"], False, "CAUSAL_LM"),
    "mistral": (tiny_mistral, ["q_proj", "o_proj", "up_proj"], False, "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], True, "CAUSAL_LM"),
    "t5": (tiny_t5, ["q", "v", "wo"], False, "SEQ_2_SEQ_LM"),
    "bert": (tiny_bert, ["query", "value", "dense"], False, "FEATURE_EXTRACTION"),
}


def make_peft_adapter(base, folder, seed, target_modules, r=4, lora_alpha=8, **config):
    """Build a PEFT LoRA on a copy of `base` with random A and B (B is zero at init), save it to `folder`."""
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, lora_dropout=0.0, **config)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(folder)
    return folder


def word_tokenizer(words):
    """A whitespace word-level tokenizer over `words` (<pad> 0, <s> 1, </s> 2, <unk> 3; <s> prepended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama_for(tokenizer, seed=0):
    """A tiny Llama sized for `tokenizer`, with its pad/bos/eos ids."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.LlamaForCausalLM(config).eval()


def sampled_adapters(model, samples: dict[str, list[str]]) -> list:
    """One adapter per name of `samples` on q_proj and v_proj (r=2, seeded, nonzero B) whose metadata holds its
    sample inputs and family (= its name), as a zoo manifest records them for retrieval."""
    import lorahub_engine as le

    adapters = []
    for i, (name, texts) in enumerate(samples.items()):
        adapter = le.init_adapter(model, name, ["q_proj", "v_proj"], r=2, seed=i)
        for m in adapter.modules.values():
            m.B.normal_(generator=torch.Generator().manual_seed(i))
        adapter.metadata = {"family": name, "samples": texts}
        adapters.append(adapter)
    return adapters


def saved_zoo(root, words: list[str], samples: dict[str, list[str]], *index_options: str):
    """Under root: a tiny Llama with a word tokenizer over `words` (model/), a zoo of `sampled_adapters` (zoo/) and a
    flat index of it built by the CLI with `index_options` (idx/). Returns (model, tokenizer)."""
    import lorahub_engine as le
    from lorahub_engine.cli import main

    tokenizer = word_tokenizer(words)
    model = tiny_llama_for(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    le.AdapterZoo(sampled_adapters(model, samples)).save(root / "zoo")
    assert main(["index", "build", str(root / "zoo"), "-o", str(root / "idx"), "--kind", "flat", *index_options]) == 0
    return model, tokenizer
