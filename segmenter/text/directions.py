"""Direction words of a caption moved with the image under the eight flips and 90-degree rotations (D4).

A caption that says "cars in the north-west" is false once the tile is rotated; training with geometric
augmentation either rewrites those words with the same transform or stays true by not transforming. The
variant index ``turns + 4 * flip`` is the one :func:`segmenter.data.samples.d4_variant` draws: ``turns`` counter-
clockwise quarter turns (``np.rot90`` on axes 0, 1), then a left-right flip when ``flip``.
"""

from __future__ import annotations

import re

N_VARIANTS = 8

# (dy, dx) in image coordinates: north is up (-y), east is right (+x).
_COMPASS: dict[str, tuple[int, int]] = {
    "north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1),
    "north-east": (-1, 1), "north-west": (-1, -1), "south-east": (1, 1), "south-west": (1, -1),
    "northeast": (-1, 1), "northwest": (-1, -1), "southeast": (1, 1), "southwest": (1, -1),
    "northern": (-1, 0), "southern": (1, 0), "eastern": (0, 1), "western": (0, -1),
}  # fmt: skip
_ADJECTIVE = {"north": "northern", "south": "southern", "east": "eastern", "west": "western"}
_SCREEN: dict[str, tuple[int, int]] = {
    "top": (-1, 0), "bottom": (1, 0), "upper": (-1, 0), "lower": (1, 0), "left": (0, -1), "right": (0, 1),
}  # fmt: skip

_COMPOUND_SCREEN = re.compile(r"\b(top|bottom|upper|lower)([- ])(left|right)\b", re.IGNORECASE)
_WORD = re.compile(
    r"\b(north-east|north-west|south-east|south-west|northeast|northwest|southeast|southwest|"
    r"northern|southern|eastern|western|north|south|east|west|top|bottom|upper|lower|left|right)\b",
    re.IGNORECASE,
)


def transform_vector(vector: tuple[int, int], variant: int) -> tuple[int, int]:
    """Where a direction points after the D4 transform ``variant`` of the image."""
    turns, flip = variant % 4, variant >= 4
    dy, dx = vector
    for _ in range(turns):  # a counter-clockwise quarter turn takes north to west
        dy, dx = -dx, dy
    return (dy, -dx) if flip else (dy, dx)


def _compass_word(vector: tuple[int, int], adjective: bool, hyphen: bool) -> str:
    dy, dx = vector
    vertical = {-1: "north", 1: "south", 0: ""}[dy]
    horizontal = {-1: "west", 1: "east", 0: ""}[dx]
    if vertical and horizontal:
        return f"{vertical}-{horizontal}" if hyphen else f"{vertical}{horizontal}"
    word = vertical or horizontal
    return _ADJECTIVE[word] if adjective else word


def _screen_word(vector: tuple[int, int], style: str) -> str:
    dy, dx = vector
    if dy:
        return {-1: "upper", 1: "lower"}[dy] if style in ("upper", "lower") else {-1: "top", 1: "bottom"}[dy]
    return {-1: "left", 1: "right"}[dx]


def _same_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def rewrite_directions(caption: str, variant: int) -> str:
    """``caption`` with every compass and screen direction moved by the D4 transform ``variant``.

    >>> rewrite_directions("Cars in the north-west, trees on the left.", 1)
    'Cars in the south-west, trees on the bottom.'
    """
    if variant % N_VARIANTS == 0:
        return caption

    def compound(match: re.Match[str]) -> str:
        first, separator, second = match.group(1), match.group(2), match.group(3)
        dy = _SCREEN[first.lower()][0]
        dx = _SCREEN[second.lower()][1]
        new_dy, new_dx = transform_vector((dy, dx), variant)
        vertical = _screen_word((new_dy, 0), first.lower())
        horizontal = _screen_word((0, new_dx), "")
        return _same_case(vertical, first) + separator + _same_case(horizontal, second)

    def single(match: re.Match[str]) -> str:
        word = match.group(0)
        key = word.lower()
        if key in _COMPASS:
            moved = transform_vector(_COMPASS[key], variant)
            return _same_case(_compass_word(moved, key.endswith("ern"), "-" in key), word)
        moved = transform_vector(_SCREEN[key], variant)
        if moved[0] and key in ("left", "right"):  # a side became an edge: "on the left" -> "on the top"
            return _same_case(_screen_word(moved, "top"), word)
        return _same_case(_screen_word(moved, key), word)

    # Compound screen phrases first ("top left" is one direction), protected from the single-word pass.
    parts = []
    last = 0
    for match in _COMPOUND_SCREEN.finditer(caption):
        parts.append(_WORD.sub(single, caption[last : match.start()]))
        parts.append(compound(match))
        last = match.end()
    parts.append(_WORD.sub(single, caption[last:]))
    return "".join(parts)


def caption_variants(caption: str) -> list[str]:
    """The caption under each of the eight D4 variants (index 0 is the caption itself)."""
    return [rewrite_directions(caption, variant) for variant in range(N_VARIANTS)]
