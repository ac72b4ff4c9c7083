"""``segmenter prepare`` and ``segmenter demo-data``: the commands of the data room."""

# A typer command takes one parameter per option; it builds one settings object from them and passes that down.
# ruff: noqa: PLR0913

from __future__ import annotations

from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from pydantic import BaseModel, ConfigDict
from rich.table import Table

from manifests.atomic import atomic_write_text
from manifests.errors import InputError, exit_on_input_error
from manifests.run_manifest import DATASET_SETTINGS, DatasetConfig, TilingConfig, load_manifest
from segmenter.cli import dataset_options as options
from segmenter.cli.app import app, console, default, progress
from segmenter.engine.options import build_settings

if TYPE_CHECKING:
    from segmenter.data.prepare import PrepareResult

# Every dataset a manifest can name is a --dataset choice: the flags below give each of its settings.
Dataset = StrEnum("Dataset", {name: name for name in DATASET_SETTINGS})
MaskFormat = StrEnum("MaskFormat", {"rgb": "rgb", "index": "index"})
Labels = StrEnum("Labels", {"full": "full", "eroded": "eroded"})
Modality = StrEnum("Modality", {name: name for name in ("rgb", "irrg", "rgbir")})
DATASET_HELP = f"the dataset, without a manifest: {', '.join(DATASET_SETTINGS)}"
SPLIT_HELP = (
    "split scheme (default: the dataset's): mpers or isprs (Vaihingen, Potsdam), mpers or official (SynDrone), "
    "official (LoveDA), folders (folder), or custom (--train/--val/--test or --split-file)"
)
IDS_HELP = "custom split: source ids of {} (repeat, or separate with commas), as the dataset numbers them"
CLASSES_HELP = "folder: the classes in order: name, name=ID (+ID...), or name=#RRGGBB (repeat or separate with commas)"
LIST_HELP = "{}: a subset (repeat, or separate with commas)"
SPLIT_FILE_HELP = "custom split as YAML, split -> source ids (read as text: 2_10 stays 2_10)"
MAX_PIXELS_HELP = "pixel budget of one source: a larger one is refused before it is read"
DATASET_PANEL, SPLIT_PANEL, FOLDER_PANEL, TILING_PANEL = "Dataset", "Custom split", "Folder dataset", "Tiling"


class PrepareSettings(BaseModel):
    """What ``segmenter prepare`` cuts and where: the ``dataset`` and ``tiling`` sections of a run manifest.

    From ``--manifest``, or from flags that name the same fields (``--dataset`` is ``dataset.name``, ``--root``
    ``dataset.root``, ``--size`` ``tiling.size``, ...): the manifest is these settings written down.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: DatasetConfig
    tiling: TilingConfig

    def manifest_text(self) -> str:
        """These settings as a run manifest (paths absolute), for ``train --manifest`` after ``prepare`` from flags."""
        dataset = self.dataset.model_dump(mode="json", exclude_defaults=True) | {
            "root": str(self.dataset.root.resolve())
        }
        dataset["name"] = self.dataset.name
        tiling = self.tiling.model_dump(mode="json", exclude_defaults=True) | {"out": str(self.tiling.out.resolve())}
        document = {"name": self.dataset.tile_prefix, "dataset": dataset, "tiling": tiling}
        return "# written by segmenter prepare: its settings, as a run manifest\n" + yaml.safe_dump(
            document, sort_keys=False
        )


def _sources_table(result: PrepareResult) -> Table:
    """One row per prepared source: its split, tiles, ignored pixels and what looks wrong in it. Source names wrap
    in their cell, never cut."""
    table = Table(title="prepared sources")
    table.add_column("source", overflow="fold")
    for column in ("split", "tiles", "boundary px", "no-data px", "unknown px", "excluded px", "check"):
        table.add_column(column, overflow="fold")
    for report in result.sources:
        checks = [text for found, text in ((report.image_is_label_map, "image is a label map?"),
                                           (bool(report.overlays), "label is an overlay?"),
                                           (not report.labelled, "no label")) if found]  # fmt: skip
        counts = (report.boundary_pixels, report.nodata_pixels, report.stray_pixels, report.excluded_pixels)
        table.add_row(report.source_id, report.split, str(report.tiles), *map(str, counts),
                      "; ".join(checks) or "ok")  # fmt: skip
    return table


def _custom_split(split: str | None, lists: dict[str, list[str] | None], split_file: Path | None) -> dict[str, Any]:
    """``split`` and ``custom_splits`` from the flags: lists imply ``--split custom``.

    Raises:
        InputError: lists with another split scheme, or ``--split custom`` without lists.
    """
    members = options.custom_splits(lists, split_file)
    if members and split not in (None, "custom"):
        raise InputError(f"--split {split}: --train/--val/--test and --split-file list a custom split (--split custom)")
    if split == "custom" and not members:
        raise InputError("--split custom: give the source ids of each split with --train/--val/--test or --split-file")
    return {"split": "custom" if members else split, "custom_splits": members}


def _from_flags(dataset: Dataset | None, root: Path | None, out: Path | None, fields: dict[str, Any],
                tiling: dict[str, Any]) -> PrepareSettings:  # fmt: skip
    """The settings the flags give, as a manifest's sections.

    Raises:
        InputError: a flag missing, or values the dataset or tiling settings refuse, naming the flags.
    """
    if not (dataset and root and out):
        raise InputError("prepare: give --manifest, or --dataset, --root and --out")
    config = options.dataset_from_flags({"name": dataset.value, "root": root, **fields})
    return PrepareSettings(dataset=config, tiling=build_settings(TilingConfig, out=out, **tiling))


def _report(result: PrepareResult) -> None:
    """The table of sources (or ``up to date``), the warnings, and where the index is."""
    if result.up_to_date:
        console.print(f"up to date: {result.index_path} ({result.n_tiles} tiles)")
    else:
        console.print(_sources_table(result))
    for line in result.warnings:  # an up-to-date index repeats those of the run that wrote it: nothing silent
        console.print(f"warning: {line}", markup=False, highlight=False)
    if not result.up_to_date:
        console.print(f"wrote {result.index_path} ({result.n_tiles} tiles)")


def _write_manifest(settings: PrepareSettings) -> None:
    """Write the flags' settings down as ``<out>/manifest.yaml`` (what ``train --manifest`` reads)."""
    path = Path(settings.tiling.out) / "manifest.yaml"
    atomic_write_text(path, settings.manifest_text())
    console.print(f"settings: {path} (a run manifest of these settings: segmenter train --manifest {path})")


def _option(help_text: str, *names: str, panel: str = DATASET_PANEL) -> Any:
    """A ``prepare`` option in its ``--help`` panel."""
    return typer.Option(*names, help=help_text, rich_help_panel=panel)


def _str(value: Enum | None) -> str | None:
    return value.value if value is not None else None


@app.command()
@exit_on_input_error
def prepare(
    manifest: Annotated[str | None, typer.Option(help="run manifest (path or packaged name)")] = None,
    dataset: Annotated[Dataset | None, _option(DATASET_HELP)] = None,
    root: Annotated[Path | None, _option("folder with the archives or their extracted folders")] = None,
    out: Annotated[Path | None, _option("output folder for crops, index.parquet and manifest.yaml")] = None,
    dataset_id: Annotated[str | None, _option("prefix of the tile ids (default: the dataset name)", "--id")] = None,
    split: Annotated[str | None, _option(SPLIT_HELP, panel=SPLIT_PANEL)] = None,
    train: Annotated[list[str] | None, _option(IDS_HELP.format("train"), panel=SPLIT_PANEL)] = None,
    val: Annotated[list[str] | None, _option(IDS_HELP.format("val"), panel=SPLIT_PANEL)] = None,
    test: Annotated[list[str] | None, _option(IDS_HELP.format("test"), panel=SPLIT_PANEL)] = None,
    split_file: Annotated[Path | None, _option(SPLIT_FILE_HELP, panel=SPLIT_PANEL)] = None,
    labels: Annotated[Labels | None, _option("ISPRS: the labels to train on: full (COMPLETE) or eroded")] = None,
    modality: Annotated[Modality | None, _option("Potsdam: the orthophoto bands (default rgb)")] = None,
    towns: Annotated[list[str] | None, _option(LIST_HELP.format("SynDrone towns (01 ... 07, 10HD)"))] = None,
    heights: Annotated[list[str] | None, _option(LIST_HELP.format("SynDrone heights (20, 50, 80)"))] = None,
    coarse: Annotated[bool | None, _option("SynDrone: 7 coarse or 28 fine classes", "--coarse/--fine")] = None,
    splits: Annotated[Path | None, _option("SynDrone: folder or splits.zip with train.txt/test.txt")] = None,
    scenes: Annotated[list[str] | None, _option(LIST_HELP.format("LoveDA scenes (urban, rural)"))] = None,
    classes: Annotated[list[str] | None, _option(CLASSES_HELP, panel=FOLDER_PANEL)] = None,
    mask_format: Annotated[
        MaskFormat | None, _option("masks: colours (rgb) or ids (index)", panel=FOLDER_PANEL)
    ] = None,
    ignore: Annotated[list[str] | None, _option("no-data values: ids or #RRGGBB colours", panel=FOLDER_PANEL)] = None,
    images_dir: Annotated[str | None, _option("image folder of a split (images)", panel=FOLDER_PANEL)] = None,
    masks_dir: Annotated[str | None, _option("mask folder of a split (masks)", panel=FOLDER_PANEL)] = None,
    ignore_index: Annotated[int | None, _option("class index of ignored pixels in the crops (default 255)")] = None,
    size: Annotated[int, _option("crop size in pixels", panel=TILING_PANEL)] = default(TilingConfig, "size"),
    stride: Annotated[int | None, _option("crop stride (default: the size)", panel=TILING_PANEL)] = None,
    max_pixels: Annotated[int, _option(MAX_PIXELS_HELP, panel=TILING_PANEL)] = default(TilingConfig, "max_pixels"),
) -> None:
    """Cut sources into crops and write the tile index (a no-op when inputs are unchanged).

    Every dataset setting of a manifest is a flag here; a prepare from flags writes them down as <out>/manifest.yaml.
    """
    from segmenter.data.prepare import prepare_tiles

    if manifest:
        run = load_manifest(manifest)
        settings = PrepareSettings(dataset=run.dataset, tiling=run.tiling)
    else:
        fields = {
            "id": dataset_id, "labels": _str(labels), "modality": _str(modality), "towns": options.values(towns),
            "heights": options.values(heights), "coarse": coarse, "splits": splits, "scenes": options.values(scenes),
            "classes": options.class_specs(classes, _str(mask_format)), "mask_format": _str(mask_format),
            "ignore": options.ignore_values(ignore), "images_dir": images_dir, "masks_dir": masks_dir,
            "ignore_index": ignore_index,
        }  # fmt: skip
        lists = {"train": options.values(train), "val": options.values(val), "test": options.values(test)}
        fields |= _custom_split(split, lists, split_file)
        tiling = {"size": size, "stride": stride, "max_pixels": max_pixels}
        settings = _from_flags(dataset, root, out, fields, tiling)
    try:
        with progress("prepare") as on_progress:
            result = prepare_tiles(settings.dataset, settings.tiling, on_progress)
    except InputError as exc:
        raise exc if manifest else options.in_flags(exc, settings.dataset.name) from None
    _report(result)
    if not manifest:
        _write_manifest(settings)


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
