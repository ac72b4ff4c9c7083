"""``segmenter prepare`` on fake official releases: counts, decoding, splits, schema, resume, bad input."""

from __future__ import annotations

import re
import zipfile

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
from typer.testing import CliRunner

from manifests.errors import InputError
from manifests.tile_index import TILE_INDEX_SCHEMA, read_tile_index
from segmenter.cli import app as segmenter_app
from segmenter.data.datasets import Vaihingen
from segmenter.data.prepare import KNOWN_OVERLAY, prepare_tiles
from segmenter.data.raster_io import read_crop
from segmenter.data.tiling import window_starts
from tests.data.isprs.generate import (
    VAIHINGEN_FULL,
    VAIHINGEN_IMAGES,
    class_map,
    image_for,
    make_potsdam,
    make_vaihingen,
    overlay_for,
)
from tests.helpers import vaihingen_configs

HEIGHT, WIDTH = 40, 72


@pytest.mark.parametrize(("size", "stride"), [(32, None), (32, 16), (20, 20), (64, 64), (40, 13)])
def test_tile_counts_follow_size_and_stride(vaihingen_root, tmp_path, size, stride):
    result = prepare_tiles(*vaihingen_configs(vaihingen_root, tmp_path / "tiles", size=size, stride=stride))
    per_source = len(window_starts(HEIGHT, size, stride or size)) * len(window_starts(WIDTH, size, stride or size))
    assert result.n_tiles == 16 * per_source
    frame = read_tile_index(result.index_path).frame
    assert frame.groupby("source_id").size().eq(per_source).all()
    assert (frame["x"] + frame["width"]).max() == WIDTH and (frame["y"] + frame["height"]).max() == HEIGHT


def test_crops_decode_every_class_and_erode_boundaries(vaihingen_root, tmp_path):
    result = prepare_tiles(*vaihingen_configs(vaihingen_root, tmp_path / "tiles", size=WIDTH))
    index = read_tile_index(result.index_path)
    row = index.frame[index.frame["source_id"] == "area1"].iloc[0]
    expected = class_map(HEIGHT, WIDTH, seed=0)[:, : row["width"]]
    label = read_crop(index.path(row["label_path"]))
    # The tile is taller than the area: the crop is padded to the tile with the ignore index.
    assert label.shape == (WIDTH, WIDTH) and (label[HEIGHT:] == 255).all()
    label = label[:HEIGHT]
    np.testing.assert_array_equal(label, expected)
    assert set(np.unique(label)) == set(range(6))
    eroded = read_crop(index.path(row["eval_label_path"]))[:HEIGHT]
    boundary = np.flatnonzero(np.diff(expected[0].astype(int)))  # stripe edges
    assert (eroded[:, boundary] == 255).all() and (eroded[:, boundary + 1] == 255).all()
    interior = eroded != 255
    np.testing.assert_array_equal(eroded[interior], expected[interior])
    image = read_crop(index.path(row["image_path"]))
    assert image.shape == (WIDTH, WIDTH, 3) and image.dtype == np.uint8 and not image[HEIGHT:].any()


def test_class_fractions_sum_to_one(vaihingen_root, tmp_path):
    result = prepare_tiles(*vaihingen_configs(vaihingen_root, tmp_path / "tiles", size=32, stride=16))
    frame = read_tile_index(result.index_path).frame
    sums = frame["class_fractions"].map(np.sum)
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
    assert frame["class_fractions"].map(len).eq(6).all()


@pytest.mark.parametrize("scheme", ["mpers", "isprs"])
def test_split_membership(tmp_path, scheme):
    splits = Vaihingen.splits[scheme]
    root = make_vaihingen(tmp_path / "v", ids=[*splits["train"], *splits["test"]], size=(16, 16))
    result = prepare_tiles(*vaihingen_configs(root, tmp_path / "tiles", size=16, split=scheme))
    frame = read_tile_index(result.index_path).frame
    for split, ids in splits.items():
        assert set(frame.loc[frame["split"] == split, "source_id"]) == {f"area{i}" for i in ids}
    assert frame["tile_id"].str.match(r"^vaihingen/area\d+/\d{4}_\d{4}$").all()


def test_custom_split_from_manifest_lists(tmp_path):
    root = make_vaihingen(tmp_path / "v", ids=["1", "2", "3"], size=(16, 16))
    config = vaihingen_configs(root, tmp_path / "tiles", size=16, split="custom",
                               custom_splits={"train": ["1", "2"], "val": ["3"]})  # fmt: skip
    frame = read_tile_index(prepare_tiles(*config).index_path).frame
    assert frame.groupby("split")["source_id"].agg(set).to_dict() == {"train": {"area1", "area2"}, "val": {"area3"}}


def test_custom_split_ids_may_be_numbers_and_a_source_is_in_one_split(tmp_path):
    root = make_vaihingen(tmp_path / "v", ids=["1", "2", "3"], size=(16, 16))
    config = vaihingen_configs(root, tmp_path / "tiles", size=16, split="custom",
                               custom_splits={"train": [1, 2], "test": [3]})  # fmt: skip
    frame = read_tile_index(prepare_tiles(*config).index_path).frame
    assert frame.groupby("split")["source_id"].agg(set).to_dict() == {"train": {"area1", "area2"}, "test": {"area3"}}
    twice = vaihingen_configs(root, tmp_path / "t2", size=16, split="custom",
                              custom_splits={"train": ["1", "2"], "test": ["2", "3"]})  # fmt: skip
    with pytest.raises(InputError, match=r"^dataset.custom_splits: source '2' is listed in both 'train' and 'test'"):
        prepare_tiles(*twice)


def test_a_zip_beside_its_extracted_folder_is_named_not_guessed(tmp_path):
    root = make_vaihingen(tmp_path / "v", ids=["1", "3"], size=(16, 16), layout="folder")
    make_vaihingen(tmp_path / "v", ids=["1", "3"], size=(16, 16))  # the zips, unzipped in place
    config = vaihingen_configs(root, tmp_path / "tiles", size=16, split="custom",
                               custom_splits={"train": ["1"], "test": ["3"]})  # fmt: skip
    result = prepare_tiles(*config)
    notice = f"{root / 'ISPRS_semantic_labeling_Vaihingen'}: read this folder; the archive "
    assert any(line.startswith(notice) for line in result.warnings)
    assert any(line.startswith(notice) for line in prepare_tiles(*config).warnings)  # repeated when up to date


def test_index_schema_opens_in_pandas_and_duckdb(vaihingen_root, tmp_path):
    path = prepare_tiles(*vaihingen_configs(vaihingen_root, tmp_path / "tiles")).index_path
    schema = pq.read_schema(path)
    assert schema.names == TILE_INDEX_SCHEMA.names
    assert [field.type for field in schema] == [field.type for field in TILE_INDEX_SCHEMA]
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert {"schema_version", "class_names", "ignore_index", "palette"} <= set(meta)
    frame = pd.read_parquet(path)
    assert len(frame) == 16 * 6 and frame["tile_id"].is_unique
    connection = duckdb.connect()
    count, n_sources = connection.execute(f"SELECT count(*), count(DISTINCT source_id) FROM '{path}'").fetchone()
    assert (count, n_sources) == (96, 16)
    image_path = connection.execute(f"SELECT image_path FROM '{path}' LIMIT 1").fetchone()[0]
    assert (path.parent / image_path).is_file()


def test_zip_and_extracted_folders_give_the_same_index(tmp_path):
    zipped = make_vaihingen(tmp_path / "zip", layout="zip")
    folders = make_vaihingen(tmp_path / "folder", layout="folder")
    a = read_tile_index(prepare_tiles(*vaihingen_configs(zipped, tmp_path / "a")).index_path).frame
    b = read_tile_index(prepare_tiles(*vaihingen_configs(folders, tmp_path / "b")).index_path).frame
    pd.testing.assert_frame_equal(a, b)


def test_potsdam_modalities(tmp_path):
    ids = ["2_10", "2_11"]
    for modality, bands in (("rgb", 3), ("rgbir", 4)):
        root = make_potsdam(tmp_path / modality, ids=ids, modality=modality)
        config = vaihingen_configs(root, tmp_path / f"tiles-{modality}", size=48, split="custom",
                                   custom_splits={"train": ["2_10"], "test": ["2_11"]})  # fmt: skip
        dataset = config[0].model_copy(update={"name": "potsdam", "modality": modality})
        index = read_tile_index(prepare_tiles(dataset, config[1]).index_path)
        assert index.frame["tile_id"].tolist() == ["potsdam/2_10/0000_0000", "potsdam/2_11/0000_0000"]
        assert read_crop(index.path(index.frame["image_path"].iloc[0])).shape == (48, 48, bands)


def test_rerun_is_up_to_date_and_a_changed_input_is_detected(tmp_path):
    root = make_vaihingen(tmp_path / "v", layout="folder")
    config = vaihingen_configs(root, tmp_path / "tiles")
    first = prepare_tiles(*config)
    assert not first.up_to_date
    mtime = first.index_path.stat().st_mtime_ns
    again = prepare_tiles(*config)
    assert again.up_to_date and first.index_path.stat().st_mtime_ns == mtime
    image = root / VAIHINGEN_IMAGES / VAIHINGEN_IMAGES / "top" / "top_mosaic_09cm_area5.tif"
    pixels = tifffile.imread(image)
    pixels[0, 0] = 255 - pixels[0, 0]
    tifffile.imwrite(image, pixels)
    changed = prepare_tiles(*config)
    assert not changed.up_to_date
    frame = read_tile_index(changed.index_path).frame
    assert len(list((tmp_path / "tiles").glob("crops-*"))) == 1
    assert all((changed.index_path.parent / p).is_file() for p in frame["image_path"])


def test_stray_colour_is_counted_not_fatal(tmp_path):
    root = make_vaihingen(tmp_path / "v", stray_in="7")
    result = prepare_tiles(*vaihingen_configs(root, tmp_path / "tiles"))
    strays = {report.source_id: report.stray_pixels for report in result.sources}
    assert strays["area7"] == 3 and sum(strays.values()) == 3


def test_missing_root(tmp_path):
    with pytest.raises(InputError, match=r"dataset.root: directory .* not found"):
        prepare_tiles(*vaihingen_configs(tmp_path / "nowhere", tmp_path / "tiles"))


def test_missing_label_names_the_file_and_writes_nothing(tmp_path):
    root = make_vaihingen(tmp_path / "v", layout="folder")
    (root / "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE" / "top_mosaic_09cm_area11.tif").unlink()
    with pytest.raises(InputError, match=r"label of 11 file top_mosaic_09cm_area11.tif not found"):
        prepare_tiles(*vaihingen_configs(root, tmp_path / "tiles"))
    assert not (tmp_path / "tiles").exists()


def test_corrupt_tiff_keeps_the_previous_index(tmp_path):
    root = make_vaihingen(tmp_path / "v", layout="folder")
    config = vaihingen_configs(root, tmp_path / "tiles")
    before = prepare_tiles(*config).index_path.read_bytes()
    (root / VAIHINGEN_IMAGES / VAIHINGEN_IMAGES / "top" / "top_mosaic_09cm_area30.tif").write_bytes(b"II*\0garbage")
    with pytest.raises(InputError, match=r"top_mosaic_09cm_area30.tif: not a readable raster"):
        prepare_tiles(*config)
    assert (tmp_path / "tiles" / "index.parquet").read_bytes() == before
    index = read_tile_index(tmp_path / "tiles")
    assert all(index.path(p).is_file() for p in index.frame["image_path"])
    assert not list((tmp_path / "tiles").glob(".*tmp"))


def test_corrupt_zip(tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    for stem in {role.archive for role in Vaihingen.roles.values()}:
        (root / f"{stem}.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable ZIP archive"):
        prepare_tiles(*vaihingen_configs(root, tmp_path / "tiles"))


def test_unknown_split(vaihingen_root, tmp_path):
    with pytest.raises(InputError, match=r"unknown split 'official2' for vaihingen \(expected one of: mpers, isprs"):
        prepare_tiles(*vaihingen_configs(vaihingen_root, tmp_path / "tiles", split="official2"))


def test_zip_members_in_macos_folders_are_skipped(tmp_path):
    root = make_vaihingen(tmp_path / "v", ids=["1"], size=(16, 16))
    with zipfile.ZipFile(root / "ISPRS_semantic_labeling_Vaihingen.zip", "a") as archive:
        # Inside a top/ folder, so only the __MACOSX and ._ rules keep it from being read as the image.
        archive.writestr(f"__MACOSX/{VAIHINGEN_IMAGES}/top/._top_mosaic_09cm_area1.tif", b"resource fork")
    config = vaihingen_configs(root, tmp_path / "tiles", size=16, split="custom", custom_splits={"train": ["1"]})
    assert prepare_tiles(*config).n_tiles == 1


def _label_map_as_image(tmp_path):
    """Areas 1 and 2 extracted, with the full ground truth of area 1 copied over its orthophoto in top/."""
    root = make_vaihingen(tmp_path / "v", ids=["1", "2"], layout="folder")
    image = root / VAIHINGEN_IMAGES / VAIHINGEN_IMAGES / "top" / "top_mosaic_09cm_area1.tif"
    image.write_bytes((root / VAIHINGEN_FULL / "top_mosaic_09cm_area1.tif").read_bytes())
    return root, image


def _manifest(tmp_path, dataset: str) -> str:
    path = tmp_path / "run.yaml"
    # 40 px fits every source (Vaihingen areas are 40 x 72, Potsdam 48 x 48): no padding warning in the output
    path.write_text(f"name: t\ndataset: {dataset}\ntiling: {{size: 40, out: {tmp_path / 'tiles'}}}\n")
    return str(path)


def test_a_label_map_read_as_the_image_is_reported(tmp_path):
    root, image = _label_map_as_image(tmp_path)
    config = vaihingen_configs(root, tmp_path / "tiles", size=72, split="custom", custom_splits={"train": ["1", "2"]})
    reports = {report.source_id: report for report in prepare_tiles(*config).sources}
    assert reports["area1"].image_is_label_map and reports["area1"].image_label_colours == 6
    assert reports["area1"].image_file == str(image)
    assert reports["area1"].warnings == [
        f"area1: the image {image} looks like a label map, not a photo: its 6 colours are all palette colours; "
        "its crops were written anyway, check that the file is the orthophoto"
    ]
    assert not reports["area2"].image_is_label_map and reports["area2"].warnings == []


def test_cli_warns_about_a_label_map_read_as_the_image_and_again_when_up_to_date(tmp_path):
    root, image = _label_map_as_image(tmp_path)
    manifest = _manifest(
        tmp_path, f"{{name: vaihingen, root: {root}, split: custom, custom_splits: {{train: ['1', '2']}}}}"
    )
    runner = CliRunner()
    for _ in range(2):  # the second run finds the index up to date and repeats the warning it recorded
        result = runner.invoke(segmenter_app, ["prepare", "--manifest", manifest])
        assert result.exit_code == 0, result.output
        assert f"warning: area1: the image {image} looks like a label map, not a photo" in result.output
        assert "area2" not in result.output.split("warning:", 1)[1]
    assert "up to date" in result.output


def test_an_overlay_label_is_counted_reported_and_prepared(tmp_path):
    root = make_potsdam(tmp_path / "p", ids=["2_10", "4_12"], modality="rgb", overlay_in="4_12")
    config = vaihingen_configs(
        root, tmp_path / "tiles", size=48, split="custom", custom_splits={"train": ["2_10", "4_12"]}
    )
    dataset = config[0].model_copy(update={"name": "potsdam", "modality": "rgb"})
    result = prepare_tiles(dataset, config[1])
    reports = {report.source_id: report for report in result.sources}
    # Count the overlay's pixels outside the palette here, from the pixels the fixture wrote.
    overlay = overlay_for(class_map(48, 48, seed=1), image_for(class_map(48, 48, seed=1), seed=1))
    palette_or_black = [*Vaihingen.palette, (0, 0, 0)]
    stray = int((~np.any([np.all(overlay == colour, axis=-1) for colour in palette_or_black], axis=0)).sum())
    assert stray > 48 * 48 // 2
    (found,) = reports["4_12"].overlays
    assert found.file == f"{root / '5_Labels_all.zip'}!top_potsdam_4_12_label.tif"
    assert (found.stray_pixels, found.pixels) == (stray, 48 * 48)
    assert reports["4_12"].warnings == [
        f"4_12: {found.file}: {stray} of {48 * 48} label pixels ({stray / 48 / 48:.0%}) match no palette colour: it "
        f"looks like the mask overlaid on the photo, not a label map ({KNOWN_OVERLAY}); they were set to the "
        "ignore index"
    ]
    assert reports["2_10"].overlays == () and result.warnings == reports["4_12"].warnings
    index = read_tile_index(result.index_path)
    label = read_crop(index.path(index.frame.set_index("source_id").loc["4_12", "label_path"]))
    assert (label == 255).sum() == stray  # kept going: the stray pixels are ignored, the rest decoded


def test_cli_warns_about_an_overlay_label(tmp_path):
    root = make_potsdam(tmp_path / "p", ids=["2_10", "4_12"], modality="rgb", overlay_in="4_12")
    manifest = _manifest(
        tmp_path, f"{{name: potsdam, root: {root}, split: custom, custom_splits: {{train: ['2_10', '4_12']}}}}"
    )
    result = CliRunner().invoke(segmenter_app, ["prepare", "--manifest", manifest])
    assert result.exit_code == 0, result.output
    warning = next(line for line in result.output.splitlines() if line.startswith("warning: 4_12:"))
    assert "5_Labels_all.zip!top_potsdam_4_12_label.tif" in warning
    assert re.search(r": \d+ of 2304 label pixels \(\d+%\) match no palette colour", warning)  # counted, 48 x 48 px
    assert "looks like the mask overlaid on the photo" in warning
    assert "top_potsdam_4_12_label.tif in 5_Labels_all.zip is known to be such an overlay" in warning
    assert "wrote" in result.output
