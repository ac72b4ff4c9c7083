"""``segmenter prepare``: cut source scenes into crops and write the tile index.

Crops go into ``<out>/crops-<fingerprint>/`` and ``index.parquet`` is written last, atomically, so an
interrupted or failed run leaves the previous index and its crops untouched. The fingerprint hashes
the source files and the settings: re-running on unchanged input is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig, TilingConfig
from manifests.tile_index import INDEX_FILENAME, TILE_INDEX_SCHEMA_VERSION, read_tile_index, write_tile_index
from segmenter.datasets import SegmentationDataset, Source, build_dataset
from segmenter.datasets.labels import DecodeStats, class_fractions
from segmenter.raster_io import array_sha256, crop_suffix, write_crop
from segmenter.tiling import tile_grid

ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class SourceReport:
    """What ``prepare`` found in one source scene."""

    source_id: str
    split: str
    tiles: int
    boundary_pixels: int
    stray_pixels: int


@dataclass(frozen=True)
class PrepareResult:
    index_path: Path
    up_to_date: bool
    n_tiles: int
    sources: list[SourceReport]


def _fingerprint(dataset: SegmentationDataset, tiling: TilingConfig, sources: list[Source]) -> str:
    settings = dataset.config.model_dump(mode="json", exclude={"root"})
    digest = hashlib.sha256()
    digest.update(json.dumps([TILE_INDEX_SCHEMA_VERSION, settings, tiling.size, tiling.effective_stride]).encode())
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


def _read_label(dataset: SegmentationDataset, source: Source, role: str, shape: tuple[int, ...]):
    file = getattr(source, role)
    if file is None:
        return None, DecodeStats()
    classes, stats = dataset.read_label(file)
    if classes.shape[:2] != shape[:2]:
        raise InputError(f"{file}: label is {classes.shape[:2]} px but its image is {shape[:2]} px")
    return classes, stats


def _cut_source(
    dataset: SegmentationDataset, source: Source, tiling: TilingConfig, crop_dir: Path, prefix: str
) -> tuple[list[dict], SourceReport]:
    image = dataset.read_image(source)
    label, label_stats = _read_label(dataset, source, "label", image.shape)
    if source.eval_label == source.label:
        eval_label, eval_stats = label, DecodeStats()
    else:
        eval_label, eval_stats = _read_label(dataset, source, "eval_label", image.shape)
    if image.dtype != np.uint8:
        raise InputError(f"{source.image}: expected 8-bit pixels, got {image.dtype}")
    rows = []
    suffix = crop_suffix(image)
    for y, x, h, w in tile_grid(image.shape[0], image.shape[1], tiling.size, tiling.effective_stride):
        name = f"{y:04d}_{x:04d}"
        window = (slice(y, y + h), slice(x, x + w))
        image_crop = image[window]
        relative = {"image_path": f"images/{source.source_id}/{name}{suffix}"}
        write_crop(crop_dir / relative["image_path"], image_crop)
        fractions = None
        for column, folder, mask in (("label_path", "labels", label), ("eval_label_path", "eval_labels", eval_label)):
            if mask is None:
                relative[column] = None
                continue
            relative[column] = f"{folder}/{source.source_id}/{name}.png"
            write_crop(crop_dir / relative[column], mask[window])
        if label is not None:
            fractions = class_fractions(label[window], len(dataset.classes), dataset.ignore_index)
        rows.append(
            {
                "tile_id": f"{prefix}/{source.source_id}/{name}",
                "dataset": prefix,
                "split": source.split,
                **{key: value and f"{crop_dir.name}/{value}" for key, value in relative.items()},
                "source_id": source.source_id,
                "x": x,
                "y": y,
                "width": w,
                "height": h,
                "class_fractions": fractions,
                "image_sha256": array_sha256(image_crop),
            }
        )
    stats = label_stats + eval_stats
    report = SourceReport(source.source_id, source.split, len(rows), eval_stats.boundary, stats.stray)
    return rows, report


def prepare_tiles(
    dataset_config: DatasetConfig, tiling: TilingConfig, on_progress: ProgressCallback | None = None
) -> PrepareResult:
    """Cut every source of the dataset into crops and write ``<tiling.out>/index.parquet``.

    Raises:
        InputError: missing root or files, an unknown split, a corrupt raster, mismatched sizes.
    """
    dataset = build_dataset(dataset_config)
    sources = dataset.sources()
    if not sources:
        raise InputError(f"dataset.root: no sources found under {dataset_config.root}")
    out = Path(tiling.out)
    fingerprint = _fingerprint(dataset, tiling, sources)
    crop_dir = out / f"crops-{fingerprint[:12]}"
    if _existing_fingerprint(out) == fingerprint and crop_dir.is_dir():
        index = read_tile_index(out)
        return PrepareResult(out / INDEX_FILENAME, True, len(index.frame), [])
    shutil.rmtree(crop_dir, ignore_errors=True)
    rows: list[dict] = []
    reports: list[SourceReport] = []
    try:
        for done, source in enumerate(sources):
            if on_progress:
                on_progress(done, len(sources), source.source_id)
            source_rows, report = _cut_source(dataset, source, tiling, crop_dir, dataset_config.tile_prefix)
            rows += source_rows
            reports.append(report)
        index_path = write_tile_index(
            out,
            rows,
            class_names=list(dataset.classes),
            ignore_index=dataset.ignore_index,
            palette=list(dataset.colors),
            extra={"inputs_sha256": fingerprint, "tile_size": str(tiling.size), "stride": str(tiling.effective_stride)},
        )
    except BaseException:
        shutil.rmtree(crop_dir, ignore_errors=True)
        raise
    for stale in out.glob("crops-*"):
        if stale != crop_dir:
            shutil.rmtree(stale, ignore_errors=True)
    if on_progress:
        on_progress(len(sources), len(sources), "done")
    return PrepareResult(index_path, False, len(rows), reports)
