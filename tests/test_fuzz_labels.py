"""A ``hypothesis`` fuzz of the RGB label decoder: any array and palette give a correct decoding or a clean error."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays, integer_dtypes, unsigned_integer_dtypes

from segmenter.data.datasets.labels import BOUNDARY_COLOR, decode_rgb_mask

colours = st.tuples(*[st.integers(0, 255)] * 3)
palettes = st.lists(colours, min_size=1, max_size=8, unique=True).map(tuple)
masks = st.one_of(
    # 8-bit RGB(A) masks, mostly palette-like values so that the known branch is hit
    arrays(np.uint8, array_shapes(min_dims=3, max_dims=3, max_side=6).map(lambda s: (*s[:2], 3 + s[2] % 2)),
           elements=st.sampled_from([0, 255, 128, 7])),
    # anything else: other dtypes, other ranks
    arrays(st.one_of(unsigned_integer_dtypes(), integer_dtypes(), st.just(np.float32), st.just(np.bool_)),
           array_shapes(min_dims=1, max_dims=4, max_side=5)),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(mask=masks, palette=palettes, ignore_index=st.integers(0, 255))
def test_decoder_is_correct_or_refuses_cleanly(mask, palette, ignore_index):
    try:
        classes, stats = decode_rgb_mask(mask, palette, ignore_index)
    except ValueError as exc:  # the clean error: one line saying what was expected
        assert "\n" not in str(exc) and str(exc)
        return
    # Accepted: an 8-bit colour mask, a palette whose class indices all differ from the ignore index.
    assert mask.dtype == np.uint8 and mask.ndim == 3 and mask.shape[-1] >= 3 and ignore_index >= len(palette)
    assert classes.shape == mask.shape[:2] and classes.dtype == np.uint8
    rgb = [tuple(int(v) for v in pixel) for pixel in mask[..., :3].reshape(-1, 3)]
    for pixel, found in zip(rgb, classes.ravel().tolist(), strict=True):
        assert found == (palette.index(pixel) if pixel in palette else ignore_index)
    unknown = [pixel for pixel in rgb if pixel not in palette]
    assert stats.boundary == sum(pixel == BOUNDARY_COLOR for pixel in unknown)
    assert stats.stray == len(unknown) - stats.boundary and stats.excluded == 0
