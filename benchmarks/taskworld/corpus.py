"""Pretraining text for the tiny base: training tasks only (never held-out), as prompt -> answer pairs.

Also the tokenizer trained on that text, and a fingerprint of the corpus that names a pretrained base.
"""

import hashlib
import json
import random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from benchmarks.taskworld.core import get_task, list_tasks
from benchmarks.taskworld.prompts import format_prompt
from benchmarks.taskworld.splits import examples

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789") + list("()[]{}<>.,:;?!'\"-+*/=_")


def pretraining_pairs(n_per_task: int, seed: int, fewshot_share: float = 0.0,
                      max_shots: int = 3) -> list[tuple[str, str]]:
    """`n_per_task` (prompt, answer) pairs from the train split of every training task, in task order.

    A `fewshot_share` of the prompts carry 1..`max_shots` solved train examples of the same task first, so the
    base also learns to read in-context examples.
    """
    rng = random.Random(seed)
    pairs = []
    for name in list_tasks(held_out=False):
        task = get_task(name)
        drawn = examples(task, "train", n_per_task * (1 + max_shots), seed=seed, distinct=False)
        queries, pool = drawn[:n_per_task], drawn[n_per_task:]
        for query in queries:
            shots = rng.sample(pool, rng.randint(1, max_shots)) if rng.random() < fewshot_share else []
            pairs.append((format_prompt(task.instruction, query.input, shots), query.answer))
    return pairs


def corpus_fingerprint(n_per_task: int = 20) -> str:
    """sha256 of a sample of the pretraining text: changes whenever a training task, its instruction, the split
    rule or the prompt format changes what the base would be trained on."""
    sample = pretraining_pairs(n_per_task, seed=0, fewshot_share=0.5)
    return hashlib.sha256(json.dumps(sample).encode()).hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BPE over lowercased words, each digit its own token (arithmetic stays learnable), bos prepended.

    Whitespace is normalized to single spaces and words carry a leading '▁', so decoding restores the text.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=ALPHABET + ["▁"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
