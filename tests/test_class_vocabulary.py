"""The dataset's class vocabulary travels in the tile index: caption words, counted classes, classes of the means."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests.errors import InputError
from manifests.run_manifest import ClassSpec, TilingConfig, dataset_config
from manifests.tile_index import read_tile_index
from segmenter.data.prepare import prepare_tiles
from tests.data.syndrone.generate import make_syndrone
from tests.helpers import vaihingen_configs


def test_isprs_index_records_its_vocabulary(vaihingen_root, tmp_path):
    index = read_tile_index(prepare_tiles(*vaihingen_configs(vaihingen_root, tmp_path / "tiles")).index_path)
    vocabulary = index.vocabulary
    assert vocabulary.main_classes == ("impervious_surfaces", "building", "low_vegetation", "tree", "car")
    assert vocabulary.plurals == {"building": "buildings", "car": "cars", "tree": "trees"}
    assert vocabulary.words["low_vegetation"][0] == "low vegetation" and "roof" in vocabulary.words["building"]


def test_syndrone_averages_over_every_class(tmp_path):
    root = make_syndrone(tmp_path / "syndrone")
    dataset = dataset_config(name="syndrone", root=root)
    index = read_tile_index(prepare_tiles(dataset, TilingConfig(size=32, out=tmp_path / "tiles")).index_path)
    assert index.vocabulary.main_classes == tuple(index.class_names)  # no ISPRS clutter rule here
    assert index.vocabulary.plurals["person"] == "people" and "clutter" not in index.vocabulary.words


def test_folder_classes_declare_their_words_plurals_and_means(tmp_path):
    train = tmp_path / "f" / "train"
    (train / "images").mkdir(parents=True)
    (train / "masks").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(train / "images" / "a.png")
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[:, :16] = (0, 0, 255)
    mask[:, 16:] = (0, 255, 0)
    Image.fromarray(mask).save(train / "masks" / "a.png")
    classes = [
        ClassSpec(name="water", color=(0, 0, 255), words=["lake", "river"]),
        ClassSpec(name="boat", color=(0, 255, 0), plural="boats", in_mean=False),
    ]
    dataset = dataset_config(name="folder", root=tmp_path / "f", classes=classes)
    index = read_tile_index(prepare_tiles(dataset, TilingConfig(size=32, out=tmp_path / "tiles")).index_path)
    assert index.vocabulary.words == {"water": ("water", "lake", "river"), "boat": ("boat",)}
    assert index.vocabulary.plurals == {"boat": "boats"} and index.vocabulary.main_classes == ("water",)


def test_an_index_from_before_the_vocabulary_is_refused_and_prepare_rewrites_it(vaihingen_root, tmp_path):
    configs = vaihingen_configs(vaihingen_root, tmp_path / "tiles")
    path = prepare_tiles(*configs).index_path
    table = pq.read_table(path)
    meta = {key: value for key, value in table.schema.metadata.items() if key != b"class_vocabulary"}
    pq.write_table(table.replace_schema_metadata({**meta, b"schema_version": b"1"}), path)
    with pytest.raises(InputError, match=r"schema_version '1', this toolkit reads 2; re-run `segmenter prepare`"):
        read_tile_index(path)
    result = prepare_tiles(*configs)
    assert not result.up_to_date and read_tile_index(path).vocabulary.main_classes[-1] == "car"
