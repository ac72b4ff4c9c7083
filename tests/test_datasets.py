"""SynDrone and the generic folder dataset through ``prepare``."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from manifests.errors import InputError
from manifests.run_manifest import ClassSpec, TilingConfig, dataset_config
from manifests.tile_index import read_tile_index
from segmenter.data.datasets.syndrone import CARLA_IDS, COARSE_CLASSES, FINE_CLASSES, FINE_TO_COARSE
from segmenter.data.prepare import prepare_tiles
from segmenter.data.raster_io import read_crop
from tests.data.syndrone.generate import SKY_ID, make_syndrone, semantic_ids


def prepare(root, tmp_path, size: int = 48, **settings):
    dataset = dataset_config(name="syndrone", root=root, **settings)
    return prepare_tiles(dataset, TilingConfig(size=size, out=tmp_path / "t"))


@pytest.mark.parametrize("coarse", [True, False])
def test_syndrone_classes_and_splits(tmp_path, coarse):
    root = make_syndrone(tmp_path / "syndrone")  # the release's per-town zips and splits.zip, read in place
    result = prepare(root, tmp_path, coarse=coarse)
    index = read_tile_index(result.index_path)
    assert index.class_names == list(COARSE_CLASSES if coarse else FINE_CLASSES)
    assert index.frame.groupby("split").size().to_dict() == {"train": 24, "test": 24}  # 8 towns x 3 heights
    row = index.frame.iloc[0]
    assert (row["height"], row["width"]) == (32, 48)  # the frame, smaller than the 48 px tile
    label = read_crop(index.path(row["label_path"]))
    assert label.shape == (48, 48) and set(np.unique(label[32:])) == {255}  # padded with the ignore index
    label = label[:32]
    raw = semantic_ids(label.shape)
    for fine_index, carla_id in enumerate(CARLA_IDS):
        values = set(np.unique(label[raw == carla_id]))
        name = FINE_CLASSES[fine_index]
        if coarse:
            expected = COARSE_CLASSES.index(FINE_TO_COARSE[name]) if name in FINE_TO_COARSE else 255
        else:
            expected = fine_index
        assert values == {expected}, name
    assert set(np.unique(label[raw == 0])) == {255}
    # Sky is ignored by design in the coarse classes: counted apart, never as a stray value; id 0 is unknown.
    report = result.sources[0]
    assert report.stray_pixels == int((raw == 0).sum())
    assert report.excluded_pixels == (int((raw == SKY_ID).sum()) if coarse else 0)
    assert not any("sky" in line or str(report.excluded_pixels) in line for line in report.warnings if coarse)


def test_syndrone_extracted_folders_read_like_the_zips(tmp_path):
    zipped = read_tile_index(prepare(make_syndrone(tmp_path / "z"), tmp_path / "a").index_path).frame
    folders = read_tile_index(prepare(make_syndrone(tmp_path / "f", layout="folder"), tmp_path / "b").index_path).frame
    columns = ["tile_id", "split", "image_sha256"]
    pd.testing.assert_frame_equal(zipped[columns], folders[columns])


def test_syndrone_zip_beside_its_extracted_town_is_named(tmp_path):
    root = make_syndrone(tmp_path / "s")
    with zipfile.ZipFile(root / "Town01_Opt_120_color.zip") as archive:
        archive.extractall(root)
    result = prepare(root, tmp_path)
    folder = root / "Town01_Opt_120" / "ClearNoon"
    notice = f"{folder}: read this folder; the archive Town01_Opt_120_color.zip beside it"
    assert f"{notice} is not read" in result.warnings


def test_syndrone_missing_towns_are_refused_unless_a_subset_is_asked_for(tmp_path):
    root = make_syndrone(tmp_path / "s", towns=("01", "03", "05"))
    expected = (
        r"^dataset.root: SynDrone town/height pairs missing under .*: Town02 \(20, 50, 80 m\), Town04 \(20, 50, 80 m\)"
        r", Town06 .*, Town07 .*, Town10HD \(20, 50, 80 m\) \(add their Town"
    )
    with pytest.raises(InputError, match=expected):
        prepare(root, tmp_path)
    assert not (tmp_path / "t").exists()  # refused before cutting anything
    index = read_tile_index(prepare(root, tmp_path, towns=[1, "03"], heights=["80"]).index_path)
    assert sorted(index.frame["source_id"].str[:10].unique()) == ["town01_h80", "town03_h80"]
    with pytest.raises(InputError, match=r"selected by dataset.towns/heights are missing .*: Town02 \(20 m\)$"):
        prepare(root, tmp_path, towns=["01", "02"], heights=[20])
    with pytest.raises(InputError, match=r"^dataset.towns: unknown value '8' \(expected some of 01, 02"):
        prepare(root, tmp_path, towns=[8])


def test_syndrone_one_missing_height_is_named(tmp_path):
    root = make_syndrone(tmp_path / "s", layout="folder")
    shutil.rmtree(root / "Town07_Opt_120" / "ClearNoon" / "height50m")
    with pytest.raises(InputError, match=r"missing under .*: Town07 \(50 m\) "):
        prepare(root, tmp_path)


def test_syndrone_without_any_town_shows_the_expected_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"Town01_Opt_120_color.zip, ... or their extracted folders Town01_Opt_120/"):
        prepare(tmp_path / "empty", tmp_path)


@pytest.mark.parametrize("where", ["zip", "parent", "text"])
def test_syndrone_split_files_are_found_where_the_release_puts_them(tmp_path, where):
    root = make_syndrone(tmp_path / "data" / "renders", splits=where)
    assert read_tile_index(prepare(root, tmp_path).index_path).frame["split"].value_counts().to_dict() == {
        "train": 24,
        "test": 24,
    }


def test_syndrone_splits_setting_and_where_they_were_looked_for(tmp_path):
    root = make_syndrone(tmp_path / "data" / "renders", splits="none")
    with pytest.raises(
        InputError, match=r"^dataset.splits: split files train.txt and test.txt not found; looked in"
    ) as e:
        prepare(root, tmp_path)
    for place in (root, root / "splits", root / "splits.zip", root.parent, root.parent / "splits.zip"):
        assert str(place) in str(e.value)
    elsewhere = tmp_path / "lists"
    make_syndrone(elsewhere / "x", towns=(), splits="parent")  # only elsewhere/splits.zip
    for given in (elsewhere, elsewhere / "splits.zip"):
        assert prepare(root, tmp_path, splits=given).n_tiles == 48
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.txt").write_text("0\n")
    with pytest.raises(InputError, match=r"half has train.txt but not test.txt"):
        prepare(root, tmp_path, splits=tmp_path / "half")


def test_syndrone_custom_ids_are_padded_like_the_split_files(tmp_path):
    root = make_syndrone(tmp_path / "s", towns=("01",), heights=("20",), frames=(5, 12))
    one = {"towns": ["01"], "heights": ["20"], "split": "custom"}
    index = read_tile_index(prepare(root, tmp_path, **one, custom_splits={"train": [5], "test": ["12"]}).index_path)
    assert sorted(index.frame["source_id"]) == ["town01_h20_00005", "town01_h20_00012"]
    with pytest.raises(InputError, match=r"source '00005' is listed in both 'train' and 'test'"):
        prepare(root, tmp_path, **one, custom_splits={"train": [5], "test": ["005"]})
    with pytest.raises(InputError, match=r"^dataset.custom_splits: 'frame5' is not a SynDrone frame number"):
        prepare(root, tmp_path, **one, custom_splits={"train": ["frame5"]})


def test_folder_dataset_with_manifest_palette(tmp_path):
    classes = [ClassSpec(name="water", color=(0, 0, 255)), ClassSpec(name="land", color=(0, 255, 0))]
    for split in ("train", "val"):
        (tmp_path / "f" / split / "images").mkdir(parents=True)
        (tmp_path / "f" / split / "masks").mkdir(parents=True)
        mask = np.zeros((20, 20, 3), np.uint8)
        mask[:, :10] = (0, 0, 255)
        mask[:, 10:] = (0, 255, 0)
        Image.fromarray(mask).save(tmp_path / "f" / split / "masks" / "a.png")
        Image.fromarray(np.full((20, 20, 3), 9, np.uint8)).save(tmp_path / "f" / split / "images" / "a.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "f" / "val" / "images" / "unlabelled.png")
    dataset = dataset_config(name="folder", root=tmp_path / "f", classes=classes)
    index = read_tile_index(prepare_tiles(dataset, TilingConfig(size=20, out=tmp_path / "t")).index_path)
    assert index.class_names == ["water", "land"]
    frame = index.frame.set_index("tile_id")
    assert frame.loc["folder/train/a/0000_0000", "class_fractions"].tolist() == [0.5, 0.5]
    unlabelled = frame.loc["folder/val/unlabelled/0000_0000"]
    assert pd.isna(unlabelled["label_path"]) and unlabelled["class_fractions"] is None


def test_syndrone_coarse_classes_follow_the_official_mapping():
    """Facts of the official release's coarse mapping, written here independently of the reader's tables."""
    from segmenter.data.datasets.syndrone import COARSE_PALETTE, FINE_TO_COARSE

    assert FINE_TO_COARSE["guard_rail"] == "obstacle"  # every guard-rail pixel was labelled construction before
    assert COARSE_PALETTE[COARSE_CLASSES.index("obstacle")] == (153, 153, 153)
