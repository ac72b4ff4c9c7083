"""A generic folder of images and RGB-coded masks with the palette given in the manifest."""

from __future__ import annotations

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig
from manifests.tile_index import ClassVocabulary
from segmenter.datasets.base import SegmentationDataset, Source
from segmenter.datasets.files import SourceFile
from segmenter.datasets.labels import RGB

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


class ImageMaskFolder(SegmentationDataset):
    """``<root>/<split>/<images_dir>/<stem>.*`` with masks ``<root>/<split>/<masks_dir>/<stem>.*``.

    Each split is a sub-folder; ``split: custom`` picks stems explicitly. Images without a mask are kept
    with an empty label (captions for them then cannot come from labels).
    """

    name = "folder"

    def __init__(self, config: DatasetConfig) -> None:
        super().__init__(config)
        assert config.classes is not None
        self._classes = tuple(spec.name for spec in config.classes)
        self._palette: tuple[RGB, ...] = tuple(spec.color for spec in config.classes)

    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes

    @property
    def colors(self) -> tuple[RGB, ...]:
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
        if self.config.split == "custom":
            return super().split_members()
        splits = sorted(path.name for path in self.config.root.iterdir() if (path / self.config.images_dir).is_dir())
        if not splits:
            raise InputError(f"dataset.root: no <split>/{self.config.images_dir}/ folders under {self.config.root}")
        return {split: self._stems(split) for split in splits}

    def _stems(self, split: str) -> list[str]:
        folder = self.config.root / split / self.config.images_dir
        return sorted(path.stem for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)

    def _find(self, folder, stem: str):
        for suffix in IMAGE_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
        return None

    def sources(self) -> list[Source]:
        found = []
        for split, stems in self.split_members().items():
            for stem in stems:
                image = self._find(self.config.root / split / self.config.images_dir, stem)
                if image is None:
                    raise InputError(f"{self.config.root / split / self.config.images_dir}: image {stem} not found")
                mask = self._find(self.config.root / split / self.config.masks_dir, stem)
                label = SourceFile(mask) if mask else None
                found.append(Source(f"{split}/{stem}", split, SourceFile(image), label, label))
        return found
