"""``segmenter predict``: class maps of new images, or predicted class fractions for every tile of an index.

Images: class-index GeoTIFFs that keep the source's georeferencing, plus colour PNGs. Index: the predicted-tile
classes contract (``manifests/class_predictions.py``), which prompts read where a split's class source is
``predictions``, with one predicted class-mask PNG per tile for the ``annotation`` expert.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning

from manifests.atomic import atomic_path
from manifests.class_predictions import write_class_predictions
from manifests.errors import InputError
from manifests.names import safe_join
from manifests.tile_index import TileIndex, make_tile_id, read_tile_index
from segmenter.data.datasets.labels import encode_rgb_mask
from segmenter.data.raster_io import array_sha256, read_crop, three_bands, write_crop
from segmenter.data.tiling import tile_grid
from segmenter.data.windowed_read import WindowReader, open_image_windows
from segmenter.engine.inference import SlidingWindows, default_batch_size, sliding_window_classes, tile_classes
from segmenter.engine.options import InferenceSettings, PredictSettings, settings_or_options
from segmenter.engine.runs import TrainedRun, open_run
from segmenter.engine.window_captions import CaptionWindows, check_masked_experts
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
        raise InputError(f"--images: no image files ({', '.join(sorted(SUFFIXES))}) in {', '.join(map(str, inputs))}")
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


def output_files(image: Path, out: Path) -> tuple[Path, ...]:
    """What ``predict`` writes for ``image`` into ``out``."""
    return tuple(safe_join(out, f"{image.stem}{suffix}") for suffix in (".tif", "_color.png", "_captions.csv"))


def check_outputs_spare_inputs(files: list[Path], out: Path) -> None:
    """Refuse an ``--out`` where an output would replace one of the images (``--out`` the input folder and a
    ``<stem>.tif`` input): the image would be gone, replaced by its prediction.

    Raises:
        InputError: an output path that is an input image.
    """
    inputs = {path.resolve() for path in files}
    for image in files:
        for target in output_files(image, out):
            if target.resolve() in inputs:
                raise InputError(
                    f"--out {out}: the prediction of {image} would be written to {target}, which is one of the "
                    "images; give an --out folder other than the images' folder"
                )


def _captioned_tiles_by_pixels(text: ExpertTextFeatures) -> dict[str, str]:
    """Pixel hash -> tile id of every tile with a selected caption of the run's experts."""
    rows = text.rows[text.rows["image_sha256"].notna()]
    return dict(zip(rows["image_sha256"], rows["tile_id"], strict=True))


def _captioned_windows(
    image: WindowReader, trained: TrainedRun, by_pixels: dict[str, str], named: set[str], stem: str
) -> pd.DataFrame:
    """The windows of the tile grid whose captions a store holds. A window is matched to a captioned tile by its
    pixels (the ``image_sha256`` that ``prepare`` recorded), whatever the file or tile is called; failing that, by
    the tile id ``<dataset>/<image stem>/<y>_<x>``."""
    prefix = trained.manifest.dataset.tile_prefix
    found = []
    for y, x, h, w in tile_grid(image.height, image.width, trained.tile_size, trained.tile_stride):
        tile_id = by_pixels.get(array_sha256(three_bands(image.read(y, x, h, w))))  # as prepare cut the tiles
        if tile_id is None and make_tile_id(prefix, stem, y, x) in named:
            tile_id = make_tile_id(prefix, stem, y, x)
        if tile_id is not None:
            found.append({"tile_id": tile_id, "y": y, "x": x, "height": h, "width": w})
    return pd.DataFrame(found, columns=["tile_id", "y", "x", "height", "width"])


def _image_captions(
    trained: TrainedRun, settings: PredictSettings, files: list[Path], spec: SlidingWindows
) -> dict[Path, CaptionWindows]:
    """Per image, which caption every window reads, under the missing-expert rule, before any image is predicted
    (empty for a text-free model, and without a store: every expert masked, which is said).

    Raises:
        InputError: a store whose experts differ from the run's, or an expert without a usable caption on any window
            of an image that reads captions (unless ``missing_captions='mask'``).
    """
    if not trained.model.config.uses_text:
        return {}
    if settings.captions is None:
        print(f"no --captions: every expert of {trained.model.config.experts} is masked on every window")
        return {}
    text = trained.text_features(settings.captions, settings)
    by_pixels, named = _captioned_tiles_by_pixels(text), set(text.features)
    plans = {}
    for path in files:
        with open_image_windows(path, settings.scale, settings.max_pixels) as (image, _):
            tiles = _captioned_windows(image, trained, by_pixels, named, path.stem)
            plans[path] = CaptionWindows(path.stem, tiles, text).plan(spec.grid(image.height, image.width))
        where = f"image {path.name}"
        check_masked_experts([plans[path]], text.experts, settings.captions, settings.missing_captions, where)
    return plans


def _record_window_captions(path: Path, out: Path, lookup: CaptionWindows, trained: TrainedRun, store: Path) -> None:
    """``<stem>_captions.csv``: per window, the tile whose caption it read and the experts masked on it; said."""
    used = pd.DataFrame(lookup.used)
    with atomic_path(output_files(path, out)[2]) as tmp:
        used.to_csv(tmp, index=False)
    read = int(used["caption_tile_id"].notna().sum())
    print(f"{path.name}: {read} of {len(used)} windows read captions from {store} (per window: "
          f"{path.stem}_captions.csv)")  # fmt: skip
    if read == 0:
        print(f"warning: {path.name}: no window matched a captioned tile of {store} by its pixels or its "
              f"tile id; every expert was masked (caption tiles cut from this image with tile size "
              f"{trained.tile_size} and stride {trained.tile_stride})")  # fmt: skip


def _write_maps(trained: TrainedRun, path: Path, out: Path, classes: np.ndarray, profile: dict) -> Path:
    """The class-index GeoTIFF of an image (with its georeferencing) and its colour PNG; returns the GeoTIFF."""
    target, colour_png, _ = output_files(path, out)
    options = {"driver": "GTiff", "height": classes.shape[0], "width": classes.shape[1], "count": 1,
               "dtype": "uint8", "compress": "deflate", **profile}  # fmt: skip
    index = trained.index
    with atomic_path(target) as tmp, warnings.catch_warnings():
        # A PNG or JPEG input has no georeferencing: its map has none either, which is all the warning says. The
        # filter comes before the open, which is where rasterio warns.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **options) as sink:
            sink.write(classes, 1)
            # The values are class indices in the run's order, not the codes of the user's masks: named in the file
            # (tags and a colour table GIS tools show), so the map can be read without the run folder.
            sink.update_tags(class_names=json.dumps(index.class_names), ignore_index=str(index.ignore_index))
            sink.update_tags(1, **{f"class_{i}": name for i, name in enumerate(index.class_names)})
            sink.set_band_description(1, "class index (tags class_<i> name each)")
            sink.write_colormap(1, {i: (*colour, 255) for i, colour in enumerate(index.palette)})
    colours = encode_rgb_mask(classes, tuple(trained.index.palette), trained.index.ignore_index)
    with atomic_path(colour_png) as tmp:
        Image.fromarray(colours).save(tmp, format="PNG")
    return target


def predict(
    run: str | Path, inputs: list[Path], out: Path, settings: PredictSettings | None = None, **options: Any
) -> list[Path]:
    """Predict every image; returns the GeoTIFFs written. An image that is not 8-bit is refused unless
    ``settings.scale`` (``minmax`` or ``percentile``) says how to stretch it
    (:func:`segmenter.data.raster_io.to_uint8`).

    A text-guided model's windows are the tile grid; each reads the captions of the store's tile with the same pixels
    (or, failing that, of tile ``<dataset>/<image stem>/<y>_<x>``), recorded in ``<stem>_captions.csv``; without a
    store, or for windows no captioned tile matches, every expert is masked, and that is printed. An expert of the
    store without a usable caption on any window of an image stops the command before anything is written, unless
    ``missing_captions='mask'`` (:func:`check_masked_experts`). 8-bit GeoTIFFs are read by windows
    (:func:`segmenter.data.windowed_read.open_image_windows`).

    Args:
        run: the run folder written by ``segmenter train``.
        inputs: image files and folders (``--images``).
        out: the output folder.
        settings: captions, windows, device, scaling (:class:`PredictSettings`).
        **options: the fields of :class:`PredictSettings` as keywords, in place of ``settings``.
    """
    settings = settings_or_options(PredictSettings, settings, options)
    trained = open_run(run, settings)
    files = image_files(inputs)  # refused before anything is written
    check_outputs_spare_inputs(files, out)
    spec = trained.sliding(settings)
    plans = _image_captions(trained, settings, files, spec)
    written = []
    for path in files:
        lookup = plans.get(path)
        with open_image_windows(path, settings.scale, settings.max_pixels) as (image, profile):
            if image.bands > 3:  # RGBIR orthophotos: the backbone was trained on, and reads, the first three
                print(f"note: {path.name}: {image.bands} bands; the model reads bands 1-3 (as RGB) and ignores the "
                      "others")  # fmt: skip
            classes = sliding_window_classes(trained.model, image, spec, lookup, trained.device)
        if lookup is not None and settings.captions is not None:
            _record_window_captions(path, out, lookup, trained, settings.captions)
        written.append(_write_maps(trained, path, out, classes, profile))
    return written


def _index_tiles(index: TileIndex, splits: list[str] | None) -> pd.DataFrame:
    """The tiles of an index, or of ``splits``.

    Raises:
        InputError: a split the index does not have.
    """
    frame = index.frame
    if not splits:
        return frame
    unknown = sorted(set(splits) - set(frame["split"]))
    if unknown:
        raise InputError(f"--split: {unknown} not in tile index {index.root} (it has {sorted(set(frame['split']))})")
    return frame[frame["split"].isin(splits)]


def _open_text_free_run(
    run: str | Path, index_path: str | Path, settings: InferenceSettings
) -> tuple[TrainedRun, TileIndex]:
    """A text-free run and an index of its classes.

    Raises:
        InputError: a text-guided run (its captions would have to exist before the predictions they feed), an
            index made for other classes.
    """
    trained = open_run(run, settings)
    if trained.model.config.uses_text:
        raise InputError(
            f"--run: {run} is text-guided ({trained.model.config.name}); tile class predictions feed the prompts, so "
            "they come from a text-free model (e.g. a *_notext preset)"
        )
    index = read_tile_index(index_path)
    if index.class_names != trained.index.class_names:
        raise InputError(
            f"--index: {index.root} has classes {index.class_names}, run {run} predicts {trained.index.class_names}"
        )
    return trained, index


def predict_index(
    run: str | Path,
    index_path: str | Path,
    predictions: str | Path,
    splits: list[str] | None = None,
    settings: InferenceSettings | None = None,
    on_tile: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Predicted class fractions and class masks of every tile of an index (or of ``splits``), written as the
    predicted-tile-classes contract to ``predictions``, with the masks in ``<stem>_masks/`` beside it. Each tile is
    one window; ``settings.batch_size`` tiles go through the model at once (default 8); ``on_tile`` is called with
    ``(done, total, tile id)``.

    Raises:
        InputError: a text-guided run (its captions would have to exist before the predictions they feed), an
            index made for other classes, an unknown split.
    """
    settings = settings or InferenceSettings()
    trained, index = _open_text_free_run(run, index_path, settings)
    frame = _index_tiles(index, splits)
    predictions = Path(predictions)
    mask_dir, run_id, num_classes = f"{predictions.stem}_masks", Path(run).resolve().name, len(index.class_names)
    rows = []
    tiles = list(frame.itertuples(index=False))
    chunk = settings.batch_size or default_batch_size(trained.device)
    for start in range(0, len(tiles), chunk):
        group = tiles[start : start + chunk]
        images = [three_bands(np.array(read_crop(index.path(row.image_path)))) for row in group]
        classes = tile_classes(trained.model, images, trained.device, chunk)
        for done, (row, mask) in enumerate(zip(group, classes, strict=True), start + 1):
            relative = f"{mask_dir}/{row.tile_id}.png"
            write_crop(safe_join(predictions.parent, relative), mask)  # a tile id is data: it stays in the folder
            fractions = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes] / mask.size
            rows.append({"tile_id": row.tile_id, "class_fractions": fractions.astype(np.float32).tolist(),
                         "mask_path": relative, "run_id": run_id, "model": trained.model.config.name})  # fmt: skip
            if on_tile:
                on_tile(done, len(frame), row.tile_id)
    return write_class_predictions(predictions, rows, index.class_names, index.ignore_index)
