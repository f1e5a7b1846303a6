"""The command line: merge and inspect on real PEFT folders, exit codes and messages for bad input."""

import json

import pytest
import torch

import lorahub_engine as le
from lorahub_engine import LoraAdapter
from lorahub_engine.cli import main
from lorahub_engine.merge import merge
from tests.tiny_models import make_peft_adapter, tiny_llama


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base, root = tiny_llama(), tmp_path_factory.mktemp("cli")
    return (make_peft_adapter(base, root / "a", 1, ["q_proj", "v_proj"], r=4, lora_alpha=8),
            make_peft_adapter(base, root / "b", 2, ["q_proj", "o_proj"], r=2, lora_alpha=8))


def test_merge_writes_what_le_merge_returns(folders, tmp_path, capsys):
    a, b = folders
    code = main(["merge", "--method", "ties", "--weights", "1,0.5", "--density", "0.2", "--rank", "6", "--name", "m",
                 str(a), str(b), "-o", str(tmp_path / "out")])
    assert code == 0
    assert "ties of 2 adapters, 6 modules" in capsys.readouterr().out
    written = LoraAdapter.load(tmp_path / "out")
    expected = merge([a, b], [1.0, 0.5], "ties", density=0.2, rank=6)
    assert written.name == "out" and written.metadata["merge"]["sources"] == ["a", "b"]
    assert sorted(written.modules) == sorted(expected.modules)
    for path in expected.modules:
        torch.testing.assert_close(written.delta_weight(path), expected.delta_weight(path))


def test_inspect_reports_modules_and_norms(folders, capsys):
    a, _ = folders
    assert main(["inspect", str(a), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    adapter = LoraAdapter.load(a)
    assert info["name"] == "a" and len(info["modules"]) == 4
    row = info["modules"][0]
    assert (row["rank"], row["scale"], row["out"], row["in"]) == (4, 2.0, 32, 32)
    assert row["norm_delta"] == pytest.approx(adapter.delta_weight(row["module"]).norm().item(), rel=1e-5)
    assert row["norm_A"] == pytest.approx(adapter.modules[row["module"]].A.norm().item(), rel=1e-5)
    assert main(["inspect", str(a)]) == 0
    text = capsys.readouterr().out
    assert "modules:        4, rank 4, scale 2.0, 896 parameters" in text and row["module"] in text and "|dW|_F" in text


@pytest.mark.parametrize("argv,message", [
    (["merge", "--weights", "1,nan", "{a}", "{b}", "-o", "{out}"], "weights[1] is nan"),
    (["merge", "--weights", "1", "{a}", "{b}", "-o", "{out}"], "got 1 weights for 2 adapters"),
    (["merge", "--method", "ties", "--space", "factors", "{a}", "{b}", "-o", "{out}"], "needs equal ranks"),
    (["merge", "{a}", "{missing}", "-o", "{out}"], "no such adapter folder"),
    (["inspect", "{missing}"], "no such adapter folder"),
])
def test_adapter_errors_exit_2_with_one_line(folders, tmp_path, capsys, argv, message):
    a, b = folders
    fill = {"a": a, "b": b, "out": tmp_path / "out", "missing": tmp_path / "missing"}
    assert main([x.format(**fill) for x in argv]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]  # apart from tqdm's bar
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(capsys):
    for argv in (["merge", "--method", "slerp", "a", "-o", "x"], ["merge", "--weights", "1,x", "a", "-o", "x"], []):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "invalid choice: 'slerp'" in capsys.readouterr().err


# ---- search ------------------------------------------------------------------------------------------------------
SEARCH_WORDS = "plural of answer cat dog cow hen pig cats dogs cows hens pigs add one two three plus sum".split()
SEARCH_SAMPLES = {"plural": ["plural of cat answer", "plural of dog answer"], "add": ["add one plus two", "sum one two"],
                  "other": ["cow hen pig", "pig cow"]}
SEARCH_EXAMPLES = [("plural of cow answer", "cows"), ("plural of hen answer", "hens"), ("plural of pig answer", "pigs")]


@pytest.fixture(scope="module")
def search_folders(tmp_path_factory):
    """A tiny Llama + tokenizer folder, a 3-adapter zoo with samples, a flat index over it, an examples file."""
    from tests.tiny_models import saved_zoo

    root = tmp_path_factory.mktemp("search_cli")
    saved_zoo(root, SEARCH_WORDS, SEARCH_SAMPLES)
    (root / "examples.jsonl").write_text("".join(json.dumps({"input": x, "output": y}) + "\n\n"
                                                 for x, y in SEARCH_EXAMPLES))
    return root


def search_argv(root, *options):
    return ["search", str(root / "zoo"), "--model", str(root / "model"), "--examples", str(root / "examples.jsonl"),
            *options]


@pytest.mark.filterwarnings("ignore:COBYLA")
def test_search_writes_what_lorahub_search_finds(search_folders, tmp_path, capsys):
    from lorahub_engine.cli.options import load_language_model

    root = search_folders
    code = main(search_argv(root, "--adapters", "add", "plural", "--budget", "6", "--seed", "3", "--json",
                            "-o", str(tmp_path / "out")))
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    zoo = le.AdapterZoo.load(root / "zoo")
    model, tokenizer = load_language_model(str(root / "model"))
    direct = le.lorahub_search(model, tokenizer, [zoo["add"], zoo["plural"]], SEARCH_EXAMPLES, budget=6, seed=3,
                               progress=False)
    assert printed["names"] == ["add", "plural"] and printed["weights"] == direct.weights
    assert [e["loss"] for e in printed["history"]] == [e.loss for e in direct.history]
    written = LoraAdapter.load(tmp_path / "out")
    expected = merge([zoo["add"], zoo["plural"]], list(direct.weights.values()), "lorahub")
    assert written.name == "out" and written.metadata["lorahub_search"]["weights"] == direct.weights
    for path in expected.modules:
        torch.testing.assert_close(written.delta_weight(path), expected.delta_weight(path))


@pytest.mark.filterwarnings("ignore:COBYLA")
def test_search_picks_random_or_retrieved_modules(search_folders, tmp_path, capsys):
    from lorahub_engine.search import random_modules, retrieved_modules
    from retrieval import AdapterIndex

    root = search_folders
    assert main(search_argv(root, "--random", "2", "--seed", "1", "--budget", "6", "-o", str(tmp_path / "r"))) == 0
    text = capsys.readouterr().out
    names = random_modules(list(SEARCH_SAMPLES), 2, seed=1)
    assert [line.split()[0] for line in text.splitlines()[:2]] == names
    assert "after 2 Adam steps" in text and f"wrote {tmp_path / 'r'}" in text
    assert main(search_argv(root, "--retrieve", str(root / "idx"), "--modules", "2", "--budget", "3", "--json",
                            "-o", str(tmp_path / "q"))) == 0
    retrieved = retrieved_modules(AdapterIndex.load(root / "idx"), [x for x, _ in SEARCH_EXAMPLES], 2)
    assert json.loads(capsys.readouterr().out)["names"] == retrieved and retrieved[0] == "plural"


@pytest.mark.filterwarnings("ignore:COBYLA")
def test_search_validates_by_the_rule_asked(search_folders, tmp_path, capsys):
    root = search_folders
    for rule in ("exact_match", "cross_entropy"):
        assert main(search_argv(root, "--adapters", "add", "plural", "--budget", "4", "--folds", "3", "--validate", rule,
                                "--json", "-o", str(tmp_path / rule))) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["config"]["validate"] == rule and printed["config"]["folds"] == 3
        scored = {s["exact_match"] is not None for s in printed["validation"]["held_out"].values()}
        assert scored == {rule == "exact_match"}


@pytest.mark.parametrize("options,message", [
    (["--adapters", "add", "nope"], "no adapter named 'nope'"),
    (["--adapters", "add", "--optimizer", "NGOtp"], "unknown optimizer 'NGOtp'"),
    (["--adapters", "add", "--bound", "0"], "--bound: expected a finite positive number"),
    (["--adapters", "add", "--validate", "ce"], "argument --validate: invalid choice: 'ce'"),
    (["--random", "9"], "cannot draw 9 modules from 3 adapters"),
    (["--adapters", "add", "--examples", "{bad}"], "bad.jsonl:1: expected a JSON object"),
])
def test_search_errors_exit_2_with_one_line(search_folders, tmp_path, capsys, options, message):
    root = search_folders
    (tmp_path / "bad.jsonl").write_text('{"input": "plural of cat answer"}\n')
    argv = search_argv(root, *[o.format(bad=tmp_path / "bad.jsonl") for o in options], "-o", str(tmp_path / "out"))
    try:
        code = main(argv)
    except SystemExit as e:  # refused by argparse
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()
