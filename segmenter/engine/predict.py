"""``segmenter predict``: class maps of new images, or predicted class fractions for every tile of an index.

Images: class-index GeoTIFFs that keep the source's georeferencing, plus colour PNGs. Index: the predicted-tile
classes contract (``manifests/class_predictions.py``), which prompts read where a split's class source is
``predictions``, with one predicted class-mask PNG per tile for the ``annotation`` expert.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from PIL import Image

from manifests.atomic import atomic_path
from manifests.class_predictions import write_class_predictions
from manifests.errors import InputError
from manifests.tile_index import make_tile_id, read_tile_index
from segmenter.data.datasets.labels import encode_rgb_mask
from segmenter.data.raster_io import array_sha256, read_crop, three_bands, write_crop
from segmenter.data.tiling import tile_grid
from segmenter.data.windowed_read import WindowReader, open_image_windows
from segmenter.engine.inference import (
    CaptionWindows,
    LocalWeights,
    TrainedRun,
    check_batch_size,
    default_batch_size,
    open_run,
    sliding_window_classes,
    tile_classes,
)
from segmenter.engine.options import MissingCaptions, Scale, parse_choice
from segmenter.text.features import ExpertTextFeatures

SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def image_files(inputs: list[Path]) -> list[Path]:
    """The image files of ``--images`` (files, and the images directly in folders), each once.

    Outputs are named by the image's stem (``<stem>.tif``, ``<stem>_color.png``, ``<stem>_captions.csv``), so two
    images with one stem (``a.tif`` and ``a.png``, or ``a.tif`` in two folders) are refused before anything runs:
    the second would overwrite the first's outputs. Stems are compared ignoring case, as on macOS and Windows.

    Raises:
        InputError: a path that does not exist, no image at all, or two images with the same stem.
    """
    files: dict[Path, Path] = {}  # resolved -> as given: a file named twice (or in a folder also named) runs once
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in SUFFIXES)
        elif item.is_file():
            found = [item]
        else:
            raise InputError(f"--images: {item} not found")
        for path in found:
            files.setdefault(path.resolve(), path)
    if not files:
        raise InputError("--images: no image files found")
    by_stem: dict[str, Path] = {}
    for path in files.values():
        other = by_stem.setdefault(path.stem.casefold(), path)
        if other is not path:
            raise InputError(
                f"--images: {other} and {path} have the same stem, so their outputs ({path.stem}.tif, "
                f"{path.stem}_color.png) would overwrite each other; rename one or predict them into separate --out "
                "folders"
            )
    return list(files.values())


def _captioned_tiles_by_pixels(text: ExpertTextFeatures) -> dict[str, str]:
    """Pixel hash -> tile id of every tile with a selected caption of the run's experts."""
    rows = text.rows[text.rows["image_sha256"].notna()]
    return dict(zip(rows["image_sha256"], rows["tile_id"], strict=True))


def _captioned_windows(
    image: WindowReader, trained: TrainedRun, by_pixels: dict[str, str], named: set[str], prefix: str, stem: str
) -> pd.DataFrame:
    """The windows of the tile grid whose captions a store holds. A window is matched to a captioned tile by its
    pixels (the ``image_sha256`` that ``prepare`` recorded), whatever the file or tile is called; failing that, by
    the tile id ``<dataset>/<image stem>/<y>_<x>``."""
    found = []
    for y, x, h, w in tile_grid(image.height, image.width, trained.tile_size, trained.tile_stride):
        tile_id = by_pixels.get(array_sha256(three_bands(image.read(y, x, h, w))))  # as prepare cut the tiles
        if tile_id is None and make_tile_id(prefix, stem, y, x) in named:
            tile_id = make_tile_id(prefix, stem, y, x)
        if tile_id is not None:
            found.append({"tile_id": tile_id, "y": y, "x": x, "height": h, "width": w})
    return pd.DataFrame(found, columns=["tile_id", "y", "x", "height", "width"])


def predict(
    run: str | Path,
    inputs: list[Path],
    out: Path,
    captions: Path | None = None,
    window: int | None = None,
    overlap: float | None = None,
    device: str = "auto",
    missing_captions: str = MissingCaptions.error,
    scale: str = Scale.none,
    batch_size: int | None = None,
    weights: LocalWeights | None = None,
) -> list[Path]:
    """Predict every image; returns the GeoTIFFs written. An image that is not 8-bit is refused unless ``scale``
    (``minmax`` or ``percentile``) says how to stretch it (:func:`segmenter.data.raster_io.to_uint8`).

    A text-guided model's windows are the tile grid; each reads the captions of the store's tile with the same pixels
    (or, failing that, of tile ``<dataset>/<image stem>/<y>_<x>``), recorded in ``<stem>_captions.csv``; without a
    store, or for windows no captioned tile matches, every expert is masked, and that is printed. ``device``:
    ``auto`` (the GPU when there is one) or a torch device name; ``batch_size``: windows per forward (default
    8). 8-bit GeoTIFFs are read by windows (:func:`segmenter.data.windowed_read.open_image_windows`).
    """
    check_batch_size(batch_size)
    missing_captions = parse_choice(MissingCaptions, missing_captions, "--missing-captions")
    scale = parse_choice(Scale, scale, "--scale")
    trained = open_run(run, device, weights)
    files = image_files(inputs)  # refused before anything is written
    window = trained.window(window)
    stride = trained.stride(window, overlap)
    guided = trained.model.config.uses_text
    text = trained.text_features(captions, missing_captions) if guided and captions is not None else None
    if guided and captions is None:
        print(f"no --captions: every expert of {trained.model.config.experts} is masked on every window")
    prefix = trained.manifest.dataset.tile_prefix
    by_pixels = _captioned_tiles_by_pixels(text) if text is not None else {}
    written = []
    for path in files:
        with open_image_windows(path, scale) as (image, profile):
            if image.bands > 3:  # RGBIR orthophotos: the backbone was trained on, and reads, the first three
                print(f"note: {path.name}: {image.bands} bands; the model reads bands 1-3 (as RGB) and ignores the "
                      "others")  # fmt: skip
            lookup = None
            if text is not None:
                tiles = _captioned_windows(image, trained, by_pixels, set(text.features), prefix, path.stem)
                lookup = CaptionWindows(path.stem, tiles, text)
            classes = sliding_window_classes(
                trained.model, image, window, 0.0, lookup, trained.device, stride=stride, batch_size=batch_size
            )
        if lookup is not None:
            used = pd.DataFrame(lookup.used)
            with atomic_path(out / f"{path.stem}_captions.csv") as tmp:
                used.to_csv(tmp, index=False)
            read = int(used["caption_tile_id"].notna().sum())
            print(f"{path.name}: {read} of {len(used)} windows read captions from {captions} (per window: "
                  f"{path.stem}_captions.csv)")  # fmt: skip
            if read == 0:
                print(f"warning: {path.name}: no window matched a captioned tile of {captions} by its pixels or its "
                      f"tile id; every expert was masked (caption tiles cut from this image with tile size "
                      f"{trained.tile_size} and stride {trained.tile_stride})")  # fmt: skip
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


def predict_index(
    run: str | Path,
    index_path: str | Path,
    predictions: str | Path,
    splits: list[str] | None = None,
    device: str = "auto",
    on_tile=None,
    batch_size: int | None = None,
    weights: LocalWeights | None = None,
) -> Path:
    """Predicted class fractions and class masks of every tile of an index (or of ``splits``), written as the
    predicted-tile-classes contract to ``predictions``, with the masks in ``<stem>_masks/`` beside it. Each tile is
    one window; ``batch_size`` tiles go through the model at once (default 8).

    Raises:
        InputError: a text-guided run (its captions would have to exist before the predictions they feed), an
            index made for other classes, an unknown split.
    """
    check_batch_size(batch_size)
    trained = open_run(run, device, weights)
    model = trained.model
    if model.config.uses_text:
        raise InputError(
            f"--run: {run} is text-guided ({model.config.name}); tile class predictions feed the prompts, so they "
            "come from a text-free model (e.g. a *_notext preset)"
        )
    index = read_tile_index(index_path)
    if index.class_names != trained.index.class_names:
        raise InputError(
            f"--index: {index.root} has classes {index.class_names}, run {run} predicts {trained.index.class_names}"
        )
    frame = index.frame
    if splits:
        unknown = sorted(set(splits) - set(frame["split"]))
        if unknown:
            raise InputError(
                f"--split: {unknown} not in tile index {index.root} (it has {sorted(set(frame['split']))})"
            )
        frame = frame[frame["split"].isin(splits)]
    predictions = Path(predictions)
    mask_dir = f"{predictions.stem}_masks"
    run_id = Path(run).resolve().name
    rows = []
    num_classes = len(index.class_names)
    tiles = list(frame.itertuples(index=False))
    chunk = batch_size or default_batch_size(trained.device)
    for start in range(0, len(tiles), chunk):
        group = tiles[start : start + chunk]
        images = [three_bands(np.array(read_crop(index.path(row.image_path)))) for row in group]
        for done, (row, classes) in enumerate(
            zip(group, tile_classes(model, images, trained.device, chunk), strict=True), start + 1
        ):
            relative = f"{mask_dir}/{row.tile_id}.png"
            write_crop(predictions.parent / relative, classes)
            fractions = np.bincount(classes.ravel(), minlength=num_classes)[:num_classes] / classes.size
            rows.append({"tile_id": row.tile_id, "class_fractions": fractions.astype(np.float32).tolist(),
                         "mask_path": relative, "run_id": run_id, "model": model.config.name})  # fmt: skip
            if on_tile:
                on_tile(done, len(frame), row.tile_id)
    return write_class_predictions(predictions, rows, index.class_names, index.ignore_index)
