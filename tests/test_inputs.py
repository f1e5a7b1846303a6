"""Inputs refused by name: adapter configs and headers, zoo and index manifests, inputs longer than the context; and
a fuzz test: random corruptions of a valid adapter folder, zoo and index give a typed error or a correct load."""

import json
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lorahub_engine as le
from lorahub_engine.errors import AdapterFormatError, UnsupportedFeatureError
from lorahub_engine.fewshot import TruncationWarning, encode_examples, example_losses, generate_answers
from tests.tiny_models import tiny_llama_for, word_tokenizer

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def tiny_adapter(name: str = "a") -> le.LoraAdapter:
    g = torch.Generator().manual_seed(0)
    modules = {f"layers.{i}.{m}": le.LoraModule(torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g), 1.5)
               for i in range(2) for m in ("q", "v")}
    return le.LoraAdapter(name, modules, metadata={"samples": ["one input", "another input"]})


@pytest.fixture
def folder(tmp_path):
    tiny_adapter().save(tmp_path / "a")
    return tmp_path / "a"


def edit_config(folder, **changes):
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_weights(folder, tensors=None, header=None):
    old = load_file(folder / WEIGHTS)
    from safetensors import safe_open

    with safe_open(folder / WEIGHTS, framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors if tensors is not None else old, folder / WEIGHTS, metadata={**metadata, **(header or {})})


# ---- adapter_config.json and the safetensors header ----------------------------------------------------------
@pytest.mark.parametrize("changes,error,message", [
    ({"alora_invocation_tokens": [5, 6]}, UnsupportedFeatureError, "alora_invocation_tokens"),
    ({"use_bdlora": True}, UnsupportedFeatureError, "'use_bdlora' is not understood"),
    ({"some_future_field": {"x": 1}}, UnsupportedFeatureError, "'some_future_field'"),
    ({"use_qalora": True}, UnsupportedFeatureError, "use_qalora"),
    ({"target_parameters": ["experts.w"]}, UnsupportedFeatureError, "target_parameters"),
    ({"bias": "all"}, UnsupportedFeatureError, "bias 'all'"),
    ({"target_modules": ["q", "v", "k_proj"]}, AdapterFormatError, "target_modules' names ['k_proj']"),
    ({"target_modules": "layers\\.9\\..*"}, AdapterFormatError, "selects none"),
    ({"target_modules": "layers.(["}, AdapterFormatError, "'target_modules' 'layers.([' is not a valid regex"),
    ({"r": 8.5}, AdapterFormatError, "'r' must be a positive integer, got 8.5"),
    ({"r": True}, AdapterFormatError, "'r' must be a positive integer, got True"),
    ({"lora_alpha": "8"}, AdapterFormatError, "'lora_alpha' must be a positive number"),
    ({"alpha_pattern": {"q": -2.0}}, AdapterFormatError, "alpha_pattern['q'] must be a positive number"),
    ({"rank_pattern": {"q": 2.5}}, AdapterFormatError, "rank_pattern['q'] must be a positive integer"),
    ({"rank_pattern": {"q(": 2}}, AdapterFormatError, "rank_pattern key 'q(' is not a valid regex"),
    ({"rank_pattern": ["q"]}, AdapterFormatError, "'rank_pattern' must be an object"),
    ({"use_rslora": "yes"}, AdapterFormatError, "'use_rslora' must be true or false"),
])
def test_config_fields_are_refused_by_name(folder, changes, error, message):
    edit_config(folder, **changes)
    with pytest.raises(error) as info:
        le.LoraAdapter.load(folder)
    assert message in str(info.value)


def test_unset_unknown_fields_and_known_bookkeeping_load(folder):
    edit_config(folder, some_future_field=None, use_bdlora=False, lora_ga_config=None, layers_to_transform=[0, 1],
                peft_version="0.99", target_modules=["q", "v"])
    loaded = le.LoraAdapter.load(folder)
    for path, module in tiny_adapter().modules.items():
        torch.testing.assert_close(loaded.delta_weight(path), module.delta_weight())


def test_integer_factors_are_refused(folder):
    tensors = {k: (v * 10).to(torch.int32) for k, v in load_file(folder / WEIGHTS).items()}
    edit_weights(folder, tensors)
    with pytest.raises(AdapterFormatError, match="must be floating point"):
        le.LoraAdapter.load(folder)


@pytest.mark.parametrize("value,message", [("{not json", "is not valid JSON"), ("[1, 2]", "must be a JSON object")])
def test_malformed_header_metadata_is_refused_by_name(folder, value, message):
    edit_weights(folder, header={"lorahub_engine.metadata": value})
    with pytest.raises(AdapterFormatError, match=f"lorahub_engine.metadata.*{message}"):
        le.LoraAdapter.load(folder)


# ---- zoo manifests -------------------------------------------------------------------------------------------
@pytest.fixture
def zoo(tmp_path):
    le.AdapterZoo([tiny_adapter("a"), tiny_adapter("b")]).save(tmp_path / "zoo")
    tiny_adapter("outside").save(tmp_path / "outside")
    return tmp_path / "zoo"


def edit_manifest(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change,message", [
    (lambda m: m["adapters"][0].update(path="../outside"), "lies outside the zoo folder"),
    (lambda m: m["adapters"][0].update(path="../../x"), "lies outside the zoo folder"),
    (lambda m: m["adapters"][0].update(path="/tmp"), "lies outside the zoo folder"),
    (lambda m: m["adapters"][0].update(path="."), "lies outside the zoo folder"),
    (lambda m: m["adapters"][0].pop("name"), "needs a non-empty string 'name'"),
    (lambda m: m["adapters"][0].update(name=3), "needs a non-empty string 'name'"),
    (lambda m: m["adapters"][0].update(path=None), "needs a non-empty string 'path'"),
    (lambda m: m["adapters"].append("c"), "adapters[2] must be an object"),
    (lambda m: m["adapters"][1].update(samples="one string"), "'samples' must be a list of strings"),
    (lambda m: m.update(format_version=2), "format_version 2"),
    (lambda m: m.pop("format_version"), "format_version None"),
    (lambda m: m.update(adapters={"a": "a"}), "an 'adapters' list"),
    (lambda m: m["adapters"][1].update(name="a"), "two adapters are named 'a'"),
])
def test_zoo_manifests_are_refused_by_name(zoo, change, message):
    edit_manifest(zoo, change)
    with pytest.raises(AdapterFormatError) as info:
        le.AdapterZoo.load(zoo)
    assert message in str(info.value)


def test_a_zoo_never_saves_an_adapter_outside_its_folder(tmp_path):
    for name in ("../evil", ".hidden", "a/b", ""):
        with pytest.raises(AdapterFormatError, match="cannot name a zoo folder"):
            le.AdapterZoo([tiny_adapter(name)]).save(tmp_path / "zoo")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- index manifests -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def index_folder(tmp_path_factory):
    from retrieval import AdapterIndex

    root = tmp_path_factory.mktemp("index")
    AdapterIndex.build({"add": ["add one and two"], "plural": ["plural of cat"]}).save(root / "idx")
    return root / "idx"


@pytest.fixture
def index(index_folder, tmp_path):
    import shutil

    shutil.copytree(index_folder, tmp_path / "idx")
    return tmp_path / "idx"


@pytest.mark.parametrize("change,message", [
    (lambda m: m["adapters"].__setitem__(0, ["x"]), "adapters[0] must be an [id, name] pair"),
    (lambda m: m["adapters"].__setitem__(0, [0, 5]), "adapters[0] must be an [id, name] pair"),
    (lambda m: m["adapters"].__setitem__(0, "add"), "adapters[0] must be an [id, name] pair"),
    (lambda m: m["adapters"].__setitem__(1, [0, "plural"]), "adapter ids must be unique"),
    (lambda m: m["adapters"].__setitem__(1, [7, "plural"]), "disagree"),
    (lambda m: m.update(adapters={"0": "add"}), "'adapters' must be a list"),
    (lambda m: m["embedder"].pop("prefix"), "embedder.prefix is missing"),
    (lambda m: m["embedder"].update(dimension="384"), "embedder.dimension has the wrong type"),
    (lambda m: m.update(embedder=[1]), "'embedder' must be an object or null"),
    (lambda m: m.update(format_version=9), "format_version 9"),
    (lambda m: m.pop("kind"), "missing field 'kind'"),
    (lambda m: m.update(dimension=True), "'dimension' must be a positive integer"),
    (lambda m: m.update(config=[]), "'config' must be an object"),
    (lambda m: m["config"].update(prefix=3), "prefix must be a string or None"),
])
def test_index_manifests_are_refused_by_name(index, change, message):
    from retrieval import AdapterIndex, RetrievalError

    edit_manifest(index, change)
    with pytest.raises(RetrievalError) as info:
        AdapterIndex.load(index)
    assert message in str(info.value)


# ---- inputs longer than the model's context --------------------------------------------------------------------
WORDS = "a b c d e f g h answer".split()


@pytest.fixture(scope="module")
def short_llama():
    tokenizer = word_tokenizer(WORDS)
    model = tiny_llama_for(tokenizer)
    model.config.max_position_embeddings = 12  # RoPE would run past it silently
    return model, tokenizer


def test_long_examples_lose_their_first_tokens_with_a_warning(short_llama):
    model, tokenizer = short_llama
    long_prompt = " ".join(["a", "b", "c", "d"] * 5) + " answer"  # 22 tokens with <s>
    with pytest.warns(TruncationWarning, match="1 of 2 inputs are longer than the 12 positions"):
        losses = example_losses(model, encode_examples(tokenizer, [long_prompt, "a answer"], ["e f", "g"]))
    # reference: the same example cut by hand to its last 12 - 3 prompt tokens (answer e f + eos = 3), alone
    ids = tokenizer(long_prompt)["input_ids"][-9:] + tokenizer("e f", add_special_tokens=False)["input_ids"] + [2]
    log_probs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = -sum(log_probs[t - 1, ids[t]] for t in range(9, 12)) / 3
    torch.testing.assert_close(losses[0], expected, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inputs that fit: no warning
        example_losses(model, encode_examples(tokenizer, ["a b answer"], ["e"]))


def test_long_prompts_are_cut_to_leave_room_for_the_answer(short_llama):
    model, tokenizer = short_llama
    long_prompt = " ".join(["h", "g"] * 10)
    with pytest.warns(TruncationWarning):
        got = generate_answers(model, tokenizer, [long_prompt], max_new_tokens=4)
    kept = tokenizer.decode(tokenizer(long_prompt)["input_ids"][-8:])
    ids = torch.tensor([tokenizer(long_prompt)["input_ids"][-8:]])
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                               pad_token_id=0)[0, 8:].tolist()
    if 2 in reference:
        reference = reference[:reference.index(2)]
    assert got == [tokenizer.decode(reference, skip_special_tokens=True).strip()] and kept
    with pytest.raises(ValueError, match="no room for the prompt"):
        generate_answers(model, tokenizer, ["a"], max_new_tokens=12)


# ---- fuzz ---------------------------------------------------------------------------------------------------------
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True)
                           | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


def corrupt_json(data, rng_choices, value):
    """Replace, delete or add one field somewhere in a JSON document (path chosen by `rng_choices`)."""
    node, choices = data, list(rng_choices)
    while isinstance(node, (dict, list)) and node and choices and choices[0] % 3 == 0:
        choices.pop(0)
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        child = node[keys[choices.pop(0) % len(keys) if choices else 0]]
        if not isinstance(child, (dict, list)) or not child:
            break
        node = child
    op = choices[0] % 3 if choices else 0
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    if not keys or op == 2:
        if isinstance(node, dict):
            node["fuzz"] = value
        else:
            node.append(value)
    elif op == 0:
        node[keys[(choices[1] if len(choices) > 1 else 0) % len(keys)]] = value
    else:
        del node[keys[(choices[1] if len(choices) > 1 else 0) % len(keys)]]
    return data


def use_adapter(adapter) -> None:
    """A correct load: every module's dW computes, finite, shapes chaining."""
    for path in adapter.modules:
        module = adapter.modules[path]
        assert module.A.shape[0] == module.B.shape[1] and math.isfinite(module.scale)
        assert torch.isfinite(adapter.delta_weight(path)).all()


FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(target=st.sampled_from(["config", "weights", "header"]), choices=st.lists(st.integers(0, 50), max_size=6),
       value=JSON_VALUES, cut=st.integers(0, 2000), flip=st.integers(0, 255))
def test_fuzzed_adapter_folders_load_correctly_or_raise_typed_errors(tmp_path_factory, target, choices, value, cut,
                                                                       flip):
    folder = tmp_path_factory.mktemp("fuzz") / "a"
    tiny_adapter().save(folder)
    if target == "config":
        (folder / CONFIG).write_text(json.dumps(corrupt_json(json.loads((folder / CONFIG).read_text()), choices,
                                                             value)))
    elif target == "weights":  # flip a byte of the file, or truncate it
        data = bytearray((folder / WEIGHTS).read_bytes())
        if choices and choices[0] % 2:
            data = data[: cut % len(data)]
        else:
            data[cut % len(data)] ^= flip or 1
        (folder / WEIGHTS).write_bytes(bytes(data))
    else:
        edit_weights(folder, header={"lorahub_engine.metadata": json.dumps(value)})
    try:
        use_adapter(le.LoraAdapter.load(folder))
    except le.AdapterError:
        pass


@FUZZ
@given(choices=st.lists(st.integers(0, 50), max_size=6), value=JSON_VALUES)
def test_fuzzed_zoo_manifests_load_correctly_or_raise_typed_errors(tmp_path_factory, choices, value):
    root = tmp_path_factory.mktemp("fuzz_zoo")
    le.AdapterZoo([tiny_adapter("a"), tiny_adapter("b")]).save(root / "zoo")
    edit_manifest(root / "zoo", lambda m: corrupt_json(m, choices, value))
    try:
        zoo = le.AdapterZoo.load(root / "zoo")
    except le.AdapterError:
        return
    reference = tiny_adapter()  # both zoo adapters hold these factors: any entry that loads must give them
    for adapter in zoo:
        for path, module in reference.modules.items():
            torch.testing.assert_close(adapter.delta_weight(path), module.delta_weight())


@FUZZ
@given(choices=st.lists(st.integers(0, 50), max_size=6), value=JSON_VALUES)
def test_fuzzed_index_manifests_load_correctly_or_raise_typed_errors(index_folder, tmp_path_factory, choices, value):
    import shutil

    from retrieval import AdapterIndex

    folder = tmp_path_factory.mktemp("fuzz_index") / "idx"
    shutil.copytree(index_folder, folder)
    edit_manifest(folder, lambda m: corrupt_json(m, choices, value))
    try:
        hits = AdapterIndex.load(folder).search(["plural of dog"], k=1)
    except le.AdapterError:
        return
    assert hits[0][0][0] in ("add", "plural")
