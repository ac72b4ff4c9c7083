"""Data laid out as other projects lay it out, prepared from the command line alone (no manifest): torchgeo's
Vaihingen and Potsdam fixtures (LZW TIFFs, no eroded labels), an ISPRS download with only the eroded labels, the
LoveDA release, and a folder of id-coded masks. Expected pixels are read here from the files at their paths in each
layout (rasterio, PIL), and decoded by rules written out here."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import tifffile
from PIL import Image
from typer.testing import CliRunner

from manifests.run_manifest import load_manifest
from manifests.tile_index import TileIndex, read_tile_index
from segmenter.cli import app as segmenter_app
from segmenter.data.datasets import build_dataset
from segmenter.data.raster_io import read_crop
from tests.data.folder.generate import make_index_folder
from tests.data.isprs.generate import (
    TORCHGEO_POTSDAM_TILES,
    TORCHGEO_VAIHINGEN_AREAS,
    VAIHINGEN_ERODED,
    make_torchgeo_potsdam,
    make_torchgeo_vaihingen,
    make_vaihingen,
)
from tests.data.loveda.generate import make_loveda
from tests.helpers import decode_isprs

runner = CliRunner()


def prepare(*args: str | Path) -> str:
    """``segmenter prepare`` with these flags; its output, once it succeeded."""
    result = runner.invoke(segmenter_app, ["prepare", *map(str, args)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


def refused(*args: str | Path) -> str:
    """``segmenter prepare`` with these flags, refused: its one error line."""
    result = runner.invoke(segmenter_app, ["prepare", *map(str, args)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def gdal_pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as source:
        return np.moveaxis(source.read(), 0, -1)


def png_in_zip(archive: Path, member: str) -> np.ndarray:
    with zipfile.ZipFile(archive) as opened:
        return np.asarray(Image.open(io.BytesIO(opened.read(member))))


def assert_crops(index: TileIndex, source_id: str, image: np.ndarray, label: np.ndarray | None) -> None:
    """Every crop of ``source_id`` is the image and the decoded label at its window (the padding aside)."""
    rows = index.frame[index.frame["source_id"] == source_id]
    assert len(rows), source_id
    for row in rows.itertuples():
        window = (slice(row.y, row.y + row.height), slice(row.x, row.x + row.width))
        crop = read_crop(index.path(row.image_path))[: row.height, : row.width]
        np.testing.assert_array_equal(crop, image[window], err_msg=row.tile_id)
        if label is None:
            assert pd.isna(row.label_path)
        else:
            got = read_crop(index.path(row.label_path))[: row.height, : row.width]
            np.testing.assert_array_equal(got, label[window], err_msg=row.tile_id)


def test_torchgeo_vaihingen_fixture_without_eroded_labels(tmp_path):
    root = make_torchgeo_vaihingen(tmp_path / "vaihingen")
    out = tmp_path / "tiles"
    output = prepare("--dataset", "vaihingen", "--root", root, "--out", out, "--size", 32, "--stride", 20,
                     "--train", "1,11", "--test", "6", "--test", "24")  # fmt: skip
    assert "no eroded labels (evaluate --gt eroded needs them" in output
    index = read_tile_index(out)
    assert index.extra["labels"] == "full" and index.frame["eval_label_path"].isna().all()
    assert index.frame.groupby("split")["source_id"].nunique().to_dict() == {"train": 2, "test": 2}
    for area in TORCHGEO_VAIHINGEN_AREAS:  # the loose copies beside the zips are the same files
        name = f"top_mosaic_09cm_area{area}.tif"
        assert_crops(index, f"area{area}", gdal_pixels(root / "top" / name), decode_isprs(gdal_pixels(root / name)))
    # The settings the flags gave, written down: a run manifest that train reads.
    written = load_manifest(out / "manifest.yaml")
    assert written.dataset.custom_splits == {"train": ["1", "11"], "test": ["6", "24"]}
    assert written.tiling.stride == 20 and written.dataset.root == root.resolve()


def test_torchgeo_potsdam_fixture_rgbir(tmp_path):
    root = make_torchgeo_potsdam(tmp_path / "potsdam")
    out = tmp_path / "tiles"
    prepare("--dataset", "potsdam", "--modality", "rgbir", "--root", root, "--out", out, "--size", 32,
            "--train", "2_10,2_11", "--test", "5_15,6_15")  # fmt: skip
    index = read_tile_index(out)
    for tile in TORCHGEO_POTSDAM_TILES:
        image = gdal_pixels(root / "4_Ortho_RGBIR" / f"top_potsdam_{tile}_RGBIR.tif")
        assert image.shape[-1] == 4
        assert_crops(index, tile, image, decode_isprs(gdal_pixels(root / f"top_potsdam_{tile}_label.tif")))


def test_an_isprs_download_with_only_the_eroded_labels(tmp_path):
    """mmsegmentation's recipe downloads the images and the eroded ground truth, and trains on it."""
    root = make_vaihingen(tmp_path / "v", ids=["1", "5"], archives=("images", "eroded"))
    flags = ("--dataset", "vaihingen", "--root", root, "--size", 36, "--train", "1", "--test", "5")
    line = refused(*flags, "--out", tmp_path / "a")
    assert "_ground_truth_COMPLETE.zip nor the folder" in line and "--labels eroded" in line
    prepare(*flags, "--out", tmp_path / "t", "--labels", "eroded")
    index = read_tile_index(tmp_path / "t")
    assert index.extra["labels"] == "eroded"
    with zipfile.ZipFile(root / f"{VAIHINGEN_ERODED}.zip") as archive:
        members = {area: archive.read(f"top_mosaic_09cm_area{area}_noBoundary.tif") for area in ("1", "5")}
    for area, data in members.items():
        label = decode_isprs(tifffile.imread(io.BytesIO(data)))
        assert (label == 255).any()  # the eroded boundary is there, ignored
        rows = index.frame[index.frame["source_id"] == f"area{area}"]
        for row in rows.itertuples():
            window = (slice(row.y, row.y + row.height), slice(row.x, row.x + row.width))
            np.testing.assert_array_equal(read_crop(index.path(row.label_path))[: row.height, : row.width],
                                          label[window])  # fmt: skip
            assert row.eval_label_path == row.label_path or np.array_equal(
                read_crop(index.path(row.eval_label_path)), read_crop(index.path(row.label_path))
            )


def loveda_label(ids: np.ndarray) -> np.ndarray:
    """LoveDA's rule, written out: 0 is no-data (ignored), ids 1-7 are the classes 0-6."""
    return np.where(ids == 0, 255, ids.astype(np.int16) - 1).astype(np.uint8)


@pytest.mark.parametrize("layout", ["zip", "folder"])
def test_the_loveda_release(tmp_path, layout):
    root = make_loveda(tmp_path / "loveda", layout=layout, unknown_in=1)
    out = tmp_path / "tiles"
    output = prepare("--dataset", "loveda", "--root", root, "--out", out, "--size", 32)
    index = read_tile_index(out)
    assert index.class_names == ["background", "building", "road", "water", "barren", "forest", "agriculture"]
    sources = index.frame.groupby("split")["source_id"].unique().map(sorted).to_dict()
    assert sources == {"train": ["rural_0", "rural_1", "urban_2", "urban_3"],
                       "val": ["rural_4", "rural_5", "urban_6", "urban_7"],
                       "test": ["rural_8", "rural_9", "urban_10", "urban_11"]}  # fmt: skip
    assert index.frame.loc[index.frame["split"] == "test", "label_path"].isna().all()
    assert "rural_1: 3 label pixels with ids outside the declared classes (id 9: 3 px)" in output
    for source_id, split, scene, number in [("rural_0", "Train", "Rural", 0), ("urban_6", "Val", "Urban", 6)]:
        member = f"{split}/{scene}/{{}}/{number}.png"
        if layout == "zip":
            image, ids = (
                png_in_zip(root / f"{split}.zip", member.format(kind)) for kind in ("images_png", "masks_png")
            )
        else:
            image, ids = (np.asarray(Image.open(root / member.format(kind))) for kind in ("images_png", "masks_png"))
        assert_crops(index, source_id, image, loveda_label(ids))
    assert_crops(
        index, "urban_10", np.asarray(Image.open(io.BytesIO(_member(root, layout, "Test", "Urban", 10)))), None
    )


def _member(root: Path, layout: str, split: str, scene: str, number: int) -> bytes:
    member = f"{split}/{scene}/images_png/{number}.png"
    if layout == "folder":
        return (root / member).read_bytes()
    with zipfile.ZipFile(root / f"{split}.zip") as archive:
        return archive.read(member)


def test_loveda_counts_its_no_data_and_a_missing_test_archive_is_said(tmp_path):
    from manifests.run_manifest import TilingConfig, dataset_config
    from segmenter.data.prepare import prepare_tiles

    root = make_loveda(tmp_path / "loveda", splits=("Train", "Val"))
    result = prepare_tiles(dataset_config(name="loveda", root=root), TilingConfig(size=32, out=tmp_path / "t"))
    assert any("no Test.zip or Test/ under" in line for line in result.warnings)
    report = next(report for report in result.sources if report.source_id == "rural_0")
    ids = png_in_zip(root / "Train.zip", "Train/Rural/masks_png/0.png")
    assert (report.nodata_pixels, report.stray_pixels, report.boundary_pixels) == (int((ids == 0).sum()), 0, 0)


def folder_label(ids: np.ndarray) -> np.ndarray:
    """The rule of the flags below, written out: ids 1, 2, 3 are road, building, tree; 0 and anything else ignored."""
    return np.select([ids == 1, ids == 2, ids == 3], [0, 1, 2], default=255).astype(np.uint8)


def test_a_folder_of_id_masks_with_capitalised_split_folders(tmp_path):
    root = make_index_folder(tmp_path / "f", undeclared_in="b")
    out = tmp_path / "tiles"
    output = prepare("--dataset", "folder", "--root", root, "--out", out, "--size", 32, "--mask-format", "index",
                     "--classes", "road=1,building=2", "--classes", "tree=3", "--ignore", 0)  # fmt: skip
    index = read_tile_index(out)
    assert index.class_names == ["road", "building", "tree"]
    assert sorted(index.frame["split"].unique()) == ["train", "val"]  # Train/ and Val/, in the index's lower case
    assert (
        "train/b: 5 label pixels with ids outside the declared classes (id 9: 5 px) were set to the ignore index; "
        "declare them in --classes (name=ID gives a class its mask id) or as --ignore values" in output
    )
    for split, name in [("Train", "a"), ("Train", "b"), ("Val", "c")]:
        image = np.asarray(Image.open(root / split / "images" / f"{name}.png"))
        ids = np.asarray(Image.open(root / split / "masks" / f"{name}.png"))
        assert_crops(index, f"{split.lower()}/{name}", image, folder_label(ids))
    # A custom split matches split names to the folders ignoring case, and lists the folders when one is missing.
    custom = ("--dataset", "folder", "--root", root, "--mask-format", "index", "--classes", "road=1,building=2,tree=3")
    prepare(*custom, "--out", tmp_path / "c", "--size", 32, "--train", "a", "--val", "c")
    assert read_tile_index(tmp_path / "c").frame.groupby("split")["source_id"].unique().map(list).to_dict() == {
        "train": ["train/a"], "val": ["val/c"]}  # fmt: skip
    line = refused(*custom, "--out", tmp_path / "d", "--train", "a", "--test", "c")
    assert "split test names no folder under" in line and "(split folders found: Train, Val;" in line


def test_no_tiles_in_split_train_lists_the_splits_the_index_has(tmp_path):
    from segmenter.engine.options import Augmentation
    from segmenter.engine.train import _train_samples

    root = make_index_folder(tmp_path / "f", splits={"Training": ("a", "b"), "Validation": ("c",)})
    prepare("--dataset", "folder", "--root", root, "--out", tmp_path / "t", "--size", 40, "--mask-format", "index",
            "--classes", "road=1,building=2,tree=3", "--ignore", 0)  # fmt: skip
    with pytest.raises(ValueError, match=r"no tiles in split 'train'; its splits: 'training' \(4 tiles\), "
                       r"'validation' \(2 tiles\)"):  # fmt: skip
        _train_samples(read_tile_index(tmp_path / "t"), None, Augmentation.none)


def test_a_yaml_integer_id_is_refused_with_the_quoted_form(tmp_path):
    manifest = tmp_path / "run.yaml"
    manifest.write_text(
        f"name: p\ndataset: {{name: potsdam, root: {tmp_path}, split: custom, custom_splits: {{train: [2_10, '2_11'],"
        f" test: [3_10]}}}}\ntiling: {{out: {tmp_path / 't'}}}\n"
    )
    result = runner.invoke(segmenter_app, ["prepare", "--manifest", str(manifest)])
    assert result.exit_code == 2
    assert (
        "split 'train': 2_10 is read by YAML as the integer 210; source ids are strings: write '2_10' (in quotes)"
        in (result.output)
    )
    line = refused("--dataset", "potsdam", "--root", tmp_path, "--out", tmp_path / "t", "--train", "210")
    assert "'210' (split train) is not a potsdam source id (expected ids such as '2_10'" in line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset", "vaihingen", "--modality", "irrg"], "error: --modality is not an option of --dataset vaihingen"),
        (["--dataset", "vaihingen", "--split", "isprs", "--train", "1"], "error: --split isprs: --train/--val/--test"),
        (["--dataset", "vaihingen", "--split", "custom"], "error: --split custom: give the source ids of each split"),
        (["--dataset", "folder"], "error: --classes: required by --dataset folder"),
        (["--dataset", "folder", "--classes", "a=1"], "error: --classes: a: --mask-format rgb codes each"),
        (["--dataset", "folder", "--mask-format", "index", "--classes", "a=1,b=1"], "error: --classes: id 1 given"),
        (["--dataset", "folder", "--mask-format", "index", "--classes", "a", "--ignore", "#000000"],
         "error: --ignore: (0, 0, 0): --mask-format index ignores ids"),
        (["--dataset", "syndrone", "--towns", "9"], "error: --towns: unknown value '9'"),
        (["--dataset", "folder", "--mask-format", "index", "--classes", "road=1,tree=3", "--ignore", "3"],
         "error: --ignore: 3 (class tree) also codes a class"),
    ],
)  # fmt: skip
def test_every_refusal_of_a_flag_names_it(tmp_path, flags, message):
    line = refused(*flags, "--root", tmp_path, "--out", tmp_path / "t")
    assert line.startswith(message), line
    assert not (tmp_path / "t").exists()


def test_the_table_never_cuts_a_source_name(tmp_path):
    names = (
        "survey_2024_block_17_flight_03_orthomosaic_tile_000",
        "survey_2024_block_17_flight_03_orthomosaic_tile_001",
    )
    make_index_folder(tmp_path / "f", splits={"train": names})
    result = runner.invoke(segmenter_app, ["prepare", "--dataset", "folder", "--root", str(tmp_path / "f"), "--out",
                                           str(tmp_path / "t"), "--size", 40, "--mask-format", "index", "--classes",
                                           "road=1,building=2,tree=3"], env={"COLUMNS": "80"})  # fmt: skip
    assert result.exit_code == 0 and "\u2026" not in result.output
    table = [line for line in result.output.splitlines() if line.startswith("\u2502")]
    first_cells = "".join(line.split("\u2502")[1].strip() for line in table)
    for name in names:
        assert f"train/{name}" in first_cells


def test_evaluation_says_which_ground_truth_is_missing(tmp_path):
    from manifests.run_manifest import dataset_config
    from segmenter.engine.evaluate import _split_sources
    from segmenter.engine.options import EvaluateSettings

    torchgeo = dataset_config(name="vaihingen", root=make_torchgeo_vaihingen(tmp_path / "tg"), split="custom",
                              custom_splits={"train": ["1"], "test": ["6"]})  # fmt: skip
    missing = r"holds neither ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip nor its folder"
    with pytest.raises(ValueError, match=rf"^--gt eroded: .* {missing} .*; add it, or evaluate with --gt full$"):
        _split_sources(build_dataset(torchgeo), EvaluateSettings(split="test", gt="eroded"))
    sources, gt = _split_sources(build_dataset(torchgeo), EvaluateSettings(split="test", gt="full"))
    assert [source.source_id for source in sources] == ["area6"] and gt == "full"
    root = make_vaihingen(tmp_path / "e", ids=["5"], archives=("images", "eroded"))
    eroded_only = dataset_config(name="vaihingen", labels="eroded", root=root, split="custom",
                                 custom_splits={"test": ["5"]})  # fmt: skip
    with pytest.raises(ValueError, match=r"^--gt full: dataset vaihingen is read with labels: eroded"):
        _split_sources(build_dataset(eroded_only), EvaluateSettings(split="test", gt="full"))
    with pytest.raises(ValueError, match=r"^--split: no sources in split 'val' of vaihingen \(its splits: 'test'\)$"):
        _split_sources(build_dataset(eroded_only), EvaluateSettings(split="val"))


def test_boundary_and_no_data_pixels_are_counted_without_separate_eval_labels(tmp_path):
    """A folder's one label file is label and eval label: its black boundary and no-data colours were reported 0."""
    from manifests.run_manifest import ClassSpec, TilingConfig, dataset_config
    from segmenter.data.prepare import prepare_tiles

    mask = np.zeros((30, 40, 3), np.uint8)
    mask[:, :20] = (0, 0, 255)
    mask[:5, 20:] = (9, 9, 9)  # 100 px of the declared no-data colour; the rest of the right half black: 500 px
    (tmp_path / "f" / "train" / "images").mkdir(parents=True)
    (tmp_path / "f" / "train" / "masks").mkdir(parents=True)
    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(tmp_path / "f" / "train" / "images" / "s.png")
    Image.fromarray(mask).save(tmp_path / "f" / "train" / "masks" / "s.png")
    config = dataset_config(name="folder", root=tmp_path / "f", classes=[ClassSpec(name="water", color=(0, 0, 255))],
                            ignore=[(9, 9, 9)])  # fmt: skip
    for stride in (None, 7):  # overlapping tiles count each pixel once
        [report] = prepare_tiles(config, TilingConfig(size=16, stride=stride, out=tmp_path / f"t{stride}")).sources
        assert (report.boundary_pixels, report.nodata_pixels, report.stray_pixels) == (500, 100, 0)


def test_train_refuses_tiles_the_model_cannot_take_in_one_line(tmp_path):
    """Tiles of 40 px are cut (captioning takes any size); training says which sizes the model takes."""
    root = make_index_folder(tmp_path / "f", splits={"Train": ("a", "b"), "Val": ("c",)})
    prepare("--dataset", "folder", "--root", root, "--out", tmp_path / "t", "--size", 40, "--mask-format", "index",
            "--classes", "road=1,building=2,tree=3", "--ignore", 0)  # fmt: skip
    flags = ["--manifest", str(tmp_path / "t" / "manifest.yaml"), "--preset", "test_tiny_notext", "--out",
             str(tmp_path / "run"), "--steps", "1"]  # fmt: skip
    result = runner.invoke(segmenter_app, ["train", *flags])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert "tiles of 40 px; the model takes sides that are multiples of 32" in line and "--size 32" in line
    assert not (tmp_path / "run" / "run.json").exists()


def test_evaluate_names_the_ground_truth_it_used_in_its_table(tmp_path):
    """A folder dataset has one label per source: the default --gt eroded falls back to it, and the table says full."""
    root = make_index_folder(tmp_path / "f", splits={"Train": ("a", "b"), "Val": ("c",)})
    prepare("--dataset", "folder", "--root", root, "--out", tmp_path / "t", "--size", 32, "--mask-format", "index",
            "--classes", "road=1,building=2,tree=3", "--ignore", 0)  # fmt: skip
    flags = ["--manifest", str(tmp_path / "t" / "manifest.yaml"), "--preset", "test_tiny_notext", "--out",
             str(tmp_path / "run"), "--steps", "1", "--batch-size", "2"]  # fmt: skip
    assert runner.invoke(segmenter_app, ["train", *flags]).exit_code == 0
    result = runner.invoke(segmenter_app, ["evaluate", "--run", str(tmp_path / "run"), "--split", "val"])
    assert result.exit_code == 0, result.output
    assert "evaluating against its full labels" in result.output and "(val, full GT)" in result.output
    assert "eroded GT" not in result.output
