import numpy as np
import pytest

from segmenter.data.datasets.isprs import ISPRS_PALETTE
from segmenter.data.datasets.labels import (
    IdTable,
    class_fractions,
    decode_index_mask,
    decode_rgb_mask,
    describe_unknown,
    encode_rgb_mask,
)


def test_every_isprs_colour_decodes_to_its_class():
    mask = np.array([list(ISPRS_PALETTE)], dtype=np.uint8)  # 1 x 6 x 3
    classes, stats = decode_rgb_mask(mask, ISPRS_PALETTE, 255)
    assert classes.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert stats.boundary == 0 and stats.stray == 0


def test_boundary_and_stray_colours_become_ignore_and_are_counted():
    mask = np.array([[[0, 0, 0], [255, 255, 255], [12, 34, 56], [0, 0, 0], [255, 0, 0]]], dtype=np.uint8)
    classes, stats = decode_rgb_mask(mask, ISPRS_PALETTE, 255)
    assert classes.tolist() == [[255, 0, 255, 255, 5]]
    assert (stats.boundary, stats.stray) == (2, 1)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 6, size=(17, 23)).astype(np.uint8)
    classes[0, 0] = 255
    decoded, _ = decode_rgb_mask(encode_rgb_mask(classes, ISPRS_PALETTE, 255), ISPRS_PALETTE, 255)
    np.testing.assert_array_equal(decoded, classes)


def test_class_fractions_sum_to_one_over_labelled_pixels():
    classes = np.array([[0, 0, 1, 255], [5, 5, 5, 255]], dtype=np.uint8)
    fractions = class_fractions(classes, 6, 255)
    assert np.isclose(sum(fractions), 1.0)
    assert fractions == [2 / 6, 1 / 6, 0.0, 0.0, 0.0, 3 / 6]
    assert class_fractions(np.full((2, 2), 255, np.uint8), 6, 255) == [0.0] * 6


def test_wide_pixels_are_refused_not_aliased_to_palette_colours():
    # (0, 65535, 255) packs to 0xFFFFFF, white: it would decode as impervious surface if accepted.
    mask = np.array([[[0, 65535, 255]]], dtype=np.uint16)
    with pytest.raises(ValueError, match="expected an 8-bit RGB mask, got uint16 pixels"):
        decode_rgb_mask(mask, ISPRS_PALETTE, 255)


def test_a_black_class_is_a_class_not_a_boundary():
    classes, stats = decode_rgb_mask(np.zeros((1, 2, 3), np.uint8), ((0, 0, 0), (9, 9, 9)), 255)
    assert classes.tolist() == [[0, 0]] and (stats.boundary, stats.stray) == (0, 0)


def test_index_masks_count_excluded_classes_apart_from_unknown_ids():
    table = IdTable(ids=(1, 2), classes=(0, 1), excluded=(13,))
    mask = np.array([[1, 2, 13, 13, 0, 300, -4]], dtype=np.int32)  # 13 excluded by design; 0, 300, -4 unknown
    classes, stats = decode_index_mask(mask, table, 255)
    assert classes.tolist() == [[0, 1, 255, 255, 255, 255, 255]]
    assert (stats.stray, stats.excluded) == (3, 2)
    with pytest.raises(ValueError, match="integer class ids"):
        decode_index_mask(mask.astype(np.float32), table, 255)


def test_index_masks_remap_ids_count_nodata_and_name_unknown_ids():
    """LoveDA-like ids: 0 no-data, two ids of one class, unknown ids named with their counts, most frequent first."""
    table = IdTable(ids=(1, 2, 7), classes=(0, 1, 1), nodata=(0,))
    mask = np.array([[0, 0, 1, 2, 7, 9, 9, 9, 14, 300]], dtype=np.uint16)
    classes, stats = decode_index_mask(mask, table, 255)
    assert classes.tolist() == [[255, 255, 0, 1, 1, 255, 255, 255, 255, 255]]
    assert (stats.nodata, stats.stray, stats.boundary, stats.excluded) == (2, 5, 0, 0)
    assert stats.unknown == ((9, 3), (14, 1), (300, 1))
    assert describe_unknown(stats.unknown, as_colours=False) == "id 9: 3 px, id 14: 1 px, id 300: 1 px"
    assert (stats + stats).unknown == ((9, 6), (14, 2), (300, 2)) and (stats + stats).stray == 10


def test_an_rgb_mask_read_as_ids_is_refused_and_grey_saved_as_rgb_is_read():
    table = IdTable(ids=(0, 1), classes=(0, 1))
    with pytest.raises(ValueError, match="single-band id mask, got 3 bands that differ"):
        decode_index_mask(np.array([[[0, 0, 255]]], np.uint8), table, 255)
    grey = np.repeat(np.array([[[0], [1]]], np.uint8), 3, axis=-1)
    assert decode_index_mask(grey, table, 255)[0].tolist() == [[0, 1]]


def test_nodata_colours_and_stray_colours_are_counted_apart():
    mask = np.array([[[0, 0, 0], [9, 9, 9], [12, 34, 56], [12, 34, 56], [255, 255, 255]]], dtype=np.uint8)
    _, stats = decode_rgb_mask(mask, ISPRS_PALETTE, 255, nodata=((9, 9, 9),))
    assert (stats.boundary, stats.nodata, stats.stray) == (1, 1, 2)
    assert describe_unknown(stats.unknown, as_colours=True) == "(12, 34, 56): 2 px"
