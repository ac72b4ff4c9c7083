"""A fake SynDrone release laid out as the official one (https://github.com/LTTM/Syndrone, checked against its
``main`` branch's writer and the ``analyses`` / ``synth2real`` readers), at a few pixels a frame.

Per town, ``Town{t}_Opt_120_color.zip`` holds ``Town{t}_Opt_120/ClearNoon/bboxes/{frame}.json`` and, per height,
``height{h}m/rgb/{frame}.jpg``, ``semantic/{frame}.png`` (single-band CARLA ids) and ``camera/{frame}.json``;
``Town{t}_Opt_120_depth.zip`` the 16-bit ``depth/{frame}.png``; ``Town{t}_Opt_120_lidar.zip`` the ``lidar/{frame}.ply``
of the heights in (50, 100) m; ``splits.zip`` the split files ``train.txt`` and ``test.txt`` (frame numbers, one a
line). Frames are numbered ``{frame:05d}``.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from segmenter.data.datasets.syndrone import CARLA_IDS, HEIGHTS, TOWNS

SKY_ID = 13  # CARLA's sky: a class of the 28, left out of the 7 coarse ones


def semantic_ids(size: tuple[int, int]) -> np.ndarray:
    """The semantic PNG of every frame: every CARLA id of the 28 classes in turn, then the unknown id 0."""
    return np.resize(np.array([*CARLA_IDS, 0], dtype=np.uint8), size[0] * size[1]).reshape(size)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _town_members(
    town: str, frames: Sequence[int], size: tuple[int, int], heights: Sequence[str], rng: np.random.Generator
) -> dict[str, dict[str, bytes]]:
    """The members of one town's ``color``, ``depth`` and ``lidar`` archives, by archive kind."""
    archives: dict[str, dict[str, bytes]] = {"color": {}, "depth": {}, "lidar": {}}
    scenario = f"Town{town}_Opt_120/ClearNoon"
    for frame in frames:
        archives["color"][f"{scenario}/bboxes/{frame:05d}.json"] = json.dumps([]).encode()
        for height in heights:
            folder = f"{scenario}/height{height}m"
            rgb = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
            archives["color"][f"{folder}/rgb/{frame:05d}.jpg"] = _jpg(rgb)
            archives["color"][f"{folder}/semantic/{frame:05d}.png"] = _png(semantic_ids(size))
            pose = {"x": 0.0, "y": 0.0, "z": int(height), "pitch": -90, "yaw": 0.0, "roll": 0}
            archives["color"][f"{folder}/camera/{frame:05d}.json"] = json.dumps(pose).encode()
            archives["depth"][f"{folder}/depth/{frame:05d}.png"] = _png(np.full(size, 1000, np.uint16))
            if 50 < int(height) < 100:
                archives["lidar"][f"{folder}/lidar/{frame:05d}.ply"] = b"ply\nformat binary_little_endian 1.0\n"
    return archives


def _write_town(root: Path, town: str, archives: dict[str, dict[str, bytes]], layout: str) -> None:
    """One town's archives as downloaded (``zip``) or extracted in place (``folder``)."""
    for kind, members in archives.items():
        if members and layout == "zip":
            with zipfile.ZipFile(root / f"Town{town}_Opt_120_{kind}.zip", "w") as archive:
                for name, data in members.items():
                    archive.writestr(name, data)
        elif members:
            for name, data in members.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)


def _write_splits(root: Path, train: Sequence[int], test: Sequence[int], splits: str) -> None:
    """The split files, as ``splits`` says (see :func:`make_syndrone`)."""
    split_text = {"train.txt": "\n".join(str(f) for f in train) + "\n", "test.txt": "\n".join(str(f) for f in test)}
    if splits == "text":
        for name, text in split_text.items():
            (root / name).write_text(text)
    elif splits in ("zip", "parent"):
        with zipfile.ZipFile((root if splits == "zip" else root.parent) / "splits.zip", "w") as archive:
            for name, text in split_text.items():
                archive.writestr(name, text)


def make_syndrone(
    root: Path,
    frames: Sequence[int] = (0, 1),
    train: Sequence[int] = (0,),
    test: Sequence[int] = (1,),
    size: tuple[int, int] = (32, 48),
    towns: Sequence[str] = TOWNS,
    heights: Sequence[str] = HEIGHTS,
    layout: str = "zip",
    splits: str = "zip",
) -> Path:
    """Write the release under ``root``; returns ``root``.

    Args:
        root: the folder the user downloaded into.
        frames: frame numbers rendered in every town and height.
        train: frames listed in ``train.txt``.
        test: frames listed in ``test.txt``.
        size: height and width of every frame.
        towns: towns downloaded (the release has 8: a user may have fetched some of them).
        heights: heights in each town's archive (the release always has 20, 50 and 80).
        layout: ``zip`` (the per-town archives as downloaded) or ``folder`` (each extracted in place, no zip left).
        splits: ``zip`` (``splits.zip`` under root), ``parent`` (``splits.zip`` beside root), ``text`` (the
            extracted ``train.txt`` / ``test.txt`` under root) or ``none``.
    """
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for town in towns:
        _write_town(root, town, _town_members(town, frames, size, heights, rng), layout)
    _write_splits(root, train, test, splits)
    return root


def remove_town(root: Path, town: str) -> None:
    """Take one town out of a release written by :func:`make_syndrone` (archives and extracted folder)."""
    for path in root.glob(f"Town{town}_Opt_120*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


if __name__ == "__main__":
    make_syndrone(Path(sys.argv[1]))
