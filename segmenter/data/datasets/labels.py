"""Label decoding: RGB-coded masks (ISPRS, colour-coded folders) and id-coded masks (SynDrone, LoveDA, folders of
index masks), with the pixels set to the ignore index counted by reason."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

RGB = tuple[int, int, int]
BOUNDARY_COLOR: RGB = (0, 0, 0)
# How many of a mask's unknown values (ids, colours) are named, the most frequent first.
NAMED_VALUES = 5


@dataclass(frozen=True)
class DecodeStats:
    """Pixels set to the ignore index while decoding one mask, by reason.

    Attributes:
        boundary: the black eroded boundary of the ISPRS ``noBoundary`` files.
        nodata: values the dataset declares as no-data (LoveDA's 0, a folder's ``ignore`` values).
        stray: values that code no class at all (a colour outside the palette, an unknown id): worth a warning.
        excluded: values of a known class that the dataset ignores by design (SynDrone's sky in the coarse classes):
            counted apart from the stray ones, never warned about.
        unknown: the most frequent stray values with their pixel counts, ``(value, pixels)`` (an id, or a colour
            packed as ``0xRRGGBB``), at most :data:`NAMED_VALUES` of them.
    """

    boundary: int = 0
    nodata: int = 0
    stray: int = 0
    excluded: int = 0
    unknown: tuple[tuple[int, int], ...] = ()

    def __add__(self, other: DecodeStats) -> DecodeStats:
        merged: dict[int, int] = dict(self.unknown)
        for value, pixels in other.unknown:
            merged[value] = merged.get(value, 0) + pixels
        return DecodeStats(
            self.boundary + other.boundary,
            self.nodata + other.nodata,
            self.stray + other.stray,
            self.excluded + other.excluded,
            _most_frequent(merged),
        )

    @property
    def ignored(self) -> int:
        """Every pixel set to the ignore index, whatever the reason."""
        return self.boundary + self.nodata + self.stray + self.excluded


def _most_frequent(counts: dict[int, int]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:NAMED_VALUES])


def _unknown_values(values: np.ndarray) -> tuple[tuple[int, int], ...]:
    """The most frequent values of ``values`` (the stray pixels of a mask) with their counts."""
    if values.size == 0:
        return ()
    found, counts = np.unique(values, return_counts=True)
    return _most_frequent(dict(zip(found.tolist(), counts.tolist(), strict=True)))


def describe_unknown(unknown: tuple[tuple[int, int], ...], as_colours: bool) -> str:
    """``id 9: 120 px, id 14: 3 px`` (or colours as ``(12, 34, 56): 3 px``): the named unknown values in words."""

    def name(value: int) -> str:
        return str(((value >> 16) & 255, (value >> 8) & 255, value & 255)) if as_colours else f"id {value}"

    return ", ".join(f"{name(value)}: {pixels} px" for value, pixels in unknown)


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def decode_rgb_mask(
    mask: np.ndarray, palette: tuple[RGB, ...], ignore_index: int, nodata: tuple[RGB, ...] = ()
) -> tuple[np.ndarray, DecodeStats]:
    """Map an ``H x W x 3`` colour mask to class indices.

    Black (the eroded boundary of the ISPRS ``noBoundary`` files), the ``nodata`` colours and every other colour
    outside the palette become ``ignore_index``; the three are counted separately, the most frequent stray colours
    named.

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
    palette_codes = _pack(np.asarray(palette, dtype=np.uint8)).tolist()
    classes, known = IdTable(tuple(palette_codes), tuple(range(len(palette_codes)))).lookup(codes, ignore_index)
    is_nodata = ~known & np.isin(codes, _pack(np.asarray(nodata, dtype=np.uint8).reshape(-1, 3)))
    # Black is the boundary only where it codes no class and is not declared no-data (a folder dataset may colour a
    # class black, or call black its no-data).
    is_boundary = ~known & ~is_nodata & (codes == _pack(np.asarray(BOUNDARY_COLOR, dtype=np.uint8)))
    stray = ~known & ~is_boundary & ~is_nodata
    return classes, DecodeStats(
        boundary=int(np.count_nonzero(is_boundary)),
        nodata=int(np.count_nonzero(is_nodata)),
        stray=int(np.count_nonzero(stray)),
        unknown=_unknown_values(codes[stray]),
    )


@dataclass(frozen=True)
class IdTable:
    """How the ids of an id-coded mask map to classes.

    Attributes:
        ids: the raw ids that code a class.
        classes: the class index of each of ``ids`` (several ids may share a class).
        nodata: raw ids of no-data (counted as such).
        excluded: raw ids of known classes the dataset ignores by design (counted apart, never warned about).
    """

    ids: tuple[int, ...]
    classes: tuple[int, ...]
    nodata: tuple[int, ...] = ()
    excluded: tuple[int, ...] = ()

    def lookup(self, raw: np.ndarray, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Class index of every raw id (``ignore_index`` where unmapped), and where an id is mapped."""
        order = np.argsort(self.ids)
        sorted_ids = np.asarray(self.ids, dtype=np.int64)[order]
        if sorted_ids.size == 0:
            return np.full(raw.shape, ignore_index, np.uint8), np.zeros(raw.shape, bool)
        position = np.clip(np.searchsorted(sorted_ids, raw), 0, len(sorted_ids) - 1)
        known = sorted_ids[position] == raw
        mapped = np.asarray(self.classes, dtype=np.uint8)[order][position]
        return np.where(known, mapped, ignore_index).astype(np.uint8), known


def single_band(mask: np.ndarray) -> np.ndarray:
    """The one band of an id-coded mask: ``H x W``, or ``H x W x C`` whose bands are all equal (grey saved as RGB).

    Raises:
        ValueError: several bands that differ (a colour-coded mask), or values that are not integers.
    """
    if mask.ndim == 3:
        if mask.shape[-1] > 1 and not all(np.array_equal(mask[..., 0], mask[..., band])
                                          for band in range(1, mask.shape[-1])):  # fmt: skip
            raise ValueError(
                f"expected a single-band id mask, got {mask.shape[-1]} bands that differ (a colour-coded mask? "
                "then its mask format is rgb)"
            )
        mask = mask[..., 0]
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"expected integer class ids, got {mask.dtype} pixels")
    return mask


def decode_index_mask(mask: np.ndarray, table: IdTable, ignore_index: int) -> tuple[np.ndarray, DecodeStats]:
    """Map raw integer ids to class indices with ``table`` (``ignore_index`` where unmapped).

    Ids in ``table.nodata`` are counted as ``nodata``, those in ``table.excluded`` as ``excluded``; every other id
    the table does not map (an id outside the declared set) as ``stray``, the most frequent named.

    Raises:
        ValueError: a mask that is not integer-valued, or has several bands that differ.
    """
    raw = single_band(mask).astype(np.int64)
    classes, known = table.lookup(raw, ignore_index)
    is_nodata = ~known & np.isin(raw, table.nodata) if table.nodata else np.zeros(raw.shape, bool)
    is_excluded = ~known & np.isin(raw, table.excluded) if table.excluded else np.zeros(raw.shape, bool)
    stray = ~known & ~is_nodata & ~is_excluded
    return classes, DecodeStats(
        nodata=int(np.count_nonzero(is_nodata)),
        stray=int(np.count_nonzero(stray)),
        excluded=int(np.count_nonzero(is_excluded)),
        unknown=_unknown_values(raw[stray]),
    )


def default_palette(count: int) -> tuple[RGB, ...]:
    """Distinct colours for ``count`` classes of a dataset whose masks hold ids, not colours (for the colour PNGs of
    ``predict`` and the index's ``palette``): hues a golden angle apart, never black (the ignore colour)."""
    colours = []
    for index in range(count):
        hue = (index * 0.618033988749895) % 1.0
        value = 0.95 if index % 2 == 0 else 0.7
        colours.append(tuple(round(channel * 255) for channel in colorsys.hsv_to_rgb(hue, 0.75, value)))
    return tuple(colours)


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
