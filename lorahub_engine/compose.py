"""retrieve_and_compose: per input, retrieve k adapters from an index, then one batched forward or generation.

    out = retrieve_and_compose(model, tokenizer, zoo, index, ["input text", ...], k=3, mode="mixture")
    out.outputs    # generated answers, or with options= each input's log-likelihood of each option
    out.hits       # per input: [(adapter name, score), ...] as retrieved (excluded names removed)

Row n of the batch uses its own k adapters: "mixture" feeds them to the grouped op as k slots with gates
(y = base + sum_j g_j s_j B_j A_j x); "fusion" mixes their factors by the LoraHub rule with the gates as weights
(one expert per row). Either way a row costs k experts, whatever the union of adapters over the batch.
The index is duck-typed: anything with `search(texts, k) -> [[(name, score), ...], ...]` (retrieval.AdapterIndex).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple

import torch

from lorahub_engine.attach import attach, attached_names, routing
from lorahub_engine.errors import AdapterError
from lorahub_engine.fewshot import IGNORE, encode_examples, example_losses, generate_answers
from lorahub_engine.lora_layer import MODES

GATINGS = ("uniform", "softmax")


class Composition(NamedTuple):
    """What retrieve_and_compose returns; idx/gates are in bank order (attached_names), -1 = empty slot."""

    outputs: list  # list[str] generated answers, or list[list[float]] option log-likelihoods
    hits: list[list[tuple[str, float]]]
    idx: torch.Tensor  # [n_inputs, k] long
    gates: torch.Tensor  # [n_inputs, k] float32


def retrieve_and_compose(model, tokenizer, zoo, index, inputs: Sequence[str], k: int = 3, mode: str = "mixture",
                         gating: str = "uniform", temperature: float = 1.0,
                         options: Sequence[str] | Sequence[Sequence[str]] | None = None,
                         max_new_tokens: int = 16, exclude: Collection[str] = ()) -> Composition:
    """Retrieve k adapters per input and run the whole batch at once, each row with its own adapters.

    zoo: attached to `model` (in place, zoo order) unless the model already has a bank; it keeps it afterwards.
    gating: "uniform" (1/k each, LoRAretriever's average) or "softmax" of the retrieval scores / temperature.
    options: None generates (greedy, max_new_tokens); a list of strings shared by every input, or one list per
        input, returns per input the summed log-probability of each option (+ eos if the tokenizer has one).
    exclude: adapter names never used (out-of-domain evaluation: the query task's own adapter removed).
    """
    inputs = _check_arguments(inputs, k, mode, gating, temperature)
    options = None if options is None else _options_per_input(options, len(inputs))
    bank = _bank(model, zoo)
    hits = retrieve(index, inputs, k, exclude)
    idx, gates = assignment(hits, bank, k, gating, temperature)
    device = next(model.parameters()).device
    idx, gates = idx.to(device), gates.to(device)
    if options is None:
        with routing(model, idx, gates, mode):
            outputs = generate_answers(model, tokenizer, inputs, max_new_tokens=max_new_tokens)
    else:
        outputs = option_loglikelihoods(model, tokenizer, inputs, options, idx, gates, mode)
    return Composition(outputs, hits, idx, gates)


def retrieve(index, inputs: Sequence[str], k: int, exclude: Collection[str] = ()) -> list[list[tuple[str, float]]]:
    """Per input, the k best adapters not in `exclude` (fetches k + len(exclude), then filters)."""
    exclude = set(exclude)
    fetched = index.search(list(inputs), k + len(exclude))
    if len(fetched) != len(inputs):
        raise AdapterError(f"the index returned {len(fetched)} result lists for {len(inputs)} inputs")
    return [[(name, float(score)) for name, score in row if name not in exclude][:k] for row in fetched]


def assignment(hits: list[list[tuple[str, float]]], bank: Sequence[str], k: int, gating: str = "uniform",
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bank ids [n, k] (-1 pads rows with fewer hits) and gates [n, k] (zero on padding) from retrieval hits."""
    position = {name: i for i, name in enumerate(bank)}
    idx = torch.full((len(hits), k), -1, dtype=torch.long)
    gates = torch.zeros(len(hits), k)
    for row, row_hits in enumerate(hits):
        if not row_hits:
            continue
        missing = [name for name, _ in row_hits if name not in position]
        if missing:
            raise AdapterError(f"retrieved adapters {missing} are not attached to the model (bank: {len(bank)})")
        scores = torch.tensor([score for _, score in row_hits], dtype=torch.float32)
        weights = (scores / temperature).softmax(0) if gating == "softmax" else torch.full_like(scores, 1 / len(scores))
        idx[row, : len(row_hits)] = torch.tensor([position[name] for name, _ in row_hits])
        gates[row, : len(row_hits)] = weights
    return idx, gates


@torch.no_grad()
def option_loglikelihoods(model, tokenizer, inputs: Sequence[str], options, idx: torch.Tensor, gates: torch.Tensor,
                          mode: str) -> list[list[float]]:
    """Summed log-probability of every (input, option) pair, all pairs in one forward; row routing per input."""
    per_input = _options_per_input(options, len(inputs))
    owner = [i for i, opts in enumerate(per_input) for _ in opts]  # input of each (input, option) pair
    answers = [option for opts in per_input for option in opts]
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    batch = encode_examples(tokenizer, [inputs[i] for i in owner], answers, is_seq2seq=is_seq2seq,
                            add_eos=tokenizer.eos_token_id is not None)
    batch = batch.to(idx.device)
    rows = torch.tensor(owner, device=idx.device)
    with routing(model, idx[rows], gates[rows], mode):
        losses = example_losses(model, batch)  # [pairs] mean token CE
    logliks = (-losses * (batch.labels != IGNORE).sum(-1)).tolist()
    out, start = [], 0
    for opts in per_input:
        out.append(logliks[start : start + len(opts)])
        start += len(opts)
    return out


def _options_per_input(options, n: int) -> list[list[str]]:
    if isinstance(options, str) or not options:
        raise AdapterError("options must be a non-empty list of strings, or one such list per input")
    if all(isinstance(o, str) for o in options):
        return [list(options)] * n
    per_input = [list(o) for o in options]
    if len(per_input) != n or any(not o or not all(isinstance(s, str) for s in o) for o in per_input):
        raise AdapterError(f"options per input must be {n} non-empty lists of strings")
    return per_input


def _bank(model, zoo) -> list[str]:
    """The model's bank names; attaches the zoo first if the model has none."""
    try:
        return attached_names(model)
    except AdapterError:
        attach(model, zoo)
        return attached_names(model)


def _check_arguments(inputs, k, mode, gating, temperature) -> list[str]:
    if isinstance(inputs, str) or not inputs or not all(isinstance(x, str) for x in inputs):
        raise AdapterError("inputs must be a non-empty list of strings")
    if not isinstance(k, int) or k < 1:
        raise AdapterError(f"k must be a positive int, got {k!r}")
    if mode not in MODES:
        raise AdapterError(f"mode must be one of {MODES}, got {mode!r}")
    if gating not in GATINGS:
        raise AdapterError(f"gating must be one of {GATINGS}, got {gating!r}")
    if not temperature > 0:
        raise AdapterError(f"temperature must be > 0, got {temperature!r}")
    return list(inputs)
