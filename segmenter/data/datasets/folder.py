"""A generic folder of images and masks, colour-coded (a palette) or id-coded (class ids), classes from the settings."""

from __future__ import annotations

from pathlib import Path

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig
from manifests.tile_index import ClassVocabulary
from segmenter.data.datasets.base import SegmentationDataset, Source
from segmenter.data.datasets.files import SourceFile, check_utf8_name
from segmenter.data.datasets.labels import RGB, IdTable, default_palette

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


class ImageMaskFolder(SegmentationDataset):
    """``<root>/<split>/<images_dir>/<stem>.*`` with masks ``<root>/<split>/<masks_dir>/<stem>.*``.

    Each split is a sub-folder, named in the index in lower case (``Train/`` is the split ``train``); ``split:
    custom`` picks stems explicitly, matching split names to the folders case-insensitively. Masks are colours
    (``mask_format: rgb``, each class's ``color``) or class ids (``mask_format: index``, each class's ``ids``, by
    default its position), with ``ignore`` values as no-data. Images without a mask are kept with an empty label, for
    captioning and prediction: captions for them cannot come from labels, and ``train`` refuses a train split that
    has them.
    """

    name = "folder"
    default_split = "folders"

    def __init__(self, config: DatasetConfig) -> None:
        super().__init__(config)
        assert config.classes is not None
        self._classes = tuple(spec.name for spec in config.classes)
        generated = default_palette(len(config.classes))
        self._palette: tuple[RGB, ...] = tuple(
            tuple(spec.color) if spec.color is not None else colour
            for spec, colour in zip(config.classes, generated, strict=True)
        )
        self.mask_format = config.mask_format
        self.id_table = IdTable(
            ids=tuple(raw for ids in config.class_ids() for raw in ids),
            classes=tuple(index for index, ids in enumerate(config.class_ids()) for _ in ids),
            nodata=tuple(value for value in config.ignore if isinstance(value, int)),
        )
        self.nodata_colours = tuple(tuple(value) for value in config.ignore if isinstance(value, tuple))

    @property
    def classes(self) -> tuple[str, ...]:
        """The manifest's class names, in label-index order."""
        return self._classes

    @property
    def colors(self) -> tuple[RGB, ...]:
        """The manifest's RGB colour of each class (generated where id-coded masks give none), in class order."""
        return self._palette

    @property
    def vocabulary(self) -> ClassVocabulary:
        """The manifest's ``classes[].words``, ``plural`` and ``in_mean``."""
        assert self.config.classes is not None
        specs = self.config.classes
        words = {spec.name: tuple(dict.fromkeys((spec.name.replace("_", " "), *spec.words))) for spec in specs}
        plurals = {spec.name: spec.plural for spec in specs if spec.plural}
        return ClassVocabulary(words, plurals, tuple(spec.name for spec in specs if spec.in_mean))

    def split_folders(self) -> dict[str, Path]:
        """Split name (lower case) -> its folder: every sub-folder of the root that holds an image folder.

        Raises:
            InputError: no split folder at all, or two folders whose names differ only by case.
        """
        folders: dict[str, Path] = {}
        for path in sorted(self.config.root.iterdir()):
            if not (path / self.config.images_dir).is_dir():
                continue
            split = path.name.casefold()
            if split in folders:
                raise InputError(
                    f"dataset.root: {folders[split].name}/ and {path.name}/ are one split named in two cases "
                    f"under {self.config.root} (expected one folder per split)"
                )
            folders[split] = path
        if not folders:
            raise InputError(f"dataset.root: no <split>/{self.config.images_dir}/ folders under {self.config.root}")
        return folders

    def split_members(self) -> dict[str, list[str]]:
        """Split name -> the image stems of that split: one split per folder, or the custom split's stems.

        Raises:
            InputError: no split folder, a custom split that names no folder (the folders found are listed), an
                unknown split scheme.
        """
        folders = self.split_folders()
        if self.config.split == "custom":
            members = super().split_members()
            missing = [split for split in members if split.casefold() not in folders]
            if missing:
                raise InputError(
                    f"dataset.custom_splits: split {', '.join(missing)} names no folder under {self.config.root} "
                    f"(split folders found: {', '.join(path.name for path in folders.values())}; matched ignoring case)"
                )
            return {split.casefold(): ids for split, ids in members.items()}
        if self.config.split != "folders":
            raise InputError(
                f"dataset.split: unknown split '{self.config.split}' for folder (expected folders, or custom)"
            )
        return {split: sorted(self._files(folder / self.config.images_dir)) for split, folder in folders.items()}

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
        folders = self.split_folders()
        found = []
        for split, stems in self.split_members().items():
            images = self._files(folders[split] / self.config.images_dir)
            masks = self._files(folders[split] / self.config.masks_dir)
            for stem in stems:
                if stem not in images:
                    raise InputError(f"{folders[split] / self.config.images_dir}: image {stem} not found")
                label = SourceFile(masks[stem]) if stem in masks else None
                found.append(Source(f"{split}/{stem}", split, SourceFile(images[stem]), label, label))
        return found
