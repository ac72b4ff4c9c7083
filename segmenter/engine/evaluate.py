"""``segmenter evaluate``: sliding-window inference over whole test sources against the eroded ground truth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from manifests.atomic import atomic_write_text
from manifests.errors import InputError
from segmenter.data.datasets import SegmentationDataset, Source, build_dataset
from segmenter.data.windowed_read import open_windows
from segmenter.engine.inference import SlidingWindows, sliding_window_classes
from segmenter.engine.metrics import CaptionFacts, ConfusionMatrix, Metrics, compute_metrics
from segmenter.engine.options import EvaluateSettings, GroundTruth, settings_or_options
from segmenter.engine.run_record import prompt_class_sources
from segmenter.engine.runs import TrainedRun, open_run
from segmenter.engine.window_captions import CaptionWindows, check_masked_experts
from segmenter.text.features import ExpertTextFeatures

SourceProgress = Callable[[int, int, str], None]


@dataclass
class _SplitCaptions:
    """The captions a text-guided model reads on an evaluated split: one window plan per source, in source order."""

    store: Path
    text: ExpertTextFeatures
    plans: list[CaptionWindows]
    tile_ids: list[str]
    masked_windows: dict[str, int]

    def facts(self) -> CaptionFacts:
        """What the text of the evaluation was: experts, masking per expert, the class sources of the prompts (so a
        report shows whether any prompt of the split carried ground truth) and how many windows were captioned
        tiles."""
        windows = self.windows()
        return CaptionFacts(
            store=str(self.store),
            experts=self.text.experts,
            tiles=len(self.tile_ids),
            masked_experts=self.text.masked_counts(self.tile_ids),
            class_sources=prompt_class_sources(self.text.rows, self.tile_ids, self.text.experts),
            windows=len(windows),
            windows_on_grid=int(windows["on_captioned_grid"].sum()) if len(windows) else 0,
            masked_windows=self.masked_windows,
        )

    def windows(self) -> pd.DataFrame:
        """Per window: its place, the tile whose caption it read, and the experts masked on it."""
        return pd.DataFrame([row for plan in self.plans for row in plan.used])


def _split_sources(dataset: SegmentationDataset, settings: EvaluateSettings) -> tuple[list[Source], GroundTruth]:
    """The sources of the evaluated split, and the ground truth they are compared with.

    Raises:
        InputError: no source in the split (its splits listed), or ground truth ``gt`` that the dataset does not read
            (eroded labels not downloaded, full labels with ``labels: eroded``).
    """
    every = dataset.sources()
    sources = [source for source in every if source.split == settings.split]
    if not sources:
        found = ", ".join(sorted({f"'{source.split}'" for source in every}))
        raise InputError(
            f"--split: no sources in split '{settings.split}' of {dataset.config.name} (its splits: {found})"
        )
    if settings.gt == GroundTruth.eroded and not dataset.has_eroded_labels:
        # SynDrone, LoveDA and folder datasets ship one label per source: "eroded" would name full labels
        print(f"note: {dataset.config.name} has no eroded ground truth; evaluating against its full labels")
        return sources, GroundTruth.full
    for source in sources:
        dataset.ground_truth(source, settings.gt)  # what is missing is said before the first window runs
    return sources, settings.gt


def _split_captions(
    trained: TrainedRun, settings: EvaluateSettings, sources: list[Source], spec: SlidingWindows
) -> _SplitCaptions:
    """Which caption every window of the split reads, under the missing-expert rule, before any window runs.

    Raises:
        InputError: no caption store given or recorded; a store whose experts differ from the run's, or an expert
            without a usable caption on any window of the split (unless ``missing_captions='mask'``).
    """
    recorded = settings.captions or trained.record.captions
    if not recorded:
        raise InputError(
            f"--captions: run {trained.paths.root} reads captions but records no caption store; pass --captions"
        )
    store = Path(recorded)
    text = trained.text_features(store, settings)
    tiles = trained.index.split(settings.split)
    plans = []
    for source in sources:
        with open_windows(source.image) as image:
            grid = spec.grid(image.height, image.width)
        plans.append(CaptionWindows(source.source_id, tiles[tiles["source_id"] == source.source_id], text).plan(grid))
    where = f"split '{settings.split}'"
    masked = check_masked_experts(plans, text.experts, store, settings.missing_captions, where)
    return _SplitCaptions(store, text, plans, tiles["tile_id"].tolist(), masked)


def _source_classes(
    trained: TrainedRun,
    dataset: SegmentationDataset,
    source: Source,
    gt: GroundTruth,
    spec: SlidingWindows,
    lookup: CaptionWindows | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The predicted classes of a whole source and its labels of ``gt``.

    Raises:
        InputError: the source has no such labels, or labels of another size than its image.
    """
    label_file = dataset.ground_truth(source, gt)
    label, _ = dataset.read_label(label_file)
    with open_windows(source.image) as image:
        if (image.height, image.width) != label.shape:
            raise InputError(
                f"{source.image}: {image.height} x {image.width} px, but its label {label_file} is "
                f"{label.shape[0]} x {label.shape[1]}"
            )
        return sliding_window_classes(trained.model, image, spec, lookup, trained.device), label


def _report_folder(trained: TrainedRun, settings: EvaluateSettings, gt: GroundTruth) -> Path:
    """``<run>/eval_<split>_<gt>``; with a store other than the run's, ``..._<store name>``, so that another store's
    result never replaces the run's."""
    folder = trained.paths.root / f"eval_{settings.split}_{gt}"
    other = settings.captions is not None and str(settings.captions.resolve()) != trained.record.captions
    if other and trained.model.config.uses_text:
        folder = folder.with_name(f"{folder.name}_{settings.captions.name}")
    return folder


def evaluate(
    run: str | Path, settings: EvaluateSettings | None = None, on_source: SourceProgress | None = None, **options: Any
) -> Metrics:
    """Metrics of a run's newest checkpoint on a split, written to ``<run>/eval_<split>_<gt>/``.

    A text-guided model reads the captions of the store it was trained with (or ``settings.captions``); by default
    its windows are the captioned tiles (``overlap=None``), so each window's caption describes what it sees.
    Sources are read window by window (GeoTIFFs) and logits summed in a band one window high, so a 6000 x 6000
    scene never sits in memory whole, as pixels or as logits.

    Args:
        run: the run folder written by ``segmenter train``.
        settings: what to evaluate and how (:class:`EvaluateSettings`: split, ground truth, windows, device, ...).
        on_source: called with ``(done, total, source id)`` after each source.
        **options: the fields of :class:`EvaluateSettings` as keywords, in place of ``settings``.

    Raises:
        InputError: no checkpoint, a run record of another version, an unknown split or ground truth, ``--gt
            eroded`` on a dataset without eroded labels, a store whose experts differ from the run's or an expert
            without a usable caption on the split (unless ``missing_captions='mask'``).
    """
    settings = settings_or_options(EvaluateSettings, settings, options)
    trained = open_run(run, settings)
    dataset = build_dataset(trained.manifest.dataset)
    sources, gt = _split_sources(dataset, settings)
    spec = trained.sliding(settings)
    captions = _split_captions(trained, settings, sources, spec) if trained.model.config.uses_text else None
    matrix = ConfusionMatrix(len(trained.index.class_names), trained.index.ignore_index)
    for done, source in enumerate(sources, 1):
        lookup = captions.plans[done - 1] if captions is not None else None
        matrix.update(*_source_classes(trained, dataset, source, gt, spec, lookup))
        if on_source:
            on_source(done, len(sources), source.source_id)
    metrics = compute_metrics(
        matrix.matrix, trained.index.class_names, trained.index.vocabulary.main_classes, gt, settings.f1_without_tp
    )
    folder = _report_folder(trained, settings, gt)
    if captions is not None:
        metrics.captions = captions.facts()
        atomic_write_text(folder / "windows.csv", captions.windows().to_csv(index=False))
    metrics.save(folder, title=f"{trained.model.config.name} on {trained.manifest.name} {settings.split}")
    return metrics
