"""A fake SynDrone release: two towns, two heights, a few frames, with split files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from segmenter.datasets.syndrone import CARLA_IDS


def make_syndrone(root: Path, frames=(0, 1, 2, 3), train=(0, 1, 2), test=(3,), size=(32, 48)) -> Path:
    """Frames whose semantic PNGs cycle through every CARLA id of the 28 classes, plus one unmapped id."""
    rng = np.random.default_rng(0)
    for town in ("01", "03"):
        for height in ("20", "80"):
            folder = root / f"Town{town}_Opt_120" / "ClearNoon" / f"height{height}m"
            (folder / "rgb").mkdir(parents=True, exist_ok=True)
            (folder / "semantic").mkdir(parents=True, exist_ok=True)
            for frame in frames:
                ids = np.resize(np.array([*CARLA_IDS, 0], dtype=np.uint8), size[0] * size[1]).reshape(size)
                Image.fromarray(ids).save(folder / "semantic" / f"{frame:05d}.png")
                rgb = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(rgb).save(folder / "rgb" / f"{frame:05d}.jpg")
    (root / "train.txt").write_text("\n".join(str(f) for f in train))
    (root / "test.txt").write_text("\n".join(str(f) for f in test))
    return root


if __name__ == "__main__":
    make_syndrone(Path(sys.argv[1]))
