"""``segmenter prepare``: cut source scenes into crops and write the tile index.

Crops go into ``<out>/crops-<fingerprint>/`` and ``index.parquet`` is written last, atomically, so an
interrupted or failed run leaves the previous index and its crops untouched. The fingerprint hashes
the source files and the settings: re-running on unchanged input is a no-op.

Input policy: a single-band image is expanded to three equal bands (the dataset's ``read_image``); a source
smaller than the tile is cut into one crop padded to the tile size, with black pixels in the image and the ignore
index in its labels, the row's ``width``/``height`` giving the real extent and a warning naming the sources; an image
without a label is kept (captioning, prediction), and ``train`` refuses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig, TilingConfig
from manifests.tile_index import (
    INDEX_FILENAME,
    TILE_INDEX_SCHEMA_VERSION,
    IndexClasses,
    read_tile_index,
    write_tile_index,
)
from segmenter.data.cutting import cut_source
from segmenter.data.datasets import SegmentationDataset, Source, build_dataset
from segmenter.data.datasets.files import SourceFile, check_utf8_name
from segmenter.data.datasets.labels import DecodeStats, describe_unknown

ProgressCallback = Callable[[int, int, str], None]
# A label file with more stray pixels than this share is taken for the mask drawn over the photo.
OVERLAY_SHARE = 0.5
KNOWN_OVERLAY = (
    "Potsdam's top_potsdam_4_12_label.tif in 5_Labels_all.zip is known to be such an overlay; "
    "5_Labels_for_participants.zip holds a clean copy"
)


@dataclass(frozen=True)
class LabelOverlay:
    """A label file whose pixels mostly match no palette colour: probably the mask blended into the photo.

    Attributes:
        file: the label file.
        stray_pixels: its pixels outside the palette (the black boundary not counted); set to the ignore index.
        pixels: all its pixels.
    """

    file: str
    stray_pixels: int
    pixels: int


@dataclass(frozen=True)
class SourceReport:
    """What ``prepare`` found in one source scene.

    The pixel counts add up the source's label files (label and eval label, when they are two files).

    Attributes:
        source_id: the source.
        split: its split.
        tiles: crops cut from it.
        boundary_pixels: eroded-boundary (black) pixels, set to the ignore index.
        stray_pixels: label values that code no class (colours outside the palette, ids outside the declared
            classes), set to the ignore index.
        excluded_pixels: label pixels of classes the dataset ignores by design (SynDrone's sky in the coarse
            classes), set to the ignore index and not counted as stray.
        nodata_pixels: label pixels of the dataset's no-data values (LoveDA's 0, a folder's ``ignore``).
        unknown: the most frequent stray values with their pixel counts (:class:`DecodeStats`).
        label_values: what the masks code classes by: ``colours`` or ``ids`` (the words of the warnings).
        height: the source's height in pixels.
        width: the source's width in pixels.
        image_file: the file read as its image.
        image_label_colours: when every pixel of the image is a palette colour (or the black boundary), how many
            distinct colours it has: the "image" is then a label map. 0 for a photo.
        overlays: label files of the source that look like the mask overlaid on the photo.
        labelled: whether the source has a label.
        bands: the image's bands (crops keep them all; the model reads the first three).
    """

    source_id: str
    split: str
    tiles: int
    boundary_pixels: int
    stray_pixels: int
    image_file: str = ""
    image_label_colours: int = 0
    overlays: tuple[LabelOverlay, ...] = ()
    excluded_pixels: int = 0
    nodata_pixels: int = 0
    unknown: tuple[tuple[int, int], ...] = ()
    label_values: str = "colours"
    height: int = 0
    width: int = 0
    labelled: bool = True
    bands: int = 3

    @property
    def image_is_label_map(self) -> bool:
        """Whether the image looks like a label map rather than a photo."""
        return self.image_label_colours > 0

    @property
    def warnings(self) -> list[str]:
        """One line per problem found in this source (without a ``warning:`` prefix), for the user to read."""
        lines = []
        if self.image_is_label_map:
            lines.append(
                f"{self.source_id}: the image {self.image_file} looks like a label map, not a photo: its "
                f"{self.image_label_colours} colours are all palette colours; its crops were written anyway, "
                "check that the file is the orthophoto"
            )
        for overlay in self.overlays:
            lines.append(
                f"{self.source_id}: {overlay.file}: {overlay.stray_pixels} of {overlay.pixels} label pixels "
                f"({overlay.stray_pixels / overlay.pixels:.0%}) match no palette colour: it looks like the mask "
                f"overlaid on the photo, not a label map ({KNOWN_OVERLAY}); they were set to the ignore index"
            )
        if self.stray_pixels and not self.overlays:
            outside = "with colours outside the palette" if self.label_values == "colours" else (
                "with ids outside the declared classes")  # fmt: skip
            named = describe_unknown(self.unknown, as_colours=self.label_values == "colours")
            # With index masks the usual cause is a class list counted from 0 where the masks count from 1.
            hint = "" if self.label_values == "colours" else (
                "; declare them in --classes (name=ID gives a class its mask id) or as --ignore values")  # fmt: skip
            lines.append(
                f"{self.source_id}: {self.stray_pixels} label pixels {outside} ({named}) were set to the ignore "
                f"index{hint}"
            )
        return lines


@dataclass(frozen=True)
class PrepareResult:
    """The outcome of :func:`prepare_tiles`.

    Attributes:
        index_path: the tile index written (or found up to date).
        up_to_date: nothing was written because the inputs and settings are unchanged.
        n_tiles: rows of the index.
        sources: per-source reports (empty when up to date).
        warnings: the sources' warnings; when up to date, those recorded in the index by the run that wrote it.
    """

    index_path: Path
    up_to_date: bool
    n_tiles: int
    sources: list[SourceReport]
    warnings: list[str] = field(default_factory=list)


def _fingerprint(dataset: SegmentationDataset, tiling: TilingConfig, sources: list[Source]) -> str:
    settings = dataset.config.model_dump(mode="json", exclude={"root"})
    digest = hashlib.sha256()
    digest.update(json.dumps([TILE_INDEX_SCHEMA_VERSION, settings, tiling.size, tiling.effective_stride]).encode())
    digest.update(dataset.vocabulary.to_json().encode())  # a new word list in a release refreshes the index
    hashed: dict[str, str] = {}
    for source in sources:
        for file in (source.image, source.label, source.eval_label):
            if file is not None and str(file) not in hashed:
                hashed[str(file)] = file.sha256()
            digest.update(f"{source.source_id}|{source.split}|{file and hashed[str(file)]}\n".encode())
    return digest.hexdigest()


def _existing_fingerprint(out: Path) -> str | None:
    if not (out / INDEX_FILENAME).is_file():
        return None
    try:
        return read_tile_index(out).extra.get("inputs_sha256")
    except InputError:
        return None


def _overlay(file: SourceFile, stats: DecodeStats, pixels: int) -> list[LabelOverlay]:
    """``file`` as a one-item list when most of its pixels are stray colours, else an empty list."""
    if stats.stray <= OVERLAY_SHARE * pixels:
        return []
    return [LabelOverlay(str(file), stats.stray, pixels)]


def _cut_source(
    dataset: SegmentationDataset, source: Source, tiling: TilingConfig, crop_dir: Path, prefix: str
) -> tuple[list[dict], SourceReport]:
    """Cut one source into crops under ``crop_dir`` (:func:`segmenter.data.cutting.cut_source`): its index rows and
    what was found in it.

    Raises:
        InputError: a file over the pixel budget, labels of another size than the image, pixels that are not 8-bit.
    """
    rows, facts = cut_source(dataset, source, tiling, crop_dir, prefix)
    stats = sum(facts.label_stats.values(), DecodeStats())
    overlays = [] if dataset.mask_format != "rgb" else [
        found for file, file_stats in facts.label_stats.items()
        for found in _overlay(file, file_stats, facts.height * facts.width)
    ]  # fmt: skip
    report = SourceReport(
        source.source_id,
        source.split,
        len(rows),
        stats.boundary,
        stats.stray,
        image_file=str(source.image),
        image_label_colours=facts.image_label_colours,
        overlays=tuple(overlays),
        excluded_pixels=stats.excluded,
        nodata_pixels=stats.nodata,
        unknown=stats.unknown,
        label_values="colours" if dataset.mask_format == "rgb" else "ids",
        height=facts.height,
        width=facts.width,
        labelled=source.label is not None,
        bands=facts.bands,
    )
    return rows, report


def _first_five(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _padded(reports: list[SourceReport], size: int) -> list[str]:
    """One line naming the sources smaller than the tile, whose crops were padded (empty when there are none)."""
    small = [f"{r.source_id} ({r.width} x {r.height} px)" for r in reports if r.height < size or r.width < size]
    if not small:
        return []
    return [
        f"{len(small)} source(s) smaller than the {size} px tile: {_first_five(small)}; their crops were padded to "
        f"{size} x {size} px with black pixels and the ignore index in the labels (width/height in the index give "
        "the real extent)"
    ]


def _extra_bands(reports: list[SourceReport], expected: int) -> list[str]:
    """One line naming the sources with more bands than the dataset's images are meant to have (RGBN tiles in a
    folder dataset), said once."""
    wide = [f"{report.source_id} ({report.bands} bands)" for report in reports if report.bands > expected]
    if not wide:
        return []
    return [
        f"{len(wide)} source(s) with more than 3 bands: {_first_five(wide)}; their crops keep every band (TIFF), the "
        "segmenter and the caption experts read bands 1-3 as RGB"
    ]


def _unlabelled(reports: list[SourceReport]) -> list[str]:
    """One line naming the sources without a label (empty when every source has one)."""
    bare = [report.source_id for report in reports if not report.labelled]
    if not bare:
        return []
    return [
        f"{len(bare)} of {len(reports)} source(s) have no label: {_first_five(bare)}; their tiles serve captioning "
        "and prediction only (training refuses them): check the mask names if they should have one"
    ]


def _sources(dataset: SegmentationDataset) -> list[Source]:
    """The dataset's sources, checked before anything is written.

    Raises:
        InputError: an ignore index that is also a class index, no source at all, a file name that is not UTF-8.
    """
    if dataset.ignore_index < len(dataset.classes):
        raise InputError(
            f"dataset.ignore_index: {dataset.ignore_index} is also the index of class "
            f"'{dataset.classes[dataset.ignore_index]}' (expected {len(dataset.classes)} or more; default 255)"
        )
    sources = dataset.sources()
    if not sources:
        raise InputError(f"dataset.root: no sources found under {dataset.config.root}")
    for source in sources:
        for file in (source.image, source.label, source.eval_label):
            if file is not None:
                check_utf8_name(file.path)
    return sources


def _cut_sources(
    dataset: SegmentationDataset,
    sources: list[Source],
    tiling: TilingConfig,
    crop_dir: Path,
    on_progress: ProgressCallback | None,
) -> tuple[list[dict], list[SourceReport], list[str]]:
    """Cut every source: the index rows, one report per source, and the warnings for the user."""
    rows: list[dict] = []
    reports: list[SourceReport] = []
    for done, source in enumerate(sources):
        if on_progress:
            on_progress(done, len(sources), source.source_id)
        source_rows, report = _cut_source(dataset, source, tiling, crop_dir, dataset.config.tile_prefix)
        rows += source_rows
        reports.append(report)
    warnings = (
        dataset.notices
        + [line for report in reports for line in report.warnings]
        + _padded(reports, tiling.size)
        + _extra_bands(reports, dataset.image_bands)
        + _unlabelled(reports)
    )
    return rows, reports, warnings


def _write_index(
    dataset: SegmentationDataset, tiling: TilingConfig, rows: list[dict], fingerprint: str, warnings: list[str]
) -> Path:
    """Write ``<tiling.out>/index.parquet`` with the dataset's classes and what a re-run compares and repeats."""
    return write_tile_index(
        Path(tiling.out),
        rows,
        IndexClasses(list(dataset.classes), dataset.ignore_index, list(dataset.colors), dataset.vocabulary),
        extra={
            "inputs_sha256": fingerprint,
            "tile_size": str(tiling.size),
            "stride": str(tiling.effective_stride),
            # Which ground truth the label crops are (ISPRS: full, or eroded with labels: eroded): training records it.
            "labels": dataset.training_labels,
            # Recorded so that a re-run that finds the index up to date can repeat them.
            "warnings": json.dumps(warnings),
        },
    )


def prepare_tiles(
    dataset_config: DatasetConfig, tiling: TilingConfig, on_progress: ProgressCallback | None = None
) -> PrepareResult:
    """Cut every source of the dataset into crops and write ``<tiling.out>/index.parquet``.

    Raises:
        InputError: missing root or files, an unknown split, a corrupt raster, mismatched sizes.
    """
    dataset = build_dataset(dataset_config)
    sources = _sources(dataset)
    out = Path(tiling.out)
    fingerprint = _fingerprint(dataset, tiling, sources)
    crop_dir = out / f"crops-{fingerprint[:12]}"
    if _existing_fingerprint(out) == fingerprint and crop_dir.is_dir():
        index = read_tile_index(out)
        recorded = json.loads(index.extra.get("warnings", "[]"))
        return PrepareResult(out / INDEX_FILENAME, True, len(index.frame), [], recorded)
    shutil.rmtree(crop_dir, ignore_errors=True)
    try:
        rows, reports, warnings = _cut_sources(dataset, sources, tiling, crop_dir, on_progress)
        index_path = _write_index(dataset, tiling, rows, fingerprint, warnings)
    except BaseException:
        shutil.rmtree(crop_dir, ignore_errors=True)
        raise
    for stale in out.glob("crops-*"):
        if stale != crop_dir:
            shutil.rmtree(stale, ignore_errors=True)
    if on_progress:
        on_progress(len(sources), len(sources), "done")
    return PrepareResult(index_path, False, len(rows), reports, warnings)
