"""The synthetic expert: a study tool that writes captions of known quality, not a captioner.

It writes the annotation expert's caption of the request's class mask (the label or the predicted mask, as the
class source of the split says) after corrupting the mask at the rates its manifest entry declares, each kind drawn
independently per key (tile, expert, prompt) and attempt:

- ``proportions``: a present class is grown over a random half-side square of the tile (its share, and every other
  class's, change; the order of the ``p1`` list may too);
- ``drop``: a present class is removed (its pixels become unlabelled, so the caption no longer names it);
- ``insert``: a class absent from the tile is painted over a random third-side square (the caption names it).

What was corrupted is recorded in the row's ``finish_reason`` (``stop`` for a faithful caption, else
``corrupted: drop=tree; insert=car``): :func:`corruption_record` reads it back, and the caption report measures the
gate's precision and recall at rejecting corrupted captions against it. A re-prompt (seed = attempt) draws anew.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
from PIL import Image

from caption_pipeline.experts.annotation import class_shares, describe_label
from caption_pipeline.experts.base import CaptionRequest, CaptionResult, Expert
from manifests.run_manifest import SyntheticExpertConfig

CORRUPTED = "corrupted: "
FAITHFUL = "stop"
KINDS = ("proportions", "drop", "insert")
# A class is "present" (can be dropped or grown) from this share of the labelled pixels on: dropping a few stray
# pixels would change no caption that names classes by share.
MIN_SHARE = 0.01


def corruption_record(finish_reason: object) -> dict[str, str]:
    """What a synthetic expert's row says was corrupted (kind -> class), {} for a faithful caption.

    Raises:
        ValueError: ``finish_reason`` is not a synthetic expert's record.
    """
    if finish_reason == FAITHFUL:
        return {}
    if not isinstance(finish_reason, str) or not finish_reason.startswith(CORRUPTED):
        raise ValueError(f"not a synthetic expert's corruption record: {finish_reason!r}")
    pairs = (part.split("=", 1) for part in finish_reason.removeprefix(CORRUPTED).split("; "))
    return {kind: name for kind, name in pairs}


def _record(done: dict[str, str]) -> str:
    return CORRUPTED + "; ".join(f"{kind}={name}" for kind, name in done.items()) if done else FAITHFUL


def _square(rng: np.random.Generator, shape: tuple[int, ...], fraction: float) -> tuple[slice, slice]:
    """A random square of side ``fraction`` of the shorter side, inside the tile."""
    side = max(1, int(min(shape[:2]) * fraction))
    top, left = (int(rng.integers(extent - side + 1)) for extent in shape[:2])
    return slice(top, top + side), slice(left, left + side)


def corrupt_mask(
    mask: np.ndarray, n_classes: int, ignore_index: int, rates: dict[str, float], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, int]]:
    """A corrupted copy of a class-index mask and what was done (kind -> class index), drawn at ``rates``.

    A kind that cannot apply (nothing to drop but the only class, no absent class to insert) is not recorded; a class
    takes at most one corruption (a dropped class is never inserted back).
    """
    mask = mask.copy()
    done: dict[str, int] = {}
    for kind in KINDS:
        if rng.random() >= rates.get(kind, 0.0):
            continue
        shares = class_shares(mask, n_classes, ignore_index)
        present = np.flatnonzero(shares >= MIN_SHARE)
        if kind == "insert":
            candidates = np.flatnonzero(shares == 0)
        else:
            candidates = present if kind == "proportions" or len(present) > 1 else present[:0]
        candidates = np.setdiff1d(candidates, list(done.values()))  # one corruption per class: each stays visible
        if not len(candidates):
            continue
        chosen = int(rng.choice(candidates))
        if kind == "drop":
            mask[mask == chosen] = ignore_index
        else:
            mask[_square(rng, mask.shape, 0.5 if kind == "proportions" else 1 / 3)] = chosen
        done[kind] = chosen
    return mask, done


def key_rng(seed: int, expert: str, request: CaptionRequest) -> np.random.Generator:
    """The generator of one key and attempt: the same draws in every run and process (no Python ``hash``)."""
    digest = hashlib.sha256(f"{request.tile_id}\0{expert}\0{request.prompt_id}".encode()).digest()
    return np.random.default_rng([seed, request.seed or 0, int.from_bytes(digest[:8], "little")])


class SyntheticExpert(Expert):
    """Captions of class masks, corrupted at declared rates, with a record of what was corrupted."""

    backend = "synthetic"
    reprompts = True  # a re-prompt draws the corruptions anew
    needs_class_mask = True
    pipeline_chunk = None
    model = "label-mask"

    def __init__(self, config: SyntheticExpertConfig) -> None:
        self.name = config.name
        self.seed = config.seed
        self.rates = {kind: getattr(config, kind) for kind in KINDS}
        self.model = "synthetic(" + ", ".join(f"{kind}={rate:g}" for kind, rate in self.rates.items()) + ")"

    def generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """A caption of each request's corrupted class mask; a request without a mask fails."""
        return [self._one(request) for request in requests]

    def _one(self, request: CaptionRequest) -> CaptionResult:
        started = time.perf_counter()
        if request.label_path is None:
            return CaptionResult(None, None, None, 0.0, error="synthetic expert needs a class mask (a label or a "
                                 "predicted mask); this tile has none")  # fmt: skip
        with Image.open(request.label_path) as label:
            mask = np.asarray(label)
        names = request.class_names
        rng = key_rng(self.seed, self.name, request)
        corrupted, done = corrupt_mask(mask, len(names), request.ignore_index, self.rates, rng)
        text = describe_label(corrupted, names, request.ignore_index, request.prompt_id, request.plurals)
        record = _record({kind: names[index] for kind, index in done.items()})
        return CaptionResult(text, record, None, time.perf_counter() - started)
