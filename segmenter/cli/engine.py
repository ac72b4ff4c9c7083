"""``segmenter train``, ``evaluate`` and ``predict``: the commands of the engine room.

Each builds one settings object from its options and passes it down (:mod:`segmenter.engine.options`).
"""

# A typer command takes one parameter per option; it builds one settings object from them and passes that down.
# ruff: noqa: PLR0913

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from manifests.errors import InputError, exit_on_input_error
from segmenter.cli.app import (
    BatchOption,
    DeviceOption,
    MissingOption,
    MovedBackboneOption,
    MovedTextOption,
    OverlapOption,
    RunOption,
    TextCacheOption,
    WindowOption,
    absolute,
    app,
    console,
    default,
    progress,
)
from segmenter.engine.options import (
    Augmentation,
    EvaluateSettings,
    F1WithoutTruePositive,
    GroundTruth,
    MissingCaptions,
    PredictSettings,
    Scale,
    TrainSettings,
    build_settings,
)

AUGMENTATION_HELP = "flips/rotations: d4; with the captions' direction words moved: d4_rewrite; auto: per preset"
TEXT_CHECKPOINT_HELP = "local text-encoder weights: a CLIP .pt, a (BLIP-2) FLAN-T5 folder, the dino.txt .pth"
SCALE_HELP = "images that are not 8-bit: none (refuse), minmax or percentile (2-98) per band"


def _names(experts: str | None) -> list[str] | None:
    """``--experts a,b`` as a list of names (None when not given)."""
    return [name.strip() for name in experts.split(",") if name.strip()] if experts else None


@app.command()
@exit_on_input_error
def train(
    manifest: Annotated[str, typer.Option(help="run manifest (its tile index is read)")],
    out: Annotated[Path, typer.Option(help="run folder: checkpoints, logs, metrics")],
    captions: Annotated[Path | None, typer.Option(help="caption store (needed by text-guided presets)")] = None,
    preset: Annotated[str, typer.Option(help="model preset (`segmenter models`)")] = default(TrainSettings, "preset"),
    steps: Annotated[int, typer.Option(help="optimizer steps")] = default(TrainSettings, "steps"),
    batch_size: Annotated[int, typer.Option(help="tiles per step and process")] = default(TrainSettings, "batch_size"),
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = default(TrainSettings, "lr"),
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = default(
        TrainSettings, "checkpoint_every"
    ),
    missing_captions: Annotated[
        MissingCaptions, typer.Option(help="train tiles without a passed caption: mask their experts, or stop")
    ] = default(TrainSettings, "missing_captions"),
    experts: Annotated[
        str | None, typer.Option(help="comma-separated experts to read, in this order (default: the store's)")
    ] = None,
    augmentation: Annotated[Augmentation, typer.Option(help=AUGMENTATION_HELP)] = default(
        TrainSettings, "augmentation"
    ),
    seed: Annotated[int, typer.Option(help="random seed")] = default(TrainSettings, "seed"),
    workers: Annotated[
        int | None, typer.Option(help="loader processes per process (default: GPU min(4, CPUs - 1), CPU 0)")
    ] = default(TrainSettings, "workers"),
    backbone_file: Annotated[
        Path | None, typer.Option(help="local DINOv3 weights (.pth/.safetensors) instead of the preset's hub id")
    ] = None,
    text_checkpoint: Annotated[Path | None, typer.Option(help=TEXT_CHECKPOINT_HELP)] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its newest checkpoint")] = False,
    text_cache: TextCacheOption = None,
    lqga_heads: Annotated[
        int | None, typer.Option(help="heads of LQGA's text query (default: the preset's; paper presets 1)")
    ] = None,
    text_pooling: Annotated[
        str | None,
        typer.Option(help="captions over the text context: truncate | chunk_mean (default) | token_weighted"),
    ] = None,
) -> None:
    """Train a preset (cross-entropy, AdamW, multi-step LR) on the GPU when there is one; run under `torchrun` for
    DDP."""
    from segmenter.engine.train import TrainingError
    from segmenter.engine.train import train as run_training
    from segmenter.model import list_presets

    if preset not in list_presets():
        raise InputError(f"--preset: unknown preset '{preset}' (see `segmenter models`)")
    settings = build_settings(
        TrainSettings, preset=preset, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        checkpoint_every=checkpoint_every, missing_captions=missing_captions, experts=_names(experts),
        augmentation=augmentation, workers=workers, backbone_file=absolute(backbone_file),
        text_checkpoint=absolute(text_checkpoint), text_cache=absolute(text_cache), lqga_heads=lqga_heads,
        text_pooling=text_pooling,
    )  # fmt: skip
    try:
        checkpoint = run_training(manifest, out, settings, captions=captions, resume=resume, progress=True)
    except TrainingError as exc:
        console.print(f"error: {exc}")
        raise SystemExit(1) from None
    console.print(f"checkpoint: {checkpoint}")


@app.command()
@exit_on_input_error
def evaluate(
    run: RunOption,
    split: Annotated[str, typer.Option(help="split to evaluate")] = default(EvaluateSettings, "split"),
    gt: Annotated[GroundTruth, typer.Option(help="ground truth: eroded (no boundaries, ISPRS) or full")] = default(
        EvaluateSettings, "gt"
    ),
    f1_without_tp: Annotated[
        F1WithoutTruePositive,
        typer.Option(help="F1 of a class without a true positive: undefined (left out of mF1, as mmseg) or zero"),
    ] = default(EvaluateSettings, "f1_without_tp"),
    window: WindowOption = None,
    overlap: OverlapOption = None,
    device: DeviceOption = default(EvaluateSettings, "device"),
    captions: Annotated[Path | None, typer.Option(help="caption store (default: the one the run trained on)")] = None,
    missing_captions: MissingOption = default(EvaluateSettings, "missing_captions"),
    batch_size: BatchOption = None,
    text_cache: TextCacheOption = None,
    backbone_file: MovedBackboneOption = None,
    text_checkpoint: MovedTextOption = None,
) -> None:
    """Sliding-window inference over whole sources: OA, per-class IoU/F1, mIoU/mF1 (main classes, and all)."""
    from segmenter.engine.evaluate import evaluate as run_evaluation

    settings = build_settings(
        EvaluateSettings, split=split, gt=gt, f1_without_tp=f1_without_tp, window=window, overlap=overlap,
        device=device, captions=captions, missing_captions=missing_captions, batch_size=batch_size,
        text_cache=text_cache, backbone_file=backbone_file, text_checkpoint=text_checkpoint,
    )  # fmt: skip
    with progress("evaluate") as on_source:
        metrics = run_evaluation(run, settings, on_source)
    print(metrics.markdown(f"{run} ({split}, {metrics.gt} GT)"))  # the ground truth used, after any fallback


@app.command()
@exit_on_input_error
def predict(
    run: RunOption,
    images: Annotated[
        list[Path] | None, typer.Option(help="an image file or folder; repeat the option for several")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output folder for GeoTIFFs and colour PNGs")] = None,
    index: Annotated[
        Path | None, typer.Option(help="tile index: predict class fractions of every tile (text-free run)")
    ] = None,
    predictions: Annotated[
        Path | None, typer.Option(help="with --index: the predicted-tile-classes Parquet file to write")
    ] = None,
    split: Annotated[list[str] | None, typer.Option(help="with --index: only these splits (repeatable)")] = None,
    captions: Annotated[Path | None, typer.Option(help="caption store for these images (else experts masked)")] = None,
    window: WindowOption = None,
    overlap: OverlapOption = None,
    device: DeviceOption = default(PredictSettings, "device"),
    missing_captions: MissingOption = default(PredictSettings, "missing_captions"),
    scale: Annotated[Scale, typer.Option(help=SCALE_HELP)] = default(PredictSettings, "scale"),
    max_pixels: Annotated[
        int, typer.Option(help="pixel budget of one image: a larger one is refused before it is read")
    ] = default(PredictSettings, "max_pixels"),
    batch_size: BatchOption = None,
    text_cache: TextCacheOption = None,
    backbone_file: MovedBackboneOption = None,
    text_checkpoint: MovedTextOption = None,
) -> None:
    """Class-index GeoTIFFs + colour PNGs of images (--images, --out), or the predicted class fractions of every
    tile of an index (--index, --predictions) for prompts whose class source is `predictions`."""
    from segmenter.engine.predict import predict as run_prediction
    from segmenter.engine.predict import predict_index

    settings = build_settings(
        PredictSettings, captions=captions, window=window, overlap=overlap, device=device,
        missing_captions=missing_captions, scale=scale, max_pixels=max_pixels, batch_size=batch_size,
        text_cache=text_cache, backbone_file=backbone_file, text_checkpoint=text_checkpoint,
    )  # fmt: skip
    if index is not None or predictions is not None:
        if index is None or predictions is None or images or out:
            raise InputError("predict: give --index with --predictions, or --images with --out")
        with progress("predict") as on_tile:
            path = predict_index(run, index, predictions, split, settings, on_tile)
        console.print(f"wrote {path}")
        return
    if not images or out is None:
        raise InputError("predict: give --images with --out, or --index with --predictions")
    for path in run_prediction(run, images, out, settings):
        console.print(f"wrote {path}")
