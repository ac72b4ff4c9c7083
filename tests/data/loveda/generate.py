"""A fake LoveDA release in the complete official layout (zenodo record 5706578), a few KB per file.

Run as a script to write it to a folder: ``python -m tests.data.loveda.generate OUT``.

Written out here, not taken from ``segmenter.data.datasets.loveda``, so that the tests check the reader against the
release: ``Train.zip``, ``Val.zip`` and ``Test.zip``, each holding ``<Split>/Urban/images_png/<n>.png`` and
``<Split>/Rural/images_png/<n>.png`` (RGB) and, for Train and Val, ``.../masks_png/<n>.png`` (8-bit single-band ids:
0 no-data, 1 background, 2 building, 3 road, 4 water, 5 barren, 6 forest, 7 agriculture). Images are numbered once
across the release, in the order Train Rural, Train Urban, Val Rural, Val Urban, Test Rural, Test Urban, as in the
real one. ``layout="folder"`` writes the three archives extracted in place (``Train/``, ``Val/``, ``Test/``).
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("Train", "Val", "Test")
SCENES = ("Rural", "Urban")
UNKNOWN_ID = 9  # a value outside LoveDA's ids, for the tests of unknown ids


def mask_ids(size: tuple[int, int], seed: int) -> np.ndarray:
    """Vertical stripes of the ids 0 (no-data) to 7, shifted by the seed."""
    columns = (np.arange(size[1]) * 8 // size[1] + seed) % 8
    return np.broadcast_to(columns, size).astype(np.uint8).copy()


def photo(size: tuple[int, int], seed: int) -> np.ndarray:
    """An RGB image of noise (never read as a label)."""
    return np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def release_members(
    per_scene: int = 2, size: tuple[int, int] = (32, 48), unknown_in: int | None = None
) -> dict[str, list[tuple[str, bytes]]]:
    """The members of each archive: ``{"Train": [(member path, bytes), ...], ...}``.

    Args:
        per_scene: images per scene in each split.
        size: height and width of every image.
        unknown_in: an image number whose mask gets three pixels of :data:`UNKNOWN_ID`.
    """
    members: dict[str, list[tuple[str, bytes]]] = {split: [] for split in SPLITS}
    number = 0
    for split in SPLITS:
        for scene in SCENES:
            for _ in range(per_scene):
                members[split].append((f"{split}/{scene}/images_png/{number}.png", _png(photo(size, number))))
                if split != "Test":
                    ids = mask_ids(size, number)
                    if number == unknown_in:
                        ids[0, :3] = UNKNOWN_ID
                    members[split].append((f"{split}/{scene}/masks_png/{number}.png", _png(ids)))
                number += 1
    return members


def make_loveda(root: Path, layout: str = "zip", splits: tuple[str, ...] = SPLITS, **options) -> Path:
    """Write the release (``splits`` of it: a user may have fetched Train and Val only) under ``root``.

    Args:
        root: the download folder.
        layout: ``zip`` (the three archives) or ``folder`` (each extracted in place).
        splits: the archives written.
        **options: passed to :func:`release_members`.

    Returns:
        ``root``.
    """
    root.mkdir(parents=True, exist_ok=True)
    for split, files in release_members(**options).items():
        if split not in splits:
            continue
        if layout == "folder":
            for member, data in files:
                (root / member).parent.mkdir(parents=True, exist_ok=True)
                (root / member).write_bytes(data)
            continue
        with zipfile.ZipFile(root / f"{split}.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for member, data in files:
                archive.writestr(member, data)
    return root


if __name__ == "__main__":
    make_loveda(Path(sys.argv[1]))
    print(f"wrote a fake LoveDA release under {sys.argv[1]}")
