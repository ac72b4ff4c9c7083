"""The ``segmenter`` command: data preparation, demo data, model listing, training, evaluation, prediction."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.padding import Padding
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from manifests.devices import DEVICE_HELP
from manifests.errors import InputError, exit_on_input_error
from manifests.run_manifest import DATASET_SETTINGS, TilingConfig, dataset_config, load_manifest
from segmenter.engine.options import Augmentation, GroundTruth, MissingCaptions, Scale, TrainSettings

app = typer.Typer(
    help="Stage 2 of MPerS: tiles, the caption-guided segmenter, its training and evaluation.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)

# The datasets `prepare` can read from flags alone: the manifest's dataset names, less `folder`, whose classes only a
# manifest can give.
Dataset = StrEnum("Dataset", {name: name for name in DATASET_SETTINGS if name != "folder"})
BATCH_HELP = "windows per forward (default 8)"
TEXT_CACHE_HELP = "text-feature cache folder (default: beside the caption store when writable, else the run folder)"
MOVED_HELP = "the run's local {} if they moved since training (checked to be the same)"
OVERLAP_HELP = "window overlap in [0, 1) (default: the captioned tile grid for text-guided models, 0.25 otherwise)"


def _train_default(field: str) -> Any:
    """The default of a training setting: the CLI takes it from :class:`TrainSettings`, never repeats it."""
    return TrainSettings.model_fields[field].default


@contextmanager
def progress(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on stderr; yields the ``(done, total, note)`` callback that advances it."""
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"), console=console, transient=False,
    )  # fmt: skip
    with bar:
        task = bar.add_task(description, total=None, note="")
        try:
            yield lambda done, total, note: bar.update(task, completed=done, total=total, note=note)
        except BaseException:
            bar.live.transient = True  # a refused run shows its one-line error alone, not an empty bar above it
            raise


@app.command()
@exit_on_input_error
def prepare(
    manifest: Annotated[str | None, typer.Option(help="run manifest (path or packaged name)")] = None,
    dataset: Annotated[Dataset | None, typer.Option(help="dataset (without a manifest)")] = None,
    root: Annotated[Path | None, typer.Option(help="folder with the archives or their extracted folders")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder for crops and index.parquet")] = None,
    split: Annotated[
        str, typer.Option(help="split scheme: mpers or isprs (Vaihingen, Potsdam), mpers or official (SynDrone)")
    ] = "mpers",
    size: Annotated[int, typer.Option(help="crop size in pixels")] = 512,
    stride: Annotated[int | None, typer.Option(help="crop stride (default: the size)")] = None,
) -> None:
    """Cut sources into crops and write the tile index (a no-op when inputs are unchanged)."""
    from segmenter.data.prepare import prepare_tiles

    if manifest:
        run = load_manifest(manifest)
        settings, tiling = run.dataset, run.tiling
    else:
        if not (dataset and root and out):
            raise InputError("prepare: give --manifest, or --dataset, --root and --out")
        try:
            settings = dataset_config(name=dataset.value, root=root, split=split)
        except ValueError as exc:
            raise InputError(f"--dataset {dataset}: {str(exc).splitlines()[-1].strip()}") from None
        try:
            tiling = TilingConfig(size=size, stride=stride, out=out)
        except ValidationError as exc:
            raise InputError(_option_error(exc)) from None
    with progress("prepare") as on_progress:
        result = prepare_tiles(settings, tiling, on_progress)
    if result.up_to_date:
        console.print(f"up to date: {result.index_path} ({result.n_tiles} tiles)")
        for line in result.warnings:  # repeated from the run that wrote the index: nothing silent on a re-run
            console.print(f"warning: {line}", markup=False, highlight=False)
        return
    columns = ("source", "split", "tiles", "boundary px", "stray px", "ignored px", "check")
    table = Table(*columns, title="prepared sources")
    for report in result.sources:
        checks = [text for found, text in ((report.image_is_label_map, "image is a label map?"),
                                           (bool(report.overlays), "label is an overlay?"),
                                           (not report.labelled, "no label")) if found]  # fmt: skip
        table.add_row(report.source_id, report.split, str(report.tiles), str(report.boundary_pixels),
                      str(report.stray_pixels), str(report.excluded_pixels), "; ".join(checks) or "ok")  # fmt: skip
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
    from segmenter.data.demo_scenes import write_demo_dataset

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
    preset: Annotated[str, typer.Option(help="model preset (`segmenter models`)")] = _train_default("preset"),
    steps: Annotated[int, typer.Option(help="optimizer steps")] = _train_default("steps"),
    batch_size: Annotated[int, typer.Option(help="tiles per step and process")] = _train_default("batch_size"),
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = _train_default("lr"),
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = _train_default(
        "checkpoint_every"
    ),
    missing_captions: Annotated[
        MissingCaptions, typer.Option(help="train tiles without a passed caption: mask their experts, or stop")
    ] = _train_default("missing_captions"),
    experts: Annotated[
        str | None, typer.Option(help="comma-separated experts to read, in this order (default: the store's)")
    ] = _train_default("experts"),
    augmentation: Annotated[
        Augmentation,
        typer.Option(
            help="flips/rotations: d4; with the captions' direction words moved: d4_rewrite; auto: per preset"
        ),
    ] = _train_default("augmentation"),
    seed: Annotated[int, typer.Option(help="random seed")] = _train_default("seed"),
    workers: Annotated[
        int | None, typer.Option(help="loader processes per process (default: GPU min(4, CPUs - 1), CPU 0)")
    ] = _train_default("workers"),
    backbone_file: Annotated[
        Path | None, typer.Option(help="local DINOv3 weights (.pth/.safetensors) instead of the preset's hub id")
    ] = None,
    text_checkpoint: Annotated[
        Path | None,
        typer.Option(help="local text-encoder weights: a CLIP .pt, a (BLIP-2) FLAN-T5 folder, the dino.txt .pth"),
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its newest checkpoint")] = False,
    text_cache: Annotated[Path | None, typer.Option(help=TEXT_CACHE_HELP)] = None,
) -> None:
    """Train a preset (cross-entropy, AdamW, multi-step LR) on the GPU when there is one; run under `torchrun` for
    DDP."""
    from segmenter.engine.train import TrainingError, text_cache_place
    from segmenter.engine.train import train as run_training
    from segmenter.model import list_presets

    if preset not in list_presets():
        raise InputError(f"--preset: unknown preset '{preset}' (see `segmenter models`)")
    chosen = [name.strip() for name in experts.split(",") if name.strip()] if experts else None
    local = {"backbone_file": backbone_file, "text_checkpoint": text_checkpoint}
    try:
        settings = TrainSettings(preset=preset, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                 checkpoint_every=checkpoint_every, missing_captions=missing_captions, experts=chosen,
                                 augmentation=augmentation, workers=workers,
                                 **{key: str(path.resolve()) for key, path in local.items() if path})  # fmt: skip
    except ValidationError as exc:
        raise InputError(_option_error(exc)) from None
    try:
        with text_cache_place(text_cache, out):
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
    gt: Annotated[GroundTruth, typer.Option(help="ground truth: eroded (no boundaries, ISPRS) or full")] = (
        GroundTruth.eroded
    ),
    window: Annotated[int | None, typer.Option(help="sliding window (default: the tile size)")] = None,
    overlap: Annotated[float | None, typer.Option(help=OVERLAP_HELP)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    captions: Annotated[Path | None, typer.Option(help="caption store (default: the one the run trained on)")] = None,
    missing_captions: Annotated[
        MissingCaptions, typer.Option(help="a store lacking some of the run's experts or having others: stop, or mask")
    ] = MissingCaptions.error,
    batch_size: Annotated[int | None, typer.Option(help=BATCH_HELP)] = None,
    text_cache: Annotated[Path | None, typer.Option(help=TEXT_CACHE_HELP)] = None,
    backbone_file: Annotated[Path | None, typer.Option(help=MOVED_HELP.format("backbone weights"))] = None,
    text_checkpoint: Annotated[Path | None, typer.Option(help=MOVED_HELP.format("text-encoder weights"))] = None,
) -> None:
    """Sliding-window inference over whole sources: OA, per-class IoU/F1, mIoU/mF1 (main classes, and all)."""
    from segmenter.engine.evaluate import evaluate as run_evaluation
    from segmenter.engine.inference import LocalWeights, check_batch_size
    from segmenter.engine.train import text_cache_place

    _check_overlap(overlap)
    _check_window(window)
    check_batch_size(batch_size)
    with progress("evaluate") as on_source, text_cache_place(text_cache, run):
        metrics = run_evaluation(
            run, split, gt, window, overlap, device, on_source, captions, missing_captions, batch_size,
            LocalWeights(backbone_file, text_checkpoint),
        )  # fmt: skip
    print(metrics.markdown(f"{run} ({split}, {gt} GT)"))


def _option_error(exc: ValidationError) -> str:
    """The first invalid value of a settings model built from options, as one line naming its option."""
    error = exc.errors()[0]
    option = "--" + str(error["loc"][0]).replace("_", "-")
    return f"{option}: {error['msg'].lower()} (got {error['input']!r})"


def _check_overlap(overlap: float | None) -> None:
    if overlap is not None and not 0 <= overlap < 1:  # NaN fails too
        raise InputError(f"--overlap: expected a value in [0, 1), got {overlap}")


def _check_window(window: int | None) -> None:
    if window is not None and window < 16:
        raise InputError(f"--window: expected a window of 16 px or more, got {window}")


@app.command()
@exit_on_input_error
def predict(
    run: Annotated[Path, typer.Option(help="run folder written by `segmenter train`")],
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
    window: Annotated[int | None, typer.Option(help="sliding window (default: the tile size)")] = None,
    overlap: Annotated[float | None, typer.Option(help=OVERLAP_HELP)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    missing_captions: Annotated[
        MissingCaptions, typer.Option(help="a store lacking some of the run's experts or having others: stop, or mask")
    ] = MissingCaptions.error,
    scale: Annotated[
        Scale, typer.Option(help="images that are not 8-bit: none (refuse), minmax or percentile (2-98) per band")
    ] = Scale.none,
    batch_size: Annotated[int | None, typer.Option(help=BATCH_HELP)] = None,
    text_cache: Annotated[Path | None, typer.Option(help=TEXT_CACHE_HELP)] = None,
    backbone_file: Annotated[Path | None, typer.Option(help=MOVED_HELP.format("backbone weights"))] = None,
    text_checkpoint: Annotated[Path | None, typer.Option(help=MOVED_HELP.format("text-encoder weights"))] = None,
) -> None:
    """Class-index GeoTIFFs + colour PNGs of images (--images, --out), or the predicted class fractions of every
    tile of an index (--index, --predictions) for prompts whose class source is `predictions`."""
    from segmenter.engine.inference import LocalWeights, check_batch_size
    from segmenter.engine.predict import predict as run_prediction
    from segmenter.engine.predict import predict_index
    from segmenter.engine.train import text_cache_place

    moved = LocalWeights(backbone_file, text_checkpoint)

    _check_overlap(overlap)
    _check_window(window)
    check_batch_size(batch_size)
    if index is not None or predictions is not None:
        if index is None or predictions is None or images or out:
            raise InputError("predict: give --index with --predictions, or --images with --out")
        with progress("predict") as on_tile:
            path = predict_index(run, index, predictions, split, device, on_tile, batch_size, moved)
        console.print(f"wrote {path}")
        return
    if not images or out is None:
        raise InputError("predict: give --images with --out, or --index with --predictions")
    with text_cache_place(text_cache, run):
        written = run_prediction(run, images, out, captions, window, overlap, device, missing_captions, scale,
                                 batch_size, moved)  # fmt: skip
    for path in written:
        console.print(f"wrote {path}")


PRESET_FIELDS = ("preset", "backbone", "adapter", "text", "lqga_stages", "decoder", "paper_row", "paper_miou", "note")
PRESET_LABELS = {field: field for field in PRESET_FIELDS} | {
    "lqga_stages": "LQGA stages", "paper_row": "paper row", "paper_miou": "paper mIoU",
}  # fmt: skip


def preset_rows() -> list[dict[str, str]]:
    """One row per model preset: its name, the parts it is built of, the paper's row it reproduces with the
    Vaihingen mIoU reported there, and the first line of its docstring."""
    from segmenter.model import list_presets, preset_config
    from segmenter.model import presets as registry

    rows = []
    for name in list_presets():
        config = preset_config(name)
        doc = (getattr(registry, name).__doc__ or "").strip()
        reference = registry.paper_row(name)
        rows.append({
            "preset": name,
            "backbone": config.backbone,
            "adapter": f"{config.adapter} r={config.dilation}" if config.adapter == "swda" else config.adapter,
            "text": config.text_encoder,
            "lqga_stages": ",".join(map(str, config.lqga_stages)) if config.uses_text else "-",
            "decoder": config.decoder,
            "paper_row": f"{reference.table}: {reference.row}" if reference else "-",
            "paper_miou": f"{reference.miou:.2f}" if reference and reference.miou is not None else "-",
            "note": doc.splitlines()[0] if doc else "",
        })  # fmt: skip
    return rows


def _typed(row: dict[str, str]) -> dict[str, object]:
    """A preset row with numbers and lists as JSON has them (``-``, nothing, as null)."""
    stages = row["lqga_stages"]
    return {
        **row,
        "lqga_stages": [int(stage) for stage in stages.split(",")] if stages != "-" else None,
        "paper_row": row["paper_row"] if row["paper_row"] != "-" else None,
        "paper_miou": float(row["paper_miou"]) if row["paper_miou"] != "-" else None,
    }


def render_presets(rows: list[dict[str, str]], out: Console) -> None:
    """The presets on a terminal. A preset name is what `--preset` takes, so it is never cut.

    A table whose name column is as wide as the longest name while the other columns wrap (long identifiers fold)
    into what is left; a console too narrow to leave them a legible width (an 80-column terminal) gets one block
    per preset instead: the name on its own line, its parts and note indented below.
    """
    longest = max(len(row["preset"]) for row in rows)
    others = len(PRESET_FIELDS) - 1
    # Each column costs 3 characters of padding and border; below ~10 characters of text a column is unreadable.
    if out.width >= longest + 4 + others * (3 + 10):
        table = Table(title="presets")
        table.add_column("preset", no_wrap=True, min_width=longest)
        for field in PRESET_FIELDS[1:]:
            table.add_column(PRESET_LABELS[field], overflow="fold")
        for row in rows:
            table.add_row(*(row[field] for field in PRESET_FIELDS))
        out.print(table)
        return
    for row in rows:
        out.print(row["preset"], style="bold", markup=False, highlight=False, soft_wrap=True)
        parts = ", ".join(f"{PRESET_LABELS[field]} {row[field]}" for field in PRESET_FIELDS[1:-1])
        for line in (parts, row["note"]):
            if line:
                out.print(Padding(line, (0, 0, 0, 2)), markup=False, highlight=False)


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list of objects, one per preset")] = False,
) -> None:
    """List the model presets (the paper's model, its ablations, the tiny test model).

    A table in a terminal; one preset a line (tab-separated fields, a header first) when the output is a pipe or a
    file; JSON with --json.
    """
    rows = preset_rows()
    if as_json:
        print(json.dumps([_typed(row) for row in rows], indent=2))
    elif not sys.stdout.isatty():
        for values in [PRESET_FIELDS, *(tuple(row[field] for field in PRESET_FIELDS) for row in rows)]:
            print("\t".join(values))
    else:
        render_presets(rows, Console())

