"""Sliding-window inference over a whole source: averaged logits of overlapping windows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segmenter.data.raster_io import three_bands
from segmenter.data.tiling import tile_grid
from segmenter.data.windowed_read import ArrayWindows, WindowReader
from segmenter.engine.options import check_batch_size
from segmenter.model import MODEL_STRIDE, MPerSSegmenter

Window = tuple[int, int, int, int]  # y, x, height, width
TextLookup = Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor] | None]

Image = np.ndarray | WindowReader


def default_batch_size(device: torch.device) -> int:
    """Windows per forward when none is asked for: 8, the paper's batch; on the CPU too, where batch 8 gave 1.5x the
    windows/s of batch 1 and batch 4 1.47x (bench/inference.py, test_tiny, 256 px windows)."""
    return 8


@dataclass(frozen=True)
class SlidingWindows:
    """How an image is cut into windows and sent through a model.

    Attributes:
        window: the window side in pixels.
        overlap: the share of a window its neighbour overlaps, when ``stride`` is not given.
        stride: the step between windows (replaces the one derived from ``overlap``).
        batch_size: windows per forward (None: :func:`default_batch_size`).
        dtype: the autocast dtype (None: bf16 on a GPU, float32 elsewhere).
    """

    window: int
    overlap: float = 0.25
    stride: int | None = None
    batch_size: int | None = None
    dtype: torch.dtype | None = None

    def grid(self, height: int, width: int) -> list[Window]:
        """The windows over an ``height x width`` image, row by row, the last row and column on the border.

        Raises:
            InputError: a batch size below 1.
        """
        check_batch_size(self.batch_size)
        stride = self.stride or max(1, round(self.window * (1 - self.overlap)))
        return tile_grid(height, width, self.window, stride)


def _autocast_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype: as asked, else bf16 on a GPU and none (float32) elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else None
    return None if dtype == torch.float32 else dtype


def _window_pixels(reader: WindowReader, y: int, x: int, h: int, w: int) -> torch.Tensor:
    """``(3, h, w)`` float pixels in [0, 1] of a window; a grey image repeats its band (:func:`three_bands`)."""
    crop = three_bands(reader.read(y, x, h, w))[..., :3]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div(255)


def _window_text(
    model: MPerSSegmenter, chunk: list[Window], text_for: TextLookup | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, M, D)`` text features and ``(B, M)`` present flags of a batch of windows; a window ``text_for`` has no
    text for (or no ``text_for``) has every expert masked."""
    experts = len(model.config.experts)
    empty = (torch.zeros(experts, model.config.text_feature_dim), torch.zeros(experts, dtype=torch.bool))
    found = [(text_for(*window) if text_for else None) or empty for window in chunk]
    return torch.stack([item[0] for item in found]).to(device), torch.stack([item[1] for item in found]).to(device)


def _window_logits(
    model: MPerSSegmenter,
    reader: WindowReader,
    windows: list[Window],
    text_for: TextLookup | None,
    device: torch.device,
    spec: SlidingWindows,
) -> Iterator[tuple[Window, torch.Tensor]]:
    """``(window, (K, h, w) float32 logits on the device)`` of every window, in order, ``spec.batch_size`` per
    forward.

    Windows are padded to a multiple of ``MODEL_STRIDE`` (reflect) and the padding is cropped from their logits.
    Each window of a batch gets its own text features and present flags.
    """
    amp = _autocast_dtype(device, spec.dtype)
    batch_size = spec.batch_size or default_batch_size(device)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        _, _, h, w = chunk[0]  # every window of a grid has the same size
        crops = torch.stack([_window_pixels(reader, *window) for window in chunk])
        pad_h, pad_w = (-h) % MODEL_STRIDE, (-w) % MODEL_STRIDE
        if pad_h or pad_w:
            mode = "reflect" if min(h, w) > max(pad_h, pad_w) else "replicate"
            crops = F.pad(crops, (0, pad_w, 0, pad_h), mode=mode)
        crops = crops.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            text = _window_text(model, chunk, text_for, device) if model.config.uses_text else ()
            logits = model(crops, *text).logits
        logits = logits[:, :, :h, :w].float()
        yield from zip(chunk, logits, strict=True)


def _setup(
    model: MPerSSegmenter, image: Image, spec: SlidingWindows, device: str | torch.device | None
) -> tuple[WindowReader, list[Window], torch.device]:
    """The window reader of an image, its windows, and the device they go to (default: the model's)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    reader = ArrayWindows(image) if isinstance(image, np.ndarray) else image
    return reader, spec.grid(reader.height, reader.width), device


@torch.no_grad()
def sliding_window_logits(
    model: MPerSSegmenter,
    image: Image,
    spec: SlidingWindows,
    text_for: TextLookup | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """``(K, H, W)`` class logits of an ``H x W x C`` uint8 image (an array or a :class:`WindowReader`), averaged
    where windows overlap, summed into one preallocated float32 array on the device.

    ``spec`` says how the image is cut into windows and how many go through the model at once. ``text_for(y, x, h,
    w)`` gives the text features of a window, or None for masked experts. ``device`` defaults to the model's:
    windows go where the weights are.
    """
    reader, windows, device = _setup(model, image, spec, device)
    total = torch.zeros(model.config.num_classes, reader.height, reader.width, device=device)
    counts = torch.zeros(1, reader.height, reader.width, device=device)
    for (y, x, h, w), logits in _window_logits(model, reader, windows, text_for, device, spec):
        total[:, y : y + h, x : x + w] += logits
        counts[:, y : y + h, x : x + w] += 1
    return (total / counts).cpu()


@torch.no_grad()
def sliding_window_classes(
    model: MPerSSegmenter,
    image: Image,
    spec: SlidingWindows,
    text_for: TextLookup | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """``(H, W)`` uint8 class map: ``sliding_window_logits(...).argmax(0)`` without ever holding the whole logits.

    Windows come row by row, so once a row of windows starting at ``y`` arrives every pixel above ``y`` is final:
    logits are summed into a band one window high that is argmaxed and shifted up as the rows advance
    (``K x window x W`` floats instead of ``K x H x W``). Arguments as :func:`sliding_window_logits`.
    """
    reader, windows, device = _setup(model, image, spec, device)
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

    for (y, x, h, w), logits in _window_logits(model, reader, windows, text_for, device, spec):
        if y > top:
            flush(y)
            top = y
        total[:, y - top : y - top + h, x : x + w] += logits
        counts[:, y - top : y - top + h, x : x + w] += 1
    flush(reader.height)
    return classes


@torch.no_grad()
def tile_classes(
    model: MPerSSegmenter, tiles: list[np.ndarray], device: str | torch.device, batch_size: int | None = None
) -> list[np.ndarray]:
    """``(h, w)`` uint8 class maps of whole tiles (one window each, no text), ``batch_size`` tiles per forward.

    Consecutive tiles of one size are laid side by side in a strip whose windows are the tiles, so they share the
    batching of :func:`sliding_window_logits`; each map equals ``sliding_window_logits(model, tile,
    SlidingWindows(max(h, w), 0.0)).argmax(0)``.
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
        spec = SlidingWindows(max(height, width), batch_size=batch_size)
        for _, logits in _window_logits(model, strip, windows, None, device, spec):
            classes.append(logits.argmax(0).cpu().numpy().astype(np.uint8))
        start = end
    return classes
