"""Reading and writing the crops that ``prepare`` produces (PNG for 1 or 3 bands, TIFF otherwise)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from manifests.atomic import atomic_path


def crop_suffix(array: np.ndarray) -> str:
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


def array_sha256(array: np.ndarray) -> str:
    """Content hash of pixels (shape and dtype included), independent of the file encoding."""
    digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
