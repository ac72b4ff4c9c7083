"""ISPRS Vaihingen and Potsdam, read from the official archives or their extracted folders.

Each role (image, label, eval label) declares the archive, the file name and the folder its file sits in
(:class:`~segmenter.data.datasets.files.FileRole`), after the official releases:

- ``ISPRS_semantic_labeling_Vaihingen.zip``: ``top/top_mosaic_09cm_area{N}.tif`` (IRRG orthophotos),
  ``dsm/dsm_09cm_matching_area{N}.tif`` and ``gts_for_participants/top_mosaic_09cm_area{N}.tif`` (full ground
  truth of the 16 labelled areas, **named like the orthophotos**), inside ``ISPRS_semantic_labeling_Vaihingen/``
  or at the top level of the archive (both are met: tools that extract it see ``top/`` at the top);
- ``ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip`` and ``..._eroded_COMPLETE.zip``: flat
  ``top_mosaic_09cm_area{N}.tif`` and ``top_mosaic_09cm_area{N}_noBoundary.tif`` for all 33 areas;
- Potsdam ``2_Ortho_RGB.zip`` / ``3_Ortho_IRRG.zip`` / ``4_Ortho_RGBIR.zip``: ``<stem>/top_potsdam_{id}_<bands>.tif``
  with a ``.tfw`` world file beside each; ``5_Labels_all.zip`` and ``5_Labels_all_noBoundary.zip``: flat
  ``top_potsdam_{id}_label.tif`` and ``top_potsdam_{id}_label_noBoundary.tif``.
"""

from __future__ import annotations

from typing import ClassVar

from manifests.errors import InputError
from manifests.run_manifest import DatasetConfig
from segmenter.data.datasets.base import SegmentationDataset, Source
from segmenter.data.datasets.files import Archive, FileRole, SourceFile
from segmenter.data.datasets.labels import RGB

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

    ``roles`` maps a role (``image``, ``label``, ``eval_label``) to where its file sits in the official release.
    """

    class_names = ISPRS_CLASSES
    palette = ISPRS_PALETTE
    class_words: ClassVar[dict[str, tuple[str, ...]]] = {
        "impervious_surfaces": ("impervious", "road", "roads", "street", "streets", "pavement", "paved", "asphalt",
                                "parking", "sidewalk", "plaza"),
        "building": ("buildings", "house", "houses", "roof", "roofs", "rooftop", "rooftops"),
        "low_vegetation": ("grass", "lawn", "lawns", "meadow", "field", "fields", "shrub", "shrubs"),
        "tree": ("trees", "forest", "canopy", "canopies", "woods"),
        "car": ("cars", "vehicle", "vehicles"),
        "clutter": ("debris", "container", "containers", "bare soil", "water"),
    }  # fmt: skip
    plurals: ClassVar[dict[str, str]] = {"building": "buildings", "car": "cars", "tree": "trees"}
    # The paper and GeoSeg average over the five classes other than clutter (mmsegmentation over all six).
    excluded_from_mean = ("clutter",)
    roles: ClassVar[dict[str, FileRole]]

    has_eroded_labels = True

    def _roles(self) -> dict[str, FileRole]:
        """The roles of this instance (Potsdam picks its image role by modality)."""
        return dict(self.roles)

    @property
    def training_labels(self) -> str:
        """``full`` (the COMPLETE ground truth, the default) or ``eroded`` (``labels: eroded``)."""
        return self.config.labels

    def _archives(self) -> dict[str, Archive]:
        """The archive of each role this instance reads: eroded labels only where present, full labels only where
        training reads them.

        Raises:
            InputError: the image archive or the archive of the training labels is missing (naming the way out when
                the other ground truth is there).
        """
        roles = self._roles()
        archives = {role: Archive(self.config.root, spec.archive) for role, spec in roles.items()}
        if self.training_labels == "eroded":
            del archives["label"]
        wanted = ("image", "label" if self.training_labels == "full" else "eval_label")
        for role in wanted:
            if not archives[role].exists:
                raise InputError(self._missing_archive(role, archives))
        if not archives["eval_label"].exists:
            del archives["eval_label"]
            self.notices.append(
                f"dataset.root: {self.config.root} holds neither {roles['eval_label'].archive}.zip nor its folder: no "
                "eroded labels (evaluate --gt eroded needs them; train and evaluate --gt full do not)"
            )
        self.notices += sorted({archive.notice for archive in archives.values() if archive.notice})
        return archives

    def _missing_archive(self, role: str, archives: dict[str, Archive]) -> str:
        """One line: the archive of ``role`` is missing, with the setting that reads the other ground truth."""
        stem = self._roles()[role].archive
        message = (
            f"dataset.root: {self.config.root} holds neither {stem}.zip nor the folder {stem}/ "
            f"({role.replace('_', ' ')} files of {self.name})"
        )
        if role == "label" and archives["eval_label"].exists:
            message += (
                "; to train on the eroded labels beside it (as mmsegmentation does), set labels: eroded "
                "(--labels eroded)"
            )
        return message

    def sources(self) -> list[Source]:
        """Every source of every split with its image, label and eval-label file.

        With ``labels: eroded`` the eroded file is both the label and the eval label; without the eroded archive the
        eval label is None (said in a notice).

        Returns:
            The sources, split by split.

        Raises:
            InputError: an archive that is needed is missing, a file is not where its role expects it, or its name
                is ambiguous.
        """
        self.notices = []
        members = self.split_members()  # the ids the user gave are checked before any archive is opened
        archives = self._archives()
        roles = self._roles()
        found: list[Source] = []
        for split, ids in members.items():
            for source_id in ids:
                files = {}
                for role, archive in archives.items():
                    spec = roles[role]
                    what = "image" if role == "image" else f"{role.replace('_', ' ')} of {source_id}"
                    file = archive.find(spec, source_id, what)
                    if file is None:
                        raise InputError(_not_found(archive, spec, source_id, what, split))
                    files[role] = file
                if self.training_labels == "eroded":
                    files["label"] = files["eval_label"]
                found.append(Source(self._source_name(source_id), split, **files))
        return found

    def ground_truth(self, source: Source, gt: str) -> SourceFile:
        """The eroded or full labels of ``source``, each only where the dataset reads them.

        Raises:
            InputError: eroded labels that were not downloaded, or full labels while training reads the eroded ones.
        """
        if gt == "eroded" and source.eval_label is None:
            stem = self._roles()["eval_label"].archive
            raise InputError(
                f"--gt eroded: {self.config.root} holds neither {stem}.zip nor its folder (the eroded labels of "
                f"{self.name}); add it, or evaluate with --gt full"
            )
        if gt == "full" and self.training_labels == "eroded":
            raise InputError(
                f"--gt full: dataset {self.name} is read with labels: eroded (its full labels are not read); evaluate "
                "with --gt eroded, or prepare and train with --labels full"
            )
        return super().ground_truth(source, gt)

    def _source_name(self, source_id: str) -> str:
        return source_id


def _not_found(archive: Archive, spec: FileRole, source_id: str, what: str, split: str) -> str:
    """One line: which file is missing, where it was expected, and where a file of that name was seen instead."""
    message = f"{archive.location}: {what} file {spec.file_name(source_id)} not found (split {split})"
    elsewhere = archive.elsewhere(spec, source_id)
    if elsewhere:
        # Say why a file of the right name was not taken: e.g. gts_for_participants/ is not top/.
        message += f"; expected {spec.where()}, found only {', '.join(elsewhere)}"
    return message


class Vaihingen(ISPRSDataset):
    """ISPRS Vaihingen: 33 IRRG true orthophotos (9 cm) with full and eroded ground truth.

    The image archive holds the orthophotos in ``top/`` and, under the same names, the ground truth of the
    16 labelled areas in ``gts_for_participants/``: the image role therefore requires the ``top`` folder.
    The labels are read from the COMPLETE archives (all 33 areas).
    """

    name = "vaihingen"
    source_id_pattern = r"[0-9]+"
    source_id_example = "1"
    roles: ClassVar[dict[str, FileRole]] = {
        "image": FileRole("ISPRS_semantic_labeling_Vaihingen", "top_mosaic_09cm_area{id}.tif", folder="top"),
        "label": FileRole("ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE", "top_mosaic_09cm_area{id}.tif"),
        "eval_label": FileRole(
            "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE", "top_mosaic_09cm_area{id}_noBoundary.tif"
        ),
    }
    # The other folders of the image archive: never read by ``prepare``, listed so that the layout is written
    # down once (the demo scenes and the test fixtures mirror it).
    companions: ClassVar[dict[str, FileRole]] = {
        "dsm": FileRole("ISPRS_semantic_labeling_Vaihingen", "dsm_09cm_matching_area{id}.tif", folder="dsm"),
        "participant_label": FileRole(
            "ISPRS_semantic_labeling_Vaihingen", "top_mosaic_09cm_area{id}.tif", folder="gts_for_participants"
        ),
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
    source_id_pattern = r"[0-9]+_[0-9]+"
    source_id_example = "2_10"
    # modality -> image role; each ortho archive holds one folder named like itself, a .tfw beside each tif.
    modalities: ClassVar[dict[str, FileRole]] = {
        "rgb": FileRole("2_Ortho_RGB", "top_potsdam_{id}_RGB.tif", folder="2_Ortho_RGB"),
        "irrg": FileRole("3_Ortho_IRRG", "top_potsdam_{id}_IRRG.tif", folder="3_Ortho_IRRG"),
        "rgbir": FileRole("4_Ortho_RGBIR", "top_potsdam_{id}_RGBIR.tif", folder="4_Ortho_RGBIR"),
    }
    roles: ClassVar[dict[str, FileRole]] = {
        "label": FileRole("5_Labels_all", "top_potsdam_{id}_label.tif"),
        "eval_label": FileRole("5_Labels_all_noBoundary", "top_potsdam_{id}_label_noBoundary.tif"),
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
        self.image_bands = 4 if self.modality == "rgbir" else 3  # R, G, B and the infrared band

    def _roles(self) -> dict[str, FileRole]:
        return {"image": self.modalities[self.modality], **self.roles}
