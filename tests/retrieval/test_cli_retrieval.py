"""`lorahub-engine index build|query` and `retrieve` on a saved zoo, index and tiny model."""

import json

import pytest
import torch

import lorahub_engine as le
from lorahub_engine.cli import main
from lorahub_engine.compose import retrieve_and_compose
from retrieval import TASK_PREFIX, AdapterIndex
from tests.tiny_models import saved_zoo

WORDS = "add one two three plus translate cat dog french chat chien review good bad film".split()
SAMPLES = {"add": ["add one plus two", "add two plus three", "one plus one"],
           "french": ["translate cat to french", "translate dog to french", "french for dog"],
           "review": ["a good film", "a bad film", "review of a good film"]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval_cli")
    model, tokenizer = saved_zoo(root, WORDS, SAMPLES, "--task-prefix")
    return root, model, tokenizer


def test_index_build_then_query(folders, tmp_path, capsys):
    root, _, _ = folders
    assert main(["index", "build", str(root / "zoo"), "-o", str(tmp_path / "idx"), "--kind", "hnsw"]) == 0
    assert "3 adapters, hnsw index, dimension 384" in capsys.readouterr().out
    index = AdapterIndex.load(root / "idx")
    assert index.config.prefix == TASK_PREFIX and index.names == list(SAMPLES)
    assert main(["index", "query", str(root / "idx"), "add two plus two", "a bad film", "-k", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = index.search(["add two plus two", "a bad film"], k=2)
    assert [[tuple(h) for h in row["hits"]] for row in printed] == expected
    assert [row["hits"][0][0] for row in printed] == ["add", "review"]
    assert main(["index", "query", str(root / "idx"), "translate dog", "-k", "1", "--exclude", "french"]) == 0
    assert "french" not in capsys.readouterr().out


def test_retrieve_with_and_without_a_model(folders, tmp_path, capsys):
    root, model, tokenizer = folders
    inputs = ["add one plus three", "translate cat", "a good film"]
    (tmp_path / "in.txt").write_text("\n".join(inputs) + "\n")
    assert main(["retrieve", str(root / "idx"), str(tmp_path / "in.txt"), "-k", "2"]) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["adapters"][0][0] for r in plain] == ["add", "french", "review"]
    code = main(["retrieve", str(root / "idx"), str(tmp_path / "in.txt"), "-k", "2", "--model", str(root / "model"),
                 "--zoo", str(root / "zoo"), "--options", "one,dog", "--batch-size", "2", "-o", str(tmp_path / "o")])
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "o").read_text().splitlines()]
    expected = retrieve_and_compose(model, tokenizer, le.AdapterZoo.load(root / "zoo"), AdapterIndex.load(root / "idx"),
                                    inputs, k=2, options=["one", "dog"])
    assert [[n for n, _ in r["adapters"]] for r in records] == [[n for n, _ in row] for row in expected.hits]
    scores = [[s for _, s in r["adapters"]] for r in records]
    torch.testing.assert_close(torch.tensor(scores), torch.tensor([[s for _, s in row] for row in expected.hits]))
    torch.testing.assert_close(torch.tensor([r["loglik"] for r in records]), torch.tensor(expected.outputs))
    assert main(["retrieve", str(root / "idx"), str(tmp_path / "in.txt"), "--model", str(root / "model")]) == 2
    assert "--model needs --zoo" in capsys.readouterr().err
    assert main(["index", "query", str(tmp_path / "missing"), "x"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_outputs_never_replace_the_zoo_or_a_foreign_file(folders, tmp_path, capsys):
    root, _, _ = folders
    zoo_files = sorted(p.name for p in (root / "zoo").iterdir())
    for extra in ([], ["--overwrite"]):
        assert main(["index", "build", str(root / "zoo"), "-o", str(root / "zoo"), *extra]) == 2
        assert "would overwrite the input" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "zoo").iterdir()) == zoo_files and le.AdapterZoo.load(root / "zoo")
    assert main(["index", "build", str(root / "zoo"), "-o", str(root / "idx")]) == 0  # its own output: replaced
    capsys.readouterr()
    (tmp_path / "in.txt").write_text("add one plus three\n")
    (tmp_path / "notes.txt").write_text("mine")
    argv = ["retrieve", str(root / "idx"), str(tmp_path / "in.txt"), "-o", str(tmp_path / "notes.txt")]
    assert main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert main(argv[:-1] + [str(tmp_path / "hits.jsonl")]) == 0
    assert main(argv[:-1] + [str(tmp_path / "hits.jsonl")]) == 0  # a retrieve output: replaced
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((tmp_path / "notes.txt").read_text())["adapters"][0][0] == "add"


def test_retrieve_reads_json_lines_with_multi_line_inputs(folders, tmp_path, capsys):
    root, _, _ = folders
    inputs = ["add one plus three\nand then two", "a good film", "translate cat"]
    (tmp_path / "in.jsonl").write_text(json.dumps(inputs[0]) + "\n\n" + json.dumps({"input": inputs[1]}) + "\n"
                                       + json.dumps({"input": inputs[2], "id": 7}) + "\n")
    assert main(["retrieve", str(root / "idx"), str(tmp_path / "in.jsonl"), "-k", "1"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in records] == inputs
    assert [r["adapters"] for r in records] == [[list(h) for h in row]
                                                for row in AdapterIndex.load(root / "idx").search(inputs, k=1)]
    (tmp_path / "lines.txt").write_text('"quoted" stays as written\n')
    assert main(["retrieve", str(root / "idx"), str(tmp_path / "lines.txt"), "-k", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["input"] == '"quoted" stays as written'
    (tmp_path / "bad.jsonl").write_text('{"text": "no input field"}\n')
    assert main(["retrieve", str(root / "idx"), str(tmp_path / "bad.jsonl")]) == 2
    assert 'bad.jsonl:1: expected a JSON string or an object with an "input" string' in capsys.readouterr().err
