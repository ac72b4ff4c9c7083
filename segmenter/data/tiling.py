"""Sliding-window crop positions: the stride is honoured and the last row/column is aligned to the border."""

from __future__ import annotations


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Start offsets of windows of ``size`` along an axis of ``length`` pixels.

    Windows start every ``stride`` pixels; when the last one does not reach the border, one more window
    ending exactly at the border is added. An axis shorter than ``size`` gets one window at 0.

    >>> window_starts(1024, 512, 512)
    [0, 512]
    >>> window_starts(1000, 512, 256)
    [0, 256, 488]
    """
    if size <= 0 or stride <= 0:
        raise ValueError(f"size and stride must be positive, got {size} and {stride}")
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def tile_grid(height: int, width: int, size: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(y, x, h, w)`` of every crop of a ``height x width`` source, row by row."""
    return [
        (y, x, min(size, height), min(size, width))
        for y in window_starts(height, size, stride)
        for x in window_starts(width, size, stride)
    ]
