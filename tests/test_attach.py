import copy
import math

import pytest
import torch
from peft import PeftModel

import lorahub_engine as le
from lorahub_engine.lora_layer import RowRouting
from tests.ops.reference import grouped_lora_reference
from tests.tiny_models import ARCHITECTURES, make_peft_adapter, tiny_gpt2, tiny_llama

CLOSE = {"atol": 1e-5, "rtol": 1e-5}  # fp32 through a few layers, with products summed in other orders than PEFT's


def outputs(model, x, arch, **kwargs):
    extra = {"decoder_input_ids": x[:, :5]} if arch == "t5" else {}
    with torch.no_grad():
        out = model(input_ids=x, **extra, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_case(request, tmp_path_factory):
    arch = request.param
    factory, targets, fan_in_fan_out, _ = ARCHITECTURES[arch]
    base = factory()
    folder = tmp_path_factory.mktemp(arch)
    extra = {"fan_in_fan_out": True} if fan_in_fan_out else {}
    make_peft_adapter(base, folder / "a", 0, targets, r=4, lora_alpha=8, **extra)
    make_peft_adapter(base, folder / "b", 1, targets[:2], r=2, lora_alpha=3, use_rslora=True, **extra)
    return arch, base, folder


def test_one_adapter_matches_peft(arch_case):
    arch, base, folder = arch_case
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder / "a")
    ours = le.attach(copy.deepcopy(base), [le.LoraAdapter.load(folder / "a")])
    x = torch.randint(0, 64, (2, 9))
    le.set_weights(ours, [1.0])
    torch.testing.assert_close(outputs(ours, x, arch), outputs(peft_model, x, arch), **CLOSE)


def test_mixed_batch_matches_peft_adapter_names(arch_case):
    arch, base, folder = arch_case
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder / "a", adapter_name="a")
    peft_model.load_adapter(folder / "b", adapter_name="b")
    adapters = [le.LoraAdapter.load(folder / n) for n in "ab"]
    ours = le.attach(copy.deepcopy(base), adapters)
    x = torch.randint(0, 64, (4, 9))
    ref = outputs(peft_model, x, arch, adapter_names=["a", "b", "__base__", "b"])
    got = outputs(ours, x, arch, adapter_ids=torch.tensor([0, 1, -1, 1]))
    torch.testing.assert_close(got, ref, **CLOSE)
    assert not torch.allclose(ref[0], ref[2])  # the adapters really change the output
    torch.testing.assert_close(outputs(ours, x, arch), outputs(base, x, arch))  # no routing = base


def test_set_weights_is_exact_task_arithmetic_and_fusion_is_lorahub():
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "up_proj"]
    a = le.init_adapter(base, "a", targets, r=4, alpha=6.0, seed=1)  # scale 1.5
    b = le.init_adapter(base, "b", targets[:2], r=2, alpha=5.0, use_rslora=True, seed=2)  # scale 5 / sqrt(2)
    for adapter in (a, b):
        for m in adapter.modules.values():
            m.B.normal_()
    x = torch.randint(0, 64, (3, 7))
    model = le.attach(copy.deepcopy(base), [a, b])
    le.set_weights(model, [0.7, -0.3])
    mixture = outputs(model, x, "llama")
    expected = copy.deepcopy(base)
    le.merge_into_base(expected, a, weight=0.7)
    le.merge_into_base(expected, b, weight=-0.3)
    torch.testing.assert_close(mixture, outputs(expected, x, "llama"), **CLOSE)

    le.set_weights(model, [0.7, -0.3], mode="fusion")
    fused = outputs(model, x, "llama")
    torch.testing.assert_close(fused, outputs(lorahub_by_hand(base, [a, b], [0.7, -0.3]), x, "llama"), **CLOSE)
    assert (fused - mixture).abs().max() > 1e-3  # fusion's cross terms really change the output


def lorahub_by_hand(base, adapters, weights):
    """A copy of `base` with each module's LoraHub fusion folded in, written out here in fp64 (no engine code):
    dW = (sum_i w_i sqrt(s_i) B_i)(sum_i w_i sqrt(s_i) A_i), ranks zero-padded to the largest, absent modules 0."""
    model = copy.deepcopy(base)
    for path in sorted({p for ad in adapters for p in ad.modules}):
        present = [(w, ad.modules[path]) for w, ad in zip(weights, adapters) if path in ad.modules]
        r = max(m.A.shape[0] for _, m in present)
        A = torch.zeros(r, present[0][1].A.shape[1], dtype=torch.float64)
        B = torch.zeros(present[0][1].B.shape[0], r, dtype=torch.float64)
        for w, m in present:
            c = w * math.sqrt(m.scale)
            A[: m.A.shape[0]] += c * m.A.double()
            B[:, : m.A.shape[0]] += c * m.B.double()
        with torch.no_grad():
            model.get_submodule(path).weight += (B @ A).float()  # nn.Linear weight [out, in]
    return model


def three_adapters(base, ranks, alphas=(16.0, 16.0, 16.0)):
    """Adapters a, b, c on q_proj and down_proj with nonzero B (init_adapter's B is zero); scale alpha / r."""
    adapters = [le.init_adapter(base, name, ["q_proj", "down_proj"], r=r, alpha=alpha, seed=i)
                for i, (name, r, alpha) in enumerate(zip("abc", ranks, alphas))]
    for ad in adapters:
        for m in ad.modules.values():
            m.B.normal_()
    return adapters


def test_routing_context_gives_each_row_its_own_mixture():
    base = tiny_llama()
    adapters = three_adapters(base, ranks=(3, 3, 3))
    model = le.attach(copy.deepcopy(base), adapters)
    x = torch.randint(0, 64, (2, 6))
    idx, gates = torch.tensor([[0, 2], [1, -1]]), torch.tensor([[0.5, 0.25], [2.0, 9.0]])
    with le.routing(model, idx, gates):
        got = outputs(model, x, "llama")
    for row, mix in enumerate([{0: 0.5, 2: 0.25}, {1: 2.0}]):
        ref = copy.deepcopy(base)
        for e, w in mix.items():
            le.merge_into_base(ref, adapters[e], weight=w)
        torch.testing.assert_close(got[row], outputs(ref, x[row : row + 1], "llama")[0], **CLOSE)


def test_merge_into_base_matches_peft_merge_and_unload(tmp_path):
    base = tiny_gpt2()
    make_peft_adapter(base, tmp_path / "a", 3, ["c_attn", "c_fc"], fan_in_fan_out=True)
    merged_peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").merge_and_unload()
    ours = le.merge_into_base(copy.deepcopy(base), le.LoraAdapter.load(tmp_path / "a"))
    x = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(outputs(ours, x, "gpt2"), outputs(merged_peft, x, "gpt2"), **CLOSE)


def test_detach_restores_the_plain_model():
    base = tiny_llama()
    model = le.attach(copy.deepcopy(base), [le.init_adapter(base, "a", ["q_proj"])])
    le.detach(model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with pytest.raises(le.AdapterError, match="no adapters are attached"):
        le.set_weights(model, [1.0])


def test_attached_detaches_after_the_block_even_on_error():
    base = tiny_llama()
    model, adapter = copy.deepcopy(base), le.init_adapter(base, "a", ["q_proj"])
    with le.attached(model, [adapter]) as inside:
        assert inside is model and le.attached_names(model) == ["a"]
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with pytest.raises(RuntimeError, match="boom"), le.attached(model, [adapter]):
        raise RuntimeError("boom")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with le.attached(model, [adapter], trainable=True):  # attachable again: nothing was left behind
        assert model.model.layers[0].self_attn.q_proj.lora_A.requires_grad


def test_training_reaches_only_routed_adapters_and_reads_back():
    base = tiny_llama()
    adapters = [le.init_adapter(base, n, ["q_proj", "v_proj"], r=2, seed=i) for i, n in enumerate("abc")]
    model = le.attach(copy.deepcopy(base), adapters, trainable=True)
    x = torch.randint(0, 64, (2, 6))
    model(input_ids=x, labels=x, adapter_ids=torch.tensor([0, 2])).loss.backward()
    grad_B = model.model.layers[0].self_attn.q_proj.lora_B.grad  # (E, out, r)
    assert grad_B[0].abs().sum() > 0 and grad_B[2].abs().sum() > 0
    assert grad_B[1].abs().sum() == 0
    read = le.read_adapters(model)
    assert [a.name for a in read] == ["a", "b", "c"]
    torch.testing.assert_close(read[1].modules["model.layers.1.self_attn.v_proj"].A,
                               adapters[1].modules["model.layers.1.self_attn.v_proj"].A)


def test_bank_stores_b_rank_major_through_casts_and_reads_back_contiguous():
    """Each expert's B^T is one contiguous [r, out] matrix (what the expand multiplies by), after dtype casts and
    a deep copy too; the adapters read back are plain contiguous tensors equal to the attached ones."""
    base = tiny_llama()
    adapters = [le.init_adapter(base, n, ["q_proj", "down_proj"], r=3, seed=i) for i, n in enumerate("ab")]
    for adapter in adapters:
        for module in adapter.modules.values():
            module.B.normal_()
    model = le.attach(copy.deepcopy(base), adapters)
    for cast in (lambda m: m, lambda m: m.double(), copy.deepcopy, lambda m: m.float()):
        model = cast(model)
        layer = model.model.layers[1].mlp.down_proj
        assert layer.lora_B.shape == (2, 32, 3) and layer.lora_B.transpose(1, 2).is_contiguous()
    for got, attached in zip(le.read_adapters(model), adapters):
        for path, module in attached.modules.items():
            assert got.modules[path].B.is_contiguous() and got.modules[path].A.is_contiguous()
            torch.testing.assert_close(got.modules[path].B, module.B)


def test_generate_under_routing_matches_merged_model():
    base = tiny_llama()
    adapter = le.init_adapter(base, "a", ["q_proj", "o_proj"], r=2, seed=4)
    for m in adapter.modules.values():
        m.B.normal_()
    model = le.attach(copy.deepcopy(base), [adapter])
    x = torch.randint(1, 64, (2, 5))
    with le.routing(model, torch.tensor([0, 0])):
        got = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    merged = le.merge_into_base(copy.deepcopy(base), adapter)
    assert torch.equal(got, merged.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0))




def test_fusion_merges_each_distinct_row_once_and_matches_per_row_merges():
    base = tiny_llama()
    adapters = three_adapters(base, ranks=(2, 3, 4), alphas=(1.0, 12.0, 9.0))  # scales 0.5, 4, 2.25
    model = le.attach(copy.deepcopy(base), adapters)
    x = torch.randint(0, 64, (4, 5))
    idx = torch.tensor([[0, 2], [1, -1], [0, 2], [1, -1]])  # a population of 2 candidates x 2 examples
    gates = torch.tensor([[0.5, -1.0], [2.0, 9.0], [0.5, -1.0], [2.0, 9.0]])
    fused_idx, _, inverse = RowRouting(idx, gates, "fusion").fused()
    assert len(fused_idx) == 2 and inverse[0] != inverse[1] and inverse.tolist() == inverse[:2].tolist() * 2
    with le.routing(model, idx, gates, mode="fusion"):
        got = outputs(model, x, "llama")
    for row, (names, weights) in enumerate([([0, 2], [0.5, -1.0]), ([1], [2.0])] * 2):
        ref = lorahub_by_hand(base, [adapters[i] for i in names], weights)
        torch.testing.assert_close(got[row], outputs(ref, x[row : row + 1], "llama")[0], **CLOSE)


def test_routing_per_token_matches_an_einsum_reference_in_every_layer():
    base = tiny_llama()
    adapters = three_adapters(base, ranks=(3, 3, 3))
    model = le.attach(copy.deepcopy(base), adapters)
    x = torch.randint(0, 64, (2, 6))
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(-1, 3, (12, 2), generator=g)  # one row per token, rows-major
    gates = torch.rand(12, 2, generator=g)
    with le.routing(model, idx, gates):
        got = outputs(model, x, "llama")
    ref = copy.deepcopy(base)
    for path in adapters[0].modules:
        A = torch.stack([ad.modules[path].A for ad in adapters])
        B = torch.stack([ad.modules[path].B for ad in adapters])
        scale = torch.tensor([ad.modules[path].scale for ad in adapters])
        ref.get_submodule(path).register_forward_hook(
            lambda mod, args, out, A=A, B=B, scale=scale: out + grouped_lora_reference(
                args[0].reshape(12, -1), A, B, scale, idx, gates).view(out.shape))
    torch.testing.assert_close(got, outputs(ref, x, "llama"), **CLOSE)
    with pytest.raises(ValueError, match="fusion merges factors per batch row"):
        with le.routing(model, idx, gates, mode="fusion"):
            model(x)

def test_bad_input_is_refused():
    base = tiny_llama()
    a = le.init_adapter(base, "a", ["q_proj"])
    with pytest.raises(le.AdapterError, match="at least one"):
        le.attach(base, [])
    wrong = a.with_modules({"model.layers.0.self_attn.nope": a.modules["model.layers.0.self_attn.q_proj"]})
    with pytest.raises(le.IncompatibleModelError, match="unknown target module"):
        le.attach(copy.deepcopy(base), [wrong])
    bad_shape = a.with_modules({"model.layers.0.mlp.down_proj": a.modules["model.layers.0.self_attn.q_proj"]})
    with pytest.raises(le.IncompatibleModelError, match="maps 48 -> 32"):
        le.attach(copy.deepcopy(base), [bad_shape])
    model = copy.deepcopy(base)
    model.config._name_or_path = "org/SmolLM2-135M"
    with pytest.raises(le.IncompatibleModelError, match="trained on"):
        le.attach(model, [a.with_modules(a.modules, base_model="other/Qwen2-0.5B")])
    le.attach(model, [a.with_modules(a.modules, base_model="/local/path/SmolLM2-135M")])
    with pytest.raises(le.AdapterError, match="already has adapters"):
        le.attach(model, [a])
    with pytest.raises(le.AdapterError, match="out of range"):
        with le.routing(model, torch.tensor([3])):
            pass
    with pytest.raises(le.AdapterError, match="2 weights for 1"):
        le.set_weights(model, [1.0, 2.0])
