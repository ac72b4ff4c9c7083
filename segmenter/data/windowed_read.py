"""The one raster reader: every source file (TIFF, PNG, JPEG; a plain file or a member of a ZIP archive) is read
through GDAL (rasterio), window by window.

GDAL decodes every TIFF a user meets (LZW, Deflate, JPEG-in-TIFF, PackBits, ZSTD; tiled or striped; BigTIFF)
without an extra codec package, and a window read decodes only the blocks (or, for PNG and JPEG, the scanlines)
it touches, so ``prepare``, ``evaluate`` and ``predict`` read a source of any size in bounded memory. A source over
the pixel budget (``tiling.max_pixels``) is refused when it is opened, before a pixel is decoded.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from manifests.errors import InputError
from segmenter.data.raster_io import to_uint8

# The decoded blocks GDAL keeps between window reads (MB): the rows that overlapping tiles share (a PNG or JPEG is
# decoded from its first row again when a read goes back), 512 px of a 20000 px wide RGB source fitting twice. GDAL's
# own default, 5% of the machine's memory, would let the cache, not the tile, set the peak.
GDAL_CACHE_MB = 64
MAX_PIXELS_SETTING = "tiling.max_pixels, --max-pixels"


class SourceFile(Protocol):
    """A raster file as the datasets find it (:class:`segmenter.data.datasets.files.SourceFile`): a plain path, or a
    member of a ZIP archive; ``str()`` names it in messages."""

    path: Path
    member: str | None


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
    """Windows of an open rasterio dataset, each decoded from the file when asked for.

    Attributes:
        name: the file in messages (a damaged block is found only when a window reads it).
    """

    def __init__(self, dataset: rasterio.io.DatasetReader, name: str) -> None:
        self.dataset = dataset
        self.name = name
        self.height, self.width, self.bands = dataset.height, dataset.width, dataset.count
        self.dtype = np.dtype(dataset.dtypes[0])

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The window's pixels, ``h x w x C``.

        Raises:
            InputError: a block of the window cannot be decoded (a truncated or damaged file).
        """
        try:
            return np.moveaxis(self.dataset.read(window=Window(x, y, w, h)), 0, -1)
        except RasterioIOError as exc:
            raise InputError(f"{self.name}: not a readable raster ({_reason(exc)})") from None


def gdal_path(file: SourceFile) -> str:
    """The path GDAL opens a source file by: the file itself, or ``/vsizip/`` into its archive."""
    if file.member is None:
        return str(file.path)
    return f"/vsizip/{Path(file.path).resolve()}/{file.member}"


def _reason(exc: RasterioIOError) -> str:
    """GDAL's message in one line, without rasterio's pointer to "the previous exception"."""
    text = " ".join(str(exc).split())
    cause = exc.__cause__ or exc.__context__
    if "See previous exception" in text and cause is not None:
        text = " ".join(str(cause).split())
    return f"{type(exc).__name__}: {text}"


def check_pixel_budget(file: SourceFile | Path, height: int, width: int, max_pixels: int | None) -> None:
    """Refuse a raster of more than ``max_pixels`` pixels, naming the file and the setting that allows more.

    Raises:
        InputError: over the budget.
    """
    if max_pixels is not None and height * width > max_pixels:
        raise InputError(
            f"{file}: {width} x {height} px ({height * width:,} pixels) is over the pixel budget of {max_pixels:,} "
            f"({MAX_PIXELS_SETTING}); raise it if the source is meant to be this large"
        )


@contextmanager
def _gdal_dataset(path: str, name: str) -> Iterator[rasterio.io.DatasetReader]:
    """A rasterio dataset of ``path`` opened in a GDAL environment with a bounded block cache.

    Raises:
        InputError: GDAL cannot open it (not a raster, a format it does not read, a damaged header).
    """
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), warnings.catch_warnings():
        # A PNG or a plain TIFF has no georeferencing: nothing the pixels depend on.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            dataset = rasterio.open(path)
        except RasterioIOError as exc:
            raise InputError(f"{name}: not a readable raster ({_reason(exc)})") from None
        with dataset:
            if dataset.count == 0 or dataset.width == 0 or dataset.height == 0:
                raise InputError(f"{name}: not a readable raster (no pixels: {dataset.count} bands)")
            yield dataset


@contextmanager
def open_windows(file: SourceFile, max_pixels: int | None = None) -> Iterator[WindowReader]:
    """A window reader of a source file, through GDAL whatever its format.

    Args:
        file: the file (a plain path or a ZIP member, read in place through ``/vsizip/``).
        max_pixels: the pixel budget (None: no limit); checked on the header, before any pixel is decoded.

    Raises:
        InputError: the file is not a readable raster, or is over the pixel budget.
    """
    with _gdal_dataset(gdal_path(file), str(file)) as dataset:
        check_pixel_budget(file, dataset.height, dataset.width, max_pixels)
        yield RasterWindows(dataset, str(file))


def read_raster(file: SourceFile) -> np.ndarray:
    """The whole raster of a source file, ``H x W`` for one band, ``H x W x C`` otherwise.

    Raises:
        InputError: the file is not a readable raster.
    """
    with open_windows(file) as reader:
        array = reader.read(0, 0, reader.height, reader.width)
    return array[..., 0] if array.shape[-1] == 1 else array


@contextmanager
def open_image_windows(path: Path, scale: str, max_pixels: int | None = None) -> Iterator[tuple[WindowReader, dict]]:
    """A window reader of an image to predict, with its georeferencing (``crs``, ``transform``).

    An 8-bit image is read by windows. Any other image is read whole: stretching pixels that are not 8-bit needs
    the statistics of the whole image (:func:`segmenter.data.raster_io.to_uint8`). The pixel budget is checked on
    the header, before a pixel is read (the class map of the whole image is held in memory).

    Raises:
        InputError: not a readable raster, over ``max_pixels``, or pixels that are not 8-bit with ``scale``
            ``none``.
    """
    with _gdal_dataset(str(path), str(path)) as dataset:
        check_pixel_budget(path, dataset.height, dataset.width, max_pixels)
        profile = {"crs": dataset.crs, "transform": dataset.transform}
        reader = RasterWindows(dataset, str(path))
        if all(dtype == "uint8" for dtype in dataset.dtypes):
            yield reader, profile
            return
        image = to_uint8(reader.read(0, 0, reader.height, reader.width), scale, path)
    yield ArrayWindows(image), profile
