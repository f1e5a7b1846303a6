"""Progress bars for long work, one rule for the whole project: drawn on a terminal, silent in a log.

`progress=True` asks for a bar and gets one only where someone watches: on a terminal (tqdm's own
`disable=None`, so a job run under nohup writes no pile of redrawn bars into its log) or in a notebook (tqdm's
widget); `progress=False` never draws one.
"""

from __future__ import annotations

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as _chosen_bar

IN_NOTEBOOK = _chosen_bar.__module__ == "tqdm.notebook"


def progress_bar(iterable=None, *, progress: bool = True, **options) -> tqdm:
    """tqdm over `iterable` (or a manual bar with `total=`), shown only if `progress` and someone watches."""
    if not progress:
        disable = True
    else:
        disable = False if IN_NOTEBOOK else None
    return tqdm(iterable, disable=disable, **options)
