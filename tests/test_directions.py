"""Direction words follow the image under flips and rotations, checked against numpy's own transforms."""

from __future__ import annotations

import numpy as np
import pytest

from segmenter.data.samples import augment
from segmenter.text.directions import caption_variants, rewrite_directions

# Where each word points, as a pixel offset from the centre of a 3 x 3 image.
POSITIONS = {"north": (0, 1), "south": (2, 1), "east": (1, 2), "west": (1, 0), "north-west": (0, 0),
             "north-east": (0, 2), "south-west": (2, 0), "south-east": (2, 2), "top": (0, 1), "bottom": (2, 1),
             "left": (1, 0), "right": (1, 2), "top left": (0, 0), "bottom right": (2, 2)}  # fmt: skip
WORD_AT = {
    "compass": {(0, 1): "north", (2, 1): "south", (1, 2): "east", (1, 0): "west", (0, 0): "north-west",
                (0, 2): "north-east", (2, 0): "south-west", (2, 2): "south-east"},
    "screen": {(0, 1): "top", (2, 1): "bottom", (1, 2): "right", (1, 0): "left", (0, 0): "top left",
               (0, 2): "top right", (2, 0): "bottom left", (2, 2): "bottom right"},
}  # fmt: skip


@pytest.mark.parametrize("variant", range(8))
@pytest.mark.parametrize("word", sorted(POSITIONS))
def test_a_word_moves_where_augment_moves_its_pixel(word, variant):
    image = np.zeros((3, 3, 3), np.uint8)
    image[POSITIONS[word]] = 255
    moved, _ = augment(image, np.zeros((3, 3), np.uint8), variant)
    where = tuple(int(v) for v in np.argwhere(moved[..., 0])[0])
    style = "compass" if word in WORD_AT["compass"].values() else "screen"
    assert rewrite_directions(f"cars in the {word}.", variant) == f"cars in the {WORD_AT[style][where]}."


def test_case_adjectives_and_other_words_are_kept():
    assert rewrite_directions("North: a Northern lawn, the Upper-Right roof; a red roof.", 2) == (
        "South: a Southern lawn, the Lower-Left roof; a red roof."
    )
    variants = caption_variants("a road in the centre")
    assert variants == ["a road in the centre"] * 8
