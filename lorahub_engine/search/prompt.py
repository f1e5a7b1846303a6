"""The opening tokens every example shares, run once per candidate instead of once per example.

Few-shot examples of one task open alike (a chat template's system turn, the task's instruction): on the 5 `navigate`
shots of SmolLM2 about half of each prompt. Under one candidate those tokens have the same keys and values in every
example (causal attention: nothing after them changes them), so `SharedPrompt` runs them once per candidate with a
KV cache, and each example's forward reads only its own remaining tokens against that cache (a forward pre-hook gives
the model the cache, the prompt's columns in the attention mask and the positions after it). When the objective
packs its rows (packing.py), the prompt instead opens each candidate's packed sequence, in the same forward.

Causal models whose forward takes a KV cache (transformers `Cache` with `batch_select_indices`); the objective checks
the shared path against the full forward on the examples before using it. Index legend: p shared tokens, s the rest
of a row, n examples.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from lorahub_engine.fewshot import IGNORE, Batch, _accepts, _cache_argument, _left_pad, context_length

MIN_SAVED_TOKENS = 32  # sharing costs one more forward per evaluation: worth it once it saves (n - 1) * p >= this


def shared_length(batch: Batch) -> int:
    """Tokens every example's sequence opens with, leaving in each the position that predicts its first answer
    token (the logit there must come from the example's own forward)."""
    rows = [ids[mask.bool()] for ids, mask in zip(batch.input_ids, batch.attention_mask)]  # real tokens
    answers = [int((labels[mask.bool()] != IGNORE).float().argmax()) for labels, mask in
               zip(batch.labels, batch.attention_mask)]  # first answer index of each row
    width = min(len(row) for row in rows)
    heads = torch.stack([row[:width] for row in rows])  # [n, width]
    same = (heads == heads[0]).all(0).long()  # [width]: 1 where every row has the first row's token
    return min(int(same.cumprod(0).sum()), min(answers) - 1)


def without_prompt(batch: Batch, p: int) -> Batch:
    """The batch with its first p real tokens cut from every row (left-padded again)."""
    keep = [mask.bool() for mask in batch.attention_mask]
    ids = [row[k][p:].tolist() for row, k in zip(batch.input_ids, keep)]
    labels = [row[k][p:].tolist() for row, k in zip(batch.labels, keep)]
    padding = batch.input_ids[batch.attention_mask == 0]
    pad = int(padding[0]) if len(padding) else 0
    return Batch(_left_pad(ids, pad), _left_pad([[1] * len(r) for r in ids], 0), _left_pad(labels, IGNORE), False)


class SharedPrompt:
    """The p shared opening tokens `ids` of a causal model's examples; `suffix` is the batch without them."""

    def __init__(self, model, ids: torch.Tensor, suffix: Batch):
        self.model, self.ids, self.suffix = model, ids, suffix  # ids [p]
        self.device = next(model.parameters()).device
        self.cache_argument = _cache_argument(model)
        self.keep_one = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}

    @classmethod
    def find(cls, model, batch: Batch) -> SharedPrompt | None:
        """The shared opening of the batch's examples, or None (seq2seq, a model without a KV cache argument,
        inputs longer than the model reads, or too little shared to pay for the extra forward)."""
        n, limit = batch.input_ids.shape[0], context_length(model)
        seq2seq = batch.is_seq2seq or getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        if seq2seq or n < 2 or not _accepts(model, "use_cache"):
            return None
        if limit is not None and batch.input_ids.shape[1] > limit:  # cut from the left, the opening first: keep all
            return None
        p = shared_length(batch)
        if (n - 1) * p < MIN_SAVED_TOKENS:
            return None
        first = batch.input_ids[0][batch.attention_mask[0].bool()]
        return cls(model, first[:p], without_prompt(batch, p))

    def run(self, rows: int):
        """The prompt's KV cache for `rows` batch rows (row i under the routing's row i): one forward of [rows, p]."""
        p = len(self.ids)
        ids = self.ids.to(self.device).expand(rows, p)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                         position_ids=torch.arange(p, device=self.device).expand(rows, p), **self.keep_one)
        return out["cache"] if "cache" in out else out["past_key_values"]

    @contextlib.contextmanager
    def attached(self, cache, rows: torch.Tensor):
        """Within the block, each model forward reads after the prompt: batch row j continues cache row rows[j]."""
        selected = _fork(cache)
        selected.batch_select_indices(rows.to(self.device))
        p = len(self.ids)

        def hook(module, args, kwargs):
            mask = kwargs["attention_mask"]  # [rows, s], the example's own tokens
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)  # [rows, p + s]
            kwargs["position_ids"] = kwargs["position_ids"] + p
            kwargs[self.cache_argument] = selected
            kwargs["use_cache"] = True
            return args, kwargs

        handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def _fork(cache):
    """A copy of the cache object whose tensors are the original's (shared, not copied: they may carry autograd
    history), so that selecting rows in the copy leaves the original as it was."""
    shared: dict[int, object] = {}

    def collect(obj, depth: int) -> None:
        if torch.is_tensor(obj):
            shared[id(obj)] = obj
        elif depth < 4:
            items = (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple))
                     else vars(obj).values() if hasattr(obj, "__dict__") else ())
            for item in items:
                collect(item, depth + 1)

    collect(cache, 0)
    return copy.deepcopy(cache, shared)
