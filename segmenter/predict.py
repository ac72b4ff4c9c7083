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
from segmenter.datasets.labels import encode_rgb_mask
from segmenter.inference import CaptionWindows, TrainedRun, open_run, sliding_window_logits
from segmenter.options import MissingCaptions, Scale, parse_choice
from segmenter.raster_io import array_sha256, read_crop, to_uint8, write_crop
from segmenter.text.features import ExpertTextFeatures
from segmenter.tiling import tile_grid

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


def _captioned_tiles_by_pixels(text: ExpertTextFeatures) -> dict[str, str]:
    """Pixel hash -> tile id of every tile with a selected caption of the run's experts."""
    rows = text.rows[text.rows["image_sha256"].notna()]
    return dict(zip(rows["image_sha256"], rows["tile_id"], strict=True))


def _captioned_windows(
    image: np.ndarray, trained: TrainedRun, by_pixels: dict[str, str], named: set[str], prefix: str, stem: str
) -> pd.DataFrame:
    """The windows of the tile grid whose captions a store holds. A window is matched to a captioned tile by its
    pixels (the ``image_sha256`` that ``prepare`` recorded), whatever the file or tile is called; failing that, by
    the tile id ``<dataset>/<image stem>/<y>_<x>``."""
    found = []
    for y, x, h, w in tile_grid(image.shape[0], image.shape[1], trained.tile_size, trained.tile_stride):
        tile_id = by_pixels.get(array_sha256(image[y : y + h, x : x + w]))
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
) -> list[Path]:
    """Predict every image; returns the GeoTIFFs written. An image that is not 8-bit is refused unless ``scale``
    (``minmax`` or ``percentile``) says how to stretch it (:func:`segmenter.raster_io.to_uint8`).

    A text-guided model's windows are the tile grid; each reads the captions of the store's tile with the same pixels
    (or, failing that, of tile ``<dataset>/<image stem>/<y>_<x>``), recorded in ``<stem>_captions.csv``; without a
    store, or for windows no captioned tile matches, every expert is masked, and that is printed. ``device``:
    ``auto`` (the GPU when there is one) or a torch device name.
    """
    missing_captions = parse_choice(MissingCaptions, missing_captions, "--missing-captions")
    scale = parse_choice(Scale, scale, "--scale")
    trained = open_run(run, device)
    window = trained.window(window)
    stride = trained.stride(window, overlap)
    guided = trained.model.config.uses_text
    text = trained.text_features(captions, missing_captions) if guided and captions is not None else None
    if guided and captions is None:
        print(f"no --captions: every expert of {trained.model.config.experts} is masked on every window")
    prefix = trained.manifest.dataset.tile_prefix
    by_pixels = _captioned_tiles_by_pixels(text) if text is not None else {}
    written = []
    for path in image_files(inputs):
        try:
            with rasterio.open(path) as source:
                pixels = source.read()
                profile = {"crs": source.crs, "transform": source.transform}
        except rasterio.errors.RasterioIOError as exc:
            raise InputError(f"{path}: not a readable raster ({exc})") from None
        image = to_uint8(np.moveaxis(pixels, 0, -1), scale, path)
        lookup = None
        if text is not None:
            tiles = _captioned_windows(image, trained, by_pixels, set(text.features), prefix, path.stem)
            lookup = CaptionWindows(path.stem, tiles, text)
        if image.shape[-1] < 3:
            image = np.repeat(image[..., :1], 3, axis=-1)
        logits = sliding_window_logits(trained.model, image, window, 0.0, lookup, trained.device, stride=stride)
        classes = logits.argmax(0).numpy().astype(np.uint8)
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
) -> Path:
    """Predicted class fractions and class masks of every tile of an index (or of ``splits``), written as the
    predicted-tile-classes contract to ``predictions``, with the masks in ``<stem>_masks/`` beside it.

    Raises:
        InputError: a text-guided run (its captions would have to exist before the predictions they feed), an
            index made for other classes, an unknown split.
    """
    trained = open_run(run, device)
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
    for done, row in enumerate(frame.itertuples(index=False)):
        image = np.array(read_crop(index.path(row.image_path)))
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        logits = sliding_window_logits(model, image, max(image.shape[:2]), 0.0, None, trained.device)
        classes = logits.argmax(0).numpy()
        classes = classes.astype(np.uint8)
        relative = f"{mask_dir}/{row.tile_id}.png"
        write_crop(predictions.parent / relative, classes)
        fractions = np.bincount(classes.ravel(), minlength=num_classes)[:num_classes] / classes.size
        rows.append({"tile_id": row.tile_id, "class_fractions": fractions.astype(np.float32).tolist(),
                     "mask_path": relative, "run_id": run_id, "model": model.config.name})  # fmt: skip
        if on_tile:
            on_tile(done + 1, len(frame), row.tile_id)
    return write_class_predictions(predictions, rows, index.class_names, index.ignore_index)
