"""What ``prepare`` does with inputs that ``train`` could not use, and the bad inputs it refuses in one line.

Decisions under test: an image without a mask is prepared (captioning, prediction) and refused by ``train``; a source
smaller than the tile is padded (black pixels, the ignore index in its labels); a single-band image is expanded to
three equal bands, the same rule in prepare and predict.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from manifests.errors import InputError
from manifests.run_manifest import ClassSpec, TilingConfig, dataset_config
from manifests.tile_index import read_tile_index
from segmenter.cli import app as segmenter_app
from segmenter.data.prepare import prepare_tiles
from segmenter.data.raster_io import read_crop, three_bands
from tests.data.isprs.generate import VAIHINGEN_FULL, make_vaihingen

CLASSES = [ClassSpec(name="water", color=(0, 0, 255)), ClassSpec(name="land", color=(0, 255, 0))]


def folder_dataset(root: Path, images: dict[str, np.ndarray], masks: dict[str, np.ndarray], split: str = "train"):
    """A ``folder`` dataset with the given image and mask files (name -> pixels) in one split."""
    for kind, files in (("images", images), ("masks", masks)):
        (root / split / kind).mkdir(parents=True, exist_ok=True)
        for name, pixels in files.items():
            Image.fromarray(pixels).save(root / split / kind / name)
    return dataset_config(name="folder", root=root, classes=CLASSES)


def half_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width, 3), np.uint8)
    mask[:, : width // 2] = (0, 0, 255)
    mask[:, width // 2 :] = (0, 255, 0)
    return mask


@pytest.mark.slow  # imports torch and builds a tiny model before the check: ~20 s on a busy 2-core machine
def test_train_refuses_an_index_with_unlabelled_train_tiles(tmp_path):
    from segmenter.engine.train import TrainSettings, train

    dataset = folder_dataset(
        tmp_path / "f", {"a.png": np.full((32, 32, 3), 9, np.uint8), "new.png": np.zeros((32, 32, 3), np.uint8)},
        {"a.png": half_mask(32, 32)},
    )  # fmt: skip
    result = prepare_tiles(dataset, TilingConfig(size=32, out=tmp_path / "tiles"))  # captioning new imagery: fine
    assert [report.labelled for report in result.sources] == [True, False]
    [line] = [line for line in result.warnings if line.startswith("1 of 2 source(s) have no label: ")]
    assert "new" in line and "captioning and prediction only" in line
    manifest = tmp_path / "run.yaml"
    manifest.write_text(
        f"name: t\ndataset: {{name: folder, root: {tmp_path / 'f'}, classes: [{{name: water, color: [0, 0, 255]}}, "
        f"{{name: land, color: [0, 255, 0]}}]}}\ntiling: {{size: 32, out: {tmp_path / 'tiles'}}}\n"
    )
    settings = TrainSettings(preset="test_tiny_notext", steps=1, batch_size=1)
    with pytest.raises(InputError, match=r"tile folder/train/new/0000_0000 \(and 0 more\) of split 'train' has no "
                       r"label \(sources without a mask: train/new\); give them their masks, or prepare with "
                       r"--train listing the labelled sources only$"):  # fmt: skip
        train(manifest, tmp_path / "run", settings)


def test_a_source_smaller_than_the_tile_is_padded_and_said(tmp_path):
    image = np.arange(20 * 30 * 3, dtype=np.uint32).reshape(20, 30, 3).astype(np.uint8)
    dataset = folder_dataset(tmp_path / "f", {"s.png": image}, {"s.png": half_mask(20, 30)})
    result = prepare_tiles(dataset, TilingConfig(size=32, out=tmp_path / "tiles"))
    index = read_tile_index(result.index_path)
    (row,) = index.frame.itertuples()
    assert (row.height, row.width) == (20, 30)  # the real extent in the source
    crop, label = read_crop(index.path(row.image_path)), read_crop(index.path(row.label_path))
    assert crop.shape == (32, 32, 3) and label.shape == (32, 32)
    np.testing.assert_array_equal(crop[:20, :30], image)
    assert not crop[20:].any() and not crop[:, 30:].any()
    assert set(np.unique(label[20:])) == {255} and set(np.unique(label[:, 30:])) == {255}
    assert set(np.unique(label[:20, :30])) == {0, 1}
    assert row.class_fractions.tolist() == [0.5, 0.5]  # the padding is not counted
    assert result.warnings == [
        "1 source(s) smaller than the 32 px tile: train/s (30 x 20 px); their crops were padded to 32 x 32 px with "
        "black pixels and the ignore index in the labels (width/height in the index give the real extent)"
    ]


def test_a_source_with_more_than_three_bands_keeps_them_and_is_said_once(tmp_path):
    rgbn = np.random.default_rng(0).integers(0, 255, (32, 32, 4), dtype=np.uint8)
    images = {"a.png": rgbn, "b.png": rgbn}
    dataset = folder_dataset(tmp_path / "f", images, {name: half_mask(32, 32) for name in images})
    result = prepare_tiles(dataset, TilingConfig(size=32, out=tmp_path / "tiles"))
    crop = read_crop(read_tile_index(result.index_path).path(read_tile_index(result.index_path).frame["image_path"][0]))
    np.testing.assert_array_equal(crop, rgbn)
    assert result.warnings == [
        "2 source(s) with more than 3 bands: train/a (4 bands), train/b (4 bands); their crops keep every band (TIFF), "
        "the segmenter and the caption experts read bands 1-3 as RGB"
    ]


def test_a_single_band_image_is_expanded_to_three_equal_bands(tmp_path):
    grey = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    dataset = folder_dataset(tmp_path / "f", {"g.png": grey}, {"g.png": half_mask(32, 32)})
    index = read_tile_index(prepare_tiles(dataset, TilingConfig(size=32, out=tmp_path / "tiles")).index_path)
    crop = read_crop(index.path(index.frame["image_path"].iloc[0]))
    assert crop.shape == (32, 32, 3)
    for band in range(3):
        np.testing.assert_array_equal(crop[..., band], grey)


@pytest.mark.parametrize(
    ("shape", "expected"), [((4, 5), (4, 5, 3)), ((4, 5, 1), (4, 5, 3)), ((4, 5, 2), (4, 5, 3)), ((4, 5, 4), (4, 5, 4))]
)
def test_three_bands_is_the_one_rule(shape, expected):
    image = np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)
    out = three_bands(image)
    assert out.shape == expected
    first = image if image.ndim == 2 else image[..., 0]
    np.testing.assert_array_equal(out[..., 0], first)
    if shape[-1] < 3 or len(shape) == 2:
        np.testing.assert_array_equal(out[..., 1], first)
        np.testing.assert_array_equal(out[..., 2], first)


def _corrupt_zip_member(tmp_path: Path) -> tuple[Path, str]:
    """A Vaihingen release whose label archive has one member with a flipped byte (bad CRC / deflate stream)."""
    root = make_vaihingen(tmp_path / "v", ids=["1", "3"])
    archive = root / f"{VAIHINGEN_FULL}.zip"
    with zipfile.ZipFile(archive) as opened:
        info = opened.getinfo("top_mosaic_09cm_area3.tif")
    data = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    return root, f"{archive}!top_mosaic_09cm_area3.tif: cannot be read from the archive"


def _truncated_tiled_tiff(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "f"
    folder_dataset(root, {}, {"cut.png": half_mask(64, 64)})
    buffer = io.BytesIO()
    pixels = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    tifffile.imwrite(buffer, pixels, tile=(16, 16), compression="zlib")
    (root / "train" / "images" / "cut.tif").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return root, f"{root / 'train' / 'images' / 'cut.tif'}: not a readable raster"


def _non_utf8_name(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "f"
    folder_dataset(root, {"ok.png": np.zeros((32, 32, 3), np.uint8)}, {})
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as an old archiver writes them
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "images" / name)
    return root, f"{root / 'train' / 'images'}/caf\\xe9.png: the file name is not valid UTF-8"


def _same_stem(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "f"
    folder_dataset(root, {"s1.png": np.zeros((32, 32, 3), np.uint8), "s1.jpg": np.zeros((32, 32, 3), np.uint8)}, {})
    return root, f"{root / 'train' / 'images'}: s1.jpg and s1.png share the stem 's1'"


FOLDER = "{{name: folder, root: {root}, classes: [{{name: water, color: [0, 0, 255]}}]{extra}}}"


@pytest.mark.parametrize(
    ("make", "dataset"),
    [
        (_corrupt_zip_member, "{{name: vaihingen, root: {root}, split: custom, custom_splits: {{train: [1, 3]}}}}"),
        (_truncated_tiled_tiff, FOLDER),
        (_non_utf8_name, FOLDER),
        (_same_stem, FOLDER),
    ],
    ids=["corrupt-zip-member", "truncated-tiled-tiff", "non-utf8-name", "same-stem"],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, make, dataset):
    root, message = make(tmp_path)
    manifest = tmp_path / "run.yaml"
    section = dataset.format(root=root, extra="")
    manifest.write_text(f"name: t\ndataset: {section}\ntiling: {{size: 32, out: {tmp_path / 'tiles'}}}\n")
    result = CliRunner().invoke(segmenter_app, ["prepare", "--manifest", str(manifest)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), result.output
    assert not any((tmp_path / "tiles").glob("crops-*/images/*/*"))  # refused before anything was cut


def test_an_ignore_index_that_is_a_class_index_is_refused(tmp_path):
    dataset = folder_dataset(tmp_path / "f", {"a.png": np.zeros((32, 32, 3), np.uint8)}, {})
    dataset = dataset.model_copy(update={"ignore_index": 1})
    with pytest.raises(InputError, match=r"^dataset.ignore_index: 1 is also the index of class 'land'"):
        prepare_tiles(dataset, TilingConfig(size=32, out=tmp_path / "tiles"))


@pytest.mark.slow  # trains a tiny model for one step
def test_a_dataset_without_eroded_labels_is_evaluated_and_named_on_its_full_labels(tmp_path, capsys):
    from segmenter.engine.evaluate import evaluate
    from segmenter.engine.train import TrainSettings, train

    for split in ("train", "test"):
        folder_dataset(
            tmp_path / "f", {"a.png": np.full((64, 64, 3), 9, np.uint8)}, {"a.png": half_mask(64, 64)}, split
        )
    dataset = dataset_config(name="folder", root=tmp_path / "f", classes=CLASSES)
    prepare_tiles(dataset, TilingConfig(size=64, out=tmp_path / "tiles"))
    manifest = tmp_path / "run.yaml"
    manifest.write_text(
        f"name: t\ndataset: {{name: folder, root: {tmp_path / 'f'}, classes: [{{name: water, color: [0, 0, 255]}}, "
        f"{{name: land, color: [0, 255, 0]}}]}}\ntiling: {{size: 64, out: {tmp_path / 'tiles'}}}\n"
    )
    train(manifest, tmp_path / "run", TrainSettings(preset="test_tiny_notext", steps=1, batch_size=1))
    capsys.readouterr()
    evaluate(tmp_path / "run", split="test")  # --gt eroded, the default
    assert "folder has no eroded ground truth; evaluating against its full labels" in capsys.readouterr().out
    assert (tmp_path / "run" / "eval_test_full").is_dir() and not (tmp_path / "run" / "eval_test_eroded").exists()
