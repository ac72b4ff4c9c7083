"""Datasets as declarative classes, and the registry that builds one from a manifest."""

from __future__ import annotations

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig
from segmenter.data.datasets.base import SegmentationDataset, Source
from segmenter.data.datasets.folder import ImageMaskFolder
from segmenter.data.datasets.isprs import ISPRS_CLASSES, ISPRS_PALETTE, Potsdam, Vaihingen
from segmenter.data.datasets.loveda import LoveDA
from segmenter.data.datasets.syndrone import SynDrone

DATASETS: dict[str, type[SegmentationDataset]] = {
    cls.name: cls for cls in (Vaihingen, Potsdam, SynDrone, LoveDA, ImageMaskFolder)
}


def build_dataset(config: DatasetConfig) -> SegmentationDataset:
    """The dataset named by ``config.name``, reading from ``config.root``.

    Raises:
        InputError: a dataset name no class implements.
    """
    if config.name not in DATASETS:
        raise InputError(f"dataset.name: unknown dataset '{config.name}' (expected one of {', '.join(DATASETS)})")
    return DATASETS[config.name](config)


__all__ = [
    "DATASETS",
    "ISPRS_CLASSES",
    "ISPRS_PALETTE",
    "ImageMaskFolder",
    "LoveDA",
    "Potsdam",
    "SegmentationDataset",
    "Source",
    "SynDrone",
    "Vaihingen",
    "build_dataset",
]
