"""Sliding-window inference over a whole source: averaged logits of overlapping windows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from manifests.caption_store import selected_captions
from manifests.devices import resolve_device
from manifests.errors import InputError
from manifests.run_manifest import RunManifest, load_manifest
from manifests.tile_index import TileIndex, read_tile_index
from segmenter.model import MPerSSegmenter
from segmenter.options import MissingCaptions
from segmenter.run_record import RunRecord, selected_captions_sha256
from segmenter.text.features import ExpertTextFeatures, check_store_experts
from segmenter.tiling import tile_grid
from segmenter.train import RunPaths, load_text_features

TextLookup = Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor] | None]


@dataclass
class TrainedRun:
    """What evaluation and prediction need of a training run: its newest model, record, manifest and tile index."""

    model: MPerSSegmenter
    record: RunRecord
    manifest: RunManifest
    index: TileIndex
    device: torch.device

    @property
    def tile_size(self) -> int:
        return int(self.index.extra.get("tile_size", 512))

    @property
    def tile_stride(self) -> int:
        return int(self.index.extra.get("stride", self.tile_size))

    def window(self, requested: int | None) -> int:
        """The sliding window: as requested, else the tile size the model was trained on."""
        return requested or self.tile_size

    def stride(self, window: int, overlap: float | None) -> int:
        """Window stride. A text-guided model defaults to the captioned tile grid (each window is a captioned tile,
        so its caption describes exactly the pixels it sees); a text-free one to 25% overlap."""
        if overlap is None:
            if self.model.config.uses_text and window == self.tile_size:
                return self.tile_stride
            overlap = 0.25
        return max(1, round(window * (1 - overlap)))

    def text_features(self, captions: str | Path, missing: str = MissingCaptions.error) -> ExpertTextFeatures:
        """Per-expert caption features from a store, as in training, for the run's experts.

        Raises:
            InputError: the store lacks some of the run's experts or has others (unless ``missing='mask'``, which
                masks the lacking ones on every tile and says so).
        """
        experts = list(self.model.config.experts)
        selected = selected_captions(captions)
        lacking = check_store_experts(captions, selected, experts, missing)
        for name in lacking:
            print(f"expert {name}: not in caption store {captions}; masked on every tile (--missing-captions mask)")
        same_store = self.record.captions is not None and str(Path(captions).resolve()) == self.record.captions
        if same_store and selected_captions_sha256(selected) != self.record.captions_sha256:
            # Not an error (re-captioning a store in place is how it grows), but never silent.
            print(f"note: the selected captions of {captions} changed since this run was trained (record's hash)")
        return load_text_features(
            self.model.config, Path(captions), selected, self.record.settings.passed_only, self.device
        )


def open_run(run: str | Path, device: str = "auto") -> TrainedRun:
    """The newest checkpoint of a training run, with its record and the manifest and tile index it was trained on.

    Args:
        run: the run folder written by ``segmenter train``.
        device: ``auto`` (the GPU when there is one) or a torch device name; see :func:`resolve_device`.

    Raises:
        InputError: no finished checkpoint, a run record of another version or with a missing field, a device this
            machine lacks, a checkpoint whose experts differ from the record's.
    """
    resolved = resolve_device(device)  # first: a bad --device fails before anything is read
    paths = RunPaths(Path(run))
    if paths.latest is None:
        raise InputError(f"--run: {run} holds no finished checkpoint (checkpoints/latest)")
    if paths.named != paths.latest:
        print(f"note: checkpoint {paths.named} is incomplete; using {paths.latest.name}, the newest complete one")
    record = RunRecord.read(paths.root)
    manifest = load_manifest(record.manifest)
    if manifest.sha256 != record.manifest_sha256:
        print(f"note: manifest {record.manifest} changed since run {run} was trained")
    model = MPerSSegmenter.load(paths.latest).to(resolved).eval()
    if model.config.uses_text and record.experts != list(model.config.experts):
        raise InputError(
            f"--run: {run} records experts {record.experts} but its checkpoint reads {model.config.experts}"
        )
    return TrainedRun(model, record, manifest, read_tile_index(manifest.tiling.out), resolved)


@torch.no_grad()
def sliding_window_logits(
    model: MPerSSegmenter,
    image: np.ndarray,
    window: int,
    overlap: float = 0.25,
    text_for: TextLookup | None = None,
    device: str | torch.device | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """``(K, H, W)`` class logits of an ``H x W x C`` uint8 image, averaged where windows overlap.

    Windows are padded to a multiple of 32 (reflect) and the padding is cropped from their logits.
    ``text_for(y, x, h, w)`` gives the text features of a window, or None for masked experts. ``stride``, when
    given, replaces the stride derived from ``overlap``. ``device`` defaults to the model's: windows go where
    the weights are.
    """
    if device is None:
        device = next(model.parameters()).device
    height, width = image.shape[:2]
    stride = stride or max(1, round(window * (1 - overlap)))
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


@dataclass
class CaptionWindows:
    """Text for each window from the captioned tiles of one source, remembering which tile's caption it used.

    A window that is exactly a captioned tile reads that tile's caption; any other window (another size or
    overlap) reads the caption of the tile it overlaps most, and is recorded as off the captioned grid.
    """

    source_id: str
    tiles: pd.DataFrame
    text: ExpertTextFeatures
    used: list[dict] = field(default_factory=list)

    def __call__(self, y: int, x: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        best, best_area, exact = None, 0, False
        for row in self.tiles.itertuples(index=False):
            if (row.y, row.x, row.height, row.width) == (y, x, h, w):
                best, exact = row.tile_id, True
                break
            area = max(0, min(x + w, row.x + row.width) - max(x, row.x)) * max(
                0, min(y + h, row.y + row.height) - max(y, row.y)
            )
            if area > best_area:
                best, best_area = row.tile_id, area
        self.used.append({"source_id": self.source_id, "y": y, "x": x, "height": h, "width": w,
                          "caption_tile_id": best, "on_captioned_grid": exact})  # fmt: skip
        if best is None:
            return None
        return self.text.lookup(best)
