"""The synthetic demo scenes: deterministic, in the Vaihingen layout, hard enough to be interesting."""

from __future__ import annotations

import numpy as np
import tifffile

from manifests.run_manifest import TilingConfig, dataset_config
from manifests.tile_index import read_tile_index
from segmenter.data.demo_scenes import IGNORE, erode_boundaries, generate_scene, write_demo_dataset
from segmenter.data.prepare import prepare_tiles
from segmenter.data.raster_io import read_crop


def test_scene_is_deterministic_and_holds_every_class():
    image_a, labels_a = generate_scene([0, 1], size=256)
    image_b, labels_b = generate_scene([0, 1], size=256)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(labels_a, labels_b)
    _, other = generate_scene([1, 1], size=256)
    assert not np.array_equal(labels_a, other)
    full = generate_scene([0, 3], size=1024)[1]
    fractions = np.bincount(full.ravel(), minlength=6) / full.size
    assert (fractions > 0).all() and fractions.max() < 0.8


def test_roofs_and_roads_overlap_in_colour():
    """Some roofs are grey like roads, so colour alone cannot separate the two classes."""
    image, labels = generate_scene([0, 7], size=512)
    road = image[labels == 0].mean(axis=0)
    roofs = image[labels == 1].astype(float)
    close = np.linalg.norm(roofs - road, axis=1) < 25
    assert 0.02 < close.mean() < 0.95


def test_erosion_marks_class_edges_only():
    labels = np.zeros((20, 20), np.uint8)
    labels[:, 10:] = 1
    eroded = erode_boundaries(labels, radius=2)
    assert (eroded[:, 8:12] == IGNORE).all()
    assert (eroded[:, :8] == 0).all() and (eroded[:, 12:] == 1).all()


def test_demo_dataset_reads_through_the_vaihingen_code_path(tmp_path):
    areas = write_demo_dataset(tmp_path / "raw", n_areas=16, size=128)
    assert len(areas) == 16
    dataset = dataset_config(name="vaihingen", id="demo", root=tmp_path / "raw")
    index = read_tile_index(prepare_tiles(dataset, TilingConfig(size=64, out=tmp_path / "t")).index_path)
    assert index.frame.groupby("split").size().to_dict() == {"train": 48, "test": 16}
    assert index.frame["tile_id"].iloc[0].startswith("demo/area")


def test_demo_dataset_has_the_full_archive_layout_and_prepare_reads_top(tmp_path):
    """dsm/ and gts_for_participants/ sit beside top/ as in the real archive; the crops are still the scenes."""
    write_demo_dataset(tmp_path / "raw", n_areas=2, size=64)  # areas 1 and 3, both labelled by the ISPRS
    images = tmp_path / "raw" / "ISPRS_semantic_labeling_Vaihingen"
    assert sorted(path.name for path in images.iterdir()) == ["dsm", "gts_for_participants", "top"]
    dsm = tifffile.imread(images / "dsm" / "dsm_09cm_matching_area1.tif")
    assert dsm.shape == (64, 64) and dsm.dtype == np.float32
    dataset = dataset_config(
        name="vaihingen", root=tmp_path / "raw", split="custom", custom_splits={"train": ["1", "3"]}
    )
    index = read_tile_index(prepare_tiles(dataset, TilingConfig(size=64, out=tmp_path / "t")).index_path)
    for row in index.frame.itertuples():
        image, _ = generate_scene([0, int(row.source_id.removeprefix("area"))], 64)
        np.testing.assert_array_equal(read_crop(index.path(row.image_path)), image)
