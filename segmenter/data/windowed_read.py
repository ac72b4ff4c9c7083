"""Reading a source window by window, so a 6000 x 6000 scene never needs to sit in memory whole.

GeoTIFFs (a plain file or a member of a ZIP archive) are read through rasterio ``Window`` reads, which decode only
the blocks a window touches. Other formats (PNG, JPEG: small by nature, and without random access) are decoded
whole once and cut from memory. Both give the same pixels as a whole read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from manifests.errors import InputError
from segmenter.data.datasets.files import SourceFile
from segmenter.data.raster_io import to_uint8

TIFF_SUFFIXES = (".tif", ".tiff")


class WindowReader(Protocol):
    """Pixels of a raster by window: ``read(y, x, h, w)`` is ``image[y:y+h, x:x+w]`` with bands last."""

    height: int
    width: int
    bands: int
    dtype: np.dtype

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The ``h x w`` window at row ``y``, column ``x``, bands last."""
        ...


class ArrayWindows:
    """Windows of an image already in memory (``H x W`` or ``H x W x C``)."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image if image.ndim == 3 else image[..., None]
        self.height, self.width, self.bands = self.image.shape
        self.dtype = self.image.dtype

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The window's pixels, ``h x w x C`` (a view: no copy)."""
        return self.image[y : y + h, x : x + w]


class RasterWindows:
    """Windows of an open rasterio dataset, each decoded from the file when asked for."""

    def __init__(self, dataset: rasterio.io.DatasetReader) -> None:
        self.dataset = dataset
        self.height, self.width, self.bands = dataset.height, dataset.width, dataset.count
        self.dtype = np.dtype(dataset.dtypes[0])

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The window's pixels, ``h x w x C``."""
        return np.moveaxis(self.dataset.read(window=Window(x, y, w, h)), 0, -1)


def gdal_path(file: SourceFile) -> str:
    """The path GDAL opens a source file by: the file itself, or ``/vsizip/`` into its archive."""
    if file.member is None:
        return str(file.path)
    return f"/vsizip/{Path(file.path).resolve()}/{file.member}"


@contextmanager
def open_windows(file: SourceFile) -> Iterator[WindowReader]:
    """A window reader of a source file: windowed rasterio reads for a GeoTIFF, a whole decode otherwise.

    A TIFF that GDAL cannot open (a compression it lacks) is decoded whole by :meth:`SourceFile.read_array`
    instead: the same pixels, only the memory differs.

    Raises:
        InputError: the file is not a readable raster (from :meth:`SourceFile.read_array`).
    """
    if file.name.lower().endswith(TIFF_SUFFIXES):
        try:
            dataset = rasterio.open(gdal_path(file))
        except RasterioIOError:
            dataset = None
        if dataset is not None:
            with dataset:
                yield RasterWindows(dataset)
            return
    yield ArrayWindows(file.read_array())


@contextmanager
def open_image_windows(path: Path, scale: str) -> Iterator[tuple[WindowReader, dict]]:
    """A window reader of an image to predict, with its georeferencing (``crs``, ``transform``).

    An 8-bit GeoTIFF is read by windows. Any other image is read whole: stretching pixels that are not 8-bit needs
    the statistics of the whole image (:func:`segmenter.data.raster_io.to_uint8`), and PNG and JPEG have no random
    access.

    Raises:
        InputError: not a readable raster, or pixels that are not 8-bit with ``scale`` ``none``.
    """
    try:
        dataset = rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(f"{path}: not a readable raster ({exc})") from None
    with dataset:
        profile = {"crs": dataset.crs, "transform": dataset.transform}
        if dataset.driver == "GTiff" and all(dtype == "uint8" for dtype in dataset.dtypes):
            yield RasterWindows(dataset), profile
            return
        image = to_uint8(np.moveaxis(dataset.read(), 0, -1), scale, path)
    yield ArrayWindows(image), profile
