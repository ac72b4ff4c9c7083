"""Label decoding: RGB-coded masks (ISPRS, generic folders) and integer-coded masks (SynDrone)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RGB = tuple[int, int, int]
BOUNDARY_COLOR: RGB = (0, 0, 0)


@dataclass(frozen=True)
class DecodeStats:
    """Pixels set to the ignore index while decoding one mask."""

    boundary: int = 0
    stray: int = 0

    def __add__(self, other: DecodeStats) -> DecodeStats:
        return DecodeStats(self.boundary + other.boundary, self.stray + other.stray)


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def decode_rgb_mask(mask: np.ndarray, palette: tuple[RGB, ...], ignore_index: int) -> tuple[np.ndarray, DecodeStats]:
    """Map an ``H x W x 3`` colour mask to class indices.

    Black (the eroded boundary of the ISPRS ``noBoundary`` files) and every colour outside the palette
    become ``ignore_index``; the two are counted separately.
    """
    if mask.ndim != 3 or mask.shape[-1] < 3:
        raise ValueError(f"expected an RGB mask, got shape {mask.shape}")
    codes = _pack(mask[..., :3])
    palette_codes = _pack(np.asarray(palette, dtype=np.uint8))
    order = np.argsort(palette_codes)
    sorted_codes = palette_codes[order]
    position = np.clip(np.searchsorted(sorted_codes, codes), 0, len(sorted_codes) - 1)
    known = sorted_codes[position] == codes
    classes = np.where(known, order[position], ignore_index).astype(np.uint8)
    boundary = int(np.count_nonzero(codes == _pack(np.asarray(BOUNDARY_COLOR, dtype=np.uint8))))
    stray = int(np.count_nonzero(~known)) - boundary
    return classes, DecodeStats(boundary=boundary, stray=stray)


def decode_index_mask(mask: np.ndarray, lookup: np.ndarray, ignore_index: int) -> tuple[np.ndarray, DecodeStats]:
    """Map raw integer ids to class indices with a 256-entry lookup table (``ignore_index`` = unmapped)."""
    if mask.ndim == 3:
        mask = mask[..., 0]
    classes = lookup[mask.astype(np.int64).clip(0, len(lookup) - 1)]
    stray = int(np.count_nonzero(classes == ignore_index))
    return classes.astype(np.uint8), DecodeStats(stray=stray)


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
