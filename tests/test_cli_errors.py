"""A CLI that speaks plainly: one line on stderr and exit 2 for every failure (a traceback only with --debug), options
validated before any model loads, every option's help with its default, errors on their own line after a bar."""

import argparse
import json
import sys

import pytest
import torch

import lorahub_engine as le
from lorahub_engine.cli import build_parser, execute, main
from tests.tiny_models import make_peft_adapter, tiny_llama


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    base = tiny_llama()
    make_peft_adapter(base, root / "a", 1, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    make_peft_adapter(base, root / "b", 2, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    make_peft_adapter(base, root / "regex", 3, ["q_proj"], r=4, lora_alpha=8)
    config = json.loads((root / "regex" / "adapter_config.json").read_text())
    (root / "regex" / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"q_proj(": 2}}))
    le.AdapterZoo([le.LoraAdapter.load(root / "a")]).save(root / "zoo")
    (root / "zoo" / "manifest.json").write_text('{"format_version": 1, "adapters": [{"path": "a"}]}')
    (root / "examples.jsonl").write_text('{"input": "x", "output": "y"}\n')
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00 not text")
    return root


def one_error_line(capsys, code, expected: int = 2) -> str:
    assert code == expected
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv,message", [
    (["demo", "--task", "nope"], "unknown task 'nope'"),
    (["demo", "--task", "plural"], "plural is a training task"),
    (["demo", "--threads", "0"], "--threads: expected a positive integer, got '0'"),
    (["demo", "--n-test", "0"], "--n-test: expected a positive integer"),
    (["demo", "--methods", "slerp"], "invalid choice: 'slerp'"),
    (["bench", "cross-task", "--methods", "nope"], "unknown methods ['nope']"),
    (["bench", "cross-task", "--n-test", "0"], "--n-test: expected a positive integer"),
    (["search", "{zoo}", "--model", "{root}", "--examples", "{examples}", "--adapters", "a", "-o", "{out}",
      "--budget", "0"], "--budget: expected a positive integer"),
    (["merge", "{a}", "{b}", "-o", "{out}", "--density", "1.5"], "--density: expected a fraction in (0, 1]"),
    (["merge", "{a}", "{b}", "-o", "{out}", "--rank", "-1"], "--rank: expected a positive integer"),
    (["inspect", "{regex}"], "rank_pattern key 'q_proj(' is not a valid regex"),
    (["index", "build", "{zoo}", "-o", "{out}"], "adapters[0] needs a non-empty string 'name'"),
    (["search", "{root}", "--model", "{root}", "--examples", "{examples}", "--adapters", "a", "-o", "{out}"],
     "manifest.json is missing"),
    (["search", "{root}", "--model", "{root}", "--examples", "{root}", "--adapters", "a", "-o", "{out}"],
     "cannot read examples"),
    (["search", "{root}", "--model", "{root}", "--examples", "{root}/binary.jsonl", "--adapters", "a", "-o", "{out}"],
     "cannot read examples"),
    (["retrieve", "{root}", "{root}/none.txt"], "cannot read inputs"),
    ([], "the following arguments are required: COMMAND"),
])
def test_every_failure_is_one_line_and_exit_2(folders, tmp_path, capsys, monkeypatch, argv, message):
    import lorahub_engine.cli.options as options

    monkeypatch.setattr(options, "load_language_model", lambda *a: pytest.fail("a model loaded before validation"))
    fill = {"root": folders, "zoo": folders / "zoo", "examples": folders / "examples.jsonl", "out": tmp_path / "out",
            "a": folders / "a", "b": folders / "b", "regex": folders / "regex"}
    argv = [x.format(**fill) for x in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    line = one_error_line(capsys, code)
    assert message in line and "error:" in line
    assert not (tmp_path / "out").exists()


def test_search_options_are_checked_before_the_model_loads(folders, tmp_path, capsys, monkeypatch):
    import lorahub_engine.cli.search as search

    monkeypatch.setattr(search, "load_language_model", lambda *a: pytest.fail("a model loaded before validation"))
    argv = ["search", str(folders / "zoo"), "--model", str(folders), "--examples", str(folders / "examples.jsonl"),
            "--adapters", "a", "-o", str(tmp_path / "out")]
    good_zoo = tmp_path / "zoo"
    le.AdapterZoo([le.LoraAdapter.load(folders / "a")]).save(good_zoo)
    argv[1] = str(good_zoo)
    for options, message in ((["--optimizer", "NGOtp"], "unknown optimizer 'NGOtp'"),
                             (["--population", "5", "--budget", "3"], "must not exceed the budget")):
        assert message in one_error_line(capsys, main([*argv, *options]))


def test_debug_shows_the_traceback(folders):
    with pytest.raises(le.AdapterError, match="not a valid regex"):
        main(["inspect", str(folders / "regex"), "--debug"])
    with pytest.raises(le.AdapterError, match="not a valid regex"):
        main(["--debug", "inspect", str(folders / "regex")])


def test_an_error_after_a_progress_bar_starts_on_its_own_line(capsys):
    from tqdm import tqdm

    def run(args):
        bar = tqdm(total=3, file=sys.stderr, desc="working")
        bar.update()
        raise le.AdapterError("it broke")

    assert execute(argparse.Namespace(command="x", run=run)) == 2
    err = capsys.readouterr().err
    assert "\nlorahub-engine x: error: it broke" in err.replace("\r", "\n")


def all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


def test_every_option_has_help_with_its_default():
    parsers = list(all_parsers(build_parser()))
    assert len(parsers) > 10
    for parser in parsers:
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, f"{parser.prog} {action.option_strings} has no help"
        assert isinstance(parser.formatter_class, type) and issubclass(parser.formatter_class,
                                                                       argparse.ArgumentDefaultsHelpFormatter)
    merge = next(p for p in parsers if p.prog.endswith(" merge"))
    assert "(default: task_arithmetic)" in merge.format_help()


def test_ties_says_how_large_its_output_is(folders, tmp_path, capsys):
    argv = ["merge", "--method", "ties", "--density", "0.5", str(folders / "a"), str(folders / "b")]
    assert main([*argv, "-o", str(tmp_path / "full")]) == 0
    err = capsys.readouterr().err

    def size(adapter):  # parameters, counted here by hand
        return sum(m.A.numel() + m.B.numel() for m in adapter.modules.values())

    ratio = size(le.LoraAdapter.load(tmp_path / "full")) / (size(le.LoraAdapter.load(folders / "a")) * 2)
    assert f"note: ties gives rank up to 32 per module, {ratio:.1f}x the parameters" in err and "--rank R" in err
    assert main([*argv, "--rank", "8", "-o", str(tmp_path / "r8")]) == 0
    assert "note:" not in capsys.readouterr().err
    merged = le.LoraAdapter.load(tmp_path / "r8")
    assert {m.rank for m in merged.modules.values()} == {8}
    exact = le.LoraAdapter.load(tmp_path / "full")
    for path in merged.modules:  # the best rank-8 approximation: its error is the tail of dW's singular values
        singular = torch.linalg.svdvals(exact.delta_weight(path).double())
        error = (exact.delta_weight(path) - merged.delta_weight(path)).double().norm()
        torch.testing.assert_close(error, singular[8:].norm(), atol=1e-4, rtol=1e-3)
