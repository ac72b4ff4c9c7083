"""Label decoding: RGB-coded masks (ISPRS, generic folders) and integer-coded masks (SynDrone)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RGB = tuple[int, int, int]
BOUNDARY_COLOR: RGB = (0, 0, 0)


@dataclass(frozen=True)
class DecodeStats:
    """Pixels set to the ignore index while decoding one mask.

    Attributes:
        boundary: the black eroded boundary of the ISPRS ``noBoundary`` files.
        stray: values that code no class at all (a colour outside the palette, an unknown id): worth a warning.
        excluded: values of a known class that the dataset ignores by design (SynDrone's sky in the coarse classes):
            counted apart from the stray ones, never warned about.
    """

    boundary: int = 0
    stray: int = 0
    excluded: int = 0

    def __add__(self, other: DecodeStats) -> DecodeStats:
        return DecodeStats(self.boundary + other.boundary, self.stray + other.stray, self.excluded + other.excluded)


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def decode_rgb_mask(mask: np.ndarray, palette: tuple[RGB, ...], ignore_index: int) -> tuple[np.ndarray, DecodeStats]:
    """Map an ``H x W x 3`` colour mask to class indices.

    Black (the eroded boundary of the ISPRS ``noBoundary`` files) and every colour outside the palette
    become ``ignore_index``; the two are counted separately.

    Raises:
        ValueError: a mask that is not ``H x W x (3 or more)`` 8-bit pixels (wider values would alias palette
            colours once packed), an empty palette or one with channels outside 0-255, or an ``ignore_index``
            that is also a class index.
    """
    if mask.ndim != 3 or mask.shape[-1] < 3:
        raise ValueError(f"expected an RGB mask, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit RGB mask, got {mask.dtype} pixels")
    colours = np.asarray(palette)
    if colours.ndim != 2 or colours.shape[0] == 0 or colours.shape[1] != 3 or colours.min() < 0 or colours.max() > 255:
        raise ValueError(f"expected a palette of one or more RGB colours in 0-255, got {len(palette)} entries")
    if ignore_index < len(palette):
        raise ValueError(f"ignore index {ignore_index} is also the index of class {ignore_index}")
    codes = _pack(mask[..., :3])
    palette_codes = _pack(np.asarray(palette, dtype=np.uint8))
    order = np.argsort(palette_codes)
    sorted_codes = palette_codes[order]
    position = np.clip(np.searchsorted(sorted_codes, codes), 0, len(sorted_codes) - 1)
    known = sorted_codes[position] == codes
    classes = np.where(known, order[position], ignore_index).astype(np.uint8)
    # Black is the boundary only where it codes no class (a folder dataset may colour a class black).
    boundary = int(np.count_nonzero(~known & (codes == _pack(np.asarray(BOUNDARY_COLOR, dtype=np.uint8)))))
    stray = int(np.count_nonzero(~known)) - boundary
    return classes, DecodeStats(boundary=boundary, stray=stray)


def decode_index_mask(
    mask: np.ndarray, lookup: np.ndarray, ignore_index: int, excluded_ids: tuple[int, ...] = ()
) -> tuple[np.ndarray, DecodeStats]:
    """Map raw integer ids to class indices with a lookup table (``ignore_index`` = unmapped).

    Ids in ``excluded_ids`` (known classes the dataset ignores by design) are counted as ``excluded``; ids the
    table does not map, and ids outside it (negative, or past its end), as ``stray``.

    Raises:
        ValueError: a mask that is not integer-valued.
    """
    if mask.ndim == 3:
        mask = mask[..., 0]
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"expected integer class ids, got {mask.dtype} pixels")
    raw = mask.astype(np.int64)
    inside = (raw >= 0) & (raw < len(lookup))
    classes = np.where(inside, lookup[np.where(inside, raw, 0)], ignore_index)
    excluded = int(np.count_nonzero(np.isin(raw, excluded_ids))) if excluded_ids else 0
    stray = int(np.count_nonzero(classes == ignore_index)) - excluded
    return classes.astype(np.uint8), DecodeStats(stray=stray, excluded=excluded)


def encode_rgb_mask(classes: np.ndarray, palette: tuple[RGB, ...], ignore_index: int) -> np.ndarray:
    """Colour a class-index mask with the palette; ignored pixels become black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    table[ignore_index] = BOUNDARY_COLOR
    return table[classes]


def class_fractions(classes: np.ndarray, num_classes: int, ignore_index: int) -> list[float]:
    """Share of each class among the labelled pixels (all zeros when nothing is labelled)."""
    labelled = classes[classes != ignore_index]
    counts = np.bincount(labelled.ravel(), minlength=num_classes)[:num_classes].astype(np.float64)
    total = counts.sum()
    return (counts / total).tolist() if total else [0.0] * num_classes
