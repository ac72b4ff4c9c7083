"""Reading and writing the crops that ``prepare`` produces (PNG for 1 or 3 bands, TIFF otherwise)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from manifests.atomic import atomic_path
from manifests.errors import InputError


def crop_suffix(array: np.ndarray) -> str:
    """The file suffix a crop is written with: PNG for 8-bit grey or RGB, TIFF for anything else."""
    bands = 1 if array.ndim == 2 else array.shape[-1]
    return ".png" if bands in (1, 3) and array.dtype == np.uint8 else ".tif"


def write_crop(path: Path, array: np.ndarray) -> None:
    """Write a crop atomically; the suffix of ``path`` picks the format."""
    with atomic_path(path) as tmp:
        if path.suffix == ".png":
            Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array).save(
                tmp, format="PNG", compress_level=1
            )
        else:
            tifffile.imwrite(tmp, array, compression="zlib")


def read_crop(path: Path) -> np.ndarray:
    """Read a crop written by :func:`write_crop`."""
    if path.suffix == ".png":
        with Image.open(path) as image:
            return np.asarray(image)
    return tifffile.imread(path)


def three_bands(image: np.ndarray) -> np.ndarray:
    """``image`` with at least three bands, the one rule for single-band sources in prepare, evaluate and predict.

    A grey image (``H x W``, one band, or grey + alpha) has its grey band repeated three times, since the backbone
    reads three bands; an image with three or more bands is returned as it is (the model reads its first three).
    """
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] >= 3:
        return image
    return np.repeat(image[..., :1], 3, axis=-1)


def pad_to(array: np.ndarray, height: int, width: int, value: int) -> np.ndarray:
    """``array`` padded at the bottom and right to ``height x width`` with ``value`` (as it is when large enough)."""
    extra = ((0, max(0, height - array.shape[0])), (0, max(0, width - array.shape[1])))
    if not any(after for _, after in extra):
        return array
    return np.pad(array, extra + ((0, 0),) * (array.ndim - 2), constant_values=value)


def array_sha256(array: np.ndarray) -> str:
    """Content hash of pixels (shape and dtype included), independent of the file encoding."""
    digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def to_uint8(image: np.ndarray, scale: str, path: Path) -> np.ndarray:
    """``image`` in 8 bits as the model was trained on: as it is when it already is; otherwise stretched per band by
    ``scale`` (``minmax``: each band's range; ``percentile``: its 2nd to 98th percentile, clipped).

    Raises:
        InputError: an image that is not 8-bit with ``scale`` ``none`` (the default), naming the file and the options.
    """
    if image.dtype == np.uint8:
        return image
    if scale == "none":
        raise InputError(
            f"{path}: {image.dtype} pixels, the model was trained on 8-bit ones (prepare refuses such sources too): "
            "convert the image, or pass --scale minmax or --scale percentile to stretch each band to 0-255"
        )
    pixels = image.astype(np.float64)
    low, high = (0.0, 100.0) if scale == "minmax" else (2.0, 98.0)
    bottom = np.nanpercentile(pixels, low, axis=(0, 1), keepdims=True)
    top = np.nanpercentile(pixels, high, axis=(0, 1), keepdims=True)
    stretched = (pixels - bottom) / np.where(top > bottom, top - bottom, 1.0)
    return np.round(np.clip(np.nan_to_num(stretched), 0.0, 1.0) * 255).astype(np.uint8)
