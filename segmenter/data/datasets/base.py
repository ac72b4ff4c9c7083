"""The declarative base of every dataset: class names, palette and splits as class attributes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig
from manifests.tile_index import ClassVocabulary
from segmenter.data.datasets.files import SourceFile
from segmenter.data.datasets.labels import RGB, DecodeStats, decode_rgb_mask
from segmenter.data.raster_io import three_bands


@dataclass(frozen=True)
class Source:
    """One source scene (an ISPRS area, a SynDrone frame, a folder image) and its files."""

    source_id: str
    split: str
    image: SourceFile
    label: SourceFile | None = None
    eval_label: SourceFile | None = None


class SegmentationDataset(ABC):
    """A dataset of whole source scenes, described by class attributes.

    Subclasses set ``name``, ``class_names``, ``palette`` and ``splits`` (split scheme -> split -> source ids)
    and implement :meth:`sources`. Their class vocabulary (written into the tile index for both stages) comes
    from ``class_words`` (extra words a caption names a class by), ``plurals`` (classes counted as objects) and
    ``excluded_from_mean`` (classes the headline means leave out).
    """

    name: ClassVar[str]
    class_names: ClassVar[tuple[str, ...]]
    palette: ClassVar[tuple[RGB, ...]]
    class_words: ClassVar[dict[str, tuple[str, ...]]] = {}
    plurals: ClassVar[dict[str, str]] = {}
    excluded_from_mean: ClassVar[tuple[str, ...]] = ()
    splits: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {}
    default_split: ClassVar[str] = "mpers"

    def __init__(self, config: DatasetConfig) -> None:
        self.config = config
        self.ignore_index = config.ignore_index
        # Facts about how the files were found that the user should see (printed and kept in the index).
        self.notices: list[str] = []
        if not config.root.is_dir():
            raise InputError(f"dataset.root: directory {config.root} not found (expected the {self.name} data)")

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, in label-index order."""
        return self.class_names

    @property
    def colors(self) -> tuple[RGB, ...]:
        """The RGB colour of each class in the label files, in class order."""
        return self.palette

    @property
    def vocabulary(self) -> ClassVocabulary:
        """How captions name the classes of this dataset and which classes the headline means average over."""
        readable = ClassVocabulary.plain(self.classes).words
        words = {name: tuple(dict.fromkeys(readable[name] + self.class_words.get(name, ()))) for name in self.classes}
        plurals = {name: noun for name, noun in self.plurals.items() if name in self.classes}
        main = tuple(name for name in self.classes if name not in self.excluded_from_mean)
        return ClassVocabulary(words, plurals, main)

    def split_members(self) -> dict[str, list[str]]:
        """Source ids of each split under the configured split scheme.

        Raises:
            InputError: the split scheme is unknown to this dataset, or a source is listed in two splits.
        """
        scheme = self.config.split
        if scheme == "custom":
            assert self.config.custom_splits is not None
            members = {split: [str(item) for item in ids] for split, ids in self.config.custom_splits.items()}
        elif scheme in self.splits:
            members = {split: list(ids) for split, ids in self.splits[scheme].items()}
        else:
            known = ", ".join([*self.splits, "custom"])
            raise InputError(f"dataset.split: unknown split '{scheme}' for {self.name} (expected one of: {known})")
        return check_disjoint(members)

    @abstractmethod
    def sources(self) -> list[Source]:
        """Every source of every split, with its files found.

        Raises:
            InputError: a file of a listed source is missing.
        """

    def read_image(self, source: Source) -> np.ndarray:
        """The pixels of a source's image, bands last; a single-band image has its band repeated three times
        (:func:`segmenter.data.raster_io.three_bands`, the rule ``predict`` follows too)."""
        return three_bands(source.image.read_array())

    def read_label(self, file: SourceFile) -> tuple[np.ndarray, DecodeStats]:
        """Class indices of a mask file (RGB-coded by default).

        Raises:
            InputError: a mask that is not RGB-coded 8-bit colours.
        """
        mask = file.read_array()
        if mask.ndim != 3 or mask.shape[-1] < 3:
            raise InputError(f"{file}: expected an RGB-coded label, got shape {mask.shape}")
        try:
            return decode_rgb_mask(mask, self.colors, self.ignore_index)
        except ValueError as exc:
            raise InputError(f"{file}: {exc}") from None


def check_disjoint(members: dict[str, list[str]]) -> dict[str, list[str]]:
    """``members`` (split -> source ids) as given, once no source is listed twice.

    Raises:
        InputError: a source listed twice, in one split or in two.
    """
    seen: dict[str, str] = {}
    for split, ids in members.items():
        for source_id in ids:
            if source_id in seen:
                where = (
                    f"twice in '{split}'" if seen[source_id] == split else f"in both '{seen[source_id]}' and '{split}'"
                )
                raise InputError(
                    f"dataset.custom_splits: source '{source_id}' is listed {where}; a source belongs to one split"
                )
            seen[source_id] = split
    return members
