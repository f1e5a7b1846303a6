"""Outputs that never destroy data: a folder or file appears complete under its final name, or not at all, and it
replaces only an earlier output of the same kind written by this engine (anything else only with overwrite=True).

A writer builds its output in a hidden sibling `.NAME.lorahub-<random>.tmp` (made with the process umask, as PEFT's
files are) while holding an flock on it, then, holding an flock on the parent folder, checks what the final path
holds, moves it aside to `.NAME.lorahub-<random>.old` and renames the new output into place. So concurrent writers to
one path each install one complete output (the last one wins), and a killed writer's temps, no longer locked, are
removed by the next writer of that name. With overwrite=True, a folder that is not such an output keeps its other
entries: only the new output's own files and folders replace theirs namesakes in it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lorahub_engine.errors import AdapterFileError, OutputError, OutputExistsError

try:
    import fcntl
except ImportError:  # no flock (Windows): temps stay unique, stale ones are ignored instead of removed
    fcntl = None

_TAG = "lorahub-"
_OWN_TEMPS: set[str] = set()  # temp folders this process is writing: private, so writes inside need no folder lock


@dataclass(frozen=True)
class OutputKind:
    """What a writer produces: `name` for messages, `is_output(path)` True where `path` holds an earlier output of
    this kind written by the engine (so it may be replaced without overwrite=True), `folder` False for files."""

    name: str
    is_output: Callable[[Path], bool]
    folder: bool = True


TEXT_FILE = OutputKind("a text file", Path.is_file, folder=False)  # results the benchmarks rewrite


def check_output(path: str | os.PathLike, kind: OutputKind, overwrite: bool = False) -> None:
    """Raise OutputExistsError now if writing `kind` to `path` would be refused (call before long work)."""
    final = Path(path)
    _refuse(final, kind, overwrite, _state(final, kind))
    if final.parent.exists() and not final.parent.is_dir():
        raise OutputError(f"{final}: {final.parent} is not a folder")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, kind: OutputKind, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it becomes `path` (see the module docstring), on error it is
    removed. Refuses, before and after the block, to replace what is not an earlier output of `kind`."""
    final = Path(path)
    check_output(final, kind, overwrite)
    with _temp(final, kind.folder) as tmp:
        yield tmp
        _usual_modes(tmp)
        _install(tmp, final, kind, overwrite)


def read_json(path: Path, error: type[Exception] = AdapterFileError):
    """A JSON file's value; a file that is not JSON or cannot be read raises `error` naming the path."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path}: unreadable ({e.strerror or e})") from None


def write_text_atomic(path: str | os.PathLike, text: str, kind: OutputKind = TEXT_FILE,
                      overwrite: bool = False) -> None:
    """Write text to a temp file beside `path`, then rename it into place (same rules as atomic_dir)."""
    write_bytes_atomic(path, text.encode("utf-8"), kind, overwrite)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, kind: OutputKind = TEXT_FILE,
                       overwrite: bool = False) -> None:
    """Write bytes to a temp file beside `path`, then rename it into place (same rules as atomic_dir)."""
    final = Path(path)
    check_output(final, kind, overwrite)
    with _temp(final, kind.folder) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as e:
            raise OutputError(f"{final}: cannot write ({e.strerror or e})") from None
        _install(tmp, final, kind, overwrite)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG at `path`, complete under its name or absent (write_bytes_atomic); the figure
    stays open (the caller closes it)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_bytes_atomic(path, buffer.getvalue())


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2, kind: OutputKind = TEXT_FILE,
                      overwrite: bool = False) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n", kind, overwrite)


# ---- what the final path holds -------------------------------------------------------------------------------
def _state(final: Path, kind: OutputKind) -> str:
    """absent | empty (an empty folder) | ours (an earlier output of `kind`) | folder | other. A path that vanishes
    while it is read (a concurrent save renaming its output into place) reads as absent; installing checks again."""
    try:
        return _read_state(final, kind)
    except FileNotFoundError:
        return "absent"


def _read_state(final: Path, kind: OutputKind) -> str:
    if not os.path.lexists(final):
        return "absent"
    if final.is_symlink():
        return "other"
    if final.is_dir():
        if not any(final.iterdir()):
            return "empty"
        return "ours" if kind.is_output(final) else "folder"
    return "ours" if kind.is_output(final) else "other"


def _refuse(final: Path, kind: OutputKind, overwrite: bool, state: str) -> None:
    if state in ("absent", "ours") or (state == "empty" and kind.folder):
        return
    if state in ("folder", "empty") and not kind.folder:
        raise OutputExistsError(f"{final}: is a folder; writing {kind.name} there would replace it (even with "
                                "--overwrite); choose another path")
    if not overwrite:
        what = "a folder that is not" if state == "folder" else "something that is not"
        raise OutputExistsError(f"{final}: exists and is {what} {kind.name} written by lorahub-engine; "
                                "pass --overwrite (API: overwrite=True) to replace it")


# ---- temps and installation -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _temp(final: Path, folder: bool) -> Iterator[Path]:
    """A locked, uniquely named hidden sibling of `final`, removed on error (stale ones are cleaned first)."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with _locked(final.parent):
            _remove_stale(final.parent, final.name)
            tmp = final.parent / f".{final.name}.{_TAG}{secrets.token_hex(8)}.tmp"
            if folder:
                os.mkdir(tmp)  # 0o777 & ~umask
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            hold = _hold(tmp)
    except OSError as e:
        raise OutputError(f"{final}: cannot write here ({e.strerror or e})") from None
    _OWN_TEMPS.add(os.path.abspath(tmp))
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _OWN_TEMPS.discard(os.path.abspath(tmp))
        _release(hold)


def _install(tmp: Path, final: Path, kind: OutputKind, overwrite: bool) -> None:
    """Rename `tmp` into place under the parent's lock (undone if a rename fails); what it replaces is moved aside
    and removed afterwards."""
    moves: list[tuple[Path, Path]] = []

    def move(src: Path, dst: Path) -> None:
        os.rename(src, dst)
        moves.append((src, dst))

    old, hold, done = None, None, False
    try:
        with _locked(final.parent):
            state = _state(final, kind)
            _refuse(final, kind, overwrite, state)
            if state == "folder":  # overwrite: only the output's own entries are replaced
                old = _aside(final)
                os.mkdir(old)
                hold = _hold(old)
                for entry in sorted(os.listdir(tmp)):
                    if os.path.lexists(final / entry):
                        move(final / entry, old / entry)
                    move(tmp / entry, final / entry)
                os.rmdir(tmp)
            else:
                if state != "absent":
                    old = _aside(final)
                    move(final, old)
                    hold = _hold(old)
                move(tmp, final)
        done = True
    except OSError as e:
        for src, dst in reversed(moves):
            with contextlib.suppress(OSError):
                os.rename(dst, src)
        raise OutputError(f"{final}: cannot install the output ({e.strerror or e})") from None
    finally:
        if old is not None and done:
            _remove(old)
        elif old is not None:  # rolled back: empty, or holding what could not be put back (left for the user)
            with contextlib.suppress(OSError):
                os.rmdir(old)
        _release(hold)


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read by setting it (briefly)
    os.umask(mask)
    return mask


def _usual_modes(folder: Path) -> None:
    """Files 0o666 and folders 0o777 less the umask, as `open` and `mkdir` make them (safetensors makes 0o600)."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)


def _aside(final: Path) -> Path:
    return final.parent / f".{final.name}.{_TAG}{secrets.token_hex(8)}.old"


def _stale_pattern(name: str) -> re.Pattern:
    """Temps of `name`: ours, and those of earlier versions (mkdtemp's 8 characters; a pid before .old)."""
    return re.compile(rf"\.{re.escape(name)}\.({_TAG}[0-9a-f]{{16}}\.(tmp|old)|[a-z0-9_]{{8}}\.tmp|\d+\.old)")


def _remove_stale(parent: Path, name: str) -> None:
    """Remove the temps of `name` that no live writer holds (called under the parent's lock)."""
    if fcntl is None:
        return
    pattern = _stale_pattern(name)
    for entry in os.listdir(parent):
        if not pattern.fullmatch(entry):
            continue
        path = parent / entry
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live writer holds it
            continue
        _remove(path)
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---- locks ------------------------------------------------------------------------------------------------------
def _hold(path: Path) -> int | None:
    """An exclusive flock on `path` (file or folder) until _release; None without flock support."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # a filesystem without flock: the temp is still unique
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` for the block (waits for other writers in it)."""
    if fcntl is None or os.path.abspath(folder) in _OWN_TEMPS:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock: renames are still atomic
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
