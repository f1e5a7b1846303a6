"""`route train|eval|stats` through add_route on a parser built here (the core discovers it by entry point)."""

import argparse
import json

import pytest

from lorahub_engine.zoo import AdapterZoo
from routers.cli import add_route
from tests.tiny_models import sampled_adapters, tiny_llama_for, word_tokenizer

WORDS = [f"w{i}" for i in range(12)]


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
    return root


def run(argv):
    parser = argparse.ArgumentParser(prog="lorahub-engine")
    add_route(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
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
