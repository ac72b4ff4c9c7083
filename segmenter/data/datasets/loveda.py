"""LoveDA (Wang et al., NeurIPS 2021 datasets track; zenodo record 5706578), read as released.

``Train.zip``, ``Val.zip`` and ``Test.zip`` (or their extracted folders ``Train/``, ``Val/``, ``Test/``) hold
``<Split>/Urban|Rural/images_png/<n>.png`` (1024 x 1024 RGB) and, for Train and Val, ``masks_png/<n>.png``
(single-band ids: 0 no-data, 1 background, 2 building, 3 road, 4 water, 5 barren, 6 forest, 7 agriculture). As
torchgeo's ``LoveDA`` and mmsegmentation's ``LoveDADataset`` (``reduce_zero_label=True``) read it: no-data is
ignored and ids 1-7 are the classes 0-6; the official splits are the three archives (Test has no public masks:
its tiles serve captioning and prediction, evaluation reads Val).
"""

from __future__ import annotations

import functools
from typing import ClassVar

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig
from segmenter.data.datasets.base import SegmentationDataset, Source, check_disjoint
from segmenter.data.datasets.files import Archive, FileRole, SourceFile
from segmenter.data.datasets.labels import RGB, IdTable

LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
# mmsegmentation's LoveDADataset palette, in class order.
LOVEDA_PALETTE: tuple[RGB, ...] = (
    (255, 255, 255),
    (255, 0, 0),
    (255, 255, 0),
    (0, 0, 255),
    (159, 129, 183),
    (0, 255, 0),
    (255, 195, 128),
)
NODATA_ID = 0
# Split -> the archive (and extracted folder) of the release that holds it.
SPLIT_ARCHIVES = {"train": "Train", "val": "Val", "test": "Test"}
# Test has no public masks and is often not downloaded: its absence is said, not refused.
OPTIONAL_SPLITS = ("test",)
SCENES = {"urban": "Urban", "rural": "Rural"}


class LoveDA(SegmentationDataset):
    """LoveDA's urban and rural scenes: ``<scene>_<n>`` sources (``urban_1366``), the split an archive's name."""

    name = "loveda"
    class_names = LOVEDA_CLASSES
    palette = LOVEDA_PALETTE
    mask_format = "index"
    default_split = "official"
    source_id_pattern = r"(urban|rural)_[^/]+"
    source_id_example = "urban_1366"
    # Words a caption names the classes by (CLIP-friendly: what a photo caption says, not the benchmark's labels).
    class_words: ClassVar[dict[str, tuple[str, ...]]] = {
        "background": ("other land", "open space"),
        "building": ("buildings", "house", "houses", "roof", "roofs", "rooftop", "rooftops", "residential"),
        "road": ("roads", "street", "streets", "highway", "highways", "pavement"),
        "water": ("river", "rivers", "lake", "lakes", "pond", "ponds", "canal", "canals"),
        "barren": ("bare soil", "bare land", "bare ground", "sand", "wasteland", "construction site"),
        "forest": ("trees", "tree", "woods", "woodland", "grove"),
        "agriculture": ("farmland", "cropland", "crops", "field", "fields", "farm", "farms", "paddy", "agricultural"),
    }
    plurals: ClassVar[dict[str, str]] = {"building": "buildings"}

    def __init__(self, config: DatasetConfig) -> None:
        super().__init__(config)
        self.scenes = tuple(config.scenes or SCENES)
        self.id_table = IdTable(tuple(range(1, 8)), tuple(range(7)), nodata=(NODATA_ID,))

    def _archives(self) -> dict[str, Archive]:
        """The archive of each official split that is there.

        Raises:
            InputError: Train or Val missing (with the official split), or no archive at all.
        """
        archives = {split: Archive(self.config.root, stem) for split, stem in SPLIT_ARCHIVES.items()}
        needed = [split for split in SPLIT_ARCHIVES if split not in OPTIONAL_SPLITS]
        missing = [SPLIT_ARCHIVES[split] for split, archive in archives.items() if not archive.exists]
        if len(missing) == len(archives) or (
            self.config.split == "official" and any(not archives[split].exists for split in needed)
        ):
            raise InputError(
                f"dataset.root: {self.config.root} holds neither {' nor '.join(f'{stem}.zip' for stem in missing)} "
                f"nor their folders (LoveDA's release: Train.zip, Val.zip, Test.zip)"
            )
        self.notices = sorted({archive.notice for archive in archives.values() if archive.notice})
        self.notices += [f"dataset.root: no {stem}.zip or {stem}/ under {self.config.root}: no {stem} split"
                         for stem in missing]  # fmt: skip
        return {split: archive for split, archive in archives.items() if archive.exists}

    @functools.cached_property
    def _catalogue(self) -> dict[str, tuple[str, SourceFile, SourceFile | None]]:
        """Every image of the selected scenes: source id -> (official split, image, mask or None).

        Raises:
            InputError: one source id in two archives, or an ambiguous file.
        """
        catalogue: dict[str, tuple[str, SourceFile, SourceFile | None]] = {}
        for split, archive in self._archives().items():
            for scene in self.scenes:
                images = FileRole(archive.stem, "{id}.png", folder=f"{SCENES[scene]}/images_png")
                masks = FileRole(archive.stem, "{id}.png", folder=f"{SCENES[scene]}/masks_png")
                for number in archive.ids(images):
                    source_id = f"{scene}_{number}"
                    if source_id in catalogue:
                        raise InputError(
                            f"{archive.location}: {source_id} is in both {SPLIT_ARCHIVES[catalogue[source_id][0]]} "
                            f"and {archive.stem} (expected each image number once in the release)"
                        )
                    image = archive.find(images, number, "image")
                    assert image is not None
                    catalogue[source_id] = (split, image, archive.find(masks, number, f"mask of {source_id}"))
        return catalogue

    def split_members(self) -> dict[str, list[str]]:
        """Source ids of each split: the official archives, or a custom split of their images.

        Raises:
            InputError: an unknown split scheme, a custom id not in the release, a source listed twice.
        """
        catalogue = self._catalogue
        if self.config.split == "official":
            members: dict[str, list[str]] = {}
            for source_id, (split, _, _) in sorted(catalogue.items(), key=lambda item: _order(item[0])):
                members.setdefault(split, []).append(source_id)
            return members
        members = super().split_members()
        for split, ids in members.items():
            unknown = [source_id for source_id in ids if source_id not in catalogue]
            if unknown:
                raise InputError(
                    f"dataset.custom_splits: {', '.join(unknown[:5])} (split {split}) not found under "
                    f"{self.config.root} (scenes: {', '.join(self.scenes)})"
                )
        return check_disjoint(members)

    def sources(self) -> list[Source]:
        """Every listed image with its mask (Test: none).

        Raises:
            InputError: see :meth:`split_members`.
        """
        catalogue = self._catalogue
        found = []
        for split, ids in self.split_members().items():
            for source_id in ids:
                _, image, mask = catalogue[source_id]
                found.append(Source(source_id, split, image, mask, mask))
        return found


def _order(source_id: str) -> tuple[str, int, str]:
    """Sort key: scene, then the image number as a number (``urban_2`` before ``urban_10``)."""
    scene, _, number = source_id.partition("_")
    return (scene, int(number) if number.isdigit() else -1, number)
