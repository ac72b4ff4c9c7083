"""Fake ISPRS Vaihingen and Potsdam releases in the complete official archive layouts, a few KB per file.

Run as a script to write them to a folder: ``python -m tests.data.isprs.generate OUT``.

The member paths are written out here rather than taken from ``segmenter.data.datasets.isprs``, so that the tests
check the reader against the official layouts and not against itself:

- ``ISPRS_semantic_labeling_Vaihingen.zip``: ``ISPRS_semantic_labeling_Vaihingen/`` holding ``top/`` (IRRG
  orthophotos ``top_mosaic_09cm_area{N}.tif``), ``dsm/`` (float32 ``dsm_09cm_matching_area{N}.tif``) and
  ``gts_for_participants/`` (full ground truth of the labelled areas, **named like the orthophotos**);
  ``top_level=False`` leaves the top-level folder out (how mmsegmentation's converter and torchgeo see it);
- ``ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip`` and ``..._eroded_COMPLETE.zip``: flat tifs,
  the eroded ones named ``..._noBoundary.tif``;
- Potsdam ``2_Ortho_RGB.zip``, ``3_Ortho_IRRG.zip``, ``4_Ortho_RGBIR.zip`` (``<stem>/top_potsdam_{id}_<bands>.tif``
  with a ``.tfw`` world file beside each), ``5_Labels_all.zip``, ``5_Labels_all_noBoundary.zip`` (flat), and the
  ``1_DSM.zip`` / ``1_DSM_normalisation.zip`` siblings of a real download folder.

``layout="folder"`` writes each archive extracted instead: a folder named like the zip without ``.zip``, holding
what the zip holds. Every label holds all six classes in known stripes, so decoding can be checked pixel by pixel;
images are stripes plus noise, so no image pixel is a palette colour and a test can tell which file was read.
"""

from __future__ import annotations

import io
import sys
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.transform import Affine

from segmenter.data.datasets.isprs import ISPRS_PALETTE, Potsdam, Vaihingen
from segmenter.data.datasets.labels import encode_rgb_mask
from segmenter.data.demo_scenes import erode_boundaries

STRAY_COLOR = (12, 34, 56)
VAIHINGEN_IMAGES = "ISPRS_semantic_labeling_Vaihingen"
VAIHINGEN_FULL = "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE"
VAIHINGEN_ERODED = "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE"
# The areas whose ground truth the image archive ships in gts_for_participants/: the official training areas.
VAIHINGEN_LABELLED = frozenset(Vaihingen.splits["isprs"]["train"])
POTSDAM_ORTHOS = {
    "rgb": ("2_Ortho_RGB", "RGB", 3),
    "irrg": ("3_Ortho_IRRG", "IRRG", 3),
    "rgbir": ("4_Ortho_RGBIR", "RGBIR", 4),
}
# A Potsdam world file: 5 cm pixels, upper-left corner in EPSG:32633.
_TFW = b"0.05\n0.0\n0.0\n-0.05\n366976.525\n5809761.000\n"


def class_map(height: int, width: int, seed: int) -> np.ndarray:
    """Vertical stripes of the six classes (in order), shifted by the seed."""
    columns = (np.arange(width) * 6 // width + seed) % 6
    return np.broadcast_to(columns, (height, width)).astype(np.uint8).copy()


def image_for(labels: np.ndarray, seed: int, bands: int = 3) -> np.ndarray:
    """An orthophoto of ``labels``: a grey level per class plus noise, never a palette colour."""
    rng = np.random.default_rng(seed)
    base = (labels.astype(np.int32) * 40)[..., None] + rng.integers(0, 20, size=(*labels.shape, bands))
    return base.clip(0, 255).astype(np.uint8)


def participant_labels(labels: np.ndarray) -> np.ndarray:
    """The ``gts_for_participants`` copy of a ground truth: its first two rows in the next class.

    The real copies match the COMPLETE ground truth; these differ on purpose, so that a test can tell which of
    the two files was read.
    """
    changed = labels.copy()
    changed[:2] = (changed[:2] + 1) % 6
    return changed


def heights_for(labels: np.ndarray) -> np.ndarray:
    """A float32 single-band surface model in metres (buildings and trees stand out)."""
    return (265.0 + np.array([0, 9, 0.2, 12, 1.5, 0.8], dtype=np.float32)[labels]).astype(np.float32)


def overlay_for(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The mask blended into the photo, as in Potsdam's ``top_potsdam_4_12_label.tif``: almost no palette colour."""
    colours = encode_rgb_mask(labels, ISPRS_PALETTE, 255).astype(np.uint16)
    return ((colours + image[..., :3]) // 2).astype(np.uint8)


def _tiff_bytes(array: np.ndarray, compress: str | None = None, **profile) -> bytes:
    """A TIFF of ``array`` (``H x W`` or ``H x W x C``): tifffile's plain TIFF, or GDAL's with ``compress`` (``lzw``,
    ``deflate``, ``jpeg``, ...), as torchgeo's fixture generators and most GIS tools write them."""
    if compress is None:
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, array)
        return buffer.getvalue()
    bands = array if array.ndim == 3 else array[..., None]
    with MemoryFile() as memory, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a label TIFF has no georeferencing, as torchgeo's
        with memory.open(driver="GTiff", height=bands.shape[0], width=bands.shape[1], count=bands.shape[2],
                         dtype=bands.dtype.name, compress=compress, **profile) as sink:  # fmt: skip
            sink.write(np.moveaxis(bands, -1, 0))
        return memory.read()


def _jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_archive(root: Path, stem: str, members: Iterable[tuple[str, bytes]], layout: str) -> None:
    """Write ``<root>/<stem>.zip`` or, extracted, ``<root>/<stem>/`` holding the same paths."""
    if layout not in ("zip", "folder"):
        raise ValueError(f"layout must be zip or folder, got {layout!r}")
    root.mkdir(parents=True, exist_ok=True)
    if layout == "folder":
        for member, data in members:
            path = root / stem / member
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return
    with zipfile.ZipFile(root / f"{stem}.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member, data in members:
            archive.writestr(member, data)


def make_vaihingen(
    root: Path,
    ids=None,
    size=(40, 72),
    layout: str = "zip",
    stray_in: str | None = None,
    top_level: bool = True,
    archives: tuple[str, ...] = ("images", "full", "eroded"),
) -> Path:
    """Fake ``ISPRS_semantic_labeling_Vaihingen*.zip`` in the official layout, or their extracted folders.

    Args:
        root: folder to write the three archives to.
        ids: area numbers (default: the 16 areas of the ``mpers`` split).
        size: height and width of each area in pixels.
        layout: ``zip`` or ``folder`` (each archive extracted into a folder named like it).
        stray_in: an area whose full ground truth gets three pixels of :data:`STRAY_COLOR`.
        top_level: put the image archive's folders inside ``ISPRS_semantic_labeling_Vaihingen/`` (else at the top).
        archives: which archives a download holds: ``images``, ``full`` (COMPLETE), ``eroded`` (eroded COMPLETE);
            mmsegmentation's recipe downloads the images and the eroded one only.

    Returns:
        ``root``.
    """
    ids = ids or [*Vaihingen.splits["mpers"]["train"], *Vaihingen.splits["mpers"]["test"]]
    prefix = f"{VAIHINGEN_IMAGES}/" if top_level else ""
    images, full, eroded = [], [], []
    for seed, area in enumerate(ids):
        labels = class_map(*size, seed)
        label_rgb = encode_rgb_mask(labels, ISPRS_PALETTE, 255)
        if area == stray_in:
            label_rgb[0, :3] = STRAY_COLOR
        name = f"top_mosaic_09cm_area{area}.tif"
        images.append((f"{prefix}top/{name}", _tiff_bytes(image_for(labels, seed))))
        images.append((f"{prefix}dsm/dsm_09cm_matching_area{area}.tif", _tiff_bytes(heights_for(labels))))
        if area in VAIHINGEN_LABELLED:
            participant = encode_rgb_mask(participant_labels(labels), ISPRS_PALETTE, 255)
            images.append((f"{prefix}gts_for_participants/{name}", _tiff_bytes(participant)))
        full.append((name, _tiff_bytes(label_rgb)))
        eroded_rgb = encode_rgb_mask(erode_boundaries(labels, radius=1), ISPRS_PALETTE, 255)
        eroded.append((f"top_mosaic_09cm_area{area}_noBoundary.tif", _tiff_bytes(eroded_rgb)))
    # Sorted like a real archive listing: gts_for_participants/ before top/.
    written = {"images": (VAIHINGEN_IMAGES, sorted(images)), "full": (VAIHINGEN_FULL, full),
               "eroded": (VAIHINGEN_ERODED, eroded)}  # fmt: skip
    for kind in archives:
        _write_archive(root, *written[kind], layout)
    return root


def make_potsdam(
    root: Path,
    ids=None,
    size=(48, 48),
    layout: str = "zip",
    modality: str | None = None,
    overlay_in: str | None = None,
) -> Path:
    """Fake Potsdam release: the three ortho archives, both label archives and the two DSM archives.

    Args:
        root: folder to write the archives to.
        ids: tile ids such as ``2_10`` (default: the 24 tiles of the ``mpers`` split).
        size: height and width of each tile in pixels.
        layout: ``zip`` or ``folder`` (each archive extracted into a folder named like it).
        modality: write only this ortho archive (``rgb``, ``irrg``, ``rgbir``); default: all three.
        overlay_in: a tile whose ``_label.tif`` is the mask blended into the photo (like the real ``4_12``).

    Returns:
        ``root``.
    """
    ids = ids or [*Potsdam.splits["mpers"]["train"], *Potsdam.splits["mpers"]["test"]]
    orthos = {key: value for key, value in POTSDAM_ORTHOS.items() if modality in (None, key)}
    members: dict[str, list[tuple[str, bytes]]] = {stem: [] for stem, _, _ in orthos.values()}
    for stem in ("5_Labels_all", "5_Labels_all_noBoundary", "1_DSM", "1_DSM_normalisation"):
        members[stem] = []
    for seed, tile in enumerate(ids):
        labels = class_map(*size, seed)
        for offset, (stem, bands_name, bands) in enumerate(POTSDAM_ORTHOS.values()):
            image = image_for(labels, 100 * offset + seed, bands)  # each modality its own pixels
            if stem in members:
                members[stem].append((f"{stem}/top_potsdam_{tile}_{bands_name}.tif", _tiff_bytes(image)))
                members[stem].append((f"{stem}/top_potsdam_{tile}_{bands_name}.tfw", _TFW))
        label_rgb = encode_rgb_mask(labels, ISPRS_PALETTE, 255)
        if tile == overlay_in:
            label_rgb = overlay_for(labels, image_for(labels, seed))
        members["5_Labels_all"].append((f"top_potsdam_{tile}_label.tif", _tiff_bytes(label_rgb)))
        eroded = encode_rgb_mask(erode_boundaries(labels, radius=1), ISPRS_PALETTE, 255)
        members["5_Labels_all_noBoundary"].append((f"top_potsdam_{tile}_label_noBoundary.tif", _tiff_bytes(eroded)))
        row, column = tile.split("_")
        dsm_name = f"dsm_potsdam_{int(row):02d}_{int(column):02d}"  # the DSMs number their tiles with two digits
        members["1_DSM"].append((f"1_DSM/{dsm_name}.tif", _tiff_bytes(heights_for(labels))))
        members["1_DSM"].append((f"1_DSM/{dsm_name}.tfw", _TFW))
        ndsm = (heights_for(labels) - 265.0).clip(0, 25.5) * 10  # 8-bit, decimetres above ground
        members["1_DSM_normalisation"].append(
            (f"1_DSM_normalisation/{dsm_name}_normalized_lastools.jpg", _jpeg_bytes(ndsm.astype(np.uint8)))
        )
    for stem, files in members.items():
        _write_archive(root, stem, files, layout)
    return root


# The areas and tiles of torchgeo's fixtures (tests/data/vaihingen/data.py, tests/data/potsdam/data.py).
TORCHGEO_VAIHINGEN_AREAS = ("1", "11", "24", "6")
TORCHGEO_POTSDAM_TILES = ("2_10", "2_11", "5_15", "6_15")
# torchgeo's Potsdam orthophotos: georeferenced in EPSG:32633 at 5 cm; its labels are not georeferenced.
_POTSDAM_GEO = {"crs": "EPSG:32633", "transform": Affine(0.05, 0.0, 366976.5, 0.0, -0.05, 5808562.6)}


def _loose_and_zipped(root: Path, archive: str, members: list[tuple[str, bytes]]) -> None:
    """Write ``members`` as loose files under ``root`` and into ``<root>/<archive>.zip``, as torchgeo's generators
    do (they write the files, then zip them beside themselves)."""
    for member, data in members:
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        (root / member).write_bytes(data)
    with zipfile.ZipFile(root / f"{archive}.zip", "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for member, data in members:
            zipped.writestr(member, data)


def make_torchgeo_vaihingen(root: Path, size=(40, 72)) -> Path:
    """torchgeo's Vaihingen fixture layout: ``ISPRS_semantic_labeling_Vaihingen.zip`` holding ``top/`` at its top
    level, ``..._ground_truth_COMPLETE.zip`` flat, every TIFF LZW-compressed by GDAL, the loose files beside the zips,
    and **no eroded archive**. Pixels as :func:`make_vaihingen` writes them (stripes of the six classes), not
    torchgeo's random bits, so that decoding can be checked."""
    root.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for seed, area in enumerate(TORCHGEO_VAIHINGEN_AREAS):
        classes = class_map(*size, seed)
        name = f"top_mosaic_09cm_area{area}.tif"
        images.append((f"top/{name}", _tiff_bytes(image_for(classes, seed), "lzw")))
        labels.append((name, _tiff_bytes(encode_rgb_mask(classes, ISPRS_PALETTE, 255), "lzw")))
    _loose_and_zipped(root, VAIHINGEN_IMAGES, images)
    _loose_and_zipped(root, VAIHINGEN_FULL, labels)
    return root


def make_torchgeo_potsdam(root: Path, size=(48, 48)) -> Path:
    """torchgeo's Potsdam fixture layout: ``4_Ortho_RGBIR.zip`` (``4_Ortho_RGBIR/top_potsdam_{id}_RGBIR.tif``, four
    bands, georeferenced) and a flat ``5_Labels_all.zip``, LZW-compressed by GDAL, loose files beside the zips, **no
    eroded archive**."""
    root.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for seed, tile in enumerate(TORCHGEO_POTSDAM_TILES):
        classes = class_map(*size, seed)
        image = _tiff_bytes(image_for(classes, seed, bands=4), "lzw", **_POTSDAM_GEO)
        images.append((f"4_Ortho_RGBIR/top_potsdam_{tile}_RGBIR.tif", image))
        labels.append(
            (f"top_potsdam_{tile}_label.tif", _tiff_bytes(encode_rgb_mask(classes, ISPRS_PALETTE, 255), "lzw"))
        )
    _loose_and_zipped(root, "4_Ortho_RGBIR", images)
    _loose_and_zipped(root, "5_Labels_all", labels)
    return root


if __name__ == "__main__":
    out = Path(sys.argv[1])
    make_vaihingen(out / "vaihingen")
    make_potsdam(out / "potsdam")
    make_torchgeo_vaihingen(out / "torchgeo_vaihingen")
    make_torchgeo_potsdam(out / "torchgeo_potsdam")
    print(f"wrote fake ISPRS releases under {out}")
