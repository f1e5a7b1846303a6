"""The per-task zoo table: an adapter that changes nothing scores exactly as the zero-shot base, and is flagged; a
changed adapter is rescored alone."""

import json

import pytest

import lorahub_engine as le
from benchmarks.zoo_table import markdown, score_task


def test_an_untrained_adapter_scores_as_the_base_and_is_flagged(micro_zoo, one_thread):
    base, zoo = micro_zoo
    task = zoo.names[0]
    untrained = le.init_adapter(base.model, task, ("q_proj", "v_proj"), r=4, seed=0)  # B = 0: the base itself
    row = score_task(base, untrained, task, n=6)
    assert row["n_test"] == 6 and row["adapter"] == row["zero_shot"]
    assert all(e["adapter"] == e["zero_shot"] for e in row["examples"])
    trained = score_task(base, zoo[task], task, n=6)
    assert all(0 <= trained[c] <= 1 for c in ("zero_shot", "icl", "adapter"))
    assert trained["zero_shot"] == row["zero_shot"] and trained["icl"] == row["icl"]  # same prompts, same base
    table = markdown({task: row})
    assert f"| {task} |" in table and "**NO**" in table and "0/1" in table


def test_the_script_scores_a_zoo_folder_and_resumes(tmp_path, one_thread, capsys, monkeypatch):
    from benchmarks import zoo_table
    from benchmarks.taskworld_zoo import TINY_ZOO

    args = ["--base", "tiny", "--zoo", str(TINY_ZOO), "--n", "3", "--out", str(tmp_path)]
    zoo_table.main([*args, "--tasks", "plural"])
    monkeypatch.setattr(zoo_table, "score_task", lambda base, adapter, name, n, base_row: {
        "zero_shot": 0.0, "icl": 0.0, "adapter": 1.0, "n_test": n, "examples": []} if name == "add" else pytest.fail())
    zoo_table.main([*args, "--tasks", "plural", "add"])  # plural is not scored again
    table = (tmp_path / "zoo_table_tiny.md").read_text()
    assert "| plural | lexicon | 3 |" in table and "| add | arithmetic | 3 | 0.00 | 0.00 | 1.00 | yes |" in table
    assert table in capsys.readouterr().out


def test_a_changed_adapter_is_rescored_alone(tmp_path, one_thread, monkeypatch):
    """The row records its adapter's digest: a rebuilt adapter of the same name gets its column rescored, the base's
    zero-shot and ICL columns (and their examples) kept; an unchanged one is skipped."""
    from benchmarks import zoo_table
    from benchmarks.taskworld_zoo import TINY_ZOO

    zoo = le.AdapterZoo.load(TINY_ZOO)
    args = ["--base", "tiny", "--n", "3", "--out", str(tmp_path), "--tasks", "plural"]
    zoo_table.main([*args, "--zoo", str(TINY_ZOO)])
    first = json.loads((tmp_path / "zoo_table_tiny.json").read_text())["tasks"]["plural"]
    next(iter(zoo["plural"].modules.values())).B.zero_()  # the "rebuilt" adapter: no longer the same
    zoo.save(tmp_path / "rebuilt")
    scored = []
    real = zoo_table.score_task
    monkeypatch.setattr(zoo_table, "score_task", lambda *a, **k: scored.append(k["base_row"]) or real(*a, **k))
    zoo_table.main([*args, "--zoo", str(tmp_path / "rebuilt")])
    zoo_table.main([*args, "--zoo", str(tmp_path / "rebuilt")])  # unchanged since: skipped
    again = json.loads((tmp_path / "zoo_table_tiny.json").read_text())["tasks"]["plural"]
    assert scored == [first]
    assert again["adapter_digest"] != first["adapter_digest"]
    assert (again["zero_shot"], again["icl"]) == (first["zero_shot"], first["icl"])
    base_columns = [[(e["zero_shot"], e["icl"]) for e in row["examples"]] for row in (first, again)]
    assert base_columns[0] == base_columns[1]
