"""The declarative base of every dataset: class names, palette and splits as class attributes."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig
from manifests.tile_index import ClassVocabulary
from segmenter.data.datasets.files import SourceFile
from segmenter.data.datasets.labels import RGB, DecodeStats, IdTable, decode_index_mask, decode_rgb_mask
from segmenter.data.windowed_read import read_raster


@dataclass(frozen=True)
class Source:
    """One source scene (an ISPRS area, a SynDrone frame, a folder image) and its files.

    Attributes:
        label: the labels training reads (None: an image for captioning and prediction only).
        eval_label: the eroded labels where the dataset has them (None where they were not downloaded); the same file
            as ``label`` for a dataset with one ground truth.
    """

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
    ``excluded_from_mean`` (classes the headline means leave out). Masks are colour-coded unless ``mask_format`` is
    ``index`` (the subclass then sets ``id_table``). ``source_id_pattern`` is the form of the ids a
    custom split lists, ``source_id_example`` one of them.
    """

    name: ClassVar[str]
    class_names: ClassVar[tuple[str, ...]]
    palette: ClassVar[tuple[RGB, ...]]
    class_words: ClassVar[dict[str, tuple[str, ...]]] = {}
    plurals: ClassVar[dict[str, str]] = {}
    excluded_from_mean: ClassVar[tuple[str, ...]] = ()
    splits: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {}
    default_split: ClassVar[str] = "mpers"
    mask_format: ClassVar[str] = "rgb"
    # Colours of colour-coded masks that are no-data (counted as such, ignored).
    nodata_colours: ClassVar[tuple[RGB, ...]] = ()
    # How the ids of id-coded masks map to classes (set by every dataset whose mask_format is index).
    id_table: IdTable
    # Whether the release ships eroded labels (ISPRS): `evaluate --gt eroded` then needs them, never falls back.
    has_eroded_labels: ClassVar[bool] = False
    source_id_pattern: ClassVar[str] = r".+"
    source_id_example: ClassVar[str] = ""
    # The bands the chosen images are meant to have: more is said by prepare (an RGBN tile in a folder), not when
    # the user chose them (Potsdam's RGBIR orthophotos).
    image_bands: int = 3

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
        """The RGB colour of each class in the label files (display colours for id-coded masks), in class order."""
        return self.palette

    @property
    def training_labels(self) -> str:
        """Which ground truth training reads: ``full``, or ``eroded`` where the dataset is set to train on it."""
        return "full"

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
            InputError: the split scheme is unknown to this dataset, a custom id not of the dataset's form, or a
                source listed in two splits.
        """
        scheme = self.config.split
        if scheme == "custom":
            assert self.config.custom_splits is not None
            members = {split: list(ids) for split, ids in self.config.custom_splits.items()}
            self.check_source_ids(members)
        elif scheme in self.splits:
            members = {split: list(ids) for split, ids in self.splits[scheme].items()}
        else:
            known = ", ".join([*self.splits, "custom"])
            raise InputError(f"dataset.split: unknown split '{scheme}' for {self.name} (expected one of: {known})")
        return check_disjoint(members)

    def check_source_ids(self, members: dict[str, list[str]]) -> None:
        """Refuse a custom-split id that is not of the form the dataset numbers its sources by.

        Raises:
            InputError: naming the id, the form expected and the quoted way to write it in YAML.
        """
        for split, ids in members.items():
            for source_id in ids:
                if not re.fullmatch(self.source_id_pattern, source_id):
                    raise InputError(
                        f"dataset.custom_splits: '{source_id}' (split {split}) is not a {self.name} source id "
                        f"(expected ids such as '{self.source_id_example}'; in a manifest, write them in quotes)"
                    )

    @abstractmethod
    def sources(self) -> list[Source]:
        """Every source of every split, with its files found.

        Raises:
            InputError: a file of a listed source is missing.
        """

    def decode_label(self, raw: np.ndarray, file: SourceFile) -> tuple[np.ndarray, DecodeStats]:
        """Class indices of the raw pixels of a mask (or of a window of it), with the ignored pixels counted.

        Colour-coded masks (``mask_format`` ``rgb``): the palette's colours are the classes, black the eroded
        boundary. Id-coded masks (``index``): ``id_table`` maps the ids.

        Raises:
            InputError: a mask of the other format, or pixels that cannot be class codes, naming ``file``.
        """
        if self.mask_format == "rgb" and (raw.ndim == 2 or raw.shape[-1] < 3):
            raise InputError(
                f"{file}: expected an RGB-coded label ({self.name} masks are colours), got a single-band mask: "
                "for masks of class ids use mask_format index (--mask-format index)"
            )
        try:
            if self.mask_format == "index":
                return decode_index_mask(raw, self.id_table, self.ignore_index)
            return decode_rgb_mask(raw, self.colors, self.ignore_index, self.nodata_colours)
        except ValueError as exc:
            raise InputError(f"{file}: {exc}") from None

    def read_label(self, file: SourceFile) -> tuple[np.ndarray, DecodeStats]:
        """Class indices of a whole mask file (:meth:`decode_label` of its pixels).

        Raises:
            InputError: an unreadable file, or a mask this dataset cannot decode.
        """
        return self.decode_label(read_raster(file), file)

    def ground_truth(self, source: Source, gt: str) -> SourceFile:
        """The labels of ``source`` that evaluation against ``gt`` (``eroded`` or ``full``) compares with.

        Raises:
            InputError: the source has no such labels.
        """
        file = source.eval_label if gt == "eroded" else source.label
        if file is None:
            raise InputError(
                f"--gt {gt}: source {source.source_id} (split {source.split}) has no labels: its tiles serve "
                "captioning and prediction only; evaluate a labelled split"
            )
        return file


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
