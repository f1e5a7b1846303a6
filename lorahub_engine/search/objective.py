"""LoraHub's objective on a model with the candidate adapters attached: only the fusion gates change.

    batch = encode_pairs(model, tokenizer, examples)
    objective = FewShotObjective(model, batch)                 # model: le.attach(model, adapters) done
    ce = objective.cross_entropy(weights)                       # weights [P, N] -> [P] mean answer CE
    loss = ce + l1_penalty(weights, 0.05)                       # LoraHub: + 0.05 * mean |w|

Candidate p's weights become the "fusion" gates of its rows: every LoRA layer mixes the N adapters' factors by
LoraHub's rule (A = sum_i w_i sqrt(s_i) A_i, B likewise, see le.merge(method="lorahub")) and applies the result
through the grouped op; mode="mixture" applies each adapter's delta with its weight (sum_i w_i dW_i). P candidates x
the n_g examples of a group are one batch of P*n_g rows (candidate-major; packed, P sequences of n_g examples each),
so a population costs one forward per group (or ceil(P*n_g / batch_size); unpacked, plus one of the shared opening
tokens), never a merge of state dicts. Index legend: P candidates, N adapters, n examples, n_g examples of one group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from lorahub_engine.attach import attached_names, routing
from lorahub_engine.fewshot import Batch, encode_examples, example_losses
from lorahub_engine.search.groups import Group, length_groups, take, trim, whole_batch
from lorahub_engine.search.packing import Packing, packed
from lorahub_engine.search.prefix import FrozenPrefix, frozen_layers
from lorahub_engine.search.prompt import SharedPrompt


class FewShotObjective:
    """Mean answer cross-entropy of the examples under each candidate weight vector (no l1 term).

    row_losses(model, batch) -> [rows] is what each example scores (default: its mean answer-token CE; the
    unsupervised fit passes the entropy of the first answer token instead).

    Four savings, each exact (the same losses within float rounding; tests/search/test_speed_levers.py,
    test_packing.py, and benchmarks/bench_search.py against merge-and-rerun on SmolLM2): share_prompt (on by default)
    runs the tokens every example opens with once per candidate (prompt.py: a KV cache each example reads; packed,
    the head of each candidate's sequence); reuse_prefix (on by default) runs the decoder layers below the lowest
    adapted one once, at construction, and reuses their output for every candidate (prefix.py); pack (on by default)
    lays each candidate's examples end to end in one sequence, so no forward computes padding (packing.py);
    by_length (off by default: on one CPU thread its extra, smaller forwards cost SmolLM2 more than the padding they
    save, see benchmarks/RESULTS.md) runs the examples in groups of equal length, padding trimmed (groups.py).
    share_prompt and pack are checked at construction on the shortest and the longest example, reuse_prefix on every
    example, against the full forward, and left off where they disagree. All off is the padded full forward,
    LoraHub's computation. The model's layers below the adapters must not change while the objective is in use."""

    def __init__(self, model, batch: Batch, batch_size: int | None = None, mode: str = "fusion",
                 row_losses=example_losses, *, by_length: bool = False, share_prompt: bool = True,
                 reuse_prefix: bool = True, pack: bool = True):
        self.model = model
        self.mode = mode  # "fusion": LoraHub's factor mix; "mixture": sum_i w_i dW_i
        self.row_losses = row_losses
        self.num_adapters = len(attached_names(model))
        self.device = next(model.parameters()).device
        self.batch = batch  # the n examples, encoded once
        self.batch_size = batch_size
        self.by_length = by_length
        self.prompt = SharedPrompt.find(model, batch) if share_prompt else None
        self.pack = pack and not batch.is_seq2seq  # each candidate's rows run end to end in one sequence
        if self.prompt is not None or self.pack:
            self._keep_what_agrees()
        self.groups = self._grouped()
        self.prefix = self._checked_prefix() if reuse_prefix else None

    @property
    def num_examples(self) -> int:
        return self.batch.input_ids.shape[0]

    @property
    def shared_tokens(self) -> int:
        """How many opening tokens run once per candidate instead of once per example (0: none)."""
        return len(self.prompt.ids) if self.prompt is not None else 0

    @property
    def reused_layers(self) -> int:
        """How many decoder layers each candidate skips (their stored output is reused); 0: the full forward."""
        return len(self.prefix.layers) if self.prefix is not None else 0

    def cross_entropy(self, weights: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """weights [P, N] -> [P] float32: mean over the examples of each example's mean answer-token CE."""
        return self.example_losses(weights, grad).mean(-1)

    def example_losses(self, weights: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """weights [P, N] -> [P, n] float32: each example's mean answer-token CE under each candidate;
        differentiable in the weights with grad=True (the gates of the routing then require grad)."""
        with torch.set_grad_enabled(grad):
            weights = torch.as_tensor(weights, dtype=torch.float32, device=self.device)
            return self._example_losses(weights, self.prefix.reuse if self.prefix is not None else _no_reuse)

    def _example_losses(self, weights: torch.Tensor, layers, groups: list[Group] | None = None) -> torch.Tensor:
        """[P, n] losses of the examples of `groups` (default: all); layers(group, rows, packing) is the context each
        forward of a group's example rows runs in."""
        if weights.dim() != 2 or weights.shape[1] != self.num_adapters:
            raise ValueError(f"weights must be [candidates, {self.num_adapters}], got {tuple(weights.shape)}")
        groups = self.groups if groups is None else groups
        P, n = weights.shape[0], sum(len(group.examples) for group in groups)
        cache = self._prompt_cache(weights) if not self.pack else None  # packed: the prompt opens each sequence
        losses, places = [], []
        for g, group in enumerate(groups):
            group_losses, group_places = self._group_losses(weights, g, group, n, layers, cache)
            losses += group_losses
            places += group_places
        order = torch.argsort(torch.cat(places)).to(self.device)
        return torch.cat(losses)[order].view(P, n)

    def _group_losses(self, weights: torch.Tensor, g: int, group: Group, n: int, layers, cache) -> tuple[list, list]:
        """Group g's losses per forward, and where each goes in the [P * n] result (candidate * n + example)."""
        n_g = len(group.examples)
        rows = weights.shape[0] * n_g  # candidate-major: row j is the group's example j % n_g under candidate j // n_g
        size = self.batch_size or rows
        losses, places = [], []
        for start in range(0, rows, size):
            row = torch.arange(start, min(start + size, rows))
            candidate, example = row // n_g, row % n_g
            batch = take(group.batch, example).to(self.device)
            packing = Packing(batch.attention_mask, candidate, self.shared_tokens) if self.pack else None
            with layers(g, example, packing), self._reading(cache, candidate, packing):
                losses.append(self._losses(weights, candidate if packing is None else packing.sequences, batch))
            places.append(candidate * n + group.examples[example])
        return losses, places

    def _reading(self, cache, candidate: torch.Tensor, packing: Packing | None):
        """The context of one forward of example rows (row j under candidate candidate[j]): packed (each sequence
        opening with the shared prompt, if any), after the shared prompt's cache, or plain."""
        if packing is not None:
            return packed(self.model, packing, self.prompt.ids if self.prompt is not None else None)
        return self.prompt.attached(cache, candidate) if cache is not None else contextlib.nullcontext()

    def _losses(self, weights: torch.Tensor, candidate: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-row losses of `batch`, whose row j (packed: sequence j) is scored under candidate candidate[j]."""
        with self._routed(weights, candidate):
            return self.row_losses(self.model, batch.to(self.device))

    def _prompt_cache(self, weights: torch.Tensor):
        """The shared prompt's KV cache under each of the P candidates (row p: candidate p), or None."""
        if self.prompt is None:
            return None
        candidates = torch.arange(weights.shape[0])
        with self._routed(weights, candidates):
            return self.prompt.run(len(candidates))

    def _routed(self, weights: torch.Tensor, candidate: torch.Tensor):
        """The routing under which batch row j runs candidate candidate[j] (one candidate: one row all share)."""
        return weighted(self.model, weights if weights.shape[0] == 1 else weights[candidate.to(self.device)],
                        self.mode)

    def _grouped(self, examples: torch.Tensor | None = None) -> list[Group]:
        """The forwards' groups of all examples, or of `examples` only (then numbered 0.. in their order)."""
        rows = self.prompt.suffix if self.prompt is not None else self.batch
        if examples is not None:
            rows = trim(take(rows, examples))
        return length_groups(rows) if self.by_length else whole_batch(rows)

    def _check_weights(self) -> torch.Tensor:
        """Two candidates [2, N] the savings are checked under (any: the savings must not depend on them; two, so
        that rows mapped to the wrong candidate show)."""
        ramp = torch.linspace(-1.0, 1.0, self.num_adapters, device=self.device)
        return torch.stack([ramp, ramp.flip(0) * 0.5])

    def _check_examples(self) -> torch.Tensor:
        """The shortest and the longest example (one if all are alike): padding and a row boundary both show."""
        lengths = self.batch.attention_mask.sum(-1)
        return torch.unique(torch.stack([lengths.argmin(), lengths.argmax()]))

    @torch.no_grad()
    def _keep_what_agrees(self) -> None:
        """Keep the shared prompt and packing if they give the full forward's losses on the check examples under two
        candidates (one batched forward each way); else the one of them that does; else neither."""
        check, examples = self._check_weights(), self._check_examples()
        whole = trim(take(self.batch, examples.repeat(len(check))))  # candidate-major rows
        candidate = torch.arange(len(check)).repeat_interleave(len(examples))
        full = self._losses(check, candidate, whole).view(len(check), len(examples))
        options = dict.fromkeys([(self.prompt, self.pack), (self.prompt, False), (None, self.pack)])
        for prompt, pack in [option for option in options if option != (None, False)]:
            self.prompt, self.pack = prompt, pack
            try:
                if torch.allclose(self._example_losses(check, _no_reuse, self._grouped(examples)), full, rtol=0.0,
                                  atol=TOLERANCE):
                    return
            except Exception:  # a model whose forward does not take the cache or the 4D mask this way
                pass
        self.prompt, self.pack = None, False

    @torch.no_grad()
    def _checked_prefix(self) -> FrozenPrefix | None:
        """A FrozenPrefix holding the frozen layers' output for every example, if reusing it gives the full
        forward's losses (checked on every example under one candidate: the frozen layers see no candidate)."""
        layers = frozen_layers(self.model)
        if not layers:
            return None
        prefix, check = FrozenPrefix(layers), self._check_weights()[:1]
        full = self._example_losses(check, prefix.capture)  # [1, n], storing the frozen layers' output
        if not prefix.supported:
            return None
        try:
            cached = self._example_losses(check, prefix.reuse)
        except Exception:  # a model whose forward does not take the stored outputs: the full forward it is
            return None
        return prefix if torch.allclose(cached, full, rtol=0.0, atol=TOLERANCE) else None


# max |loss difference| from the full forward for a saving to be used: float32 rounding through SmolLM2's 30 layers
# alone reaches 1.05e-5 on a loss of 1.44 (the shared prompt on one example); a wrong cache row, position or stored
# state costs orders of magnitude more
TOLERANCE = 1e-4


@contextlib.contextmanager
def _no_reuse(group: int, rows: torch.Tensor, packing: Packing | None):
    yield


def weighted(model, weights: torch.Tensor, mode: str):
    """The routing under which batch row j composes the N attached adapters by weights[j] (weights [rows, N]; one
    row: every batch row), in `mode` ("fusion" or "mixture"): what every candidate of a search or fit runs under."""
    idx = torch.arange(weights.shape[1], device=weights.device).expand_as(weights)
    return routing(model, idx, weights, mode=mode, per="row")


def encode_pairs(model, tokenizer, examples: Sequence[tuple[str, str]]) -> Batch:
    """(input, answer) pairs as one batch for `model` (causal or seq2seq); answers end with eos when there is one."""
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    return encode_examples(tokenizer, [x for x, _ in examples], [y for _, y in examples], is_seq2seq=is_seq2seq,
                           add_eos=tokenizer.eos_token_id is not None)


def l1_penalty(weights: torch.Tensor, l1: float) -> torch.Tensor:
    """LoraHub's regularizer: l1 * mean_i |w_i| per candidate; weights [P, N] -> [P]."""
    return l1 * torch.as_tensor(weights).abs().mean(-1)
