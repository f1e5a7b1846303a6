"""Outputs never destroy data: what a save may replace, temps (unique, cleaned up, stale ones removed), concurrent
saves from several processes, permissions that follow the umask, typed errors."""

import fcntl
import multiprocessing
import os
import stat

import pytest
import torch

import lorahub_engine as le
from lorahub_engine import _io
from lorahub_engine.cli import main
from lorahub_engine.errors import OutputError, OutputExistsError


def adapter(name: str = "a", value: float = 1.0, r: int = 2) -> le.LoraAdapter:
    modules = {"layers.0.q": le.LoraModule(torch.full((r, 8), value), torch.full((8, r), value), 2.0),
               "layers.0.v": le.LoraModule(torch.full((r, 8), -value), torch.full((8, r), value), 0.5)}
    return le.LoraAdapter(name, modules, metadata={"value": value})


def hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- what a save may replace ----------------------------------------------------------------------------------
def test_a_save_replaces_its_own_earlier_output(tmp_path):
    adapter(value=1.0).save(tmp_path / "out")
    adapter(value=2.0).save(tmp_path / "out")
    assert le.LoraAdapter.load(tmp_path / "out").metadata == {"value": 2.0}
    assert hidden(tmp_path) == []


def test_a_folder_with_other_files_is_refused_and_overwrite_replaces_only_the_adapter_files(tmp_path):
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "keep.txt").write_text("mine")
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        adapter().save(out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "notes"]
    adapter(value=3.0).save(out, overwrite=True)
    assert (out / "notes" / "keep.txt").read_text() == "mine"
    assert le.LoraAdapter.load(out).metadata == {"value": 3.0}
    assert hidden(tmp_path) == []


def test_a_file_is_not_turned_into_a_folder_without_overwrite(tmp_path):
    report = tmp_path / "report.txt"
    report.write_text("results")
    with pytest.raises(OutputExistsError, match="report.txt: exists"):
        adapter().save(report)
    assert report.read_text() == "results"
    adapter().save(report, overwrite=True)
    assert le.LoraAdapter.load(report).metadata == {"value": 1.0}


def test_outputs_of_another_kind_are_refused(tmp_path):
    adapter().save(tmp_path / "adapter")
    with pytest.raises(OutputExistsError, match="not a zoo folder"):
        le.AdapterZoo([adapter("x")]).save(tmp_path / "adapter")
    le.AdapterZoo([adapter("x")]).save(tmp_path / "zoo")
    with pytest.raises(OutputExistsError, match="not an adapter folder"):
        adapter().save(tmp_path / "zoo")
    le.AdapterZoo([adapter("y")]).save(tmp_path / "zoo")  # its own kind: replaced
    assert le.AdapterZoo.load(tmp_path / "zoo").names == ["y"]


def test_a_peft_folder_not_written_by_the_engine_is_refused(tmp_path):
    from tests.tiny_models import make_peft_adapter, tiny_llama

    make_peft_adapter(tiny_llama(), tmp_path / "peft", 0, ["q_proj"])
    with pytest.raises(OutputExistsError):
        adapter().save(tmp_path / "peft")


def test_text_files_never_replace_a_folder(tmp_path):
    (tmp_path / "d").mkdir()
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="is a folder"):
            _io.write_text_atomic(tmp_path / "d", "x", overwrite=overwrite)
    _io.write_text_atomic(tmp_path / "f.txt", "one")
    _io.write_text_atomic(tmp_path / "f.txt", "two")
    assert (tmp_path / "f.txt").read_text() == "two" and hidden(tmp_path) == []


def test_cli_refuses_a_foreign_output_and_the_input_itself(tmp_path, capsys):
    adapter("a").save(tmp_path / "a")
    adapter("b", 2.0).save(tmp_path / "b")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    argv = ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine" and le.LoraAdapter.load(tmp_path / "out")
    for output in (tmp_path / "a", tmp_path):  # the input itself, or a folder holding it: never, even with --overwrite
        assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(output), "--overwrite"]) == 2
        assert "would overwrite the input" in capsys.readouterr().err
    assert le.LoraAdapter.load(tmp_path / "a").metadata == {"value": 1.0}


# ---- temps ------------------------------------------------------------------------------------------------------
def test_a_failed_save_leaves_nothing_and_keeps_the_old_output(tmp_path, monkeypatch):
    adapter(value=1.0).save(tmp_path / "out")
    import lorahub_engine.adapter as adapter_module

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_module, "save_file", broken)
    with pytest.raises(OSError):
        adapter(value=2.0).save(tmp_path / "out")
    assert hidden(tmp_path) == [] and le.LoraAdapter.load(tmp_path / "out").metadata == {"value": 1.0}


def test_a_failed_rename_is_rolled_back_with_a_typed_error(tmp_path, monkeypatch):
    adapter(value=1.0).save(tmp_path / "out")
    rename = os.rename

    def fail_into_place(src, dst):
        if str(dst) == str(tmp_path / "out") and ".tmp" in str(src):
            raise OSError(5, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(_io.os, "rename", fail_into_place)
    with pytest.raises(OutputError, match="cannot install"):
        adapter(value=2.0).save(tmp_path / "out")
    monkeypatch.undo()
    assert le.LoraAdapter.load(tmp_path / "out").metadata == {"value": 1.0} and hidden(tmp_path) == []


def test_stale_temps_are_removed_and_live_ones_kept(tmp_path):
    stale = [".out.lorahub-0123456789abcdef.tmp", ".out.lorahub-fedcba9876543210.old", f".out.{os.getpid()}.old",
             ".out.ab_cd123.tmp"]
    for name in stale:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / ".out.lorahub-00000000000000ff.tmp"
    live.mkdir()
    other = tmp_path / ".notes.txt.tmp"
    other.write_text("not ours")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer still at work
        adapter().save(tmp_path / "out")
    finally:
        os.close(fd)
    assert hidden(tmp_path) == sorted([live.name, other.name])
    assert le.LoraAdapter.load(tmp_path / "out")


def test_temp_names_are_unique_and_not_pid_based(tmp_path, monkeypatch):
    names = set()
    real_mkdir = os.mkdir

    def spy(path, *args, **kwargs):
        names.add(os.path.basename(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(_io.os, "mkdir", spy)
    for _ in range(3):
        adapter().save(tmp_path / "out")
    temps = {n for n in names if n.endswith(".tmp")}
    assert len(temps) == 3 and not any(str(os.getpid()) in n for n in temps)


# ---- permissions and typed errors --------------------------------------------------------------------------------
def test_permissions_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        adapter().save(tmp_path / "out")
        _io.write_text_atomic(tmp_path / "r.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    for path in (tmp_path / "out" / "adapter_config.json", tmp_path / "out" / "adapter_model.safetensors",
                 tmp_path / "r.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_file_in_the_way_of_the_parent_is_a_typed_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError):
        adapter().save(tmp_path / "file" / "out")
    with pytest.raises(OutputError):
        _io.write_text_atomic(tmp_path / "file" / "deeper" / "r.txt", "x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_typed_error(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(OutputError, match="cannot write"):
        adapter().save(tmp_path / "ro" / "out")


# ---- concurrent saves --------------------------------------------------------------------------------------------
def _save_many(path: str, worker: int, rounds: int, queue) -> None:
    outcomes = []
    for i in range(rounds):
        value = float(worker * 100 + i)
        try:
            adapter(value=value, r=1 + (worker + i) % 3).save(path)
            outcomes.append("ok")
        except le.AdapterError as e:  # typed: allowed
            outcomes.append(f"typed {type(e).__name__}")
        except Exception as e:  # noqa: BLE001  (raw OSError & co.: the bug this test guards against)
            outcomes.append(f"raw {type(e).__name__}: {e}")
    queue.put(outcomes)


def test_concurrent_saves_from_four_processes_leave_one_complete_output(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    path, rounds = str(tmp_path / "out"), 25
    workers = [context.Process(target=_save_many, args=(path, w, rounds, queue)) for w in range(4)]
    for w in workers:
        w.start()
    outcomes = [o for _ in workers for o in queue.get(timeout=300)]
    for w in workers:
        w.join(timeout=60)
    assert len(outcomes) == 4 * rounds
    assert not [o for o in outcomes if o.startswith("raw")], outcomes
    assert outcomes.count("ok") > 0
    final = le.LoraAdapter.load(path)
    value = final.metadata["value"]
    expected = adapter(value=value, r=1 + (int(value) // 100 + int(value) % 100) % 3)
    for name, module in expected.modules.items():  # the files of one save, not a mix of two
        torch.testing.assert_close(final.modules[name].A, module.A)
        torch.testing.assert_close(final.modules[name].B, module.B)
    assert hidden(tmp_path) == []
