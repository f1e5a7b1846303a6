"""`route train|eval|stats|export` through add_route on a parser built here (the core discovers it by entry point).
SiRA and LoRAMoE from the command line equal the Python API on the same seed (config, logits, eval loss, exported
experts, which PEFT loads); bad combinations are one error line before any model loads, and write nothing."""

import argparse
import json

import pytest
import torch
from peft import PeftModel

import lorahub_engine as le
from lorahub_engine.cli import execute
from lorahub_engine.cli.options import load_language_model, read_examples
from lorahub_engine.errors import AdapterError
from lorahub_engine.fewshot import example_losses
from lorahub_engine.search.objective import encode_pairs
from lorahub_engine.zoo import AdapterZoo
from routers import LoRAMoEConfig, SiRAConfig, attach_router, export_experts, load_router, train_router
from routers.api import routers_of
from routers.cli import add_route
from routers.experts import layer_index
from routers.storage import saved_config
from tests.tiny_models import sampled_adapters, tiny_llama_for, word_tokenizer

WORDS = [f"w{i}" for i in range(12)]
TYPED = [(f"w{i} w{(i * 5) % 12}", f"w{(i + 3) % 12}", None if i == 7 else i % 2) for i in range(8)]
MLP = ("gate_proj", "up_proj", "down_proj")
MOE = {  # CLI options, and the config they stand for (the others at the config's defaults)
    "sira": (["--num-experts", "2,3", "--top-k", "2", "--rank", "2", "--capacity-factor", "1.0"],
             SiRAConfig(num_experts=(2, 3), top_k=2, rank=2, capacity_factor=1.0, seed=1)),
    "loramoe": (["--num-experts", "4", "--rank", "2", "--expert-groups", "2,2", "--target-modules", *MLP,
                 "--balance-weight", "0.2"],
                LoRAMoEConfig(num_experts=4, rank=2, expert_groups=(2, 2), target_modules=MLP, balance_weight=0.2,
                              seed=1)),
}
TRAIN = ["--steps", "4", "--lr", "2e-2", "--batch-size", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    tokenizer = word_tokenizer(WORDS)
    model = tiny_llama_for(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    AdapterZoo(sampled_adapters(model, {"x": ["w1 w2"], "y": ["w3"], "z": ["w4 w5"]})).save(root / "zoo")
    lines = [json.dumps({"input": f"w{i} w{i + 1}", "output": f"w{(i + 2) % 12}"}) for i in range(6)]
    (root / "ex.jsonl").write_text("\n".join(lines) + "\n")
    typed = [json.dumps({"input": x, "output": y, **({} if t is None else {"type": t})}) for x, y, t in TYPED]
    (root / "typed.jsonl").write_text("\n".join(typed) + "\n")
    (root / "bad_type.jsonl").write_text('{"input": "w1", "output": "w2", "type": "math"}\n')
    return root


def parse(argv):
    parser = argparse.ArgumentParser(prog="lorahub-engine")
    add_route(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def run(argv):
    args = parse(argv)
    return args.run(args)


@pytest.mark.parametrize("method", ["mole", "arrow"])
def test_train_eval_stats(files, method, capsys):
    common = ["--zoo", str(files / "zoo"), "--model", str(files / "model"), "--examples", str(files / "ex.jsonl")]
    router = files / f"router-{method}"
    assert run(["route", "train", "--method", method, *common, "-o", str(router), "--top-k", "2", "--steps", "3",
                "--batch-size", "2"]) == 0
    meta = json.loads((router / "router.json").read_text())
    assert meta["experts"] == ["x", "y", "z"] and meta["config"]["top_k"] == 2
    capsys.readouterr()
    assert run(["route", "eval", str(router), *common, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 6 and result["loss"] > 0 and 0 <= result["exact_match"] <= 1
    assert run(["route", "stats", str(router), *common, "-o", str(files / f"{method}.png"), "--json"]) == 0
    assert (files / f"{method}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads(capsys.readouterr().out.rsplit("wrote", 1)[0])
    assert all(layer["count"] > 0 and len(layer["tokens"]) == 3 for layer in stats.values())


def test_read_examples_gives_each_lines_type_only_when_asked(files):
    assert read_examples(str(files / "typed.jsonl"), types=True) == TYPED
    assert read_examples(str(files / "typed.jsonl")) == [(x, y) for x, y, _ in TYPED]
    with pytest.raises(AdapterError, match=r'bad_type.jsonl:1: "type" must be an integer or null'):
        read_examples(str(files / "bad_type.jsonl"), types=True)


@pytest.fixture(scope="module", params=list(MOE))
def moe(request, files):
    """A router trained from the command line, and the same config trained through the Python API."""
    options, config = MOE[request.param]
    router = files / f"router-{request.param}"
    assert run(["route", "train", "--method", request.param, "--model", str(files / "model"), "--examples",
                str(files / "typed.jsonl"), "-o", str(router), *options, *TRAIN]) == 0
    model, tokenizer = load_language_model(str(files / "model"))
    reference = attach_router(model, config)
    train_router(reference, tokenizer, TYPED, steps=4, lr=2e-2, batch_size=2, seed=1, progress=False)
    return router, reference, tokenizer


def test_a_cli_router_equals_the_python_apis_on_the_same_seed(files, moe):
    router, reference, _ = moe
    assert saved_config(router) == next(iter(routers_of(reference).values())).config
    loaded = load_router(load_language_model(str(files / "model"))[0], router)
    x = torch.randint(4, 16, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, reference(x).logits, atol=0, rtol=0)
        assert not torch.equal(reference(x).logits, load_language_model(str(files / "model"))[0](x).logits)


def test_eval_and_stats_of_a_router_with_its_own_experts_need_no_zoo(files, moe, capsys):
    router, reference, tokenizer = moe
    common = ["--model", str(files / "model"), "--examples", str(files / "typed.jsonl")]
    capsys.readouterr()
    assert run(["route", "eval", str(router), *common, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        loss = example_losses(reference, encode_pairs(reference, tokenizer, [e[:2] for e in TYPED])).mean()
    assert result["examples"] == len(TYPED) and result["loss"] == pytest.approx(float(loss), rel=1e-5)
    png = files / f"{router.name}.png"
    assert run(["route", "stats", str(router), *common, "-o", str(png), "--json"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads(capsys.readouterr().out.rsplit("wrote", 1)[0])
    counts = saved_config(router).num_experts  # sira: (2, 3), experts per layer (MoLA)
    for path, layer in stats.items():
        assert layer["count"] > 0
        assert len(layer["tokens"]) == (counts if isinstance(counts, int) else counts[layer_index(path)])


def test_export_writes_each_trained_expert_as_a_peft_folder(files, moe, capsys):
    router, reference, _ = moe
    out = files / f"experts-{router.name}"
    assert run(["route", "export", str(router), "--model", str(files / "model"), "-o", str(out)]) == 0
    expected = export_experts(reference)
    assert sorted(p.name for p in out.iterdir()) == sorted([a.name for a in expected] + ["manifest.json"])
    assert AdapterZoo.load(out).names == [a.name for a in expected]
    for adapter in expected:
        saved = le.LoraAdapter.load(out / adapter.name)
        assert saved.modules.keys() == adapter.modules.keys()
        for path, m in adapter.modules.items():
            assert torch.equal(saved.modules[path].A, m.A) and torch.equal(saved.modules[path].B, m.B)
            assert saved.modules[path].scale == pytest.approx(m.scale)
    x = torch.randint(4, 16, (2, 6))
    last = expected[-1]  # sira: on layer 1 only
    with torch.no_grad():
        peft = PeftModel.from_pretrained(load_language_model(str(files / "model"))[0], str(out / last.name))(x).logits
        ours = le.attach(load_language_model(str(files / "model"))[0], [last])(x, adapter_ids=[0, 0]).logits
    torch.testing.assert_close(peft, ours, atol=1e-5, rtol=1e-5)


def fails(capsys, argv) -> str:
    """The one error line of a command that must fail with exit code 2."""
    capsys.readouterr()
    assert execute(parse(argv)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("options,message", [
    (["--method", "sira", "--adapters", "x"], "--adapters: --method sira trains new experts"),
    (["--method", "loramoe", "--zoo", "{zoo}"], "--zoo: a loramoe router has its own experts"),
    (["--method", "mole"], "--zoo is required: a mole router routes over zoo adapters"),
    (["--method", "loramoe", "--top-k", "2", "--gate-dropout", "0.2"],
     "--top-k, --gate-dropout: not an option of --method loramoe"),
    (["--method", "mole", "--zoo", "{zoo}", "--num-experts", "4"], "--num-experts: not an option of --method mole"),
    (["--method", "loramoe", "--num-experts", "4", "--expert-groups", "3,3"], "expert_groups (3, 3) must sum"),
    (["--method", "sira", "--gate-dropout", "1.5"], "gate_dropout must be a number in [0, 1)"),
    (["--method", "loramoe", "--examples", "{files}/bad_type.jsonl"], '"type" must be an integer or null'),
])
def test_bad_train_combinations_are_one_line_before_the_model_loads(files, tmp_path, capsys, monkeypatch, options,
                                                                   message):
    import routers.cli

    monkeypatch.setattr(routers.cli, "load_language_model", lambda *a: pytest.fail("a model loaded"))
    options = [o.format(zoo=files / "zoo", files=files) for o in options]
    examples = [] if "--examples" in options else ["--examples", str(files / "typed.jsonl")]
    line = fails(capsys, ["route", "train", "--model", str(files / "model"), *examples, "-o", str(tmp_path / "out"),
                          *options])
    assert message in line and "error:" in line
    assert not (tmp_path / "out").exists()


def test_zoo_options_must_fit_the_saved_router(files, moe, tmp_path, capsys, monkeypatch):
    router, _, _ = moe
    mole = tmp_path / "mole"
    assert run(["route", "train", "--method", "mole", "--zoo", str(files / "zoo"), "--model", str(files / "model"),
                "--examples", str(files / "ex.jsonl"), "-o", str(mole), "--steps", "1", "--batch-size", "2"]) == 0
    import routers.cli

    monkeypatch.setattr(routers.cli, "load_language_model", lambda *a: pytest.fail("a model loaded"))
    common = ["--model", str(files / "model"), "--examples", str(files / "ex.jsonl")]
    assert "--zoo: a" in fails(capsys, ["route", "eval", str(router), "--zoo", str(files / "zoo"), *common])
    assert "--zoo is required: a mole router" in fails(capsys, ["route", "stats", str(mole), *common, "-o",
                                                                str(tmp_path / "u.png")])
    line = fails(capsys, ["route", "export", str(mole), "--model", str(files / "model"), "-o", str(tmp_path / "x")])
    assert "a mole router routes over zoo adapters and trained none" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "u.png").exists()
