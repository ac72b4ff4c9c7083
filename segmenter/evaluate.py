"""``segmenter evaluate``: sliding-window inference over whole test sources against the eroded ground truth."""

from __future__ import annotations

from pathlib import Path

from manifests.errors import InputError
from segmenter.datasets import build_dataset
from segmenter.inference import open_run, overlapping_tile_text, sliding_window_logits
from segmenter.metrics import ConfusionMatrix, Metrics, compute_metrics


def evaluate(
    run: str | Path,
    split: str = "test",
    gt: str = "eroded",
    window: int | None = None,
    overlap: float = 0.25,
    device: str = "cpu",
    on_source=None,
) -> Metrics:
    """Metrics of a run's newest checkpoint on a split, written to ``<run>/eval_<split>_<gt>/``.

    Raises:
        InputError: no checkpoint, an unknown split, ``--gt eroded`` on a dataset without eroded labels.
    """
    trained = open_run(run, device)
    model, manifest, index = trained.model, trained.manifest, trained.index
    dataset = build_dataset(manifest.dataset)
    sources = [source for source in dataset.sources() if source.split == split]
    if not sources:
        raise InputError(f"--split: no sources in split '{split}' of {manifest.dataset.name}")
    text = trained.text_features(trained.info.get("captions"))
    window = trained.window(window)
    matrix = ConfusionMatrix(len(index.class_names), index.ignore_index)
    for done, source in enumerate(sources):
        label_file = source.eval_label if gt == "eroded" else source.label
        if label_file is None:
            raise InputError(f"--gt {gt}: source {source.source_id} has no such ground truth")
        image = dataset.read_image(source)
        label, _ = dataset.read_label(label_file)
        tiles = index.frame[index.frame["source_id"] == source.source_id]
        lookup = overlapping_tile_text(tiles, text) if text is not None else None
        logits = sliding_window_logits(model, image, window, overlap, lookup, device)
        assert logits.shape[-2:] == label.shape, (logits.shape, label.shape)
        matrix.update(logits.argmax(0), label)
        if on_source:
            on_source(done + 1, len(sources), source.source_id)
    metrics = compute_metrics(matrix.matrix, index.class_names, gt=gt)
    metrics.save(Path(run) / f"eval_{split}_{gt}", title=f"{model.config.name} on {manifest.name} {split}")
    return metrics
