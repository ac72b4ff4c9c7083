"""Which file ``prepare`` reads for each role, in the official ISPRS layouts, zipped and extracted.

The expected pixels are read here straight from the fake archives (tifffile + zipfile) at their official member
paths, so each test states what a user would check by hand: every image crop is the orthophoto at that window,
every label crop the decoded COMPLETE ground truth, never the ``gts_for_participants`` copy of the same name.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from manifests.errors import InputError
from manifests.tile_index import TileIndex, read_tile_index
from segmenter.data.prepare import PrepareResult, prepare_tiles
from segmenter.data.raster_io import read_crop
from tests.data.isprs.generate import (
    VAIHINGEN_ERODED,
    VAIHINGEN_FULL,
    VAIHINGEN_IMAGES,
    make_potsdam,
    make_vaihingen,
)
from tests.helpers import decode_isprs as decode
from tests.helpers import vaihingen_configs

VAIHINGEN_IDS = ["1", "2", "5"]  # 1 and 5 have a gts_for_participants copy, 2 has none
VAIHINGEN_SPLITS = {"train": ["1", "2"], "test": ["5"]}
POTSDAM_IDS = ["2_10", "4_12"]
SIZE, STRIDE = 32, 16


def read_official(root: Path, stem: str, member: str, layout: str) -> np.ndarray:
    """A raster at its path inside the official archive ``stem``, zipped or extracted."""
    if layout == "zip":
        with zipfile.ZipFile(root / f"{stem}.zip") as archive:
            return tifffile.imread(io.BytesIO(archive.read(member)))
    return tifffile.imread(root / stem / member)


def assert_crops_match(index: TileIndex, source_id: str, photo: np.ndarray, full: np.ndarray, eroded: np.ndarray):
    """Every crop of ``source_id`` equals the photo and the decoded labels at its window."""
    rows = index.frame[index.frame["source_id"] == source_id]
    height, width = photo.shape[:2]
    assert len(rows) == len(range(0, height - SIZE + STRIDE, STRIDE)) * len(range(0, width - SIZE + STRIDE, STRIDE))
    for row in rows.itertuples():
        window = (slice(row.y, row.y + row.height), slice(row.x, row.x + row.width))
        np.testing.assert_array_equal(read_crop(index.path(row.image_path)), photo[window], err_msg=row.tile_id)
        np.testing.assert_array_equal(read_crop(index.path(row.label_path)), full[window], err_msg=row.tile_id)
        np.testing.assert_array_equal(read_crop(index.path(row.eval_label_path)), eroded[window], err_msg=row.tile_id)


def prepared(result: PrepareResult) -> TileIndex:
    assert result.warnings == [], result.warnings  # a photo, clean labels: nothing to warn about
    return read_tile_index(result.index_path)


@pytest.mark.parametrize(
    ("layout", "top_level"),
    [("zip", True), ("zip", False), ("folder", True), ("folder", False)],
    ids=["zip", "zip-without-top-folder", "extracted", "extracted-without-top-folder"],
)
def test_vaihingen_crops_are_the_orthophoto_and_the_complete_ground_truth(tmp_path, layout, top_level):
    root = make_vaihingen(tmp_path / "v", ids=VAIHINGEN_IDS, layout=layout, top_level=top_level)
    config = vaihingen_configs(root, tmp_path / "tiles", size=SIZE, stride=STRIDE, split="custom",
                               custom_splits=VAIHINGEN_SPLITS)  # fmt: skip
    index = prepared(prepare_tiles(*config))
    folder = f"{VAIHINGEN_IMAGES}/" if top_level else ""
    for area in VAIHINGEN_IDS:
        name = f"top_mosaic_09cm_area{area}.tif"
        photo = read_official(root, VAIHINGEN_IMAGES, f"{folder}top/{name}", layout)
        full = decode(read_official(root, VAIHINGEN_FULL, name, layout))
        eroded = decode(read_official(root, VAIHINGEN_ERODED, f"top_mosaic_09cm_area{area}_noBoundary.tif", layout))
        assert_crops_match(index, f"area{area}", photo, full, eroded)
        if area != "2":
            # The same-named ground truth beside top/ differs from the COMPLETE one, so reading it would fail above.
            participant = decode(read_official(root, VAIHINGEN_IMAGES, f"{folder}gts_for_participants/{name}", layout))
            assert not np.array_equal(participant, full)


@pytest.mark.parametrize(
    ("layout", "modality", "stem", "bands"),
    [
        ("zip", "rgb", "2_Ortho_RGB", "RGB"),
        ("folder", "rgb", "2_Ortho_RGB", "RGB"),
        ("zip", "irrg", "3_Ortho_IRRG", "IRRG"),
        ("folder", "rgbir", "4_Ortho_RGBIR", "RGBIR"),
    ],
)
def test_potsdam_crops_are_the_chosen_orthophoto_and_the_complete_labels(tmp_path, layout, modality, stem, bands):
    root = make_potsdam(tmp_path / "p", ids=POTSDAM_IDS, layout=layout)  # all three ortho archives, DSMs, .tfw
    config = vaihingen_configs(root, tmp_path / "tiles", size=SIZE, stride=STRIDE, split="custom",
                               custom_splits={"train": POTSDAM_IDS})  # fmt: skip
    dataset = config[0].model_copy(update={"name": "potsdam", "modality": modality})
    index = prepared(prepare_tiles(dataset, config[1]))
    for tile in POTSDAM_IDS:
        photo = read_official(root, stem, f"{stem}/top_potsdam_{tile}_{bands}.tif", layout)
        full = decode(read_official(root, "5_Labels_all", f"top_potsdam_{tile}_label.tif", layout))
        eroded = decode(
            read_official(root, "5_Labels_all_noBoundary", f"top_potsdam_{tile}_label_noBoundary.tif", layout)
        )
        assert_crops_match(index, tile, photo, full, eroded)


def test_two_top_folders_in_one_archive_name_both_paths(tmp_path):
    root = make_vaihingen(tmp_path / "v", ids=VAIHINGEN_IDS)
    with zipfile.ZipFile(root / f"{VAIHINGEN_IMAGES}.zip", "a") as archive:
        data = archive.read(f"{VAIHINGEN_IMAGES}/top/top_mosaic_09cm_area5.tif")
        archive.writestr("top/top_mosaic_09cm_area5.tif", data)  # a second copy, as if extracted into itself
    config = vaihingen_configs(root, tmp_path / "tiles", split="custom", custom_splits=VAIHINGEN_SPLITS)
    with pytest.raises(InputError) as error:
        prepare_tiles(*config)
    message = str(error.value)
    assert "\n" not in message
    assert "image file top_mosaic_09cm_area5.tif is ambiguous" in message
    assert f"{VAIHINGEN_IMAGES}/top/top_mosaic_09cm_area5.tif and top/top_mosaic_09cm_area5.tif" in message
    assert not (tmp_path / "tiles").exists()


def test_extra_copy_in_an_extracted_folder_names_both_paths(tmp_path):
    root = make_vaihingen(tmp_path / "v", ids=VAIHINGEN_IDS, layout="folder")
    top = root / VAIHINGEN_IMAGES / VAIHINGEN_IMAGES / "top"
    backup = root / VAIHINGEN_IMAGES / "backup" / "top"
    backup.mkdir(parents=True)
    (backup / "top_mosaic_09cm_area1.tif").write_bytes((top / "top_mosaic_09cm_area1.tif").read_bytes())
    config = vaihingen_configs(root, tmp_path / "tiles", split="custom", custom_splits=VAIHINGEN_SPLITS)
    with pytest.raises(InputError, match=r"ambiguous: ISPRS_semantic_labeling_Vaihingen/top/top_mosaic_09cm_area1\.tif "
                       r"and backup/top/top_mosaic_09cm_area1\.tif both sit in a top/ folder"):  # fmt: skip
        prepare_tiles(*config)


def test_label_copy_one_folder_down_is_ambiguous(tmp_path):
    root = make_vaihingen(tmp_path / "v", ids=VAIHINGEN_IDS)
    with zipfile.ZipFile(root / f"{VAIHINGEN_FULL}.zip", "a") as archive:
        archive.writestr("old/top_mosaic_09cm_area2.tif", archive.read("top_mosaic_09cm_area2.tif"))
    config = vaihingen_configs(root, tmp_path / "tiles", split="custom", custom_splits=VAIHINGEN_SPLITS)
    with pytest.raises(InputError, match=r"label of 2 file top_mosaic_09cm_area2\.tif is ambiguous: "
                       r"old/top_mosaic_09cm_area2\.tif and top_mosaic_09cm_area2\.tif"):  # fmt: skip
        prepare_tiles(*config)


def test_potsdam_extracted_twice_is_ambiguous(tmp_path):
    """``2_Ortho_RGB/`` holding both its own files and the archive's inner ``2_Ortho_RGB/`` folder."""
    root = make_potsdam(tmp_path / "p", ids=POTSDAM_IDS, layout="folder", modality="rgb")
    inner = root / "2_Ortho_RGB" / "2_Ortho_RGB" / "top_potsdam_4_12_RGB.tif"
    (root / "2_Ortho_RGB" / inner.name).write_bytes(inner.read_bytes())
    config = vaihingen_configs(root, tmp_path / "tiles", split="custom", custom_splits={"train": POTSDAM_IDS})
    dataset = config[0].model_copy(update={"name": "potsdam", "modality": "rgb"})
    with pytest.raises(InputError, match=r"2_Ortho_RGB/top_potsdam_4_12_RGB\.tif and top_potsdam_4_12_RGB\.tif both "
                       r"sit in a 2_Ortho_RGB/ folder"):  # fmt: skip
        prepare_tiles(dataset, config[1])


def test_image_only_beside_top_is_not_taken(tmp_path):
    """An orthophoto missing from top/ is an error that says where the same name was seen, never a fallback."""
    root = make_vaihingen(tmp_path / "v", ids=VAIHINGEN_IDS, layout="folder")
    (root / VAIHINGEN_IMAGES / VAIHINGEN_IMAGES / "top" / "top_mosaic_09cm_area5.tif").unlink()
    config = vaihingen_configs(root, tmp_path / "tiles", split="custom", custom_splits=VAIHINGEN_SPLITS)
    with pytest.raises(InputError) as error:
        prepare_tiles(*config)
    assert str(error.value).endswith(
        "image file top_mosaic_09cm_area5.tif not found (split test); expected in a top/ folder, found only "
        f"{VAIHINGEN_IMAGES}/gts_for_participants/top_mosaic_09cm_area5.tif"
    )


def test_macos_entries_and_world_files_are_ignored(tmp_path):
    root = make_potsdam(tmp_path / "p", ids=POTSDAM_IDS, modality="rgb")
    with zipfile.ZipFile(root / "2_Ortho_RGB.zip", "a") as archive:
        archive.writestr("__MACOSX/2_Ortho_RGB/._top_potsdam_2_10_RGB.tif", b"resource fork")
        archive.writestr("2_Ortho_RGB/._top_potsdam_4_12_RGB.tif", b"resource fork")
        assert "2_Ortho_RGB/top_potsdam_2_10_RGB.tfw" in archive.namelist()
    config = vaihingen_configs(root, tmp_path / "tiles", size=48, split="custom", custom_splits={"train": POTSDAM_IDS})
    dataset = config[0].model_copy(update={"name": "potsdam", "modality": "rgb"})
    assert prepare_tiles(dataset, config[1]).n_tiles == 2


def test_file_role_folders():
    from segmenter.data.datasets.files import FileRole

    top = FileRole("ISPRS_semantic_labeling_Vaihingen", "top_mosaic_09cm_area{id}.tif", folder="top")
    assert top.accepts("ISPRS_semantic_labeling_Vaihingen/top/x.tif") and top.accepts("top/x.tif")
    assert not top.accepts("ISPRS_semantic_labeling_Vaihingen/gts_for_participants/x.tif")
    assert not top.accepts("x.tif")  # at the top level it sits in a folder named like the archive
    ortho = FileRole("2_Ortho_RGB", "top_potsdam_{id}_RGB.tif", folder="2_Ortho_RGB")
    assert ortho.accepts("2_Ortho_RGB/x.tif") and ortho.accepts("x.tif") and not ortho.accepts("other/x.tif")
    labels = FileRole("5_Labels_all", "top_potsdam_{id}_label.tif")
    assert labels.accepts("x.tif") and labels.accepts("5_Labels_all/x.tif") and not labels.accepts("a/b/x.tif")
