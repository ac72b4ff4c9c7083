"""A generic folder of images and RGB-coded masks with the palette given in the manifest."""

from __future__ import annotations

from pathlib import Path

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig
from manifests.tile_index import ClassVocabulary
from segmenter.data.datasets.base import SegmentationDataset, Source
from segmenter.data.datasets.files import SourceFile, check_utf8_name
from segmenter.data.datasets.labels import RGB

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


class ImageMaskFolder(SegmentationDataset):
    """``<root>/<split>/<images_dir>/<stem>.*`` with masks ``<root>/<split>/<masks_dir>/<stem>.*``.

    Each split is a sub-folder; ``split: custom`` picks stems explicitly. Images without a mask are kept
    with an empty label, for captioning and prediction: captions for them cannot come from labels, and ``train``
    refuses a train split that has them.
    """

    name = "folder"

    def __init__(self, config: DatasetConfig) -> None:
        super().__init__(config)
        assert config.classes is not None
        self._classes = tuple(spec.name for spec in config.classes)
        self._palette: tuple[RGB, ...] = tuple(spec.color for spec in config.classes)

    @property
    def classes(self) -> tuple[str, ...]:
        """The manifest's class names, in label-index order."""
        return self._classes

    @property
    def colors(self) -> tuple[RGB, ...]:
        """The manifest's RGB colour of each class, in class order."""
        return self._palette

    @property
    def vocabulary(self) -> ClassVocabulary:
        """The manifest's ``classes[].words``, ``plural`` and ``in_mean``."""
        assert self.config.classes is not None
        specs = self.config.classes
        words = {spec.name: tuple(dict.fromkeys((spec.name.replace("_", " "), *spec.words))) for spec in specs}
        plurals = {spec.name: spec.plural for spec in specs if spec.plural}
        return ClassVocabulary(words, plurals, tuple(spec.name for spec in specs if spec.in_mean))

    def split_members(self) -> dict[str, list[str]]:
        """Split name -> the image stems of that split: one split per ``<split>/`` folder with an image folder."""
        if self.config.split == "custom":
            return super().split_members()
        splits = sorted(path.name for path in self.config.root.iterdir() if (path / self.config.images_dir).is_dir())
        if not splits:
            raise InputError(f"dataset.root: no <split>/{self.config.images_dir}/ folders under {self.config.root}")
        return {split: sorted(self._files(self.config.root / split / self.config.images_dir)) for split in splits}

    @staticmethod
    def _files(folder: Path) -> dict[str, Path]:
        """Stem -> raster file of ``folder`` (any case of the suffix).

        Raises:
            InputError: two rasters with one stem (``s1.png`` beside ``s1.jpg``: which one is meant is not guessed),
                or a file name that is not UTF-8.
        """
        found: dict[str, Path] = {}
        if not folder.is_dir():
            return found
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            check_utf8_name(path)
            if path.stem in found:
                raise InputError(
                    f"{folder}: {found[path.stem].name} and {path.name} share the stem '{path.stem}' (expected one "
                    "file per image; remove or rename one)"
                )
            found[path.stem] = path
        return found

    def sources(self) -> list[Source]:
        """Every image of every split, with its mask when ``<masks_dir>/`` has one (else no label).

        Raises:
            InputError: a listed image that is missing, two files with one stem, a file name that is not UTF-8.
        """
        found = []
        for split, stems in self.split_members().items():
            images = self._files(self.config.root / split / self.config.images_dir)
            masks = self._files(self.config.root / split / self.config.masks_dir)
            for stem in stems:
                if stem not in images:
                    raise InputError(f"{self.config.root / split / self.config.images_dir}: image {stem} not found")
                label = SourceFile(masks[stem]) if stem in masks else None
                found.append(Source(f"{split}/{stem}", split, SourceFile(images[stem]), label, label))
        return found
