"""A MoLE router learns a planted rule: two teachers, each trained on its own input vocabulary only; routed by the
learned gates, the loss on a mixed batch approaches the per-input oracle (each input on its own teacher)."""

import copy

import torch

import lorahub_engine as le
from lorahub_engine.fewshot import example_losses
from lorahub_engine.search.objective import encode_pairs
from routers import MoLEConfig, attach_router, train_router
from tests.tiny_models import tiny_llama_for, word_tokenizer

N = 8
WORDS = [f"{p}{i}" for p in "abo" for i in range(N)]
TASKS = {  # disjoint input vocabularies, one shared output vocabulary, different rules
    "a": [(f"a{i} a{j}", f"o{i}") for i in range(N) for j in range(N)],
    "b": [(f"b{i} b{j}", f"o{(j + 3) % N}") for i in range(N) for j in range(N)],
}


def train_teachers(base, tokenizer, steps=300):
    """One LoRA per task, trained only on that task's examples (rows routed by adapter_ids)."""
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    teachers = [le.init_adapter(base, name, targets, r=8, seed=i) for i, name in enumerate(TASKS)]
    model = le.attach(copy.deepcopy(base), teachers, trainable=True)
    model.requires_grad_(False)
    bank = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in bank:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(bank, lr=1e-2)
    examples = TASKS["a"] + TASKS["b"]
    ids = torch.tensor([0] * len(TASKS["a"]) + [1] * len(TASKS["b"]))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randperm(len(examples), generator=g)[:32]
        batch = encode_pairs(model, tokenizer, [examples[i] for i in rows])
        loss = example_losses(model, batch, adapter_ids=ids[rows]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return le.read_adapters(model)


def test_mole_routing_approaches_the_per_input_oracle():
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    base = tiny_llama_for(tokenizer)
    with torch.no_grad():  # init std 0.02 keeps every logit near 0: no LoRA could make a confident prediction
        base.lm_head.weight.mul_(50)
    teachers = train_teachers(base, tokenizer)
    examples = TASKS["a"] + TASKS["b"]
    ids = torch.tensor([0] * len(TASKS["a"]) + [1] * len(TASKS["b"]))
    model = attach_router(copy.deepcopy(base), MoLEConfig(), teachers)
    batch = encode_pairs(model, tokenizer, examples)
    with torch.no_grad():
        oracle = float(example_losses(model, batch, adapter_ids=ids).mean())
        wrong = float(example_losses(model, batch, adapter_ids=1 - ids).mean())
        uniform = float(example_losses(model, batch).mean())  # zero gates at start: every expert 1/2
    assert oracle < 0.5 and wrong > oracle + 1.0  # the teachers really are specialists
    history = train_router(model, tokenizer, examples, steps=150, lr=5e-2, batch_size=16, seed=0, progress=False)
    with torch.no_grad():
        routed = float(example_losses(model, batch).mean())
    assert routed - oracle < 0.2 * (uniform - oracle), (oracle, uniform, routed, history.task[-5:])
