"""SynDrone and the generic folder dataset through ``prepare``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from manifests.errors import InputError
from manifests.run_manifest import ClassSpec, TilingConfig, dataset_config
from manifests.tile_index import read_tile_index
from segmenter.datasets.syndrone import CARLA_IDS, COARSE_CLASSES, FINE_CLASSES, FINE_TO_COARSE
from segmenter.prepare import prepare_tiles
from segmenter.raster_io import read_crop
from tests.data.syndrone.generate import make_syndrone


@pytest.mark.parametrize("coarse", [True, False])
def test_syndrone_classes_and_splits(tmp_path, coarse):
    root = make_syndrone(tmp_path / "syndrone")
    dataset = dataset_config(name="syndrone", root=root, coarse=coarse)
    index = read_tile_index(prepare_tiles(dataset, TilingConfig(size=48, out=tmp_path / "t")).index_path)
    assert index.class_names == list(COARSE_CLASSES if coarse else FINE_CLASSES)
    assert index.frame.groupby("split").size().to_dict() == {"train": 12, "test": 4}  # 2 towns x 2 heights
    label = read_crop(index.path(index.frame["label_path"].iloc[0]))
    raw = np.resize(np.array([*CARLA_IDS, 0], dtype=np.uint8), label.size).reshape(label.shape)
    for fine_index, carla_id in enumerate(CARLA_IDS):
        values = set(np.unique(label[raw == carla_id]))
        name = FINE_CLASSES[fine_index]
        if coarse:
            expected = COARSE_CLASSES.index(FINE_TO_COARSE[name]) if name in FINE_TO_COARSE else 255
        else:
            expected = fine_index
        assert values == {expected}, name
    assert set(np.unique(label[raw == 0])) == {255}


def test_syndrone_without_split_files(tmp_path):
    root = make_syndrone(tmp_path / "syndrone")
    (root / "test.txt").unlink()
    with pytest.raises(InputError, match=r"split file .*test.txt not found"):
        prepare_tiles(dataset_config(name="syndrone", root=root), TilingConfig(size=48, out=tmp_path / "t"))


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
    from segmenter.datasets.syndrone import COARSE_PALETTE, FINE_TO_COARSE

    assert FINE_TO_COARSE["guard_rail"] == "obstacle"  # every guard-rail pixel was labelled construction before
    assert COARSE_PALETTE[COARSE_CLASSES.index("obstacle")] == (153, 153, 153)
