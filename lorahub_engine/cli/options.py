"""Argument types and helpers shared by the commands of every package (the core's and its plugins')."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lorahub_engine._io import OutputKind, check_output
from lorahub_engine.errors import AdapterError, OutputExistsError


class CommandParser(argparse.ArgumentParser):
    """argparse with every option's default in its help, and usage errors as one line on stderr (exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def floats(text: str) -> list[float]:
    """argparse type: comma-separated numbers."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def show_progress() -> bool:
    """Progress bars only on a terminal (tqdm's own rule for disable=None): a log gets no pile of redrawn bars."""
    return sys.stderr.isatty()


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output path even if it holds something this command did not write (in a "
                        "folder, only the output's own files are replaced)")


def check_output_path(output: str, kind: OutputKind, overwrite: bool, inputs: list[str] = ()) -> None:
    """Before any work: refuse an output that is, holds or lies inside one of the inputs, and one that would replace
    what is not an earlier output of `kind` without --overwrite."""
    target = Path(output).resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise OutputExistsError(f"{output}: the output would overwrite the input {source}; choose another path")
    check_output(output, kind, overwrite)


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (1: tiny models gain nothing from more, and on a busy machine OpenMP waits "
                        "make small ops far slower)")


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


def read_lines(path: str, what: str) -> list[str]:
    """The lines of a UTF-8 text file; a missing, unreadable or binary file is an AdapterError naming `what`."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(f"cannot read {what} from {path}: {e}") from None


def read_examples(path: str, types: bool = False) -> list[tuple]:
    """(input, output) pairs from a JSON lines file; blank lines are skipped. With `types`, (input, output, type)
    triples: an example's optional "type" field, an int (e.g. an expert-group index) or None where absent or null."""
    lines = read_lines(path, "examples")
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            example = (record["input"], record["output"])
            kind = record.get("type") if types else None
        except (json.JSONDecodeError, KeyError, TypeError):
            raise AdapterError(f'{path}:{number}: expected a JSON object with "input" and "output"') from None
        if isinstance(kind, bool) or not isinstance(kind, (int, type(None))):
            raise AdapterError(f'{path}:{number}: "type" must be an integer or null, got {kind!r}')
        examples.append((*example, kind) if types else example)
    return examples
