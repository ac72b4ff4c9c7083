"""Tiles of the index as training samples, with their per-expert text features."""

from __future__ import annotations

import numpy as np
import torch

from manifests.tile_index import TileIndex
from segmenter.raster_io import read_crop
from segmenter.text.features import ExpertTextFeatures


def d4_variant(seed: int) -> int:
    """The flip/rotation of a sample, ``turns + 4 * flip`` (the variant index of
    :mod:`segmenter.text.directions`); ``seed`` makes it reproducible."""
    rng = np.random.default_rng(seed)
    turns = int(rng.integers(4))
    return turns + 4 * int(rng.random() < 0.5)


def augment(image: np.ndarray, label: np.ndarray, variant: int) -> tuple[np.ndarray, np.ndarray]:
    """Counter-clockwise quarter turns, then a left-right flip, the same for image and label."""
    turns, flip = variant % 4, variant >= 4
    image, label = np.rot90(image, turns, axes=(0, 1)), np.rot90(label, turns)
    if flip:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


class TileSamples(torch.utils.data.Dataset):
    """``sample(i, seed)`` gives image ``(3, H, W)`` in [0, 1], label ``(H, W)`` and text ``(M, D)`` + mask.

    ``augmentation``: ``d4`` flips and rotates (captions unchanged), ``d4_rewrite`` flips and rotates and reads
    the text features of the captions with their direction words moved the same way, ``none`` leaves tiles as
    they are.
    """

    def __init__(
        self,
        index: TileIndex,
        split: str,
        text: ExpertTextFeatures | None,
        label_column: str = "label_path",
        augmentation: str = "d4",
    ):
        self.index = index
        self.frame = index.split(split).sort_values("tile_id").reset_index(drop=True)
        self.text = text
        self.label_column = label_column
        self.augmentation = augmentation
        if augmentation == "d4_rewrite" and text is not None and text.n_variants == 1:
            raise ValueError("augmentation d4_rewrite needs text features of every direction variant")

    def __len__(self) -> int:
        return len(self.frame)

    def sample(self, position: int, seed: int | None = None) -> dict:
        row = self.frame.iloc[position]
        image = np.array(read_crop(self.index.path(row["image_path"]))[..., :3])
        label_path = self.index.path(row[self.label_column])
        if label_path is None:
            raise ValueError(f"tile {row['tile_id']} has no label; this index is for captioning/prediction only")
        label = read_crop(label_path)
        variant = d4_variant(seed) if seed is not None and self.augmentation != "none" else 0
        image, label = augment(image, label, variant)
        item = {
            "tile_id": row["tile_id"],
            "image": torch.from_numpy(image).permute(2, 0, 1).float() / 255,
            "label": torch.from_numpy(label.astype(np.int64)),
        }
        if self.text is not None:
            text_variant = variant if self.augmentation == "d4_rewrite" else 0
            item["text"], item["present"] = self.text.lookup(row["tile_id"], text_variant)
        return item

    def __getitem__(self, position: int) -> dict:
        return self.sample(position)

    def batch(self, positions: list[int], seeds: list[int] | None = None) -> dict:
        items = [self.sample(p, s) for p, s in zip(positions, seeds or [None] * len(positions), strict=True)]
        batch = {"tile_id": [item["tile_id"] for item in items]}
        for key in ("image", "label", "text", "present"):
            if key in items[0]:
                batch[key] = torch.stack([item[key] for item in items])
        return batch
