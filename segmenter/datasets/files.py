"""Uniform access to source files, whether they sit in an official ZIP archive or in its extracted folder."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from manifests.atomic import sha256_bytes
from manifests.errors import InputError

_SKIPPED_PARTS = ("__MACOSX",)


@dataclass(frozen=True)
class SourceFile:
    """One raster file: a plain path, or a member of a ZIP archive."""

    path: Path
    member: str | None = None

    @property
    def name(self) -> str:
        return Path(self.member).name if self.member else self.path.name

    def __str__(self) -> str:
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def read_bytes(self) -> bytes:
        if self.member is None:
            return self.path.read_bytes()
        with zipfile.ZipFile(self.path) as archive:
            return archive.read(self.member)

    def sha256(self) -> str:
        return sha256_bytes(self.read_bytes())

    def read_array(self) -> np.ndarray:
        """Decode the raster to an ``H x W`` or ``H x W x C`` array.

        Raises:
            InputError: the file cannot be decoded.
        """
        data = self.read_bytes()
        try:
            if self.name.lower().endswith((".tif", ".tiff")):
                array = tifffile.imread(io.BytesIO(data))
            else:
                with Image.open(io.BytesIO(data)) as image:
                    array = np.asarray(image)
        except (tifffile.TiffFileError, UnidentifiedImageError, ValueError, OSError) as exc:
            raise InputError(f"{self}: not a readable raster ({type(exc).__name__}: {exc})") from None
        if array.ndim not in (2, 3) or array.size == 0:
            raise InputError(f"{self}: not a readable raster (decoded to shape {array.shape})")
        if array.ndim == 3 and array.shape[0] < 8 < array.shape[-1]:
            array = np.moveaxis(array, 0, -1)  # planar TIFF (C, H, W) to interleaved
        return array


class Archive:
    """The files of one official archive, found as ``<root>/<stem>.zip`` or as the folder ``<root>/<stem>/``.

    Files are looked up by base name, because the member folders differ between releases
    (``top/top_mosaic_09cm_area1.tif`` vs ``top_mosaic_09cm_area1.tif``).
    """

    def __init__(self, root: Path, stem: str) -> None:
        self.root = root
        self.stem = stem
        self._files: dict[str, SourceFile] = {}
        zip_path = root / f"{stem}.zip"
        folder = root / stem
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.is_file() and not _skipped(path.relative_to(folder).as_posix()):
                    self._files.setdefault(path.name, SourceFile(path))
            self.location = str(folder)
        elif zip_path.is_file():
            try:
                with zipfile.ZipFile(zip_path) as archive:
                    members = [info.filename for info in archive.infolist() if not info.is_dir()]
            except zipfile.BadZipFile:
                raise InputError(f"{zip_path}: not a readable ZIP archive") from None
            for member in sorted(members):
                if not _skipped(member):
                    self._files.setdefault(Path(member).name, SourceFile(zip_path, member))
            self.location = str(zip_path)
        else:
            self.location = ""

    @property
    def exists(self) -> bool:
        return bool(self.location)

    def get(self, name: str) -> SourceFile | None:
        return self._files.get(name)

    def names(self) -> list[str]:
        return list(self._files)


def _skipped(relative: str) -> bool:
    parts = relative.split("/")
    return any(part in _SKIPPED_PARTS for part in parts) or parts[-1].startswith("._")
