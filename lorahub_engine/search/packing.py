"""The rows of one candidate laid end to end in one sequence: an evaluation's forward computes no padding.

A padded batch of few-shot examples computes every pad position in every layer (the 5 `navigate` shots of SmolLM2
after their shared prompt: 171 real tokens in a [5, 45] batch of 225). `Packing` lays the real tokens of the rows
that run under one candidate end to end in one sequence, after a head every row continues (the shared prompt, run
once per sequence in the same forward instead of as a forward of its own); a 4D attention mask lets each token see the
head and the earlier tokens of its own row only, and it keeps the position it had in its row (after the head).
Within `packed(...)` the model's forwards run packed while their callers keep the padded layout: inputs are packed by
a forward pre-hook, and the logits come back in the rows' layout (zeros at pad positions).

Causal transformers models that take a ready 4D mask and `position_ids` (Llama, Qwen2, GPT-2, ...); the objective
checks the packed path against the padded full forward before using it. Index legend: R batch rows, s their length,
G packed sequences, L their length (head included), p head tokens, k kept logits per row, K per packed sequence, v
vocabulary.
"""

from __future__ import annotations

import contextlib

import torch

from lorahub_engine.fewshot import positions


class Packing:
    """Where each real token of a left-padded batch [R, s] sits when the rows with equal `sequence` ids are laid end
    to end in batch order: G sequences of length L, right-padded, each opening with the same `head` tokens (a prompt
    every row continues; 0: none)."""

    def __init__(self, attention_mask: torch.Tensor, sequence: torch.Tensor, head: int = 0):
        real = attention_mask.bool()  # [R, s]
        R, s = real.shape
        device = real.device
        self.rows, self.width, self.head = R, s, head
        self.sequences, self.slot = torch.unique(sequence.to(device), return_inverse=True)  # [G] ids; [R] row j's
        self.count = len(self.sequences)  # G
        lengths = real.sum(-1)  # [R]
        order = torch.arange(R, device=device)
        self.before = (self.slot[:, None] == self.slot[None, :]) & (order[None, :] < order[:, None])  # [R, R]
        offset = (self.before * lengths[None, :]).sum(-1)  # [R]: tokens of earlier rows in row j's sequence
        self.length = head + self._longest(lengths)  # L
        column = torch.arange(s, device=device)
        place = self.slot[:, None] * self.length + head + offset[:, None] + column - (s - lengths)[:, None]  # [R, s]
        self.target = torch.where(real, place, -1)  # [R, s]: flat index into [G * L], -1 at padding
        source = torch.full((self.count * self.length,), -1, dtype=torch.long, device=device)
        source[self.target[real]] = (order[:, None] * s + column)[real]
        self.source = source.view(self.count, self.length)  # [G, L]: flat index into [R * s], -1 at padding and head
        segment = torch.full_like(source, -1)
        segment[self.target[real]] = order[:, None].expand(R, s)[real]
        self.segment = segment.view(self.count, self.length)  # [G, L]: the row each packed token comes from
        self.segment[:, :head] = HEAD

    def _longest(self, counts: torch.Tensor) -> int:
        """The largest sum of `counts` [R] over the rows of one sequence."""
        return int(counts.new_zeros(self.count).index_add_(0, self.slot, counts).max())

    def pack(self, x: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """[R, s, ...] -> [G, L, ...], zeros at the packed padding; `head` [head, ...] opens every sequence."""
        packed = _gather(x.reshape(self.rows * self.width, *x.shape[2:]), self.source)
        if not self.head:
            return packed
        return torch.cat([head.to(packed).expand(self.count, *head.shape), packed[:, self.head:]], dim=1)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """[G, L, ...] -> [R, s, ...], zeros at the rows' padding (the head is left out)."""
        return _gather(y.reshape(self.count * self.length, *y.shape[2:]), self.target)

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive attention mask [G, 1, L, L]: every token sees the head and the earlier tokens of its own row
        (padding sees itself, so that no row of the mask is empty)."""
        seen = (self.segment[:, :, None] == self.segment[:, None, :]) | (self.segment[:, None, :] == HEAD)  # [G, L, L]
        causal = torch.ones(self.length, self.length, dtype=torch.bool, device=seen.device).tril()
        mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device)
        return mask.masked_fill_(~(seen & causal), torch.finfo(dtype).min)[:, None]

    def kept(self, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the rows' last `keep` positions: the packed positions to compute logits at, [G, K] (every sequence's
        real ones, then repeats of position 0), and where each row position finds its logit in the [G * K] result
        ([R, keep], -1 at the rows' padding)."""
        wanted = self.target[:, self.width - keep:]  # [R, keep]
        valid = wanted >= 0
        earlier = (self.before * valid.sum(-1)[None, :]).sum(-1)  # [R]: kept positions of earlier rows in the sequence
        rank = earlier[:, None] + valid.long().cumsum(-1) - 1  # [R, keep]
        K = self._longest(valid.sum(-1))
        at = self.slot[:, None].expand_as(wanted) * K + rank  # [R, keep]
        places = torch.zeros(self.count * K, dtype=torch.long, device=wanted.device)
        places[at[valid]] = wanted[valid] % self.length
        return places.view(self.count, K), torch.where(valid, at, -1)


HEAD = -2  # the segment id of the head tokens, seen by every token after them


def _gather(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """flat[index] with zeros where index is -1 (index of any shape; differentiable in flat)."""
    valid = index >= 0
    out = flat[index.clamp(min=0).flatten()].view(*index.shape, *flat.shape[1:])
    return out * valid.view(*index.shape, *[1] * (flat.dim() - 1)).to(out.dtype)


@contextlib.contextmanager
def packed(model, packing: Packing, head: torch.Tensor | None = None):
    """Within the block, each forward of the model on the packing's left-padded rows (keyword inputs: input_ids,
    attention_mask, position_ids, logits_to_keep) runs as the packed sequences, each opening with the token ids
    `head` (the rows' positions continue after it); the output's logits come back in the rows' layout."""
    dtype = next(model.parameters()).dtype
    kept: dict[str, torch.Tensor] = {}
    head_positions = torch.arange(packing.head, device=packing.segment.device)

    def pack_inputs(module, args, kwargs):
        rows_positions = kwargs.get("position_ids")
        if rows_positions is None:
            rows_positions = positions(kwargs["attention_mask"])
        kwargs["input_ids"] = packing.pack(kwargs["input_ids"], head)
        kwargs["position_ids"] = packing.pack(rows_positions + packing.head, head_positions)
        kwargs["attention_mask"] = packing.mask(dtype)
        keep = kwargs.get("logits_to_keep", 0)
        kept.clear()
        if isinstance(keep, int) and keep > 0:
            kwargs["logits_to_keep"], kept["index"] = packing.kept(keep)
        return args, kwargs

    def unpack_logits(module, args, output):
        logits = output["logits"]  # [G, K or L, v]
        if "index" in kept:
            output["logits"] = _gather(logits.reshape(-1, logits.shape[-1]), kept["index"])  # [R, keep, v]
        else:
            output["logits"] = packing.unpack(logits)  # [R, s, v]
        return output

    handles = [model.register_forward_pre_hook(pack_inputs, with_kwargs=True),
               model.register_forward_hook(unpack_logits)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
