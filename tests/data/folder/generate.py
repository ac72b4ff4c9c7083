"""A folder dataset of id-coded masks, laid out as in-house data and most exports are (iSAID, OpenEarthMap, UAVid
converted to ids): ``<Split>/images/<name>.png`` and ``<Split>/masks/<name>.png`` (8-bit single-band class ids),
split folders named ``Train/`` and ``Val/`` (capitalised, as many exports name them).

Run as a script to write it to a folder: ``python -m tests.data.folder.generate OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

# The mask ids: 0 is no-data, 1-3 are the classes; 9 is an id the dataset does not declare.
NODATA_ID = 0
CLASS_IDS = (1, 2, 3)
UNDECLARED_ID = 9


def mask_for(size: tuple[int, int], seed: int) -> np.ndarray:
    """Horizontal stripes of no-data and the three class ids, shifted by the seed."""
    rows = (np.arange(size[0]) * 4 // size[0] + seed) % 4
    return np.broadcast_to(rows[:, None], size).astype(np.uint8).copy()


def make_index_folder(
    root: Path,
    splits: dict[str, tuple[str, ...]] | None = None,
    size: tuple[int, int] = (40, 56),
    undeclared_in: str | None = None,
) -> Path:
    """Write ``<root>/<Split>/images/<name>.png`` and ``<root>/<Split>/masks/<name>.png``.

    Args:
        root: the dataset folder.
        splits: split folder -> image names (default ``Train``: a, b; ``Val``: c).
        size: height and width of every image.
        undeclared_in: an image whose mask gets five pixels of :data:`UNDECLARED_ID`.

    Returns:
        ``root``.
    """
    splits = splits or {"Train": ("a", "b"), "Val": ("c",)}
    seed = 0
    for split, names in splits.items():
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for name in names:
            ids = mask_for(size, seed)
            if name == undeclared_in:
                ids[-1, :5] = UNDECLARED_ID
            pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / "images" / f"{name}.png")
            Image.fromarray(ids).save(root / split / "masks" / f"{name}.png")
            seed += 1
    return root


if __name__ == "__main__":
    make_index_folder(Path(sys.argv[1]))
    print(f"wrote a folder of id masks under {sys.argv[1]}")
