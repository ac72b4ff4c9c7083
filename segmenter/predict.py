"""``segmenter predict``: class-index GeoTIFFs that keep the source's georeferencing, plus colour PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from PIL import Image

from manifests.atomic import atomic_path
from manifests.errors import InputError
from segmenter.datasets.labels import encode_rgb_mask
from segmenter.inference import open_run, sliding_window_logits
from segmenter.text.features import ExpertTextFeatures

SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def image_files(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise InputError(f"--images: {item} not found")
    if not files:
        raise InputError("--images: no image files found")
    return files


def tile_text(text: ExpertTextFeatures | None, prefix: str, stem: str):
    """Text of the captioned tile ``<prefix>/<stem>/<y>_<x>`` a window starts on, if the store has it."""
    if text is None:
        return None

    def lookup(y: int, x: int, h: int, w: int):
        tile_id = f"{prefix}/{stem}/{y:04d}_{x:04d}"
        return text.lookup(tile_id) if tile_id in text.features else None

    return lookup


def predict(
    run: str | Path,
    inputs: list[Path],
    out: Path,
    captions: Path | None = None,
    window: int | None = None,
    overlap: float = 0.25,
    device: str = "cpu",
) -> list[Path]:
    """Predict every image; returns the GeoTIFFs written. Without ``captions`` the experts are masked."""
    trained = open_run(run, device)
    window = trained.window(window)
    text = trained.text_features(captions) if captions is not None else None
    prefix = trained.manifest.dataset.tile_prefix
    written = []
    for path in image_files(inputs):
        try:
            with rasterio.open(path) as source:
                pixels = source.read()
                profile = {"crs": source.crs, "transform": source.transform}
        except rasterio.errors.RasterioIOError as exc:
            raise InputError(f"{path}: not a readable raster ({exc})") from None
        image = np.moveaxis(pixels, 0, -1)
        if image.shape[-1] < 3:
            image = np.repeat(image[..., :1], 3, axis=-1)
        lookup = tile_text(text, prefix, path.stem)
        classes = (
            sliding_window_logits(trained.model, image, window, overlap, lookup, device)
            .argmax(0)
            .numpy()
            .astype(np.uint8)
        )
        target = out / f"{path.stem}.tif"
        options = {"driver": "GTiff", "height": classes.shape[0], "width": classes.shape[1], "count": 1,
                   "dtype": "uint8", "compress": "deflate", **profile}  # fmt: skip
        with atomic_path(target) as tmp, rasterio.open(tmp, "w", **options) as sink:
            sink.write(classes, 1)
        with atomic_path(out / f"{path.stem}_color.png") as tmp:
            Image.fromarray(encode_rgb_mask(classes, tuple(trained.index.palette), trained.index.ignore_index)).save(
                tmp, format="PNG"
            )
        written.append(target)
    return written
