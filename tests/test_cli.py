"""The command line: merge and inspect on real PEFT folders, exit codes and messages for bad input."""

import json

import pytest
import torch

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
