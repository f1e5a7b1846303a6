"""The routing interface: per-forward contexts (padding masks, KV-cache decode steps, T5 encoder/decoder), learned
routers through set_router, explicit per-row / per-token routings, records that never outlive their forward."""

import copy

import pytest
import torch
from torch import nn

import lorahub_engine as le
import lorahub_engine.dispatch as dispatch_module
from lorahub_engine.attach import router_outputs, set_router
from lorahub_engine.lora_layer import LoraLayer
from lorahub_engine.dispatch import RouterOutput
from tests.tiny_models import tiny_llama, tiny_t5

CLOSE = {"atol": 1e-5, "rtol": 1e-5}


class TopTwo(nn.Module):
    """A fixed per-token router for tests: top-2 of softmax(W x), W random."""

    def __init__(self, d_in, num_experts, seed):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, d_in, generator=torch.Generator().manual_seed(seed)))
        self.masks = []  # the padding masks it was shown (a test probe, cleared by the test)

    def forward(self, x, layout):
        self.masks.append(layout.real(x.device).clone())
        probs = (x @ self.weight.T).softmax(-1)  # (T, E)
        top, idx = probs.topk(2, dim=-1)
        return RouterOutput(idx, top / top.sum(-1, keepdim=True), probs, {"mean_top": top[:, 0].mean()})


def routed(base, targets, seed=0):
    adapters = [le.init_adapter(base, n, targets, r=2, seed=i) for i, n in enumerate("abc")]
    for ad in adapters:
        for m in ad.modules.values():
            m.B.normal_(generator=torch.Generator().manual_seed(seed))
    model = le.attach(copy.deepcopy(base), adapters)
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]
    set_router(model, {path: TopTwo(m.lora_A.shape[2], 3, i) for i, (path, m) in enumerate(layers)})
    return model


def padded(rows, side):
    lengths = [5, 3, 4]
    x = torch.randint(4, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(3, 5, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, 5 - n:] = 1
        else:
            mask[i, :n] = 1
    return torch.where(mask.bool(), x, torch.zeros_like(x)), mask


def test_llama_generate_with_kv_cache_equals_recompute_under_a_token_router():
    model = routed(tiny_llama(), ["q_proj", "v_proj", "down_proj"])
    x, mask = padded(3, "left")
    with router_outputs(model) as records:
        out = model.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    assert len(records) == 4 and all(len(r) == 6 for r in records)  # one record per layer and step
    assert records[1]["model.layers.0.self_attn.q_proj"].output.indices.shape == (3, 2)  # decode: 1 token per row
    seq = out.sequences
    for step, logits in enumerate(out.logits):
        n = x.shape[1] + step
        full_mask = torch.cat([mask, torch.ones(3, step, dtype=torch.long)], dim=1)
        with torch.no_grad():
            ref = model(seq[:, :n], attention_mask=full_mask,
                        position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        torch.testing.assert_close(logits, ref, **CLOSE)


@pytest.mark.parametrize("side", ["left", "right"])
def test_llama_padded_batch_equals_each_row_alone_and_routers_see_its_padding(side):
    model = routed(tiny_llama(), ["q_proj", "v_proj", "down_proj"])
    x, mask = padded(3, side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    router = model.get_submodule("model.layers.1.mlp.down_proj").router
    with torch.no_grad():
        batch = model(x, attention_mask=mask, position_ids=positions).logits
        assert torch.equal(router.masks[-1], mask.bool().reshape(-1))
        for row in range(3):
            real = mask[row].bool()
            alone = model(x[row : row + 1, real]).logits[0]
            torch.testing.assert_close(batch[row, real], alone, **CLOSE)


@pytest.mark.parametrize("side", ["left", "right"])
def test_t5_generate_with_kv_cache_equals_recompute_and_masks_encoder_padding(side):
    model = routed(tiny_t5(), ["q", "k", "v", "wo"])
    x, mask = padded(3, side)
    out = model.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    for step, logits in enumerate(out.logits):
        with torch.no_grad():
            ref = model(x, attention_mask=mask, decoder_input_ids=out.sequences[:, : step + 1]).logits[:, -1]
        torch.testing.assert_close(logits, ref, **CLOSE)
    # the encoder's layers and the decoder's cross-attention k/v (over encoder states) see the encoder's padding
    for path in ("encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.1.EncDecAttention.k"):
        router = model.get_submodule(path).router
        router.masks.clear()
        with torch.no_grad():
            model(x, attention_mask=mask, decoder_input_ids=out.sequences[:, :2])
        assert torch.equal(router.masks[0], mask.bool().reshape(-1))
    router = model.get_submodule("decoder.block.0.layer.0.SelfAttention.q").router
    assert bool(router.masks[-1].all())  # decoder tokens: no padding


def test_records_hold_one_forward_with_its_padding_and_nothing_outlives_the_block():
    model = routed(tiny_llama(), ["q_proj"])
    x, mask = padded(3, "left")
    with router_outputs(model) as records:
        model(x, attention_mask=mask)
        model(x[:1], attention_mask=mask[:1])
    assert [len(r) for r in records] == [2, 2]
    first = records[0]["model.layers.1.self_attn.q_proj"]
    assert torch.equal(first.layout.real(), mask.bool().reshape(-1))
    assert first.output.aux["mean_top"].requires_grad
    model(x, attention_mask=mask)  # no collector: nothing kept anywhere
    dispatch = model._lorahub_attached.dispatch
    assert dispatch.contexts == [] and dispatch.collectors == [] and len(records) == 2


def test_a_mixture_builds_its_token_routing_once_per_batch_shape(monkeypatch):
    """Kept across forwards (a generate's decode steps reuse the plan and coefficients); fusion builds one per forward."""
    base = tiny_llama()
    model = le.attach(copy.deepcopy(base), [le.init_adapter(base, n, ["q_proj", "v_proj"], seed=i)
                                           for i, n in enumerate("ab")])
    calls = []
    original = dispatch_module.RowRouting._per_token
    monkeypatch.setattr(dispatch_module.RowRouting, "_per_token",
                        lambda self, layout: calls.append(layout) or original(self, layout))
    x = torch.randint(0, 64, (2, 6))
    with le.routing(model, torch.tensor([0, 1])):
        model(x)
        model(x)
        assert len(calls) == 1  # 4 LoRA layers, 2 forwards of one shape
        model(x[:, :3])
        model(x)
        assert len(calls) == 2  # a second shape; the first still kept
    with le.routing(model, torch.tensor([[0, 1], [1, 0]]), torch.full((2, 2), 0.5), mode="fusion"):
        model(x)
        model(x)
    assert len(calls) == 4


def with_random_b(base, targets, names):
    """A copy of the base with adapters `names` on `targets` attached, each B drawn at random (PEFT starts it at 0)."""
    adapters = [le.init_adapter(base, n, targets, seed=i) for i, n in enumerate(names)]
    for ad in adapters:
        for m in ad.modules.values():
            m.B.normal_()
    return le.attach(copy.deepcopy(base), adapters)


def test_a_kept_routing_follows_in_place_changes_of_gates_and_scales():
    """What a mixture keeps across forwards is rebuilt when its gates or a layer's scale change in place."""
    model = with_random_b(tiny_llama(), ["q_proj", "v_proj"], "ab")
    x, idx = torch.randint(0, 64, (2, 6)), torch.tensor([[0], [1]])

    def fresh(gates):
        with le.routing(model, idx, gates):
            return model(x).logits

    gates = torch.ones(2, 1)
    with torch.no_grad(), le.routing(model, idx, gates):
        first = model(x).logits
        gates.mul_(0.5)
        halved = model(x).logits
        torch.testing.assert_close(halved, fresh(torch.full((2, 1), 0.5)), atol=0, rtol=0)
        assert not torch.equal(halved, first)
        for layer in model.modules():
            if isinstance(layer, le.lora_layer.LoraLayer):
                layer.lora_scale.mul_(3.0)
        tripled = model(x).logits
        torch.testing.assert_close(tripled, fresh(torch.full((2, 1), 0.5)), atol=0, rtol=0)
        assert not torch.equal(tripled, halved)


def test_a_routing_made_in_inference_mode_follows_in_place_changes():
    """Inference tensors keep no version counter: such a routing is built per forward, so changed gates show."""
    model = with_random_b(tiny_llama(), ["q_proj", "v_proj"], "ab")
    x = torch.randint(0, 64, (2, 6))
    with torch.no_grad(), le.routing(model, torch.tensor([[0], [1]]), torch.full((2, 1), 0.5)):
        expected = model(x).logits
    with torch.inference_mode():
        idx, gates = torch.tensor([[0], [1]]), torch.ones(2, 1)
        with le.routing(model, idx, gates):
            first = model(x).logits
            gates.mul_(0.5)  # no version bump in inference mode
            halved = model(x).logits
    torch.testing.assert_close(halved, expected, atol=0, rtol=0)
    assert not torch.equal(halved, first)


def test_explicit_per_row_and_per_token_routings_equal_the_inferred_ones():
    model = with_random_b(tiny_llama(), ["q_proj", "down_proj"], "abc")
    x = torch.randint(0, 64, (2, 6))
    per_token = torch.randint(-1, 3, (12, 2), generator=torch.Generator().manual_seed(0))
    for idx, per in ((torch.tensor([[0, 2], [1, -1]]), "row"), (per_token, "token")):
        with torch.no_grad(), le.routing(model, idx):
            inferred = model(x).logits
        with torch.no_grad(), le.routing(model, idx, per=per):
            explicit = model(x).logits
        torch.testing.assert_close(explicit, inferred, atol=0, rtol=0)
    with pytest.raises(ValueError, match="per-token routing of 12 tokens met 2 tokens"):
        with torch.no_grad(), le.routing(model, per_token, per="token"):
            model(x[:, :1])
    with pytest.raises(le.AdapterError, match="mixture only"):
        with le.routing(model, per_token, per="token", mode="fusion"):
            pass


def test_set_router_requires_every_layer_and_can_be_removed():
    model = routed(tiny_llama(), ["q_proj"])
    with pytest.raises(le.AdapterError, match="missing"):
        set_router(model, {})
    x = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        routed_logits = model(x).logits
        set_router(model, None)
        assert not hasattr(model.model.layers[0].self_attn.q_proj, "router")
        plain = model(x).logits
        torch.testing.assert_close(plain, le.detach(model)(x).logits)
    assert not torch.allclose(routed_logits, plain)
