"""Smoke run of benchmarks/latency_generate_profile.py on one layer: every run's time per call over the base, the
hand-written floor's generated tokens equal to the engine's (it is the same adapter, by hand)."""

import copy

import torch

import lorahub_engine as le
from benchmarks import latency_generate_profile as probe
from benchmarks.bench_latency import NEW_TOKENS, PROMPT, VOCAB, build_causal_lm, random_adapters
from lorahub_engine.lora_layer import LoraLayer


def test_probe_reports_every_run_per_call(one_thread):
    report = probe.main(["--layers", "1", "--rounds", "1"])
    assert set(report["added_us_per_call"]) == {"wrapped", "two_matmuls", "ours", "peft"}


def test_the_two_matmuls_floor_generates_what_the_engine_does(one_thread, monkeypatch):
    base = build_causal_lm(1)
    model = le.attach(copy.deepcopy(base), random_adapters(base, 1, torch.Generator().manual_seed(0)))
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS // 4, do_sample=False)
    with torch.no_grad(), le.routing(model, torch.zeros(1, 1, dtype=torch.long)):
        ours = model.generate(ids, **options)
        monkeypatch.setattr(LoraLayer, "forward", probe._two_matmuls)
        floor = model.generate(ids, **options)
    assert torch.equal(ours, floor) and not torch.equal(ours, base.generate(ids, **options))
