"""ISPRS-style metrics from one dataset-pooled confusion matrix.

OA over all non-ignored pixels; per-class IoU, precision, recall, F1; mIoU and mF1 over the dataset's main classes
(its class vocabulary in the tile index: for ISPRS the five classes without clutter, as the paper and GeoSeg
report) and over all classes (as mmsegmentation reports). A class absent from both prediction and ground truth has
no IoU/F1 and is left out of the means.

F1 of a class without a true positive (present in the ground truth or the prediction, never both at one pixel):
by default it is undefined and left out of mF1, as mmsegmentation (``IoUMetric.total_area_to_metrics``: F from
precision and recall, 0/0) and GeoSeg (``tools/metric.py``, mF1 ``np.nanmean``) compute it; its IoU is 0 and counts
in mIoU there and here. ``zero`` counts it as 0 in mF1 instead (what this toolkit reported before).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from manifests.atomic import atomic_write_text
from segmenter.engine.options import F1WithoutTruePositive

F1_NOTES = {
    F1WithoutTruePositive.undefined: "F1 of a class without a true positive is undefined and left out of mF1 "
    "(mmsegmentation, GeoSeg)",
    F1WithoutTruePositive.zero: "F1 of a class without a true positive counts as 0 in mF1",
}


class ConfusionMatrix:
    """``matrix[gt, pred]`` pixel counts; per-image matrices add up to the dataset one."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> np.ndarray:
        """Add one image (or batch); returns that image's own matrix."""
        prediction = np.asarray(prediction.cpu() if isinstance(prediction, torch.Tensor) else prediction).ravel()
        target = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).ravel()
        keep = (target != self.ignore_index) & (target < self.num_classes)
        codes = target[keep].astype(np.int64) * self.num_classes + prediction[keep].astype(np.int64)
        image = np.bincount(codes, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)
        self.matrix += image
        return image


@dataclass
class CaptionFacts:
    """What text a text-guided model read in an evaluation, written into its metrics report.

    Attributes:
        store: the caption store read.
        experts: the run's experts, in order.
        tiles: tiles of the evaluated split.
        masked_experts: per expert, on how many of those tiles it had no usable caption (masked there).
        class_sources: per expert, the class sources of the prompts behind its captions of the split.
        windows: sliding windows evaluated.
        windows_on_grid: how many of them are captioned tiles (the others read the caption of the tile they
            overlap most).
        masked_windows: per expert, on how many of the windows it was masked (the missing-expert rule's count).
    """

    store: str
    experts: list[str]
    tiles: int
    masked_experts: dict[str, int]
    class_sources: dict[str, list[str]]
    windows: int
    windows_on_grid: int
    masked_windows: dict[str, int] = field(default_factory=dict)


@dataclass
class Metrics:
    """The metrics of one evaluation: per class (in the tile index's order) and over the main classes and all.

    ``miou``/``mf1`` average over ``main_classes``, ``miou_all``/``mf1_all`` over every class; a class absent from
    prediction and ground truth is NaN and left out of the means. ``gt`` names the ground truth, ``captions`` what
    a text-guided model read (None for a text-free one).
    """

    class_names: list[str]
    iou: list[float]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    oa: float
    miou: float
    mf1: float
    miou_all: float
    mf1_all: float
    main_classes: list[str] = field(default_factory=list)
    gt: str = "eroded"
    f1_without_tp: str = F1WithoutTruePositive.undefined.value
    captions: CaptionFacts | None = None

    def to_json(self) -> str:
        """Strict JSON: an undefined value (a class absent from prediction and ground truth) is ``null``; no caption
        facts (a text-free model) is ``{}``, as reports have always written it."""
        report = asdict(self)
        report["captions"] = report["captions"] or {}
        return json.dumps(_finite_or_null(report), indent=2, allow_nan=False)

    def markdown(self, title: str = "") -> str:
        """A table laid out like the paper's: per-class IoU and F1, then OA, mIoU, mF1 (in %)."""

        def pct(value: float) -> str:
            return "-" if np.isnan(value) else f"{value * 100:.2f}"

        header = "| metric | " + " | ".join(self.class_names) + " | OA | mIoU | mF1 |"
        rule = "|" + "---|" * (len(self.class_names) + 4)
        iou = "| IoU | " + " | ".join(map(pct, self.iou)) + f" | {pct(self.oa)} | {pct(self.miou)} | {pct(self.mf1)} |"
        f1 = "| F1 | " + " | ".join(map(pct, self.f1)) + " | | | |"
        notes = (
            f"\nmIoU/mF1 over {', '.join(self.main_classes)}; over all classes: mIoU {pct(self.miou_all)}, "
            f"mF1 {pct(self.mf1_all)}. Ground truth: {self.gt}; one dataset-pooled confusion matrix; "
            f"{F1_NOTES[F1WithoutTruePositive(self.f1_without_tp)]}."
        )
        return "\n".join(filter(None, [f"### {title}" if title else "", header, rule, iou, f1, notes,
                                        self._caption_note()]))  # fmt: skip

    def _caption_note(self) -> str:
        """What text a text-guided model read: which experts, where they were masked, which windows' captions."""
        facts = self.captions
        if facts is None:
            return ""
        masked = ", ".join(f"{name} on {n}" for name, n in facts.masked_experts.items() if n) or "none"
        on_windows = ", ".join(f"{name} on {n}" for name, n in facts.masked_windows.items() if n) or "none"
        sources = "; ".join(f"{name}: {', '.join(kinds) or '-'}" for name, kinds in facts.class_sources.items())
        return (
            f"Captions: experts {', '.join(facts.experts)} from {facts.store}; class sources of their prompts: "
            f"{sources or '-'}. Of {facts.tiles} tiles, experts masked: {masked}. {facts.windows_on_grid} of "
            f"{facts.windows} windows are captioned tiles (the others read the caption of the tile they overlap "
            f"most, listed in windows.csv); of the {facts.windows} windows, experts masked: {on_windows}."
        )

    def save(self, folder: Path, title: str = "") -> None:
        """Write ``metrics.json`` and ``metrics.md`` (with ``title``) into ``folder``, each atomically."""
        atomic_write_text(folder / "metrics.json", self.to_json())
        atomic_write_text(folder / "metrics.md", self.markdown(title) + "\n")


def _finite_or_null(value):
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


def compute_metrics(
    matrix: np.ndarray,
    class_names: list[str],
    main_classes: Sequence[str],
    gt: str = "eroded",
    f1_without_tp: F1WithoutTruePositive = F1WithoutTruePositive.undefined,
) -> Metrics:
    """Metrics of a pooled confusion matrix; ``mIoU``/``mF1`` average over ``main_classes`` (the tile index's
    ``vocabulary.main_classes``), ``mIoU_all``/``mF1_all`` over every class; ``f1_without_tp`` says what the F1 of a
    class without a true positive is (module docstring).

    Raises:
        ValueError: a main class that is not one of ``class_names``.
    """
    unknown = sorted(set(main_classes) - set(class_names))
    if unknown:
        raise ValueError(f"main classes {unknown} are not classes of this dataset ({class_names})")
    matrix = matrix.astype(np.float64)
    true_positive = np.diag(matrix)
    predicted = matrix.sum(0)
    actual = matrix.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = true_positive / (actual + predicted - true_positive)
        precision = true_positive / predicted
        recall = true_positive / actual
        f1 = 2 * true_positive / (actual + predicted)
    if f1_without_tp == F1WithoutTruePositive.undefined:
        f1[true_positive == 0] = np.nan
    main = [i for i, name in enumerate(class_names) if name in main_classes]
    total = matrix.sum()

    def nanmean(values: np.ndarray) -> float:
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else float("nan")

    return Metrics(
        class_names=list(class_names), iou=iou.tolist(), precision=precision.tolist(), recall=recall.tolist(),
        f1=f1.tolist(), oa=float(true_positive.sum() / total) if total else float("nan"),
        miou=nanmean(iou[main]), mf1=nanmean(f1[main]), miou_all=nanmean(iou), mf1_all=nanmean(f1),
        main_classes=[class_names[i] for i in main], gt=gt, f1_without_tp=F1WithoutTruePositive(f1_without_tp).value,
    )  # fmt: skip
