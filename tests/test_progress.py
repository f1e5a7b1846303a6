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
