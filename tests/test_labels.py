import numpy as np

from segmenter.datasets.isprs import ISPRS_PALETTE
from segmenter.datasets.labels import class_fractions, decode_rgb_mask, encode_rgb_mask


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
