"""Batched sliding-window inference and windowed reads give what the one-window loop and a whole read give."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from typer.testing import CliRunner

from manifests.devices import resolve_device
from manifests.errors import InputError
from segmenter.cli import app
from segmenter.data.datasets.files import SourceFile
from segmenter.data.tiling import tile_grid
from segmenter.data.windowed_read import RasterWindows, open_image_windows, open_windows, read_raster
from segmenter.engine.inference import (
    SlidingWindows,
    default_batch_size,
    sliding_window_classes,
    sliding_window_logits,
    tile_classes,
)
from segmenter.engine.window_captions import CaptionWindows
from segmenter.model import build_model
from tests.helpers import assert_same_classes

EXPERTS = ["alpha", "beta", "gamma"]
# 150 x 110 is no multiple of the 64 px window: the last row and column of windows are aligned to the border and
# overlap their neighbours by other amounts than the 50% stride does.
HEIGHT, WIDTH, WINDOW, OVERLAP = 150, 110, 64, 0.5


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded 2-core machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(bands: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(HEIGHT, WIDTH, bands), dtype=np.uint8)


class _TileText:
    """Per-tile expert features, as :class:`ExpertTextFeatures` looks them up: each tile its own, some masked."""

    def __init__(self, tile_ids: list[str], dim: int) -> None:
        self.experts = EXPERTS
        generator = torch.Generator().manual_seed(1)
        self.features = {tile: torch.randn(len(EXPERTS), dim, generator=generator) for tile in tile_ids}
        self.present = {tile: torch.tensor([True, i % 3 != 1, i % 2 == 0]) for i, tile in enumerate(tile_ids)}

    def lookup(self, tile_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[tile_id], self.present[tile_id]


def _caption_windows(dim: int) -> CaptionWindows:
    """Captioned tiles on the window grid of the test image, each with its own caption features."""
    grid = tile_grid(HEIGHT, WIDTH, WINDOW, round(WINDOW * (1 - OVERLAP)))
    tiles = pd.DataFrame(
        [{"tile_id": f"demo/scene/{y}_{x}", "y": y, "x": x, "height": h, "width": w} for y, x, h, w in grid]
    )
    return CaptionWindows("scene", tiles, _TileText(tiles["tile_id"].tolist(), dim))


def test_batched_text_free_windows_equal_the_one_window_loop():
    torch.manual_seed(0)
    model = build_model("test_tiny_notext").eval()
    image = _image()
    single = sliding_window_logits(model, image, SlidingWindows(WINDOW, OVERLAP, batch_size=1))
    batched = sliding_window_logits(model, image, SlidingWindows(WINDOW, OVERLAP, batch_size=4))
    assert single.shape == (6, HEIGHT, WIDTH)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    # The banded class map (never the whole logits) is the argmax of the same logits.
    classes = sliding_window_classes(model, image, SlidingWindows(WINDOW, OVERLAP, batch_size=3))
    assert classes.dtype == np.uint8
    assert_same_classes(classes, single)


def test_batched_whole_tiles_equal_one_tile_per_forward():
    """``predict --index``: tiles of one size share a forward; a tile of another size runs on its own."""
    torch.manual_seed(0)
    model = build_model("test_tiny_notext").eval()
    tiles = [_image(seed=seed)[:64, :48] for seed in range(5)]
    tiles.insert(2, _image(seed=9)[:40, :40])
    batched = tile_classes(model, tiles, "cpu", batch_size=4)
    for tile, classes in zip(tiles, batched, strict=True):
        single = sliding_window_logits(model, tile, SlidingWindows(max(tile.shape[:2]), 0.0, batch_size=1))
        assert classes.shape == tile.shape[:2]
        assert_same_classes(classes, single)


def test_batched_text_guided_windows_each_read_their_own_caption():
    torch.manual_seed(0)
    model = build_model("test_tiny", experts=EXPERTS).eval()
    with torch.no_grad():  # at initialisation the text barely moves the logits (1e-4): make its effect visible
        for parameter in [*model.dmte.parameters(), *model.lqga.parameters()]:
            parameter.normal_(0, 0.5)
    image = _image()
    one, four = _caption_windows(model.config.text_dim), _caption_windows(model.config.text_dim)
    single = sliding_window_logits(model, image, SlidingWindows(WINDOW, OVERLAP, batch_size=1), one)
    batched = sliding_window_logits(model, image, SlidingWindows(WINDOW, OVERLAP, batch_size=4), four)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    assert one.used == four.used and all(window["on_captioned_grid"] for window in four.used)
    # The captions matter to this model: one caption for every window gives other logits, so the equality above
    # shows each window of a batch got its own.
    same = _caption_windows(model.config.text_dim)
    first = same.text.lookup(same.tiles["tile_id"].iloc[0])
    shared = sliding_window_logits(model, image, SlidingWindows(WINDOW, OVERLAP, batch_size=4), lambda *_: first)
    assert (shared - single).abs().max() > 1e-3
    classes = sliding_window_classes(
        model, image, SlidingWindows(WINDOW, OVERLAP, batch_size=4), _caption_windows(model.config.text_dim)
    )
    assert_same_classes(classes, single)


def _write_tiled_geotiff(path: Path, image: np.ndarray) -> None:
    height, width, bands = image.shape
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=bands, dtype="uint8",
                       tiled=True, blockxsize=32, blockysize=32, compress="deflate") as sink:  # fmt: skip
        sink.write(np.moveaxis(image, -1, 0))


def test_windowed_reads_of_a_tiled_geotiff_give_the_whole_read_pixels(tmp_path):
    image = _image(bands=4)
    path = tmp_path / "scene.tif"
    _write_tiled_geotiff(path, image)
    with zipfile.ZipFile(tmp_path / "archive.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(path, "top/scene.tif")
    for file in (SourceFile(path), SourceFile(tmp_path / "archive.zip", "top/scene.tif")):
        whole = read_raster(file)
        assert np.array_equal(whole, image)
        with open_windows(file) as reader:
            assert isinstance(reader, RasterWindows) and (reader.height, reader.width, reader.bands) == (150, 110, 4)
            for y, x, h, w in [*tile_grid(HEIGHT, WIDTH, WINDOW, 40), (0, 0, HEIGHT, WIDTH), (149, 109, 1, 1)]:
                assert np.array_equal(reader.read(y, x, h, w), whole[y : y + h, x : x + w]), (file, y, x)
    with open_image_windows(path, "none") as (reader, profile):
        assert isinstance(reader, RasterWindows) and set(profile) == {"crs", "transform"}
        torch.manual_seed(0)
        model = build_model("test_tiny_notext").eval()
        from_file = sliding_window_logits(model, reader, SlidingWindows(WINDOW, OVERLAP, batch_size=4))
    torch.testing.assert_close(
        from_file, sliding_window_logits(model, image, SlidingWindows(WINDOW, OVERLAP, batch_size=1))
    )


def test_png_is_read_by_windows_and_non_8_bit_images_whole(tmp_path):
    from PIL import Image

    Image.fromarray(_image()).save(tmp_path / "scene.png")
    with open_image_windows(tmp_path / "scene.png", "none") as (reader, _):
        assert isinstance(reader, RasterWindows) and np.array_equal(reader.read(10, 20, 5, 6), _image()[10:15, 20:26])
    deep = tmp_path / "deep.tif"
    with rasterio.open(deep, "w", driver="GTiff", height=8, width=8, count=3, dtype="uint16") as sink:
        sink.write(np.full((3, 8, 8), 1000, np.uint16))
    with pytest.raises(InputError, match="--scale"), open_image_windows(deep, "none"):
        pass


def test_device_auto_picks_the_cpu_here_and_its_default_batch():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    device = resolve_device("auto")
    assert device == torch.device("cpu") and default_batch_size(device) == 8
    assert default_batch_size(torch.device("cuda", 0)) == 8


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_batch_size_zero_is_refused(command, tmp_path):
    extra = ["--images", str(tmp_path), "--out", str(tmp_path / "out")] if command == "predict" else []
    result = CliRunner().invoke(app, [command, "--run", str(tmp_path), "--batch-size", "0", *extra])
    assert result.exit_code == 2 and "--batch-size" in result.output and "got 0" in result.output
    model = build_model("test_tiny_notext").eval()
    with pytest.raises(InputError, match="--batch-size"):
        sliding_window_logits(model, _image(), SlidingWindows(WINDOW, batch_size=0))
