"""The `lorahub-engine` command line.

Each command is two functions: `add_<command>(commands)` declares its subparser on argparse's subparsers object and
sets `run=run_<command>`; `run_<command>(args)` does the work and returns the exit code. The core's own commands are
listed in CORE_COMMANDS. Packages above the core (retrieval, routers, benchmarks) declare theirs in the entry-point
group `lorahub_engine.commands` of their pyproject.toml (name = command, value = `package.module:add_<command>`), the
plugin convention of pytest and llm: the core discovers them and imports none of them by name.

Every failure is one line on stderr and exit code 2 (a traceback only with --debug), after any progress bar's line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from lorahub_engine.cli.adapters import add_inspect, add_merge
from lorahub_engine.cli.options import CommandParser
from lorahub_engine.cli.search import add_search
from lorahub_engine.errors import AdapterError

COMMANDS_GROUP = "lorahub_engine.commands"
CORE_COMMANDS = [add_merge, add_inspect, add_search]


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, for every command
    return execute(build_parser().parse_args([a for a in argv if a != "--debug"]), debug)


def execute(args: argparse.Namespace, debug: bool = False) -> int:
    """Run a parsed command. Errors (the engine's, the file system's, bad values) print one line on stderr and
    return 2; with `debug` they propagate with their traceback."""
    try:
        return args.run(args)
    except (AdapterError, OSError, ValueError) as e:
        if debug:
            raise
        _fail(args, f"error: {_one_line(e)}")
        return 2
    except KeyboardInterrupt:
        _fail(args, "interrupted")
        return 130


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, AdapterError) else f"{text} ({type(error).__name__})"


def _fail(args: argparse.Namespace, message: str) -> None:
    from tqdm import tqdm

    if getattr(tqdm, "_instances", None):  # a bar left open by the error: start on a line of our own
        sys.stderr.write("\n")
    print(f"lorahub-engine {args.command}: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="lorahub-engine", description="Compose, retrieve, search and route LoRA adapters.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
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
