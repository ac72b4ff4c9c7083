"""Sliding-window inference over a whole source: averaged logits of overlapping windows."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from manifests.errors import InputError
from manifests.run_manifest import RunManifest, load_manifest
from manifests.tile_index import TileIndex, read_tile_index
from segmenter.model import MPerSSegmenter
from segmenter.text.features import ExpertTextFeatures
from segmenter.tiling import tile_grid
from segmenter.train import RunPaths, load_text_features

TextLookup = Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor] | None]


@dataclass
class TrainedRun:
    """What evaluation and prediction need of a training run: its newest model, manifest and tile index."""

    model: MPerSSegmenter
    info: dict
    manifest: RunManifest
    index: TileIndex
    device: str

    def window(self, requested: int | None) -> int:
        """The sliding window: as requested, else the tile size the model was trained on."""
        return requested or int(self.index.extra.get("tile_size", 512))

    def text_features(self, captions: str | Path | None) -> ExpertTextFeatures | None:
        """Per-expert caption features from a store, as in training (None for a model without text)."""
        passed_only = self.info["settings"]["passed_only"]
        return load_text_features(self.model.config, Path(captions) if captions else None, passed_only, self.device)


def open_run(run: str | Path, device: str = "cpu") -> TrainedRun:
    """The newest checkpoint of a training run, with the manifest and tile index it was trained on."""
    paths = RunPaths(Path(run))
    if paths.latest is None or not (paths.root / "run.json").is_file():
        raise InputError(f"--run: {run} holds no finished checkpoint (checkpoints/latest and run.json)")
    info = json.loads((paths.root / "run.json").read_text())
    manifest = load_manifest(info["manifest"])
    model = MPerSSegmenter.load(paths.latest).to(device).eval()
    return TrainedRun(model, info, manifest, read_tile_index(manifest.tiling.out), device)


@torch.no_grad()
def sliding_window_logits(
    model: MPerSSegmenter,
    image: np.ndarray,
    window: int,
    overlap: float = 0.25,
    text_for: TextLookup | None = None,
    device: str = "cpu",
) -> torch.Tensor:
    """``(K, H, W)`` class logits of an ``H x W x C`` uint8 image, averaged where windows overlap.

    Windows are padded to a multiple of 32 (reflect) and the padding is cropped from their logits.
    ``text_for(y, x, h, w)`` gives the text features of a window, or None for masked experts.
    """
    height, width = image.shape[:2]
    stride = max(1, round(window * (1 - overlap)))
    pixels = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float().div(255)
    total = torch.zeros(model.config.num_classes, height, width)
    counts = torch.zeros(1, height, width)
    for y, x, h, w in tile_grid(height, width, window, stride):
        crop = pixels[:, y : y + h, x : x + w][None]
        pad_h, pad_w = (-h) % 32, (-w) % 32
        if pad_h or pad_w:
            crop = F.pad(crop, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
        crop = crop.to(device)
        if model.config.uses_text:
            found = text_for(y, x, h, w) if text_for else None
            if found is None:
                experts = len(model.config.experts)
                found = (torch.zeros(experts, model.config.text_dim), torch.zeros(experts, dtype=torch.bool))
            logits = model(crop, found[0][None].to(device), found[1][None].to(device)).logits
        else:
            logits = model(crop).logits
        total[:, y : y + h, x : x + w] += logits[0, :, :h, :w].float().cpu()
        counts[:, y : y + h, x : x + w] += 1
    return total / counts


def overlapping_tile_text(tiles, text) -> TextLookup:
    """Text of the captioned tile that overlaps a window most (tiles: rows with x, y, width, height, tile_id)."""
    boxes = [(row.x, row.y, row.width, row.height, row.tile_id) for row in tiles.itertuples(index=False)]

    def lookup(y: int, x: int, h: int, w: int):
        best, best_area = None, 0
        for tx, ty, tw, th, tile_id in boxes:
            area = max(0, min(x + w, tx + tw) - max(x, tx)) * max(0, min(y + h, ty + th) - max(y, ty))
            if area > best_area:
                best, best_area = tile_id, area
        return text.lookup(best) if best is not None else None

    return lookup
