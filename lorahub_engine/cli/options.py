"""Argument types and helpers shared by the commands of every package (the core's and its plugins')."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lorahub_engine.errors import AdapterError


def floats(text: str) -> list[float]:
    """argparse type: comma-separated numbers."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: tiny models gain nothing from more, and on a busy machine "
                        "OpenMP waits make small ops far slower)")


def set_threads(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)


def load_language_model(path: str):
    """A local causal or seq2seq LM and its tokenizer, in eval mode (never downloads)."""
    import transformers as tf

    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        cls = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
        return cls.from_pretrained(path, local_files_only=True).eval(), tf.AutoTokenizer.from_pretrained(
            path, local_files_only=True)
    except OSError as e:
        raise AdapterError(f"cannot load a model and tokenizer from {path}: {e}") from None


def read_examples(path: str) -> list[tuple[str, str]]:
    """(input, output) pairs from a JSON lines file; blank lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise AdapterError(f"cannot read examples: {e}") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            examples.append((record["input"], record["output"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise AdapterError(f'{path}:{number}: expected a JSON object with "input" and "output"') from None
    return examples
