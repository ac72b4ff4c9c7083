"""Every TIFF a user has is read through the one reader (GDAL), and a source has a pixel budget: one line refuses a
larger one before it is decoded, and ``prepare`` reads a large source by rows of tiles, its memory set by the tile
and the source's width, not its area."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from typer.testing import CliRunner

from manifests.run_manifest import ClassSpec, TilingConfig, dataset_config
from manifests.tile_index import read_tile_index
from segmenter.cli import app as segmenter_app
from segmenter.data.datasets.files import SourceFile
from segmenter.data.prepare import prepare_tiles
from segmenter.data.raster_io import read_crop
from segmenter.data.windowed_read import open_windows, read_raster

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 70, 90


def write_tiff(path: Path, pixels: np.ndarray, **profile) -> Path:
    """A TIFF written by GDAL with the given creation options (compression, tiling, BigTIFF)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", height=pixels.shape[0], width=pixels.shape[1],
                           count=pixels.shape[2], dtype=pixels.dtype.name, **profile) as sink:  # fmt: skip
            sink.write(np.moveaxis(pixels, -1, 0))
    return path


def smooth_image() -> np.ndarray:
    """Gradients, so that a lossy JPEG-in-TIFF stays close to them."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.stack([x * 2, y * 3, (x + y)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize(
    "profile",
    [
        {"compress": "lzw"},
        {"compress": "lzw", "predictor": 2},
        {"compress": "deflate", "tiled": True, "blockxsize": 32, "blockysize": 32},
        {"compress": "packbits"},
        {"compress": "zstd", "tiled": True, "blockxsize": 16, "blockysize": 16},
        {"compress": "lzw", "BIGTIFF": "YES"},
        {"compress": "deflate", "BIGTIFF": "YES", "tiled": True, "blockxsize": 16, "blockysize": 16},
        {"compress": "lzw", "interleave": "band"},
        {"compress": "jpeg", "tiled": True, "blockxsize": 32, "blockysize": 32},
        {"compress": "jpeg", "photometric": "ycbcr"},
    ],
    ids=["lzw-striped", "lzw-predictor", "deflate-tiled", "packbits", "zstd-tiled", "bigtiff-lzw",
         "bigtiff-deflate-tiled", "lzw-planar", "jpeg-tiled", "jpeg-ycbcr"],
)  # fmt: skip
def test_every_tiff_compression_is_read_whole_and_by_windows(tmp_path, profile):
    image = smooth_image()
    path = write_tiff(tmp_path / "scene.tif", image, **profile)
    whole = read_raster(SourceFile(path))
    if profile["compress"] == "jpeg":  # lossy: close to the pixels written
        assert whole.shape == image.shape and np.abs(whole.astype(int) - image).mean() < 2
    else:
        np.testing.assert_array_equal(whole, image)
    with open_windows(SourceFile(path)) as reader:
        np.testing.assert_array_equal(reader.read(13, 21, 40, 50), whole[13:53, 21:71])


def test_prepare_reads_lzw_and_jpeg_tiffs_in_a_folder_dataset(tmp_path):
    """The issue's case: an LZW TIFF (GDAL's usual choice) failed with "requires the 'imagecodecs' package"."""
    image = smooth_image()
    mask = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    mask[:, WIDTH // 2 :] = (0, 255, 0)
    root = tmp_path / "f"
    write_tiff(root / "train" / "images" / "lzw.tif", image, compress="lzw")
    write_tiff(root / "train" / "images" / "jpg.tif", image, compress="jpeg")
    for name in ("lzw", "jpg"):
        write_tiff(root / "train" / "masks" / f"{name}.tif", mask, compress="lzw", tiled=True, blockxsize=16,
                   blockysize=16)  # fmt: skip
    classes = [ClassSpec(name="bare", color=(0, 0, 0)), ClassSpec(name="green", color=(0, 255, 0))]
    result = prepare_tiles(dataset_config(name="folder", root=root, classes=classes),
                           TilingConfig(size=32, stride=24, out=tmp_path / "t"))  # fmt: skip
    index = read_tile_index(result.index_path)
    for row in index.frame.itertuples():
        window = (slice(row.y, row.y + row.height), slice(row.x, row.x + row.width))
        crop = read_crop(index.path(row.image_path))
        if row.source_id == "train/lzw":
            np.testing.assert_array_equal(crop, image[window])
        else:
            assert np.abs(crop.astype(int) - image[window]).mean() < 2
        np.testing.assert_array_equal(
            read_crop(index.path(row.label_path)), (mask[window][..., 1] > 0).astype(np.uint8)
        )


def test_a_source_over_the_pixel_budget_is_refused_in_one_line_before_it_is_decoded(tmp_path):
    """A 20000 x 20000 PNG of 48 KB stopped prepare with Pillow's DecompressionBombError traceback."""
    root = tmp_path / "f"
    (root / "train" / "images").mkdir(parents=True)
    Image.new("1", (20000, 20000)).save(root / "train" / "images" / "huge.png")
    args = ["prepare", "--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "t"), "--classes",
            "a=#00ff00", "--max-pixels", "100000000"]  # fmt: skip
    result = CliRunner().invoke(segmenter_app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert line == (
        f"error: {root / 'train' / 'images' / 'huge.png'}: 20000 x 20000 px (400,000,000 pixels) is over the pixel "
        "budget of 100,000,000 (tiling.max_pixels, --max-pixels); raise it if the source is meant to be this large"
    )
    assert not any((tmp_path / "t").glob("crops-*/images/*/*"))


_PEAK = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from manifests.run_manifest import ClassSpec, TilingConfig, dataset_config
    from segmenter.data.prepare import prepare_tiles

    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    classes = [ClassSpec(name="bare", color=(0, 0, 0)), ClassSpec(name="green", color=(0, 255, 0))]
    result = prepare_tiles(dataset_config(name="folder", root=root, classes=classes), TilingConfig(size=512, out=out))
    print(json.dumps({"tiles": result.n_tiles, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """
)


def _prepare_peak(root: Path, out: Path) -> dict:
    """Prepare a folder dataset in a fresh process: its tiles and its peak resident memory (KiB)."""
    done = subprocess.run([sys.executable, "-c", _PEAK, str(root), str(out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _scene(root: Path, height: int, width: int) -> None:
    """A folder dataset of one tiled, compressed RGB scene and its colour mask."""
    image = np.broadcast_to(np.arange(width, dtype=np.uint8) % 251, (height, width))
    pixels = np.stack([image, image.T[:height, :width] if height == width else image, image], axis=-1)
    mask = np.zeros((height, width, 3), np.uint8)
    mask[:, : width // 2, 1] = 255
    tiled = {"compress": "deflate", "tiled": True, "blockxsize": 256, "blockysize": 256}
    write_tiff(root / "train" / "images" / "scene.tif", np.ascontiguousarray(pixels), **tiled)
    write_tiff(root / "train" / "masks" / "scene.tif", mask, **tiled)


@pytest.mark.slow  # two fresh processes and a 16384 x 2048 scene cut into 64 crops: ~20 s on the 2-core machine
def test_prepare_memory_follows_the_tile_not_the_source(tmp_path):
    """Peak memory over a small scene's: a whole read of this 16384 x 2048 scene (image and mask) and its decoding
    take over 1 GB more; rows of 512 px tiles, the band of one row (2048 px wide) and the block cache."""
    _scene(tmp_path / "small", 512, 512)
    _scene(tmp_path / "large", 16384, 2048)
    small = _prepare_peak(tmp_path / "small", tmp_path / "ts")
    large = _prepare_peak(tmp_path / "large", tmp_path / "tl")
    assert (small["tiles"], large["tiles"]) == (1, 128)
    extra_mb = (large["peak_kb"] - small["peak_kb"]) / 1024
    assert extra_mb < 250, f"prepare of the large scene took {extra_mb:.0f} MB more than of the small one"
