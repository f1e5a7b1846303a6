"""Few-shot examples as model inputs: (prompt, answer) strings -> padded batches -> per-example losses or answers,
and answers scored by normalized exact match (`exact_match`, the scoring of the cross-task benchmark).

Shared by search, routers and benchmarks. Works for causal LMs (prompt and answer in one sequence, loss on the
answer tokens only) and seq2seq LMs (prompt to the encoder, answer as labels). Causal batches are left-padded, so
all answers end at the last position: the LM head then runs only on the trailing positions that carry a loss.
Index legend: n examples, l sequence length, v vocabulary.
"""

import inspect
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions without a loss
_EDGE_PUNCTUATION = " \t\n.,;:!?\"'`"


class TruncationWarning(UserWarning):
    """Inputs longer than the model's context were cut from the left (their first tokens dropped)."""


@dataclass(frozen=True)
class Batch:
    """Token tensors of n examples. Causal: `labels` is aligned with `input_ids` ([n, l], IGNORE outside the
    answer). Seq2seq: `input_ids` is the prompt and `labels` the answer ([n, l_answer], IGNORE as padding)."""

    input_ids: torch.Tensor  # [n, l] long
    attention_mask: torch.Tensor  # [n, l] long, 0 = padding
    labels: torch.Tensor  # [n, l] causal / [n, l_answer] seq2seq
    is_seq2seq: bool

    def to(self, device) -> "Batch":
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       labels=self.labels.to(device))


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


def _left_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([[value] * (width - len(r)) + r for r in rows], dtype=torch.long)


def _right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _ones(rows: list[list[int]]) -> list[list[int]]:
    return [[1] * len(r) for r in rows]


def _prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]


def encode_examples(tokenizer, prompts: Sequence[str], answers: Sequence[str], is_seq2seq: bool = False,
                    max_length: int | None = None, add_eos: bool = True) -> Batch:
    """Tokenize prompts (with the tokenizer's special tokens) and answers (plus eos) into one `Batch`.

    Prompt and answer are tokenized separately, so the answer's tokens are the same in every prompt. With
    `max_length`, a prompt too long for prompt + answer loses tokens from its start (the query stays at its end).
    """
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"need equal, non-zero numbers of prompts and answers, got {len(prompts)}, {len(answers)}")
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True but the tokenizer has no eos token")
    eos = [tokenizer.eos_token_id] if add_eos else []
    prompt_ids = _prompt_ids(tokenizer, prompts)
    if not is_seq2seq and any(not p for p in prompt_ids):
        raise ValueError("a causal prompt must encode to at least one token")
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + eos for a in answers]
    if any(not a for a in answer_ids):
        raise ValueError("an answer encodes to no tokens")
    if max_length is not None:
        room = [max_length - (0 if is_seq2seq else len(a)) for a in answer_ids]
        if min(room) < 1:
            raise ValueError(f"max_length={max_length} leaves no room for the prompt of the longest answer")
        prompt_ids = [p[-r:] if len(p) > r else p for p, r in zip(prompt_ids, room)]
    pad = _pad_id(tokenizer)
    if is_seq2seq:
        return Batch(input_ids=_right_pad(prompt_ids, pad), attention_mask=_right_pad(_ones(prompt_ids), 0),
                     labels=_right_pad(answer_ids, IGNORE), is_seq2seq=True)
    sequences = [p + a for p, a in zip(prompt_ids, answer_ids)]
    labels = [[IGNORE] * len(p) + a for p, a in zip(prompt_ids, answer_ids)]
    return Batch(input_ids=_left_pad(sequences, pad), attention_mask=_left_pad(_ones(sequences), 0),
                 labels=_left_pad(labels, IGNORE), is_seq2seq=False)


def context_length(model) -> int | None:
    """Positions the model can read (max_position_embeddings, or GPT-2's n_positions); None without a fixed limit
    (T5's relative positions)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None and not getattr(config, "is_encoder_decoder", False):
        limit = getattr(config, "n_positions", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def _warn_truncated(n_long: int, n: int, limit: int) -> None:
    warnings.warn(f"{n_long} of {n} inputs are longer than the {limit} positions the model reads; their first "
                  "tokens were dropped", TruncationWarning, stacklevel=3)


def _keep_last(rows: list[list[int]], limit: int) -> list[list[int]]:
    """Token rows cut to their last `limit` tokens, with a TruncationWarning if any was longer."""
    if limit < 1:
        raise ValueError(f"the model reads {limit} positions here: no room for the prompt")
    long = sum(len(r) > limit for r in rows)
    if long:
        _warn_truncated(long, len(rows), limit)
    return [r[-limit:] for r in rows]


def fit_context(model, batch: Batch) -> Batch:
    """`batch` cut to the positions `model` reads, each prompt losing tokens from its start (TruncationWarning):
    a longer input would otherwise run past the positions the model was trained on, or fail."""
    limit = context_length(model)
    if limit is None or batch.input_ids.shape[1] <= limit:
        return batch
    if not batch.is_seq2seq:  # left-padded, answers end at the last position: keep the last `limit` columns
        _warn_truncated(int((batch.attention_mask.sum(-1) > limit).sum()), len(batch.input_ids), limit)
        return replace(batch, input_ids=batch.input_ids[:, -limit:], attention_mask=batch.attention_mask[:, -limit:],
                       labels=batch.labels[:, -limit:])
    lengths = batch.attention_mask.sum(-1).tolist()  # right-padded encoder inputs: re-pad each row's last tokens
    rows = _keep_last([row[:n] for row, n in zip(batch.input_ids.tolist(), lengths)], limit)
    padding = batch.input_ids[batch.attention_mask == 0]
    pad = int(padding[0]) if len(padding) else 0
    return replace(batch, input_ids=_right_pad(rows, pad), attention_mask=_right_pad(_ones(rows), 0))


def _accepts(model, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def _cache_argument(model) -> str:
    """transformers 5.x renamed past_key_values to cache: the name the first module declaring either uses (a wrapper
    whose forward takes **kwargs, as PEFT's, passes it on to the model it wraps)."""
    for module in model.modules():
        parameters = inspect.signature(module.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in parameters:
                return name
    return "past_key_values"


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, so left padding changes nothing."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [n, l]


def example_losses(model, batch: Batch, **forward_kwargs) -> torch.Tensor:
    """Mean token cross-entropy of each example's answer: [n] float32, differentiable.

    `forward_kwargs` go to every model call unchanged (e.g. per-row adapter ids). Inputs longer than the model's
    context lose their first tokens (see fit_context).
    """
    batch = fit_context(model, batch)
    if _accepts(model, "use_cache"):  # no KV cache to fill: one forward, nothing decoded after it
        forward_kwargs = {"use_cache": False, **forward_kwargs}
    if batch.is_seq2seq:
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=batch.labels)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       decoder_input_ids=decoder_input_ids, **forward_kwargs).logits  # [n, l_answer, v]
        targets = batch.labels
    else:
        length = batch.input_ids.shape[1]
        first_target = max(1, int((batch.labels != IGNORE).float().argmax(-1).min()))  # earliest predictable label
        keep = length - first_target + 1  # positions first_target-1 .. l-1 predict the answers
        if _accepts(model, "logits_to_keep"):
            forward_kwargs = {"logits_to_keep": keep, **forward_kwargs}
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=positions(batch.attention_mask), **forward_kwargs).logits
        logits = logits[:, -keep:-1]  # [n, keep-1, v]: the logit at position t predicts token t+1
        targets = batch.labels[:, length - keep + 1:]
    token_losses = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE,
                                   reduction="none")  # [n, t]
    return token_losses.sum(-1) / (targets != IGNORE).sum(-1)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16,
                     **forward_kwargs) -> list[str]:
    """Greedy answers to a batch of prompts, decoded without special tokens and stripped.

    One batched decoding loop with a KV cache; causal prompts are left-padded with matching position ids, so
    each answer equals that prompt's answer decoded alone. `forward_kwargs` go to every model call. Prompts longer
    than the model's context less `max_new_tokens` lose their first tokens (TruncationWarning).
    """
    if not prompts:
        return []
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    rows = _prompt_ids(tokenizer, prompts)
    limit = context_length(model)
    if limit is not None:
        rows = _keep_last(rows, limit if is_seq2seq else limit - max_new_tokens)
    device = next(model.parameters()).device
    if is_seq2seq:
        input_ids = _right_pad(rows, pad).to(device)
        mask = _right_pad(_ones(rows), 0).to(device)
        encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=mask)
        start = model.config.decoder_start_token_id
        step_inputs = dict(attention_mask=mask, encoder_outputs=encoder_outputs,
                           decoder_input_ids=torch.full((len(rows), 1), start, device=device))
    else:
        input_ids = _left_pad(rows, pad).to(device)
        mask = _left_pad(_ones(rows), 0).to(device)
        step_inputs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask))
    if _accepts(model, "logits_to_keep"):
        forward_kwargs = {"logits_to_keep": 1, **forward_kwargs}
    cache_argument = _cache_argument(model)
    new_tokens = torch.empty(len(rows), 0, dtype=torch.long, device=device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    cache = None
    for _ in range(max_new_tokens):
        out = model(**step_inputs, **{cache_argument: cache}, use_cache=True, **forward_kwargs)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        token = out.logits[:, -1].argmax(-1)  # [n]
        token = torch.where(done, torch.full_like(token, pad), token)
        new_tokens = torch.cat([new_tokens, token[:, None]], dim=1)
        done |= token == eos
        if bool(done.all()):
            break
        if is_seq2seq:
            step_inputs["decoder_input_ids"] = token[:, None]
        else:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_inputs = dict(input_ids=token[:, None], attention_mask=mask, position_ids=positions(mask)[:, -1:])
    return [_decode_until_eos(tokenizer, row, eos) for row in new_tokens.tolist()]


def _decode_until_eos(tokenizer, tokens: list[int], eos: int | None) -> str:
    if eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def normalize_answer(text: str) -> str:
    """Lowercase, collapse whitespace, and strip quotes and punctuation at both ends ("Cats." -> "cats")."""
    return re.sub(r"\s+", " ", text.lower()).strip(_EDGE_PUNCTUATION)


def exact_match(prediction: str, answer: str) -> bool:
    """Whether the prediction equals the answer after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(answer)
