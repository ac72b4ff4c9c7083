"""``segmenter evaluate``: sliding-window inference over whole test sources against the eroded ground truth."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from manifests.atomic import atomic_write_text
from manifests.errors import InputError
from segmenter.data.datasets import build_dataset
from segmenter.data.windowed_read import open_windows
from segmenter.engine.inference import CaptionWindows, LocalWeights, check_batch_size, open_run, sliding_window_classes
from segmenter.engine.metrics import CaptionFacts, ConfusionMatrix, Metrics, compute_metrics
from segmenter.engine.options import GroundTruth, MissingCaptions, parse_choice
from segmenter.engine.run_record import prompt_class_sources
from segmenter.engine.train import print_masked
from segmenter.text.features import ExpertTextFeatures


def _caption_facts(
    text: ExpertTextFeatures, store: Path, tile_ids: list[str], masked: dict[str, int], windows: pd.DataFrame
) -> CaptionFacts:
    """What the text of an evaluation was: experts, masking per expert, the class sources of the prompts (so a
    report shows whether any prompt of the split carried ground truth) and how many windows were captioned tiles."""
    return CaptionFacts(
        store=str(store),
        experts=text.experts,
        tiles=len(tile_ids),
        masked_experts=masked,
        class_sources=prompt_class_sources(text.rows, tile_ids, text.experts),
        windows=len(windows),
        windows_on_grid=int(windows["on_captioned_grid"].sum()) if len(windows) else 0,
    )


def _refuse_experts_without_captions(
    masked: dict[str, int], tile_ids: list[str], split: str, store: Path, missing: str
) -> None:
    """An expert the store names but with no usable caption on any tile of the split is as good as absent.

    Raises:
        InputError: with ``missing='error'``, one line naming those experts.
    """
    empty = [name for name, n in masked.items() if tile_ids and n == len(tile_ids)]
    if empty and missing == "error":
        raise InputError(
            f"--captions: caption store {store} has no usable caption (passed the gate, not empty) of expert(s) "
            f"{empty} on any of the {len(tile_ids)} tiles of split '{split}'; caption them or pass "
            "--missing-captions mask"
        )


def evaluate(
    run: str | Path,
    split: str = "test",
    gt: str = GroundTruth.eroded,
    window: int | None = None,
    overlap: float | None = None,
    device: str = "auto",
    on_source=None,
    captions: str | Path | None = None,
    missing_captions: str = MissingCaptions.error,
    batch_size: int | None = None,
    weights: LocalWeights | None = None,
) -> Metrics:
    """Metrics of a run's newest checkpoint on a split, written to ``<run>/eval_<split>_<gt>/``.

    A text-guided model reads the captions of the store it was trained with (or ``captions``); by default its
    windows are the captioned tiles (``overlap=None``), so each window's caption describes what it sees.

    ``device``: ``auto`` (the GPU when there is one) or a torch device name. ``batch_size``: windows per forward
    (default 8). ``weights``: where the run's local weights are now, if they moved.
    Sources are read window by window (GeoTIFFs) and logits summed in a band one window high, so a 6000 x 6000
    scene never sits in memory whole, as pixels or as logits.

    Raises:
        InputError: no checkpoint, a run record of another version, an unknown split or ground truth, ``--gt
            eroded`` on a dataset without eroded labels, a store whose experts differ from the run's (unless
            ``missing_captions='mask'``).
    """
    gt = parse_choice(GroundTruth, gt, "--gt")
    check_batch_size(batch_size)
    missing_captions = parse_choice(MissingCaptions, missing_captions, "--missing-captions")
    trained = open_run(run, device, weights)
    model, manifest, index = trained.model, trained.manifest, trained.index
    dataset = build_dataset(manifest.dataset)
    sources = [source for source in dataset.sources() if source.split == split]
    if not sources:
        raise InputError(f"--split: no sources in split '{split}' of {manifest.dataset.name}")
    if gt == GroundTruth.eroded and all(source.eval_label == source.label for source in sources):
        # SynDrone and folder datasets ship one label per source: "eroded" would name full labels
        print(f"note: {manifest.dataset.name} has no eroded ground truth; evaluating against its full labels")
        gt = GroundTruth.full
    split_tiles = index.split(split)
    tile_ids = split_tiles["tile_id"].tolist()
    store, text, masked = None, None, {}
    if model.config.uses_text:
        recorded = captions or trained.record.captions
        if not recorded:
            raise InputError(f"--captions: run {run} reads captions but records no caption store; pass --captions")
        store = Path(recorded)
        text = trained.text_features(store, missing_captions)
        masked = text.masked_counts(tile_ids)
        _refuse_experts_without_captions(masked, tile_ids, split, store, missing_captions)
        print_masked(masked, len(tile_ids), split)
    window = trained.window(window)
    stride = trained.stride(window, overlap)
    matrix = ConfusionMatrix(len(index.class_names), index.ignore_index)
    used: list[dict] = []
    for done, source in enumerate(sources):
        label_file = source.eval_label if gt == GroundTruth.eroded else source.label
        if label_file is None:
            raise InputError(f"--gt {gt}: source {source.source_id} has no such ground truth")
        label, _ = dataset.read_label(label_file)
        lookup = None
        if text is not None:
            lookup = CaptionWindows(source.source_id, split_tiles[split_tiles["source_id"] == source.source_id], text)
        with open_windows(source.image) as image:
            if (image.height, image.width) != label.shape:
                raise InputError(
                    f"{source.image}: {image.height} x {image.width} px, but its label {label_file} is "
                    f"{label.shape[0]} x {label.shape[1]}"
                )
            classes = sliding_window_classes(
                model, image, window, 0.0, lookup, trained.device, stride=stride, batch_size=batch_size
            )
        matrix.update(classes, label)
        if lookup is not None:
            used += lookup.used
        if on_source:
            on_source(done + 1, len(sources), source.source_id)
    metrics = compute_metrics(matrix.matrix, index.class_names, index.vocabulary.main_classes, gt=gt)
    folder = Path(run) / f"eval_{split}_{gt}"
    if captions is not None and store is not None and str(store.resolve()) != trained.record.captions:
        folder = folder.with_name(f"{folder.name}_{store.name}")  # another store's result never replaces the run's
    if text is not None and store is not None:
        windows = pd.DataFrame(used)
        metrics.captions = _caption_facts(text, store, tile_ids, masked, windows)
        atomic_write_text(folder / "windows.csv", windows.to_csv(index=False))
    metrics.save(folder, title=f"{model.config.name} on {manifest.name} {split}")
    return metrics
