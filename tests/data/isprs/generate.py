"""Fake ISPRS Vaihingen and Potsdam releases in the official archive layouts, a few KB each.

Run as a script to write them to a folder: ``python -m tests.data.isprs.generate OUT``.
Every label holds all six classes in known stripes, so decoding can be checked pixel by pixel.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import tifffile

from segmenter.datasets.isprs import ISPRS_PALETTE, Potsdam, Vaihingen
from segmenter.datasets.labels import encode_rgb_mask
from segmenter.demo_scenes import erode_boundaries

STRAY_COLOR = (12, 34, 56)


def class_map(height: int, width: int, seed: int) -> np.ndarray:
    """Vertical stripes of the six classes (in order), shifted by the seed."""
    columns = (np.arange(width) * 6 // width + seed) % 6
    return np.broadcast_to(columns, (height, width)).astype(np.uint8).copy()


def image_for(labels: np.ndarray, seed: int, bands: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = (labels.astype(np.int32) * 40)[..., None] + rng.integers(0, 20, size=(*labels.shape, bands))
    return base.clip(0, 255).astype(np.uint8)


def _tiff_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


def _write(root: Path, stem: str, member: str, data: bytes, layout: str) -> None:
    if layout == "folder":
        path = root / stem / member
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        with zipfile.ZipFile(root / f"{stem}.zip", "a") as archive:
            archive.writestr(member, data)


def _release(dataset, root: Path, ids, size, layout, image_names, stray_in=None, bands=3, image_folder=""):
    root.mkdir(parents=True, exist_ok=True)
    stems = {"image": image_names[0], **{k: v for k, v in dataset.archives.items() if k != "image"}}
    names = {"image": image_names[1], **{k: v for k, v in dataset.file_names.items() if k != "image"}}
    for seed, source_id in enumerate(ids):
        labels = class_map(*size, seed)
        label_rgb = encode_rgb_mask(labels, ISPRS_PALETTE, 255)
        if source_id == stray_in:
            label_rgb[0, :3] = STRAY_COLOR
        eroded = encode_rgb_mask(erode_boundaries(labels, radius=1), ISPRS_PALETTE, 255)
        files = {"image": image_for(labels, seed, bands), "label": label_rgb, "eval_label": eroded}
        for role, array in files.items():
            member = names[role].format(id=source_id)
            if role == "image" and image_folder:
                member = f"{image_folder}/{member}"
            _write(root, stems[role], member, _tiff_bytes(array), layout)


def make_vaihingen(root: Path, ids=None, size=(40, 72), layout: str = "zip", stray_in: str | None = None) -> Path:
    """Fake ``ISPRS_semantic_labeling_Vaihingen*.zip`` (images under ``top/``), or their extracted folders."""
    ids = ids or [*Vaihingen.splits["mpers"]["train"], *Vaihingen.splits["mpers"]["test"]]
    _release(Vaihingen, root, ids, size, layout, (Vaihingen.archives["image"], Vaihingen.file_names["image"]),
             stray_in=stray_in, image_folder="top")  # fmt: skip
    return root


def make_potsdam(root: Path, ids=None, size=(48, 48), layout: str = "zip", modality: str = "rgb") -> Path:
    """Fake ``2_Ortho_RGB.zip`` (or IRRG / RGBIR), ``5_Labels_all.zip`` and ``5_Labels_all_noBoundary.zip``."""
    ids = ids or [*Potsdam.splits["mpers"]["train"], *Potsdam.splits["mpers"]["test"]]
    bands = 4 if modality == "rgbir" else 3
    _release(Potsdam, root, ids, size, layout, Potsdam.modalities[modality], bands=bands,
             image_folder=Potsdam.modalities[modality][0])  # fmt: skip
    return root


if __name__ == "__main__":
    out = Path(sys.argv[1])
    make_vaihingen(out / "vaihingen")
    make_potsdam(out / "potsdam")
    print(f"wrote fake ISPRS releases under {out}")
