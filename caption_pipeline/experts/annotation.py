"""The annotation expert: a caption written from the label mask alone (no weights, no image).

It names the classes with their shares, counts objects of the countable classes (those the dataset's class
vocabulary gives a plural) by connected components and
places them on a 3 x 3 compass grid. It is the embedded default and a label-grounded baseline. It needs a
class-index mask: the label where the class source of the split is ``labels``, the mask a text-free segmenter
predicted where it is ``predictions`` (the store rows record which); where it is ``none`` it does not run. It is
deterministic: the temperature and seed of a request change nothing, its prompt id chooses the style.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
from PIL import Image
from scipy import ndimage

from caption_pipeline.experts.base import CaptionRequest, CaptionResult, Expert
from caption_pipeline.prompts import readable
from manifests.run_manifest import AnnotationExpertConfig

COMPASS = (("north-west", "north", "north-east"), ("west", "centre", "east"), ("south-west", "south", "south-east"))
MIN_OBJECT_PIXELS = 12


def compass(mask: np.ndarray) -> str:
    """Where most of ``mask`` lies, on a 3 x 3 grid."""
    rows, cols = np.nonzero(mask)
    row = min(int(rows.mean() * 3 / mask.shape[0]), 2)
    col = min(int(cols.mean() * 3 / mask.shape[1]), 2)
    return COMPASS[row][col]


def _regions(mask: np.ndarray) -> list[str]:
    """Compass cells holding at least a fifth of the class, in reading order."""
    height, width = mask.shape
    total = mask.sum()
    cells = []
    for row in range(3):
        for col in range(3):
            cell = mask[row * height // 3 : (row + 1) * height // 3, col * width // 3 : (col + 1) * width // 3]
            if cell.sum() >= 0.2 * total:
                cells.append(COMPASS[row][col])
    return cells


def class_shares(classes: np.ndarray, n_classes: int, ignore_index: int) -> np.ndarray:
    """``(n_classes,)``: each class's share of the labelled pixels of a class-index mask (all zero when none is
    labelled)."""
    counts = np.bincount(classes[classes != ignore_index].ravel(), minlength=n_classes)[:n_classes]
    return counts / max(int(counts.sum()), 1)


def describe_label(
    classes: np.ndarray,
    class_names: tuple[str, ...],
    ignore_index: int,
    prompt_id: str,
    plurals: Mapping[str, str] | None = None,
) -> str:
    """A caption of a class-index mask, in the style of the prompt (P1 list, P2 shares, P3 spatial).

    P3 counts the objects of the classes that ``plurals`` names (the dataset's class vocabulary), by connected
    components; other classes are described as areas."""
    plurals = plurals or {}
    shares = class_shares(classes, len(class_names), ignore_index)
    if not shares.any():
        return "An aerial image whose content is not labelled."
    order = [int(index) for index in np.argsort(-shares) if shares[index] > 0]
    if prompt_id == "p1":
        return "An aerial image showing " + ", ".join(readable(class_names[i]) for i in order) + "."
    if prompt_id == "p2":
        parts = [f"{readable(class_names[i])} ({shares[i] * 100:.0f}%)" for i in order]
        return "An aerial image covered by " + ", ".join(parts) + "."
    phrases = []
    for index in order:
        name = class_names[index]
        mask = classes == index
        if name in plurals:
            labelled_objects, n = ndimage.label(mask)
            sizes = np.bincount(labelled_objects.ravel())[1:]
            n = int((sizes >= MIN_OBJECT_PIXELS).sum())
            if n:
                noun = plurals[name] if n > 1 else readable(name)
                phrases.append(f"{n} {noun} mostly in the {compass(mask)}")
                continue
        where = _regions(mask)
        spread = "across the image" if len(where) >= 5 else "in the " + " and ".join(where[:2] or [compass(mask)])
        phrases.append(f"{readable(name)} ({shares[index] * 100:.0f}%) {spread}")
    return "An aerial image with " + "; ".join(phrases) + "."


class AnnotationExpert(Expert):
    """Writes captions from class-index masks (labels or predictions); a request without one fails clearly."""

    backend = "annotation"
    reprompts = False  # the caption depends on the mask alone
    needs_class_mask = True
    pipeline_chunk = None
    model = "label-mask"

    def __init__(self, config: AnnotationExpertConfig) -> None:
        self.name = config.name

    def generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """A caption of each request's class mask in the style of its prompt; a request without a mask fails."""
        results = []
        for request in requests:
            started = time.perf_counter()
            if request.label_path is None:
                results.append(CaptionResult(None, None, None, 0.0, error="annotation expert needs a class mask "
                                             "(a label or a predicted mask); this tile has none"))  # fmt: skip
                continue
            with Image.open(request.label_path) as label:
                classes = np.asarray(label)
            text = describe_label(
                classes, request.class_names, request.ignore_index, request.prompt_id, request.plurals
            )
            results.append(CaptionResult(text, "stop", None, time.perf_counter() - started))
        return results
