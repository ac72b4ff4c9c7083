"""Cutting one source into crops, one row of tiles at a time, so that memory follows the tile, not the source.

A source is read in row bands (:func:`row_bands`): each band holds the rows of one row of tiles, read once through
the window reader of every file (image, label, eval label), decoded, cut into the crops of that row and counted.
Every source row belongs to exactly one band's own rows, so the counts of ignored pixels (boundary, no-data,
unknown values, excluded classes) cover each pixel once, whatever the stride; rows that overlapping tiles share are
decoded again for the next row of tiles but counted there only.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from manifests.errors import InputError
from manifests.run_manifest import TilingConfig
from manifests.tile_index import make_tile_id, tile_name
from segmenter.data.datasets import SegmentationDataset, Source
from segmenter.data.datasets.files import SourceFile
from segmenter.data.datasets.labels import RGB, DecodeStats, class_fractions, decode_rgb_mask
from segmenter.data.raster_io import array_sha256, crop_suffix, pad_to, three_bands, write_crop
from segmenter.data.tiling import window_starts
from segmenter.data.windowed_read import WindowReader, open_windows

# The folder of each label column's crops.
LABEL_FOLDERS = {"label_path": "labels", "eval_label_path": "eval_labels"}
# Pixels decoded at a time: decoding takes some 40 bytes a pixel in temporaries, so a band of a 20000 px wide source
# is decoded in column chunks of about 2 million pixels rather than 10 million at once.
DECODE_PIXELS = 1 << 21


def row_bands(height: int, size: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, own_end, read_end)`` of each row of tiles of a source ``height`` rows high.

    ``start`` is the row of the tiles' top edge; rows ``start:own_end`` are counted in this band (the bands' own
    rows tile the source exactly once); ``start:read_end`` are read: the tiles' rows, and the rows up to the next
    band where the stride leaves a gap between tiles.

    >>> row_bands(100, 40, 30)
    [(0, 30, 40), (30, 60, 70), (60, 100, 100)]
    """
    starts = window_starts(height, size, stride)
    tile = min(size, height)
    ends = [*starts[1:], height]
    return [(start, own_end, max(start + tile, own_end)) for start, own_end in zip(starts, ends, strict=True)]


class LabelMapCheck:
    """Whether an image is all palette colours (a label map read as the photo), checked band by band.

    A photo has thousands of colours and fails on a sparse sample of its first band already; only a candidate
    label map is decoded in full. An image of black alone is not taken for a label map.
    """

    def __init__(self, palette: tuple[RGB, ...], ignore_index: int, active: bool) -> None:
        self.palette = palette
        self.ignore_index = ignore_index
        self.photo = not active
        self.found: set[int] = set()

    def update(self, pixels: np.ndarray) -> None:
        """Look at the next rows of the image."""
        if self.photo or pixels.size == 0:
            return
        if pixels.ndim != 3 or pixels.shape[-1] < 3 or pixels.dtype != np.uint8:
            self.photo = True
            return
        step = max(1, DECODE_PIXELS // max(1, pixels.shape[0]))
        for sample in (pixels[::16, ::16, :3], *(pixels[:, x : x + step, :3] for x in range(0, pixels.shape[1], step))):
            classes, stats = decode_rgb_mask(sample, self.palette, self.ignore_index)
            if stats.stray:
                self.photo = True
                return
            self.found.update(np.unique(classes).tolist())

    @property
    def colours(self) -> int:
        """How many distinct colours the image has when all of them are palette colours or black, else 0."""
        if self.photo or not any(value != self.ignore_index for value in self.found):
            return 0
        return len(self.found)


@dataclass
class _LabelFile:
    """One label file of a source being cut: its reader and what its decoding counted so far."""

    file: SourceFile
    reader: WindowReader
    stats: DecodeStats = field(default_factory=DecodeStats)


@dataclass(frozen=True)
class CutFacts:
    """What cutting one source found.

    Attributes:
        height: the source's height in pixels.
        width: the source's width in pixels.
        label_stats: per label file (label, and eval label when it is another file), the pixels its decoding
            set to the ignore index, by reason.
        image_label_colours: how many colours the image has when all are palette colours (a label map), else 0.
        bands: the image's bands.
    """

    height: int
    width: int
    label_stats: dict[SourceFile, DecodeStats]
    image_label_colours: int
    bands: int = 3


@dataclass(frozen=True)
class _Band:
    """The pixels of one row of tiles: the image and the decoded labels of each index column, from row ``top``."""

    top: int
    image: np.ndarray
    masks: dict[str, np.ndarray | None]


def _open_labels(
    source: Source, image: WindowReader, tiling: TilingConfig, stack: ExitStack
) -> dict[str, _LabelFile | None]:
    """A reader per label column (one shared when label and eval label are one file), checked against the image.

    Raises:
        InputError: a label of another size than its image, or over the pixel budget.
    """
    opened: dict[SourceFile, _LabelFile] = {}
    columns: dict[str, _LabelFile | None] = {}
    for column, file in (("label_path", source.label), ("eval_label_path", source.eval_label)):
        if file is not None and file not in opened:
            reader = stack.enter_context(open_windows(file, tiling.max_pixels))
            if (reader.height, reader.width) != (image.height, image.width):
                raise InputError(
                    f"{file}: label is {(reader.height, reader.width)} px but its image is "
                    f"{(image.height, image.width)} px"
                )
            opened[file] = _LabelFile(file, reader)
        columns[column] = opened[file] if file is not None else None
    return columns


def _decode(dataset: SegmentationDataset, raw: np.ndarray, file: SourceFile) -> tuple[np.ndarray, DecodeStats]:
    """:meth:`SegmentationDataset.decode_label` of ``raw``, in column chunks of about :data:`DECODE_PIXELS` pixels."""
    step = max(1, DECODE_PIXELS // max(1, raw.shape[0]))
    parts = [dataset.decode_label(raw[:, x : x + step], file) for x in range(0, raw.shape[1], step)]
    return np.concatenate([classes for classes, _ in parts], axis=1), sum((s for _, s in parts), DecodeStats())


def _decode_band(
    dataset: SegmentationDataset, label: _LabelFile, bounds: tuple[int, int, int], width: int
) -> np.ndarray:
    """The classes of a band of a label file, counting its own rows' ignored pixels into ``label.stats``."""
    start, own_end, read_end = bounds
    raw = label.reader.read(start, 0, read_end - start, width)
    own, stats = _decode(dataset, raw[: own_end - start], label.file)
    label.stats = label.stats + stats
    if read_end == own_end:
        return own
    shared, _ = _decode(dataset, raw[own_end - start :], label.file)  # counted by the next band
    return np.concatenate([own, shared])


def _crop_row(dataset: SegmentationDataset, source: Source, band: _Band, cut: tuple[int, int, int, int],
              where: tuple[Path, str, int]) -> dict:  # fmt: skip
    """Write the crops of one tile (image, labels) and return its index row. A source smaller than the tile gets
    crops padded to the tile size: they keep one size for batching, the padding is black and ignored."""
    y, x, h, w = cut
    crop_dir, prefix, size = where
    name, window = tile_name(y, x), (slice(y - band.top, y - band.top + h), slice(x, x + w))
    source_id, ignore = source.source_id, dataset.ignore_index
    relative = {"image_path": f"images/{source_id}/{name}{crop_suffix(band.image)}"}
    write_crop(crop_dir / relative["image_path"], pad_to(band.image[window], size, size, 0))
    for column, mask in band.masks.items():
        relative[column] = None if mask is None else f"{LABEL_FOLDERS[column]}/{source_id}/{name}.png"
        if mask is not None:
            write_crop(crop_dir / relative[column], pad_to(mask[window], size, size, ignore))
    label = band.masks["label_path"]
    fractions = class_fractions(label[window], len(dataset.classes), ignore) if label is not None else None
    return {
        "tile_id": make_tile_id(prefix, source_id, y, x),
        "dataset": prefix,
        "split": source.split,
        **{key: value and f"{crop_dir.name}/{value}" for key, value in relative.items()},
        "source_id": source_id,
        "x": x,
        "y": y,
        "width": w,
        "height": h,
        "class_fractions": fractions,
        "image_sha256": array_sha256(band.image[window]),
    }


def cut_source(
    dataset: SegmentationDataset, source: Source, tiling: TilingConfig, crop_dir: Path, prefix: str
) -> tuple[list[dict], CutFacts]:
    """Cut one source into crops under ``crop_dir``, a row of tiles at a time: its index rows and what was found.

    Raises:
        InputError: a file over the pixel budget, labels of another size than the image, pixels that are not 8-bit.
    """
    size, stride = tiling.size, tiling.effective_stride
    with ExitStack() as stack:
        image = stack.enter_context(open_windows(source.image, tiling.max_pixels))
        if image.dtype != np.uint8:
            raise InputError(
                f"{source.image}: expected 8-bit pixels, got {image.dtype}; prepare cuts 8-bit images (what the "
                "backbone and the caption experts read): stretch it to 8 bits first, e.g. gdal_translate -ot Byte "
                "-scale <min> <max> 0 255 in.tif out.tif (segmenter predict --scale does this for new images)"
            )
        labels = _open_labels(source, image, tiling, stack)
        check = LabelMapCheck(dataset.colors, dataset.ignore_index, active=dataset.mask_format == "rgb")
        columns = window_starts(image.width, size, stride)
        rows: list[dict] = []
        for bounds in row_bands(image.height, size, stride):
            start, own_end, read_end = bounds
            pixels = three_bands(image.read(start, 0, read_end - start, image.width))
            check.update(pixels[: own_end - start])
            files = {label.file: label for label in labels.values() if label is not None}  # a shared file once
            decoded = {file: _decode_band(dataset, label, bounds, image.width) for file, label in files.items()}
            band = _Band(start, pixels, {column: label and decoded[label.file] for column, label in labels.items()})
            tile = (min(size, image.height), min(size, image.width))
            rows += [_crop_row(dataset, source, band, (start, x, *tile), (crop_dir, prefix, size)) for x in columns]
        stats = {label.file: label.stats for label in labels.values() if label is not None}
        return rows, CutFacts(image.height, image.width, stats, check.colours, image.bands)
