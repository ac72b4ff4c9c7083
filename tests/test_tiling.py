import itertools

import pytest

from segmenter.data.tiling import tile_grid, window_starts


@pytest.mark.parametrize(
    ("length", "size", "stride", "expected"),
    [
        (1024, 512, 512, [0, 512]),
        (1000, 512, 512, [0, 488]),  # last window aligned to the border
        (1024, 512, 256, [0, 256, 512]),  # stride smaller than the size
        (1000, 512, 256, [0, 256, 488]),
        (512, 512, 512, [0]),
        (300, 512, 512, [0]),  # shorter than one window
        (2000, 512, 384, [0, 384, 768, 1152, 1488]),
    ],
)
def test_window_starts_honour_stride_and_border(length, size, stride, expected):
    starts = window_starts(length, size, stride)
    assert starts == expected
    assert max(starts) + min(size, length) == length
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap <= stride for gap in gaps)


def test_tile_grid_counts_and_shapes():
    grid = tile_grid(1000, 1500, 512, 256)
    assert len(grid) == 3 * 5
    assert {(h, w) for _, _, h, w in grid} == {(512, 512)}
    assert grid[0] == (0, 0, 512, 512) and grid[-1] == (488, 988, 512, 512)


def test_invalid_stride_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        window_starts(100, 32, 0)
