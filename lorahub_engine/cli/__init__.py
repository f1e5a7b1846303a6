"""The `lorahub-engine` command line.

Each command is two functions: `add_<command>(commands)` declares its subparser on argparse's subparsers object and
sets `run=run_<command>`; `run_<command>(args)` does the work and returns the exit code. The core's own commands are
listed in CORE_COMMANDS. Packages above the core (retrieval, routers, benchmarks) declare theirs in the entry-point
group `lorahub_engine.commands` of their pyproject.toml (name = command, value = `package.module:add_<command>`), the
plugin convention of pytest and llm: the core discovers them and imports none of them by name.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from lorahub_engine.cli.adapters import add_inspect, add_merge
from lorahub_engine.cli.search import add_search
from lorahub_engine.errors import AdapterError

COMMANDS_GROUP = "lorahub_engine.commands"
CORE_COMMANDS = [add_merge, add_inspect, add_search]


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub
    return execute(build_parser().parse_args(argv))


def execute(args: argparse.Namespace) -> int:
    """Run a parsed command; errors of the AdapterError family print one line on stderr and return 2."""
    try:
        return args.run(args)
    except AdapterError as e:
        print(f"lorahub-engine {args.command}: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorahub-engine",
                                     description="Compose, retrieve, search and route LoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in CORE_COMMANDS:
        add(commands)
    for entry in entry_points(group=COMMANDS_GROUP):
        _add_plugin(commands, entry)
    return parser


def _add_plugin(commands, entry) -> None:
    """Call a declared `add_<command>`; it must add exactly the command its entry point names."""
    if entry.name in commands.choices:
        raise RuntimeError(f"{entry.value} declares command {entry.name!r}, which already exists")
    entry.load()(commands)
    if entry.name not in commands.choices:
        raise RuntimeError(f"{entry.value} did not add the command {entry.name!r} its entry point names")
