"""The decoder layers below the lowest adapted one, run once per search instead of once per candidate.

A candidate only changes the gates of the LoRA layers, so each decoder layer below the first one that holds a LoRA
layer computes the same hidden states under every candidate. `FrozenPrefix` stores the output of the last such layer
for every example (captured on one ordinary forward) and, inside `reuse(group, rows)`, makes those layers return the
stored output instead of computing: the model's own forward still runs (embeddings, masks, positions, the upper
layers, the head), only the frozen layers' work is skipped. The SmolLM2 zoo adapts layers 14-29 of 30: about half of
each candidate's forward. With a shared prompt run as a KV cache (prompt.py) the prompt's own forward still runs
every layer (the cache needs each layer's keys and values); run packed (packing.py), the prompt is the head of each
sequence and its frozen layers' output is stored and reused like the examples'.

Decoder-only transformers models whose blocks are one nn.ModuleList of `config.num_hidden_layers` (Llama, Qwen2,
Mistral, GPT-2, ...); seq2seq models and any LoRA layer outside that list keep the full forward. `frozen_layers`
finds the layers; the objective checks the cached path against the full forward on the examples before using it.
Index legend: n_g examples of one group, l length, d hidden size.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lorahub_engine.lora_layer import LoraLayer
from lorahub_engine.search.packing import Packing


def frozen_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers below the lowest one holding a LoRA layer, bottom first; [] where none can be skipped
    (seq2seq, no single list of num_hidden_layers blocks, a LoRA layer outside it, or one in the first block)."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if getattr(config, "is_encoder_decoder", False) or not isinstance(count, int) or count < 2:
        return []
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(stacks) != 1:
        return []
    name, stack = stacks[0]
    lora_paths = [path for path, m in model.named_modules() if isinstance(m, LoraLayer)]
    lowest = count
    for path in lora_paths:
        index = _block_index(path, name, count)
        if index is None:
            return []
        lowest = min(lowest, index)
    return list(stack[:lowest]) if lora_paths else []


def _block_index(path: str, stack: str, count: int) -> int | None:
    """Which block of the stack `path` sits in, None when it is outside the stack."""
    head = f"{stack}." if stack else ""
    if not path.startswith(head):
        return None
    index = path[len(head):].split(".", 1)[0]
    return int(index) if index.isdigit() and int(index) < count else None


class FrozenPrefix:
    """Stored outputs of the frozen layers for each group of examples, and the switch that makes them reused."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers  # bottom first; the last one's output is what the layer above reads
        self.stored: dict[int, dict[int, torch.Tensor]] = {}  # group -> example row -> [l, d]
        self.head: torch.Tensor | None = None  # run packed: the shared prompt's output [p, d], opening each sequence
        self.rest: tuple | None = None  # the layer output's other items when it is a tuple (all None); None: a tensor
        self.supported = True  # False once a captured output carried more than hidden states (a cache, attentions)

    @contextlib.contextmanager
    def capture(self, group: int, rows: torch.Tensor, packing: Packing | None = None):
        """Within the block, one ordinary forward of group `group`'s example rows `rows` [n] (local indices) stores
        the last frozen layer's output for each row (run packed: unpacked to the rows first)."""
        def hook(module, args, output):
            hidden = output if torch.is_tensor(output) else output[0]  # [n, l, d] (packed: [G, L, d])
            if packing is not None:
                self.head = hidden[0, :packing.head].detach()  # [p, d]: the shared prompt's, alike in every sequence
                hidden = packing.unpack(hidden)
            if not torch.is_tensor(output):
                self.supported &= all(item is None for item in output[1:])
                self.rest = tuple(output[1:])
            for row, h in zip(rows.tolist(), hidden.detach()):
                self.stored.setdefault(group, {})[row] = h

        handle = self.layers[-1].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def reuse(self, group: int, rows: torch.Tensor, packing: Packing | None = None):
        """Within the block, the frozen layers return the stored output of group `group`'s example rows `rows`
        [batch rows] (each batch row is that example under some candidate; packed when the forward is) and compute
        nothing."""
        stored = self.stored[group]
        hidden = torch.stack([stored[row] for row in rows.tolist()])  # [rows, l, d]
        if packing is not None:
            hidden = packing.pack(hidden, self.head)  # [G, L, d]
        output = hidden if self.rest is None else (hidden, *self.rest)
        saved = [layer.__dict__.get("forward") for layer in self.layers]  # an instance forward (accelerate) or None

        def forward(*args, **kwargs):
            return output

        for layer in self.layers:
            layer.forward = forward
        try:
            yield
        finally:
            for layer, previous in zip(self.layers, saved):
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous
