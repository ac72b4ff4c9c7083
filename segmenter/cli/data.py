"""``segmenter prepare`` and ``segmenter demo-data``: the commands of the data room."""

# A typer command takes one parameter per option; it builds one settings object from them and passes that down.
# ruff: noqa: PLR0913

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import BaseModel, ConfigDict
from rich.table import Table

from manifests.errors import InputError, exit_on_input_error
from manifests.run_manifest import DATASET_SETTINGS, DatasetConfig, TilingConfig, dataset_config, load_manifest
from segmenter.cli.app import app, console, progress
from segmenter.engine.options import build_settings

if TYPE_CHECKING:
    from segmenter.data.prepare import PrepareResult

# The datasets `prepare` can read from flags alone: the manifest's dataset names, less `folder`, whose classes only a
# manifest can give.
Dataset = StrEnum("Dataset", {name: name for name in DATASET_SETTINGS if name != "folder"})
SPLIT_HELP = "split scheme: mpers or isprs (Vaihingen, Potsdam), mpers or official (SynDrone)"


class PrepareSettings(BaseModel):
    """What ``segmenter prepare`` cuts and where: the ``dataset`` and ``tiling`` sections of a run manifest.

    From ``--manifest``, or from flags that name the same fields (``--dataset`` is ``dataset.name``, ``--root``
    ``dataset.root``, ``--size`` ``tiling.size``, ...): the manifest is these settings written down.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: DatasetConfig
    tiling: TilingConfig


def _from_flags(
    dataset: Dataset | None, root: Path | None, out: Path | None, split: str, size: int, stride: int | None
) -> PrepareSettings:
    """The settings the flags give, as a manifest's sections.

    Raises:
        InputError: a flag missing, or a value the dataset or tiling settings refuse, naming it.
    """
    if not (dataset and root and out):
        raise InputError("prepare: give --manifest, or --dataset, --root and --out")
    try:
        config = dataset_config(name=dataset.value, root=root, split=split)
    except ValueError as exc:
        raise InputError(f"--dataset {dataset}: {str(exc).splitlines()[-1].strip()}") from None
    return PrepareSettings(dataset=config, tiling=build_settings(TilingConfig, size=size, stride=stride, out=out))


def _sources_table(result: PrepareResult) -> Table:
    """One row per prepared source: its split, tiles, ignored pixels and what looks wrong in it."""
    columns = ("source", "split", "tiles", "boundary px", "stray px", "ignored px", "check")
    table = Table(*columns, title="prepared sources")
    for report in result.sources:
        checks = [text for found, text in ((report.image_is_label_map, "image is a label map?"),
                                           (bool(report.overlays), "label is an overlay?"),
                                           (not report.labelled, "no label")) if found]  # fmt: skip
        table.add_row(report.source_id, report.split, str(report.tiles), str(report.boundary_pixels),
                      str(report.stray_pixels), str(report.excluded_pixels), "; ".join(checks) or "ok")  # fmt: skip
    return table


@app.command()
@exit_on_input_error
def prepare(
    manifest: Annotated[str | None, typer.Option(help="run manifest (path or packaged name)")] = None,
    dataset: Annotated[Dataset | None, typer.Option(help="dataset (without a manifest)")] = None,
    root: Annotated[Path | None, typer.Option(help="folder with the archives or their extracted folders")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder for crops and index.parquet")] = None,
    split: Annotated[str, typer.Option(help=SPLIT_HELP)] = "mpers",
    size: Annotated[int, typer.Option(help="crop size in pixels")] = 512,
    stride: Annotated[int | None, typer.Option(help="crop stride (default: the size)")] = None,
) -> None:
    """Cut sources into crops and write the tile index (a no-op when inputs are unchanged)."""
    from segmenter.data.prepare import prepare_tiles

    if manifest:
        run = load_manifest(manifest)
        settings = PrepareSettings(dataset=run.dataset, tiling=run.tiling)
    else:
        settings = _from_flags(dataset, root, out, split, size, stride)
    with progress("prepare") as on_progress:
        result = prepare_tiles(settings.dataset, settings.tiling, on_progress)
    if result.up_to_date:
        console.print(f"up to date: {result.index_path} ({result.n_tiles} tiles)")
    else:
        console.print(_sources_table(result))
    for line in result.warnings:  # an up-to-date index repeats those of the run that wrote it: nothing silent
        console.print(f"warning: {line}", markup=False, highlight=False)
    if not result.up_to_date:
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
