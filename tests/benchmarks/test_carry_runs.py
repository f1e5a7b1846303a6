"""carry_runs: exactly the runs a rebuilt zoo cannot have changed are carried, under the new zoo's key."""

import json

import pytest

from benchmarks.carry_runs import carry

OLD_KEY = {"base": "b", "settings": {"n_test": 5}, "seeds": [0], "zoo": ["a", "b", "c"], "zoo_digest": "old"}
NEW_KEY = {**OLD_KEY, "zoo_digest": "new"}
RUNS = {
    "t|zero_shot|0": {"info": {}},
    "t|icl|0": {"info": {}},
    "t|upper_shots_lora|0": {"info": {}},
    "t|lorahub|0": {"info": {"adapters": ["a", "c"]}},  # c changed
    "t|retrieval_lorahub|0": {"info": {"adapters": ["a", "b"]}},
    "t|ties|0": {"info": {"adapters": ["b"]}},
    "t|best_single|0": {"info": {"adapters": ["a"]}},  # chose after scoring every adapter, c too
    "t|retrieval_mixture|0": {"info": {}},  # records nothing of what it used
    "t|arrow|0": {"info": {}},
}


def write(path, key, runs):
    path.write_text(json.dumps({"key": key, "runs": runs}))
    return path


def test_carries_the_runs_that_read_no_changed_adapter_and_reruns_the_rest(tmp_path):
    old, new = write(tmp_path / "old.json", OLD_KEY, RUNS), tmp_path / "new.json"
    assert carry(old, new, NEW_KEY, {"c"}) == (5, 4)
    data = json.loads(new.read_text())
    assert data["key"] == NEW_KEY
    assert sorted(data["runs"]) == sorted(["t|zero_shot|0", "t|icl|0", "t|upper_shots_lora|0",
                                           "t|retrieval_lorahub|0", "t|ties|0"])


def test_refuses_runs_of_other_settings_or_adapter_names_and_unknown_changes(tmp_path):
    new = tmp_path / "new.json"
    for field, value in (("settings", {"n_test": 6}), ("seeds", [1]), ("zoo", ["a", "b", "d"])):
        old = write(tmp_path / f"{field}.json", {**OLD_KEY, field: value}, RUNS)
        with pytest.raises(ValueError, match="another base, settings"):
            carry(old, new, NEW_KEY, {"c"})
    with pytest.raises(ValueError, match="does not have"):
        carry(write(tmp_path / "old.json", OLD_KEY, RUNS), new, NEW_KEY, {"z"})
    assert not new.exists()
