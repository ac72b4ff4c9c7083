"""One writer per place: an OS file lock (``flock``, through ``filelock``) on a folder, and the partial files a killed
writer left behind.

Compacting a caption store and training into a run folder each take the lock of their folder for as long as they
write; a second writer is refused at once with one line naming the holder (its process id, host, command and start
time, kept in a side file beside the lock: the lock file itself is opened by every contender). The OS releases the
lock when its holder dies, however it dies, so a killed writer never blocks the next one.

A writer killed between creating a temporary file and renaming it (:func:`manifests.atomic.atomic_path`) leaves a
``.<name>.<pid>@<host>.<random>.tmp`` file. The next writer of the folder removes it and says so: every temporary file
when the folder has one writer at a time (a run folder), and otherwise only those of a writer on this host that no
longer runs (a caption store, where caption runs write fragments while another compacts).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import filelock

from manifests.atomic import atomic_write_text, host_name
from manifests.errors import InputError

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.holder"
# The writer tag in a temporary file's name (manifests.atomic): ".<target>.<pid>@<host>.<random>.tmp".
_TEMP_WRITER = re.compile(r"\.(\d+)@([^./]+)\.[A-Za-z0-9_]+\.tmp$")


class FolderBusy(InputError):
    """The folder's lock is held by another writer (named in the message)."""


def _holder(folder: Path) -> str:
    """The recorded holder of ``folder``'s lock, in words."""
    try:
        holder = json.loads((folder / HOLDER_FILE).read_text())
        return f"pid {holder['pid']} on {holder['host']} ({holder['command']}, since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not recorded itself yet)"


@contextlib.contextmanager
def one_writer(folder: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs; the folder is created if needed.

    Args:
        folder: the folder written (a caption store, a run folder).
        what: what the folder is, for the message (``caption store``, ``run folder``).

    Raises:
        FolderBusy: another process (or another writer in this one) holds the lock: one line naming it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(folder / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise FolderBusy(
            f"{what} {folder}: being written by {_holder(folder)}; wait until it ends, or write elsewhere"
        ) from None
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] not in ("", "-c", "-m") else "python"
        command = " ".join([program, *sys.argv[1:2]])  # `segmenter train`, `flows run`
        atomic_write_text(folder / HOLDER_FILE, json.dumps(
            {"pid": os.getpid(), "host": host_name(), "command": command, "since": since}
        ))  # fmt: skip
        yield
    finally:
        (folder / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


def _writer_is_gone(name: str) -> bool:
    """Whether the temporary file ``name`` was written by a process of this host that no longer runs."""
    match = _TEMP_WRITER.search(name)
    if match is None or match.group(2) != host_name():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: it runs
        return False
    return False


def remove_partial_files(folder: str | os.PathLike[str], every: bool) -> list[Path]:
    """Remove the temporary files and folders (``.*.tmp``) a killed writer left directly in ``folder``.

    Args:
        folder: the folder to clean (nothing happens where it does not exist).
        every: all of them (the caller holds the folder's lock and is its only writer), or only those of writers of
            this host that no longer run (other writers may be writing the rest right now).

    Returns:
        What was removed, for the caller to name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.glob(".*.tmp")):
        if every or _writer_is_gone(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
