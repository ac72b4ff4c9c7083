"""Atomic file writes: a reader sees either the old file or the complete new one, never a partial one."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _read_umask() -> int:
    """The process umask. Reading it means setting it, which other threads would see: so once, at import."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def host_name() -> str:
    """This machine's short host name (its first label), as lock holders and temporary files record it."""
    return socket.gethostname().split(".")[0] or "localhost"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    The temporary name starts with ``.`` and ends with ``.tmp`` so that directory readers skip it, and names its
    writer (``.<name>.<pid>@<host>.<random>.tmp``), so that a file a killed writer left can be told from one being
    written (:func:`manifests.locks.remove_partial_files`). On an exception the temporary file is removed and ``path``
    is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = f"{os.getpid()}@{host_name()}"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{writer}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes the file private (0600); a store or report on a shared path must get the mode any other new
    # file would get, under the user's umask.
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def file_digest(path: Path) -> str:
    """SHA-256 of a weights file, computed once per (path, mtime, size) in a process: a gigabyte-sized backbone or
    text checkpoint that is recorded at training and checked when the model is built is read once."""
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
