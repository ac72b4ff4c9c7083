"""ISPRS Vaihingen and Potsdam, read from the official archives or their extracted folders."""

from __future__ import annotations

from typing import ClassVar

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig
from segmenter.datasets.base import SegmentationDataset, Source
from segmenter.datasets.files import Archive
from segmenter.datasets.labels import RGB

ISPRS_CLASSES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
ISPRS_PALETTE: tuple[RGB, ...] = (
    (255, 255, 255),
    (0, 0, 255),
    (0, 255, 255),
    (0, 255, 0),
    (255, 255, 0),
    (255, 0, 0),
)


def _ids(text: str) -> tuple[str, ...]:
    return tuple(text.split())


class ISPRSDataset(SegmentationDataset):
    """Common code of the two ISPRS 2D labelling datasets.

    ``archives`` maps a role (``image``, ``label``, ``eval_label``) to the stem of the official archive,
    ``file_names`` maps the same roles to a file-name template with ``{id}``.
    """

    class_names = ISPRS_CLASSES
    palette = ISPRS_PALETTE
    archives: ClassVar[dict[str, str]]
    file_names: ClassVar[dict[str, str]]

    def _archive_stems(self) -> dict[str, str]:
        return dict(self.archives)

    def _file_names(self) -> dict[str, str]:
        return dict(self.file_names)

    def sources(self) -> list[Source]:
        stems = self._archive_stems()
        names = self._file_names()
        archives = {role: Archive(self.config.root, stem) for role, stem in stems.items()}
        for role, archive in archives.items():
            if not archive.exists:
                raise InputError(
                    f"dataset.root: {self.config.root} holds neither {archive.stem}.zip nor the folder "
                    f"{archive.stem}/ ({role} files of {self.name})"
                )
        found: list[Source] = []
        for split, ids in self.split_members().items():
            for source_id in ids:
                files = {}
                for role, archive in archives.items():
                    file_name = names[role].format(id=source_id)
                    file = archive.get(file_name)
                    if file is None:
                        what = "image" if role == "image" else f"{role.replace('_', ' ')} of {source_id}"
                        raise InputError(f"{archive.location}: {what} file {file_name} not found (split {split})")
                    files[role] = file
                found.append(Source(self._source_name(source_id), split, **files))
        return found

    def _source_name(self, source_id: str) -> str:
        return source_id


class Vaihingen(ISPRSDataset):
    """ISPRS Vaihingen: 33 IRRG true orthophotos (9 cm) with full and eroded ground truth.

    Image and full ground truth share the file name ``top_mosaic_09cm_area{N}.tif`` in different archives.
    """

    name = "vaihingen"
    archives: ClassVar[dict[str, str]] = {
        "image": "ISPRS_semantic_labeling_Vaihingen",
        "label": "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE",
        "eval_label": "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE",
    }
    file_names: ClassVar[dict[str, str]] = {
        "image": "top_mosaic_09cm_area{id}.tif",
        "label": "top_mosaic_09cm_area{id}.tif",
        "eval_label": "top_mosaic_09cm_area{id}_noBoundary.tif",
    }
    splits: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {
        "mpers": {
            "train": _ids("1 3 7 11 13 17 23 26 28 32 34 37"),
            "test": _ids("5 15 21 30"),
        },
        "isprs": {
            "train": _ids("1 3 5 7 11 13 15 17 21 23 26 28 30 32 34 37"),
            "test": _ids("2 4 6 8 10 12 14 16 20 22 24 27 29 31 33 35 38"),
        },
    }

    def _source_name(self, source_id: str) -> str:
        return f"area{source_id}"


class Potsdam(ISPRSDataset):
    """ISPRS Potsdam: 38 tiles of 6000 x 6000 px (5 cm) in RGB, IRRG or RGBIR, with full and eroded labels."""

    name = "potsdam"
    modalities: ClassVar[dict[str, tuple[str, str]]] = {
        "rgb": ("2_Ortho_RGB", "top_potsdam_{id}_RGB.tif"),
        "irrg": ("3_Ortho_IRRG", "top_potsdam_{id}_IRRG.tif"),
        "rgbir": ("4_Ortho_RGBIR", "top_potsdam_{id}_RGBIR.tif"),
    }
    archives: ClassVar[dict[str, str]] = {"label": "5_Labels_all", "eval_label": "5_Labels_all_noBoundary"}
    file_names: ClassVar[dict[str, str]] = {
        "label": "top_potsdam_{id}_label.tif",
        "eval_label": "top_potsdam_{id}_label_noBoundary.tif",
    }
    splits: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {
        "mpers": {
            "train": _ids("2_10 2_12 3_11 3_12 4_11 4_12 5_10 5_12 6_7 6_8 6_9 6_10 6_12 7_7 7_8 7_9 7_10 7_11"),
            "test": _ids("2_11 3_10 4_10 5_11 6_11 7_12"),
        },
        "isprs": {
            "train": _ids(
                "2_10 2_11 2_12 3_10 3_11 3_12 4_10 4_11 4_12 5_10 5_11 5_12 6_7 6_8 6_9 6_10 6_11 6_12 "
                "7_7 7_8 7_9 7_10 7_11 7_12"
            ),
            "test": _ids("2_13 2_14 3_13 3_14 4_13 4_14 4_15 5_13 5_14 5_15 6_13 6_14 6_15 7_13"),
        },
    }

    def __init__(self, config: DatasetConfig) -> None:
        super().__init__(config)
        self.modality = config.modality or "rgb"

    def _archive_stems(self) -> dict[str, str]:
        return {"image": self.modalities[self.modality][0], **self.archives}

    def _file_names(self) -> dict[str, str]:
        return {"image": self.modalities[self.modality][1], **self.file_names}
