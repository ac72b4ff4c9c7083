"""Tiles of the index as training samples, with their per-expert text features, and the loader that batches them.

Every sample of a training step is fixed by (seed, step) alone (:func:`sample_plan`): which tile and which
flip/rotation. :class:`PlannedBatches` hands those plans to a :class:`torch.utils.data.DataLoader`, whose worker
processes decode and augment the crops while the model trains, and whose batches come back in step order, so the
batches are the same whatever the number of workers and a resumed run starts at its step without redoing the others.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from manifests.tile_index import TileIndex
from segmenter.data.raster_io import read_crop

# What a batch stacks into tensors (``tile_id`` stays a list of strings).
STACKED = ("image", "label", "text", "present")


class TileText(Protocol):
    """The text of tiles as the samples read it (:class:`segmenter.text.features.ExpertTextFeatures` is one): the data
    room names no other room, so it states what it reads instead of importing the type."""

    n_variants: int

    def lookup(self, tile_id: str, variant: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, D)`` features of a tile's experts under a direction variant, and the ``(M,)`` present flags."""
        ...


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


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    # A batch reads one or two epochs' orders: cached, so a step does not shuffle all n tiles once per sample.
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def sample_plan(step: int, batch: int, n: int, seed: int, rank: int, world: int) -> tuple[list[int], list[int]]:
    """Positions and augmentation seeds of this rank's share of the global batch of ``step``.

    The global batches walk one shuffled order of the ``n`` tiles per epoch (shuffled by ``(seed, epoch)``), rank
    ``r`` taking the ``r``-th share of each.
    """
    positions, seeds = [], []
    for j in range(rank * batch, (rank + 1) * batch):
        counter = step * batch * world + j
        epoch, offset = divmod(counter, n)
        positions.append(int(_epoch_order(seed, epoch, n)[offset]))
        seeds.append(seed * 1_000_003 + counter)
    return positions, seeds


@dataclass
class PlannedBatches(torch.utils.data.Sampler):
    """The batch sampler of training: for each step in ``[start, stop)``, this rank's ``(position, seed)`` pairs.

    ``batch_size`` tiles per step and rank out of ``n``, shuffled by ``seed`` (:func:`sample_plan`). A run resumed at
    step ``k`` starts at ``start=k``: no earlier step is decoded again.
    """

    start: int
    stop: int
    batch_size: int
    n: int
    seed: int
    rank: int = 0
    world: int = 1

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            positions, seeds = sample_plan(step, self.batch_size, self.n, self.seed, self.rank, self.world)
            yield list(zip(positions, seeds, strict=True))


def collate(items: list[dict]) -> dict:
    """One batch of samples: ``tile_id`` a list, the rest stacked along a new first dimension."""
    batch: dict = {"tile_id": [item["tile_id"] for item in items]}
    for key in STACKED:
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    return batch


class TileSamples(torch.utils.data.Dataset):
    """``sample(i, seed)`` gives image ``(3, H, W)`` in [0, 1], label ``(H, W)`` and text ``(M, D)`` + mask.

    ``augmentation``: ``d4`` flips and rotates (captions unchanged), ``d4_rewrite`` flips and rotates and reads
    the text features of the captions with their direction words moved the same way, ``none`` leaves tiles as
    they are. Indexing takes a position, or a ``(position, seed)`` pair as :class:`PlannedBatches` yields. The
    object pickles (index, frame and CPU text features), so loader workers may be spawned as well as forked.
    """

    def __init__(
        self,
        index: TileIndex,
        split: str,
        text: TileText | None,
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
        """The sample at ``position``, flipped and rotated by the variant ``seed`` draws (none without a seed)."""
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

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        return self.sample(*key) if isinstance(key, tuple) else self.sample(key)

    def batch(self, positions: list[int], seeds: list[int] | None = None) -> dict:
        """The batch of ``positions`` (augmented by ``seeds``), decoded here, in this process."""
        return collate([self.sample(p, s) for p, s in zip(positions, seeds or [None] * len(positions), strict=True)])


def training_loader(
    samples: TileSamples, plan: PlannedBatches, workers: int, prefetch: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    """The batches of ``plan`` in step order, decoded by ``workers`` processes (0: in this process).

    Each worker keeps ``prefetch`` batches ready; ``pin_memory`` (for a CUDA device) puts them in page-locked memory
    so the copy to the GPU can overlap the step. The plan spans every remaining step and is read once, so the workers
    live for the whole run without ``persistent_workers``.
    """
    return torch.utils.data.DataLoader(
        samples,
        batch_sampler=plan,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers > 0 else None,
    )
