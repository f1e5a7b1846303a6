"""Packing: a candidate's rows laid end to end, by hand on a small layout; a packed forward gives the padded one's
logits and computes no padding; the objective's check turns packing off where it disagrees with the full forward."""

import contextlib
import copy

import pytest
import torch

import lorahub_engine as le
from lorahub_engine.fewshot import positions
from lorahub_engine.search import FewShotObjective, encode_pairs
from lorahub_engine.search import objective as objective_module
from lorahub_engine.search.packing import Packing, packed
from tests.search.conftest import MODELS, mixed_adapters
from tests.search.test_speed_levers import EXAMPLES, WEIGHTS, merged_losses

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 left-padded rows of 2, 4, 3, 1 real tokens; rows 0-1 run under candidate 3, rows 2-3 under candidate 5
MASK = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
SEQUENCE = torch.tensor([3, 3, 5, 5])


def test_a_layout_by_hand():
    packing = Packing(MASK, SEQUENCE)
    assert packing.sequences.tolist() == [3, 5] and packing.length == 6  # 2 + 4 tokens; 3 + 1 (then 2 of padding)
    x = torch.arange(16).view(4, 4) + 1  # token ids 1..16, row-major
    assert packing.pack(x).tolist() == [[3, 4, 5, 6, 7, 8], [10, 11, 12, 16, 0, 0]]
    assert packing.unpack(packing.pack(x)).tolist() == (x * MASK).tolist()
    assert packing.segment.tolist() == [[0, 0, 1, 1, 1, 1], [2, 2, 2, 3, -1, -1]]
    places, index = packing.kept(2)  # each row's last 2 positions
    assert places.tolist() == [[0, 1, 4, 5], [1, 2, 3, 0]]  # sequence 1 keeps 3 real positions, then position 0
    assert index.tolist() == [[0, 1], [2, 3], [4, 5], [-1, 6]]  # row 3's first kept position is padding
    allowed = packing.mask(torch.float32)[:, 0] == 0  # [2, 6, 6]
    assert allowed[0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                                         [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert allowed[1].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                         [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]]


def test_a_layout_with_a_head_by_hand():
    """Two head tokens (a shared prompt) open every sequence; every row sees them, and only its own tokens after."""
    packing = Packing(MASK, SEQUENCE, head=2)
    assert packing.length == 8
    x = torch.arange(16).view(4, 4) + 1
    assert packing.pack(x, torch.tensor([98, 99])).tolist() == [[98, 99, 3, 4, 5, 6, 7, 8],
                                                                [98, 99, 10, 11, 12, 16, 0, 0]]
    assert packing.unpack(packing.pack(x, torch.tensor([98, 99]))).tolist() == (x * MASK).tolist()
    places, index = packing.kept(2)
    assert places.tolist() == [[2, 3, 6, 7], [3, 4, 5, 0]] and index.tolist() == [[0, 1], [2, 3], [4, 5], [-1, 6]]
    allowed = (packing.mask(torch.float32)[:, 0] == 0).int()
    assert allowed[1].tolist() == [[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0],
                                   [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1, 0, 0],
                                   [1, 1, 0, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0, 1, 1]]


@torch.no_grad()
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_packed_forward_gives_the_padded_forwards_logits(tokenizer, name):
    model = MODELS[name][0](tokenizer)
    batch = encode_pairs(model, tokenizer, EXAMPLES)
    mask, real = batch.attention_mask, batch.attention_mask.bool()
    inputs = dict(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions(mask))
    padded = model(**inputs).logits  # [5, s, v]
    packing = Packing(mask, torch.tensor([0, 0, 1, 1, 1]))
    with packed(model, packing):
        whole = model(**inputs).logits
        last = model(**inputs, logits_to_keep=3).logits
    assert whole.shape == padded.shape and last.shape == (5, 3, padded.shape[-1])
    torch.testing.assert_close(whole[real], padded[real], atol=1e-5, rtol=0)
    assert not whole[~real].any()  # padding: zeros
    torch.testing.assert_close(last[real[:, -3:]], padded[:, -3:][real[:, -3:]], atol=1e-5, rtol=0)
    assert not model._forward_hooks and not model._forward_pre_hooks


@torch.no_grad()
def test_the_packed_objective_computes_no_padding(tokenizer):
    model = MODELS["llama"][0](tokenizer)
    adapters = mixed_adapters(model, MODELS["llama"][1])
    attached = le.attach(copy.deepcopy(model), adapters)
    batch = encode_pairs(attached, tokenizer, EXAMPLES)
    objective = FewShotObjective(attached, batch, share_prompt=False)
    assert objective.pack
    rows = []  # the [rows, length] of every input the first attention projection sees
    handle = attached.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda module, args, out: rows.append(tuple(args[0].shape[:2])))
    objective.example_losses(WEIGHTS[:2])  # a population of 2: one packed sequence per candidate
    handle.remove()
    assert rows == [(2, int(batch.attention_mask.sum()))]


@torch.no_grad()
def test_packing_that_disagrees_with_the_full_forward_is_not_used(tokenizer, monkeypatch):
    """Positions after the prompt off by one, rows that see each other, or a model that refuses the 4D mask: the
    check at construction turns packing off (the shared prompt stays) and the losses stay the full forward's."""
    model = MODELS["llama"][0](tokenizer)
    adapters = mixed_adapters(model, MODELS["llama"][1])
    expected = merged_losses(model, tokenizer, adapters, WEIGHTS)
    mask = Packing.mask

    @contextlib.contextmanager
    def shifted(model, packing, head):  # the rows' tokens one position later than after the prompt
        def hook(module, args, kwargs):
            kwargs["position_ids"] = kwargs["position_ids"] + (torch.arange(packing.length) >= packing.head)
            return args, kwargs

        with packed(model, packing, head):
            handle = model.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()

    def one_sequence(self, dtype):  # causal over the whole packed sequence: rows see the rows before them
        causal = torch.ones(self.length, self.length, dtype=torch.bool).tril()
        return torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(dtype).min).expand_as(mask(self, dtype))

    def refused(self, dtype):
        raise TypeError("this model takes no 4D mask")

    for where, planted in ((objective_module, shifted), (Packing, one_sequence), (Packing, refused)):
        with monkeypatch.context() as patch:
            patch.setattr(where, "packed" if where is objective_module else "mask", planted)
            attached = le.attach(copy.deepcopy(model), adapters)
            fast = FewShotObjective(attached, encode_pairs(attached, tokenizer, EXAMPLES))
            assert not fast.pack and fast.shared_tokens > 0
            torch.testing.assert_close(fast.example_losses(WEIGHTS), expected, atol=1e-5, rtol=0)
    attached = le.attach(copy.deepcopy(model), adapters)
    assert FewShotObjective(attached, encode_pairs(attached, tokenizer, EXAMPLES)).pack  # unplanted: packed
