"""Sliding-window inference over a whole source: averaged logits of overlapping windows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
from segmenter.data.raster_io import three_bands
from segmenter.data.tiling import tile_grid
from segmenter.data.windowed_read import ArrayWindows, WindowReader
from segmenter.engine.options import MissingCaptions
from segmenter.engine.run_record import RunRecord, selected_captions_sha256
from segmenter.engine.train import CHECKPOINT_FILES, RunPaths, load_text_features, local_weights
from segmenter.model import MPerSSegmenter
from segmenter.text.features import ExpertTextFeatures, check_store_experts

TextLookup = Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor] | None]


@dataclass(frozen=True)
class LocalWeights:
    """Where a run's local weights are now (``--backbone-file``, ``--text-checkpoint``); None: where they were at
    training. The backbone file must be the one trained with (SHA-256), the text weights give the same features."""

    backbone_file: Path | None = None
    text_checkpoint: Path | None = None


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


def _why_unfinished(paths: RunPaths) -> str:
    """What the newest checkpoint folder of a run without a complete one lacks (for the refusal)."""
    folders = sorted(paths.checkpoints.glob("step_*"))
    if not folders:
        return f" ({paths.checkpoints} has no step_* folder)"
    missing = [name for name in CHECKPOINT_FILES if not (folders[-1] / name).is_file()]
    older = " (written by an older version: train again)" if missing == ["checksums.json"] else ""
    return f": {folders[-1]} lacks {', '.join(missing)}{older}"


def open_run(run: str | Path, device: str = "auto", weights: LocalWeights | None = None) -> TrainedRun:
    """The newest checkpoint of a training run, with its record and the manifest and tile index it was trained on.

    Args:
        run: the run folder written by ``segmenter train``.
        device: ``auto`` (the GPU when there is one) or a torch device name; see :func:`resolve_device`.
        weights: where the run's local weights are now, when they moved since training (another machine).

    Raises:
        InputError: no finished checkpoint, a run record of another version or with a missing field, a device this
            machine lacks, a checkpoint whose experts differ from the record's.
    """
    resolved = resolve_device(device)  # first: a bad --device fails before anything is read
    paths = RunPaths(Path(run))
    if paths.latest is None:
        raise InputError(f"--run: {run} holds no finished checkpoint{_why_unfinished(paths)}")
    if paths.named != paths.latest:
        print(f"note: checkpoint {paths.named} is incomplete; using {paths.latest.name}, the newest complete one")
    record = RunRecord.read(paths.root)
    manifest = load_manifest(record.manifest)
    if manifest.sha256 != record.manifest_sha256:
        print(f"note: manifest {record.manifest} changed since run {run} was trained")
    moved = local_weights(weights.backbone_file, weights.text_checkpoint) if weights else {}
    model = MPerSSegmenter.load(paths.latest, **moved).to(resolved).eval()
    # convolutions run faster on NHWC tensors, on a GPU and on the CPU (oneDNN) alike; the windows are sent so too
    model = model.to(memory_format=torch.channels_last)
    if model.config.uses_text and record.experts != list(model.config.experts):
        raise InputError(
            f"--run: {run} records experts {record.experts} but its checkpoint reads {model.config.experts}"
        )
    return TrainedRun(model, record, manifest, read_tile_index(manifest.tiling.out), resolved)


Image = np.ndarray | WindowReader


def default_batch_size(device: torch.device) -> int:
    """Windows per forward when none is asked for: 8, the paper's batch; on the CPU too, where batch 8 gave 1.5x the
    windows/s of batch 1 and batch 4 1.47x (bench/inference.py, test_tiny, 256 px windows)."""
    return 8


def check_batch_size(batch_size: int | None) -> None:
    """Refuse a batch size below one window per forward (None: the device's default).

    Raises:
        InputError: naming ``--batch-size``.
    """
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size: expected 1 or more windows per forward, got {batch_size}")


def _autocast_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype: as asked, else bf16 on a GPU and none (float32) elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else None
    return None if dtype == torch.float32 else dtype


def _window_pixels(reader: WindowReader, y: int, x: int, h: int, w: int) -> torch.Tensor:
    """``(3, h, w)`` float pixels in [0, 1] of a window; a grey image repeats its band (:func:`three_bands`)."""
    crop = three_bands(reader.read(y, x, h, w))[..., :3]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div(255)


def _window_logits(
    model: MPerSSegmenter,
    reader: WindowReader,
    windows: list[tuple[int, int, int, int]],
    text_for: TextLookup | None,
    device: torch.device,
    batch_size: int,
    dtype: torch.dtype | None,
) -> Iterator[tuple[tuple[int, int, int, int], torch.Tensor]]:
    """``(window, (K, h, w) float32 logits on the device)`` of every window, in order, ``batch_size`` per forward.

    Windows are padded to a multiple of 32 (reflect) and the padding is cropped from their logits. Each window of a
    batch gets its own text features and present flags.
    """
    amp = _autocast_dtype(device, dtype)
    experts = len(model.config.experts)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        _, _, h, w = chunk[0]  # every window of a grid has the same size
        crops = torch.stack([_window_pixels(reader, *window) for window in chunk])
        pad_h, pad_w = (-h) % 32, (-w) % 32
        if pad_h or pad_w:
            mode = "reflect" if min(h, w) > max(pad_h, pad_w) else "replicate"
            crops = F.pad(crops, (0, pad_w, 0, pad_h), mode=mode)
        crops = crops.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            if model.config.uses_text:
                found = [text_for(*window) if text_for else None for window in chunk]
                empty = (torch.zeros(experts, model.config.text_feature_dim), torch.zeros(experts, dtype=torch.bool))
                found = [item if item is not None else empty for item in found]
                text = torch.stack([item[0] for item in found]).to(device)
                present = torch.stack([item[1] for item in found]).to(device)
                logits = model(crops, text, present).logits
            else:
                logits = model(crops).logits
        logits = logits[:, :, :h, :w].float()
        yield from zip(chunk, logits, strict=True)


def _setup(
    model: MPerSSegmenter,
    image: Image,
    window: int,
    overlap: float,
    device: str | torch.device | None,
    stride: int | None,
    batch_size: int | None,
) -> tuple[WindowReader, list[tuple[int, int, int, int]], torch.device, int]:
    device = torch.device(device) if device is not None else next(model.parameters()).device
    reader = ArrayWindows(image) if isinstance(image, np.ndarray) else image
    stride = stride or max(1, round(window * (1 - overlap)))
    check_batch_size(batch_size)
    batch_size = batch_size or default_batch_size(device)
    return reader, tile_grid(reader.height, reader.width, window, stride), device, batch_size


@torch.no_grad()
def sliding_window_logits(
    model: MPerSSegmenter,
    image: Image,
    window: int,
    overlap: float = 0.25,
    text_for: TextLookup | None = None,
    device: str | torch.device | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(K, H, W)`` class logits of an ``H x W x C`` uint8 image (an array or a :class:`WindowReader`), averaged
    where windows overlap, summed into one preallocated float32 array on the device.

    ``text_for(y, x, h, w)`` gives the text features of a window, or None for masked experts. ``stride``, when
    given, replaces the stride derived from ``overlap``. ``device`` defaults to the model's: windows go where
    the weights are. ``batch_size`` windows are forwarded at once (default: :func:`default_batch_size`); ``dtype``
    is the autocast dtype (default: bf16 on a GPU, float32 elsewhere).
    """
    reader, windows, device, batch_size = _setup(model, image, window, overlap, device, stride, batch_size)
    total = torch.zeros(model.config.num_classes, reader.height, reader.width, device=device)
    counts = torch.zeros(1, reader.height, reader.width, device=device)
    for (y, x, h, w), logits in _window_logits(model, reader, windows, text_for, device, batch_size, dtype):
        total[:, y : y + h, x : x + w] += logits
        counts[:, y : y + h, x : x + w] += 1
    return (total / counts).cpu()


@torch.no_grad()
def sliding_window_classes(
    model: MPerSSegmenter,
    image: Image,
    window: int,
    overlap: float = 0.25,
    text_for: TextLookup | None = None,
    device: str | torch.device | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """``(H, W)`` uint8 class map: ``sliding_window_logits(...).argmax(0)`` without ever holding the whole logits.

    Windows come row by row, so once a row of windows starting at ``y`` arrives every pixel above ``y`` is final:
    logits are summed into a band one window high that is argmaxed and shifted up as the rows advance
    (``K x window x W`` floats instead of ``K x H x W``). Arguments as :func:`sliding_window_logits`.
    """
    reader, windows, device, batch_size = _setup(model, image, window, overlap, device, stride, batch_size)
    rows = windows[0][2]
    classes = np.zeros((reader.height, reader.width), np.uint8)
    total = torch.zeros(model.config.num_classes, rows, reader.width, device=device)
    counts = torch.zeros(1, rows, reader.width, device=device)
    top = 0  # the source row of the band's first row

    def flush(until: int) -> None:
        done = min(until - top, rows)
        classes[top : top + done] = (total[:, :done] / counts[:, :done]).argmax(0).cpu().numpy()
        for band in (total, counts):
            band[:, : rows - done] = band[:, done:].clone()
            band[:, rows - done :] = 0

    for (y, x, h, w), logits in _window_logits(model, reader, windows, text_for, device, batch_size, dtype):
        if y > top:
            flush(y)
            top = y
        total[:, y - top : y - top + h, x : x + w] += logits
        counts[:, y - top : y - top + h, x : x + w] += 1
    flush(reader.height)
    return classes


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


@torch.no_grad()
def tile_classes(
    model: MPerSSegmenter, tiles: list[np.ndarray], device: str | torch.device, batch_size: int | None = None
) -> list[np.ndarray]:
    """``(h, w)`` uint8 class maps of whole tiles (one window each, no text), ``batch_size`` tiles per forward.

    Consecutive tiles of one size are laid side by side in a strip whose windows are the tiles, so they share the
    batching of :func:`sliding_window_logits`; each map equals ``sliding_window_logits(model, tile, max(h, w),
    0.0).argmax(0)``.
    """
    check_batch_size(batch_size)
    device = torch.device(device)
    batch_size = batch_size or default_batch_size(device)
    classes: list[np.ndarray] = []
    start = 0
    while start < len(tiles):
        shape, end = tiles[start].shape, start
        while end < len(tiles) and end - start < batch_size and tiles[end].shape == shape:
            end += 1
        height, width = shape[:2]
        strip = ArrayWindows(np.concatenate(tiles[start:end], axis=1))
        windows = [(0, i * width, height, width) for i in range(end - start)]
        for _, logits in _window_logits(model, strip, windows, None, device, batch_size, None):
            classes.append(logits.argmax(0).cpu().numpy().astype(np.uint8))
        start = end
    return classes
