"""The objective's savings change no loss: examples grouped by length (padding trimmed), the shared opening tokens run
once per candidate (a KV cache), the layers below the lowest adapted one run once (their output reused), and each
candidate's rows packed end to end (no padding) give, each alone and together, the padded full forward's losses and
the merge-and-rerun reference's, on tiny Llama / Qwen2 / GPT-2 / T5, adapters on all layers or on upper ones."""

import contextlib
import copy

import pytest
import torch
import transformers as tf

import lorahub_engine as le
from lorahub_engine.fewshot import IGNORE, encode_examples, example_losses
from lorahub_engine.search import FewShotObjective, encode_pairs
from lorahub_engine.search.groups import length_groups
from lorahub_engine.search.prefix import FrozenPrefix, frozen_layers
from lorahub_engine.search.prompt import SharedPrompt, shared_length, without_prompt
from tests.search.conftest import mixed_adapters, tiny_t5_for

pytestmark = pytest.mark.usefixtures("one_thread")

OPENING = "answer plural of answer plural of answer plural of"  # 9 words every prompt opens with
# prompts of 9 + 5, 8, 6, 10 and 5 tokens (with <s>), answers of 1 or 2 words (+ eos): causal rows of 16, 18, 18,
# 20, 16 tokens (3 groups), seq2seq encoder inputs of 14, 17, 15, 19, 14 (4 groups)
EXAMPLES = [(f"{OPENING} {x}", y) for x, y in [
    ("plural of cat answer", "cats"), ("plural of dog of dog answer", "dogs"),
    ("plural of cow cow answer", "cows cows"), ("plural of hen of hen of hen answer", "hens"),
    ("plural of pig answer", "pigs")]]
SHARED = 1 + 9 + 2  # <s>, the opening, "plural of"
WEIGHTS = torch.tensor([[0.8, -0.4, 1.2], [-1.5, 0.3, 0.0], [0.0, 0.0, 0.0], [0.2, 1.1, -0.7]])
NONE = dict(by_length=False, share_prompt=False, reuse_prefix=False, pack=False)
LEVERS = {"lengths": {**NONE, "by_length": True}, "prompt": {**NONE, "share_prompt": True},
          "prefix": {**NONE, "reuse_prefix": True}, "packed": {**NONE, "pack": True},
          "default": {},  # FewShotObjective's own: prompt, prefix, packed
          "all": dict(by_length=True, share_prompt=True, reuse_prefix=True, pack=True)}


def three_layers(config_cls, model_cls, tokenizer, **sizes):
    torch.manual_seed(0)
    config = config_cls(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2, **sizes)
    return model_cls(config).eval()


MODELS = {  # factory, LoRA targets, decoder layers (None: seq2seq)
    "llama": (lambda tok: three_layers(tf.LlamaConfig, tf.LlamaForCausalLM, tok, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64), ["q_proj", "v_proj", "down_proj"], 3),
    "qwen2": (lambda tok: three_layers(tf.Qwen2Config, tf.Qwen2ForCausalLM, tok, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64), ["q_proj", "v_proj", "up_proj"], 3),
    "gpt2": (lambda tok: three_layers(tf.GPT2Config, tf.GPT2LMHeadModel, tok, n_embd=32, n_layer=3, n_head=4,
                                      n_positions=64), ["c_attn", "c_fc"], 3),
    "t5": (tiny_t5_for, ["q", "v", "wo"], None),
}


def upper_only(adapters, lowest: int):
    """The adapters without their modules in decoder layers below `lowest` (seq2seq: without the encoder's)."""
    def keep(path):
        index = next((int(p) for p in path.split(".") if p.isdigit()), 0)
        return index >= lowest and not path.startswith("encoder.")
    return [a.with_modules({p: m for p, m in a.modules.items() if keep(p)}) for a in adapters]


@pytest.fixture(scope="module", params=[(m, where) for m in MODELS for where in ("all", "upper")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tokenizer):
    name, where = request.param
    factory, targets, _ = MODELS[name]
    base = factory(tokenizer)
    adapters = mixed_adapters(base, targets)
    if where == "upper":  # the top layer only (T5, 2 layers: the decoder's second block)
        adapters = upper_only(adapters, 2 if MODELS[name][2] else 1)
    return name, where, base, adapters


def objective(base, adapters, tokenizer, **levers):
    """The objective on a copy of `base` with the adapters attached; every saving on unless `levers` say."""
    model = le.attach(copy.deepcopy(base), adapters)
    return FewShotObjective(model, encode_pairs(model, tokenizer, EXAMPLES), **{**LEVERS["all"], **levers})


@torch.no_grad()
def merged_losses(base, tokenizer, adapters, weights):
    """Reference [P, n]: per candidate, the LoraHub merge folded into a copy of the base, one padded batch."""
    rows = []
    for w in weights.tolist():
        model = le.merge_into_base(copy.deepcopy(base), le.merge(adapters, w, method="lorahub"))
        rows.append(example_losses(model, encode_pairs(model, tokenizer, EXAMPLES)))
    return torch.stack(rows)


@torch.no_grad()
@pytest.mark.parametrize("lever", list(LEVERS))
def test_each_lever_gives_the_full_forwards_and_the_merged_references_losses(case, tokenizer, lever):
    name, where, base, adapters = case
    expected = merged_losses(base, tokenizer, adapters, WEIGHTS)
    plain = objective(base, adapters, tokenizer, **NONE)
    fast = objective(base, adapters, tokenizer, **LEVERS[lever])
    torch.testing.assert_close(plain.example_losses(WEIGHTS), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.example_losses(WEIGHTS), expected, atol=1e-5, rtol=0)  # a population
    one_by_one = torch.cat([fast.example_losses(w[None]) for w in WEIGHTS])
    torch.testing.assert_close(one_by_one, expected, atol=1e-5, rtol=0)
    fast.batch_size = 3  # chunks of 3 rows within each group
    torch.testing.assert_close(fast.example_losses(WEIGHTS), expected, atol=1e-5, rtol=0)
    assert expected.unique().numel() == expected.numel()  # every candidate and example scores differently


def test_savings_apply_where_they_can(case, tokenizer):
    """Causal models share the 12 opening tokens and run packed; the prefix is exactly the layers below the adapters."""
    name, where, base, adapters = case
    causal = MODELS[name][2] is not None
    fast = objective(base, adapters, tokenizer)
    assert fast.reused_layers == (2 if where == "upper" and causal else 0)
    assert fast.shared_tokens == (SHARED if causal else 0)
    assert fast.pack == causal
    assert len(fast.groups) == (3 if causal else 4)


@torch.no_grad()
def test_reused_layers_compute_nothing(tokenizer):
    factory, targets, _ = MODELS["llama"]
    base = factory(tokenizer)
    fast = objective(base, upper_only(mixed_adapters(base, targets), 2), tokenizer)
    lengths = []  # the token count of every input the frozen layers' modules see
    hooks = [m.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[-2]))
             for layer in fast.model.model.layers[:2] for m in layer.modules() if m is not layer and
             isinstance(m, torch.nn.Linear)]
    fast.example_losses(WEIGHTS)
    assert lengths == []  # packed, the prompt opens each sequence: the frozen layers compute neither
    cached = FewShotObjective(fast.model, fast.batch, by_length=True, share_prompt=True, pack=False)
    lengths.clear()
    cached.example_losses(WEIGHTS)
    assert lengths and set(lengths) == {SHARED}  # the prompt's own forward (its cache), never an example's tokens
    lengths.clear()
    FewShotObjective(fast.model, fast.batch, by_length=True, share_prompt=True, reuse_prefix=False).example_losses(
        WEIGHTS)
    assert max(lengths) > SHARED  # the same hooks see the examples' tokens without the reuse
    for h in hooks:
        h.remove()
    assert "forward" not in vars(fast.model.model.layers[0])  # the layers' own forward is back after each call


def test_gradients_in_the_weights_are_those_of_the_full_forward(tokenizer):
    factory, targets, _ = MODELS["gpt2"]
    base = factory(tokenizer)
    adapters = upper_only(mixed_adapters(base, targets), 2)
    grads = []
    for levers in (NONE, LEVERS["all"]):
        weights = WEIGHTS[:2].clone().requires_grad_(True)
        objective(base, adapters, tokenizer, **levers).cross_entropy(weights, grad=True).sum().backward()
        grads.append(weights.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)
    assert grads[0].abs().sum() > 0


@torch.no_grad()
def test_a_cached_path_that_disagrees_with_the_full_forward_is_not_used(tokenizer, monkeypatch):
    """A capture that stores slightly wrong hidden states, or a model that refuses the stored output: the check at
    construction turns the prefix off and the losses stay the full forward's."""
    factory, targets, _ = MODELS["llama"]
    base = factory(tokenizer)
    adapters = upper_only(mixed_adapters(base, targets), 2)
    expected = merged_losses(base, tokenizer, adapters, WEIGHTS)
    capture = FrozenPrefix.capture

    def off_by_a_little(self, group, rows, packing=None):
        with capture(self, group, rows, packing):
            yield
        for stored in self.stored.values():
            for h in stored.values():
                h.add_(1e-3)

    monkeypatch.setattr(FrozenPrefix, "capture", contextlib.contextmanager(off_by_a_little))
    fast = objective(base, adapters, tokenizer)
    assert fast.reused_layers == 0
    torch.testing.assert_close(fast.example_losses(WEIGHTS), expected, atol=1e-5, rtol=0)
    monkeypatch.setattr(FrozenPrefix, "capture", capture)

    @contextlib.contextmanager
    def refused(self, group, rows, packing=None):
        raise TypeError("this model's loop wants something else")
        yield

    monkeypatch.setattr(FrozenPrefix, "reuse", refused)
    fast = objective(base, adapters, tokenizer)
    assert fast.reused_layers == 0
    torch.testing.assert_close(fast.example_losses(WEIGHTS), expected, atol=1e-5, rtol=0)


def test_frozen_layers_need_one_stack_and_every_lora_layer_inside_it(tokenizer):
    factory, targets, _ = MODELS["llama"]
    base = factory(tokenizer)
    adapters = upper_only(mixed_adapters(base, targets), 2)
    model = le.attach(copy.deepcopy(base), adapters)
    assert frozen_layers(model) == list(model.model.layers[:2])
    le.detach(model)
    head = adapters[0].with_modules({**adapters[0].modules, "lm_head": le.init_adapter(
        base, "head", ["lm_head"]).modules["lm_head"]})
    model = le.attach(copy.deepcopy(base), [head, *adapters[1:]])
    assert frozen_layers(model) == []  # a LoRA layer outside the stack: its place in the forward is unknown
    assert frozen_layers(le.attach(copy.deepcopy(base), mixed_adapters(base, targets))) == []  # layer 0 adapted


def test_length_groups_partition_the_examples_and_trim_only_padding(tokenizer):
    causal = encode_examples(tokenizer, [x for x, _ in EXAMPLES], [y for _, y in EXAMPLES])
    seq2seq = encode_examples(tokenizer, [x for x, _ in EXAMPLES], [y for _, y in EXAMPLES], is_seq2seq=True)
    for batch, count in ((causal, 3), (seq2seq, 4)):
        groups = length_groups(batch)
        assert sorted(torch.cat([g.examples for g in groups]).tolist()) == list(range(len(EXAMPLES)))
        assert len(groups) == count
        for g in groups:
            mask = g.batch.attention_mask
            assert bool(mask.all())  # equal lengths: no padding left
            for row, e in enumerate(g.examples.tolist()):
                real = batch.attention_mask[e].bool()
                assert g.batch.input_ids[row].tolist() == batch.input_ids[e][real].tolist()
                answer = batch.labels[e][batch.labels[e] != IGNORE].tolist()
                assert g.batch.labels[row][g.batch.labels[row] != IGNORE].tolist() == answer
            if batch.is_seq2seq:  # labels keep the group's longest answer and nothing after it
                assert bool((g.batch.labels[:, -1] != IGNORE).any())


@torch.no_grad()
def test_a_shared_prompt_that_disagrees_with_the_full_forward_is_not_used(tokenizer, monkeypatch):
    """Positions after the prompt off by one, or a model that refuses the cache: the check at construction turns
    sharing off and the losses stay the full forward's."""
    factory, targets, _ = MODELS["qwen2"]
    base = factory(tokenizer)
    adapters = mixed_adapters(base, targets)
    expected = merged_losses(base, tokenizer, adapters, WEIGHTS)
    attached = SharedPrompt.attached

    @contextlib.contextmanager
    def shifted(self, cache, rows):
        def hook(module, args, kwargs):
            kwargs["position_ids"] = kwargs["position_ids"] + 1
            return args, kwargs

        with attached(self, cache, rows):
            handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()

    for planted in (shifted, contextlib.contextmanager(lambda self, cache, rows: (yield self.model.no_such_thing))):
        monkeypatch.setattr(SharedPrompt, "attached", planted)
        fast = objective(base, adapters, tokenizer, pack=False)  # the shared prompt's own path (packed: see below)
        assert fast.shared_tokens == 0 and len(fast.groups) == 3
        torch.testing.assert_close(fast.example_losses(WEIGHTS), expected, atol=1e-5, rtol=0)


def test_the_shared_opening_stops_before_the_position_that_predicts_an_answer(tokenizer):
    same_prompt = encode_examples(tokenizer, ["plural of cat answer"] * 2, ["cats", "dogs"])
    assert shared_length(same_prompt) == 4  # <s> plural of cat | answer: "answer" predicts the first answer token
    batch = encode_examples(tokenizer, [x for x, _ in EXAMPLES], [y for _, y in EXAMPLES])
    assert shared_length(batch) == SHARED
    rest = without_prompt(batch, SHARED)
    for row in range(len(EXAMPLES)):
        real, left = batch.attention_mask[row].bool(), rest.attention_mask[row].bool()
        assert batch.input_ids[row][real][SHARED:].tolist() == rest.input_ids[row][left].tolist()
        assert batch.labels[row][real][SHARED:].tolist() == rest.labels[row][left].tolist()
    seq2seq = encode_examples(tokenizer, [x for x, _ in EXAMPLES], [y for _, y in EXAMPLES], is_seq2seq=True)
    assert SharedPrompt.find(tiny_t5_for(tokenizer), batch) is None  # seq2seq: none
    assert SharedPrompt.find(tiny_t5_for(tokenizer), seq2seq) is None


def _model_state(model):
    """What an objective may touch on the attached model: instance attributes of its modules (a replaced forward),
    forward hooks, the dispatch's routing stack and open forwards, train mode, the config's cache switch."""
    dispatch = getattr(model, "_lorahub_attached").dispatch
    return ([(name, sorted(k for k in vars(m) if not k.startswith("_") and k not in ("training",)))
             for name, m in model.named_modules()],
            [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()],
            len(dispatch.stack), len(dispatch.contexts), model.training, model.config.use_cache)


@torch.no_grad()
def test_objectives_sharing_one_model_leave_each_other_exact(tokenizer):
    """bench_search's sequence: every combination of savings built on ONE attached model, then evaluated in turn,
    one by one and as populations, several rounds: each keeps the merge-and-rerun losses, whatever ran before it,
    and the model's state is what it was before the first objective."""
    factory, targets, _ = MODELS["llama"]
    base = factory(tokenizer)
    for adapters in (mixed_adapters(base, targets), upper_only(mixed_adapters(base, targets), 2)):
        expected = merged_losses(base, tokenizer, adapters, WEIGHTS)
        model = le.attach(copy.deepcopy(base), adapters)
        before = _model_state(model)
        batch = encode_pairs(model, tokenizer, EXAMPLES)
        combos = [dict(by_length=a, share_prompt=b, reuse_prefix=c, pack=d) for a in (False, True)
                  for b in (False, True) for c in (False, True) for d in (False, True)]
        objectives = [FewShotObjective(model, batch, **levers) for levers in combos]
        for _ in range(2):
            for o in objectives + objectives[::-1]:
                torch.testing.assert_close(torch.cat([o.example_losses(w[None]) for w in WEIGHTS]), expected,
                                           atol=1e-5, rtol=0)
                torch.testing.assert_close(o.example_losses(WEIGHTS), expected, atol=1e-5, rtol=0)
                assert _model_state(model) == before


def test_defaults_share_the_prompt_reuse_the_prefix_and_pack_one_batch(tokenizer):
    factory, targets, _ = MODELS["llama"]
    base = factory(tokenizer)
    model = le.attach(copy.deepcopy(base), upper_only(mixed_adapters(base, targets), 2))
    default = FewShotObjective(model, encode_pairs(model, tokenizer, EXAMPLES))
    assert default.shared_tokens == SHARED and default.reused_layers == 2 and default.pack and len(default.groups) == 1
