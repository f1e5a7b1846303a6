"""Progress bars: drawn on a terminal, silent in a log, never with progress=False."""

import io

import pytest

from lorahub_engine.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "progress", "drawn"), [
    (Terminal, True, True),
    (io.StringIO, True, False),  # a log: no pile of redrawn bars
    (Terminal, False, False),
])
def test_bar_is_drawn_only_on_a_terminal_and_when_asked(stream, progress, drawn):
    out = stream()
    assert sum(progress_bar(range(3), desc="work", file=out, progress=progress)) == 3
    assert ("work: 100%" in out.getvalue()) is drawn


def test_every_bar_of_the_packages_goes_through_progress_bar():
    """A bar made with tqdm directly would ignore the rule (and pile up in logs)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    allowed = {root / "lorahub_engine" / "progress.py",  # the rule
               root / "lorahub_engine" / "cli" / "__init__.py"}  # only to end an open bar's line before an error
    direct = [str(path.relative_to(root)) for package in ("lorahub_engine", "retrieval", "routers", "benchmarks")
              for path in (root / package).rglob("*.py")
              if path not in allowed and re.search(r"^\s*(from tqdm|import tqdm)", path.read_text(), re.M)]
    assert direct == []
