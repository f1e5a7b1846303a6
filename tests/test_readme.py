"""The README's Python API sketch runs as written, on the shipped tiny base and zoo (from the repository's root)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_sketch() -> str:
    """The first Python block of the README's "Python API" section."""
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


@pytest.mark.filterwarnings("ignore:COBYLA")
def test_the_readme_sketch_runs_as_written(one_thread, tmp_path, monkeypatch):
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")  # its relative paths, with outputs kept out of the tree
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_sketch(), "README.md", "exec"), namespace)
    import lorahub_engine as le

    assert le.LoraAdapter.load(tmp_path / "merged").modules and le.LoraAdapter.load(tmp_path / "composed").modules
    assert namespace["out"].shape[0] == 3 and set(namespace["result"].weights) == {"plural", "opposite"}
