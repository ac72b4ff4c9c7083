"""Uniform access to source files, whether they sit in an official ZIP archive or in its extracted folder.

A file is found by its role: which archive holds it, its file name and the folder it must sit in
(:class:`FileRole`). The base name alone is never enough: the official Vaihingen image archive holds the
orthophoto ``top/top_mosaic_09cm_area1.tif`` and the ground truth ``gts_for_participants/top_mosaic_09cm_area1.tif``
under the same name, so a lookup by name would sooner or later read a label map as the image.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from manifests.errors import InputError

# Bytes read at a time when a file is hashed: a source of gigabytes is never held whole.
_CHUNK = 1 << 20

# Finder metadata that macOS adds to archives: resource forks (``._name``) and the ``__MACOSX`` tree.
_SKIPPED_PARTS = ("__MACOSX",)


@dataclass(frozen=True)
class SourceFile:
    """One raster file: a plain path, or a member of a ZIP archive."""

    path: Path
    member: str | None = None

    @property
    def name(self) -> str:
        """The base name of the file (of the member for a ZIP archive)."""
        return Path(self.member).name if self.member else self.path.name

    def __str__(self) -> str:
        return f"{printable(self.path)}!{self.member}" if self.member else printable(self.path)

    def read_bytes(self) -> bytes:
        """The raw bytes of the file (small files: split lists, side files).

        Returns:
            The file's content.
        """
        return b"".join(self.chunks())

    def chunks(self) -> Iterator[bytes]:
        """The bytes of the file in chunks of 1 MiB; a ZIP member's CRC is checked when its last chunk is read.

        Raises:
            InputError: a damaged archive member (bad CRC, broken deflate stream, cut short).
        """
        if self.member is None:
            with self.path.open("rb") as handle:
                yield from iter(lambda: handle.read(_CHUNK), b"")
            return
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as member:
                yield from iter(lambda: member.read(_CHUNK), b"")
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            # A bad CRC, a broken deflate stream, a member cut short: the archive is damaged, say which member.
            raise InputError(f"{self}: cannot be read from the archive ({type(exc).__name__}: {exc})") from None

    def sha256(self) -> str:
        """SHA-256 of the file's bytes (hex), read in chunks."""
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()


@dataclass(frozen=True)
class FileRole:
    """Where the file of one role (image, label, eval label) of a source sits in an official release.

    Attributes:
        archive: stem of the archive, found as ``<root>/<archive>.zip`` or as the extracted ``<root>/<archive>/``.
        name: file-name template with ``{id}`` (the source id), e.g. ``top_mosaic_09cm_area{id}.tif``.
        folder: the folder the file must sit in, at any depth (``top`` for the Vaihingen orthophotos, so that
            ``gts_for_participants/`` beside it is never read as the image); several levels are written with ``/``
            (LoveDA's ``Urban/images_png``). A file at the top level of the archive counts as sitting in a folder
            named like the archive, so ``2_Ortho_RGB`` matches both ``2_Ortho_RGB.zip!2_Ortho_RGB/x.tif`` and a
            flat ``2_Ortho_RGB.zip!x.tif``. ``None``: the file sits at the top level of the archive or in one folder
            below it, whatever its name (the label archives).
    """

    archive: str
    name: str
    folder: str | None = None

    def file_name(self, source_id: str) -> str:
        """The file name of one source."""
        return self.name.format(id=source_id)

    def where(self) -> str:
        """Where the file must sit, in words (for error messages)."""
        return f"in a {self.folder}/ folder" if self.folder else "at the top level of the archive or one folder down"

    def accepts(self, relative: str) -> bool:
        """Whether a file at ``relative`` (a POSIX path inside the archive) sits where this role expects it."""
        parents = PurePosixPath(relative).parts[:-1]
        if self.folder is None:
            return len(parents) <= 1
        wanted = tuple(self.folder.split("/"))
        return (self.archive, *parents)[-len(wanted) :] == wanted

    def source_id(self, name: str) -> str | None:
        """The source id of a file named ``name`` (``{id}`` of the template), or None when the name does not fit."""
        before, _, after = self.name.partition("{id}")
        fits = name.startswith(before) and name.endswith(after) and len(name) > len(before) + len(after)
        return name[len(before) : len(name) - len(after)] if fits else None


class Archive:
    """The files of one official archive, found as ``<root>/<stem>.zip`` or as the folder ``<root>/<stem>/``.

    Files are indexed by base name with their path inside the archive; :meth:`find` then keeps the ones in the
    folder that a :class:`FileRole` asks for and refuses to guess between several. ``__MACOSX`` trees and
    ``._*`` resource forks are skipped. World files (``.tfw``) and other side files are indexed too but never
    match a raster's name, so they cannot be picked by mistake.
    """

    def __init__(self, root: Path, stem: str) -> None:
        self.root = root
        self.stem = stem
        # base name -> [(path inside the archive, file)], in sorted path order
        self._files: dict[str, list[tuple[str, SourceFile]]] = {}
        zip_path = root / f"{stem}.zip"
        folder = root / stem
        # Both present (unzipped in place): the folder is read, and that is said rather than guessed silently.
        self.notice = (
            f"{folder}: read this folder; the archive {zip_path.name} beside it is not read"
            if folder.is_dir() and zip_path.is_file()
            else None
        )
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                relative = path.relative_to(folder).as_posix()
                if path.is_file() and not _skipped(relative):
                    self._files.setdefault(path.name, []).append((relative, SourceFile(path)))
            self.location = str(folder)
        elif zip_path.is_file():
            try:
                with zipfile.ZipFile(zip_path) as archive:
                    members = [info.filename for info in archive.infolist() if not info.is_dir()]
            except zipfile.BadZipFile:
                raise InputError(f"{zip_path}: not a readable ZIP archive") from None
            except UnicodeDecodeError:
                raise InputError(f"{zip_path}: a member name is flagged UTF-8 but is not valid UTF-8") from None
            for member in sorted(members):
                if not _skipped(member):
                    file = SourceFile(zip_path, member)
                    self._files.setdefault(file.name, []).append((member, file))
            self.location = str(zip_path)
        else:
            self.location = ""

    @property
    def exists(self) -> bool:
        """Whether the archive or its extracted folder was found."""
        return bool(self.location)

    def find(self, role: FileRole, source_id: str, what: str) -> SourceFile | None:
        """The one file of ``role`` for ``source_id``, or ``None`` when the archive has none where expected.

        Args:
            role: archive, file name and folder of the file.
            source_id: the source whose file is wanted.
            what: the file's role in words, for the error message (``image``, ``label of 11``).

        Returns:
            The file, or ``None`` when no file of that name sits where ``role`` expects it.

        Raises:
            InputError: several files of that name sit where ``role`` expects one (the message names them).
        """
        name = role.file_name(source_id)
        matches = [(relative, file) for relative, file in self._files.get(name, []) if role.accepts(relative)]
        if len(matches) > 1:
            paths = " and ".join(relative for relative, _ in matches)
            raise InputError(
                f"{self.location}: {what} file {name} is ambiguous: {paths} {'both' if len(matches) == 2 else 'all'} "
                f"sit {role.where()} (expected exactly one; remove or move the extra copy)"
            )
        return matches[0][1] if matches else None

    def elsewhere(self, role: FileRole, source_id: str) -> list[str]:
        """Paths inside the archive of files named like the file of ``role`` that sit where it does not look."""
        name = role.file_name(source_id)
        return [relative for relative, _ in self._files.get(name, []) if not role.accepts(relative)]

    def ids(self, role: FileRole) -> list[str]:
        """The source ids of the files of ``role`` in the archive (each file named by the role's template and sitting
        where it looks), sorted."""
        found = {
            source_id
            for name, entries in self._files.items()
            if (source_id := role.source_id(name)) is not None
            and any(role.accepts(relative) for relative, _ in entries)
        }
        return sorted(found)

    def names(self) -> list[str]:
        """Base names of the files in the archive (side files such as ``.tfw`` included)."""
        return list(self._files)


def printable(path: Path | str) -> str:
    """``path`` as text that can always be printed: bytes of a file name that are not UTF-8 shown as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_utf8_name(path: Path) -> None:
    """Refuse a file whose name is not UTF-8 (tile ids and the index store paths as UTF-8 text).

    Raises:
        InputError: naming the file, its undecodable bytes shown as ``\\xNN``.
    """
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{printable(path)}: the file name is not valid UTF-8; rename the file") from None


def _skipped(relative: str) -> bool:
    parts = relative.split("/")
    return any(part in _SKIPPED_PARTS for part in parts) or parts[-1].startswith("._")
