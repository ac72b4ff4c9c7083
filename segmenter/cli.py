"""The ``segmenter`` command: data preparation, demo data, model listing, training, evaluation, prediction."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from manifests.errors import InputError, exit_on_input_error
from manifests.run_manifest import DatasetConfig, TilingConfig, load_manifest

app = typer.Typer(
    help="Stage 2 of MPerS: tiles, the caption-guided segmenter, its training and evaluation.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)


@contextmanager
def progress(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on stderr; yields the ``(done, total, note)`` callback that advances it."""
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"), console=console, transient=False,
    )  # fmt: skip
    with bar:
        task = bar.add_task(description, total=None, note="")
        yield lambda done, total, note: bar.update(task, completed=done, total=total, note=note)


@app.command()
@exit_on_input_error
def prepare(
    manifest: Annotated[str | None, typer.Option(help="run manifest (path or packaged name)")] = None,
    dataset: Annotated[str | None, typer.Option(help="vaihingen | potsdam | syndrone (without a manifest)")] = None,
    root: Annotated[Path | None, typer.Option(help="folder with the archives or their extracted folders")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder for crops and index.parquet")] = None,
    split: Annotated[str, typer.Option(help="split scheme: mpers | isprs")] = "mpers",
    size: Annotated[int, typer.Option(help="crop size in pixels")] = 512,
    stride: Annotated[int | None, typer.Option(help="crop stride (default: the size)")] = None,
) -> None:
    """Cut sources into crops and write the tile index (a no-op when inputs are unchanged)."""
    from segmenter.prepare import prepare_tiles

    if manifest:
        run = load_manifest(manifest)
        dataset_config, tiling = run.dataset, run.tiling
    else:
        if not (dataset and root and out):
            raise InputError("prepare: give --manifest, or --dataset, --root and --out")
        try:
            dataset_config = DatasetConfig(name=dataset, root=root, split=split)  # type: ignore[arg-type]
        except ValueError as exc:
            raise InputError(f"--dataset {dataset}: {str(exc).splitlines()[-1].strip()}") from None
        tiling = TilingConfig(size=size, stride=stride, out=out)
    with progress("prepare") as on_progress:
        result = prepare_tiles(dataset_config, tiling, on_progress)
    if result.up_to_date:
        console.print(f"up to date: {result.index_path} ({result.n_tiles} tiles)")
        for line in result.warnings:  # repeated from the run that wrote the index: nothing silent on a re-run
            console.print(f"warning: {line}", markup=False, highlight=False)
        return
    table = Table("source", "split", "tiles", "boundary px", "stray px", "check", title="prepared sources")
    for report in result.sources:
        checks = [text for found, text in ((report.image_is_label_map, "image is a label map?"),
                                           (bool(report.overlays), "label is an overlay?")) if found]  # fmt: skip
        table.add_row(report.source_id, report.split, str(report.tiles), str(report.boundary_pixels),
                      str(report.stray_pixels), "; ".join(checks) or "ok")  # fmt: skip
    console.print(table)
    for line in result.warnings:
        console.print(f"warning: {line}", markup=False, highlight=False)
    console.print(f"wrote {result.index_path} ({result.n_tiles} tiles)")


@app.command("demo-data")
@exit_on_input_error
def demo_data(
    out: Annotated[Path, typer.Option(help="folder for the synthetic Vaihingen-layout archives")] = Path(
        "data/demo/raw"
    ),
    areas: Annotated[int, typer.Option(help="number of scenes (areas)")] = 16,
    size: Annotated[int, typer.Option(help="scene side in pixels")] = 1024,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Generate the synthetic demo scenes in the ISPRS Vaihingen archive layout."""
    from segmenter.demo_scenes import write_demo_dataset

    try:
        area_ids = write_demo_dataset(out, n_areas=areas, size=size, seed=seed)
    except ValueError as exc:
        raise InputError(f"demo-data: {exc}") from None
    console.print(f"wrote {len(area_ids)} demo scenes of {size} px to {out}")


@app.command()
@exit_on_input_error
def train(
    manifest: Annotated[str, typer.Option(help="run manifest (its tile index is read)")],
    out: Annotated[Path, typer.Option(help="run folder: checkpoints, logs, metrics")],
    captions: Annotated[Path | None, typer.Option(help="caption store (needed by text-guided presets)")] = None,
    preset: Annotated[str, typer.Option(help="model preset (`segmenter models`)")] = "mpers_vitl16",
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 20000,
    batch_size: Annotated[int, typer.Option(help="tiles per step and process")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-3,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 1000,
    missing_captions: Annotated[str, typer.Option(help="mask | error for tiles without captions")] = "mask",
    experts: Annotated[
        str | None, typer.Option(help="comma-separated experts to read, in this order (default: the store's)")
    ] = None,
    augmentation: Annotated[
        str, typer.Option(help="auto | d4 | d4_rewrite (flips/rotations with direction words moved) | none")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its newest checkpoint")] = False,
) -> None:
    """Train a preset (cross-entropy, AdamW, multi-step LR); run under `torchrun` for DDP."""
    from segmenter.model import list_presets
    from segmenter.train import TrainingError, TrainSettings
    from segmenter.train import train as run_training

    if preset not in list_presets():
        raise InputError(f"--preset: unknown preset '{preset}' (see `segmenter models`)")
    if missing_captions not in ("mask", "error"):
        raise InputError(f"--missing-captions: expected mask or error, got '{missing_captions}'")
    if augmentation not in ("auto", "d4", "d4_rewrite", "none"):
        raise InputError(f"--augmentation: expected auto, d4, d4_rewrite or none, got '{augmentation}'")
    chosen = [name.strip() for name in experts.split(",") if name.strip()] if experts else None
    settings = TrainSettings(preset=preset, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                             checkpoint_every=checkpoint_every, missing_captions=missing_captions, experts=chosen,
                             augmentation=augmentation)  # fmt: skip
    try:
        checkpoint = run_training(manifest, out, settings, captions=captions, resume=resume, progress=True)
    except TrainingError as exc:
        console.print(f"error: {exc}")
        raise SystemExit(1) from None
    console.print(f"checkpoint: {checkpoint}")


@app.command()
@exit_on_input_error
def evaluate(
    run: Annotated[Path, typer.Option(help="run folder written by `segmenter train`")],
    split: Annotated[str, typer.Option(help="split to evaluate")] = "test",
    gt: Annotated[str, typer.Option(help="eroded (ISPRS protocol) | full")] = "eroded",
    window: Annotated[int | None, typer.Option(help="sliding window (default: the tile size)")] = None,
    overlap: Annotated[
        float | None,
        typer.Option(
            help="window overlap in [0, 1) (default: the captioned tile grid for text-guided models, 0.25 otherwise)"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    captions: Annotated[Path | None, typer.Option(help="caption store (default: the one the run trained on)")] = None,
    missing_captions: Annotated[
        str, typer.Option(help="error | mask: a store lacking some of the run's experts or having others")
    ] = "error",
) -> None:
    """Sliding-window inference over whole sources; OA, per-class IoU/F1, mIoU/mF1 (5 classes and all)."""
    from segmenter.evaluate import evaluate as run_evaluation

    if gt not in ("eroded", "full"):
        raise InputError(f"--gt: expected eroded or full, got '{gt}'")
    _check_inference_options(overlap, missing_captions)
    with progress("evaluate") as on_source:
        metrics = run_evaluation(run, split, gt, window, overlap, device, on_source, captions, missing_captions)
    print(metrics.markdown(f"{run} ({split}, {gt} GT)"))


def _check_inference_options(overlap: float | None, missing_captions: str) -> None:
    if overlap is not None and not 0 <= overlap < 1:
        raise InputError(f"--overlap: expected a value in [0, 1), got {overlap}")
    if missing_captions not in ("error", "mask"):
        raise InputError(f"--missing-captions: expected error or mask, got '{missing_captions}'")


@app.command()
@exit_on_input_error
def predict(
    run: Annotated[Path, typer.Option(help="run folder written by `segmenter train`")],
    images: Annotated[list[Path] | None, typer.Option(help="image files or folders (repeatable)")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder for GeoTIFFs and colour PNGs")] = None,
    index: Annotated[
        Path | None, typer.Option(help="tile index: predict class fractions of every tile (text-free run)")
    ] = None,
    predictions: Annotated[
        Path | None, typer.Option(help="with --index: the predicted-tile-classes Parquet file to write")
    ] = None,
    split: Annotated[list[str] | None, typer.Option(help="with --index: only these splits (repeatable)")] = None,
    captions: Annotated[Path | None, typer.Option(help="caption store for these images (else experts masked)")] = None,
    window: Annotated[int | None, typer.Option(help="sliding window (default: the tile size)")] = None,
    overlap: Annotated[
        float | None,
        typer.Option(
            help="window overlap in [0, 1) (default: the captioned tile grid for text-guided models, 0.25 otherwise)"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    missing_captions: Annotated[
        str, typer.Option(help="error | mask: a store lacking some of the run's experts or having others")
    ] = "error",
) -> None:
    """Class-index GeoTIFFs + colour PNGs of images (--images, --out), or the predicted class fractions of every
    tile of an index (--index, --predictions) for prompts whose class source is `predictions`."""
    from segmenter.predict import predict as run_prediction
    from segmenter.predict import predict_index

    _check_inference_options(overlap, missing_captions)
    if index is not None or predictions is not None:
        if index is None or predictions is None or images or out:
            raise InputError("predict: give --index with --predictions, or --images with --out")
        with progress("predict") as on_tile:
            path = predict_index(run, index, predictions, split, device, on_tile)
        console.print(f"wrote {path}")
        return
    if not images or out is None:
        raise InputError("predict: give --images with --out, or --index with --predictions")
    for path in run_prediction(run, images, out, captions, window, overlap, device, missing_captions):
        console.print(f"wrote {path}")


@app.command()
def models() -> None:
    """List the model presets (the paper's model, its ablations, the tiny test model)."""
    from segmenter.model import list_presets, preset_config
    from segmenter.model import presets as registry

    table = Table("preset", "backbone", "adapter", "text", "LQGA stages", "decoder", "note", title="presets")
    for name in list_presets():
        config = preset_config(name)
        adapter = f"{config.adapter} r={config.dilation}" if config.adapter == "swda" else config.adapter
        note = (
            (getattr(registry, name).__doc__ or "").strip().splitlines()[0] if getattr(registry, name).__doc__ else ""
        )
        stages = ",".join(map(str, config.lqga_stages)) if config.uses_text else "-"
        table.add_row(name, config.backbone, adapter, config.text_encoder, stages, config.decoder, note)
    Console().print(table)


if __name__ == "__main__":
    app()
