"""The ``segmenter`` command: data preparation, demo data, model listing, training, evaluation, prediction."""

from __future__ import annotations

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


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"), console=console, transient=False,
    )  # fmt: skip


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
    with progress_bar() as bar:
        task = bar.add_task("prepare", total=None, note="")

        def on_progress(done: int, total: int, note: str) -> None:
            bar.update(task, completed=done, total=total, note=note)

        result = prepare_tiles(dataset_config, tiling, on_progress)
    if result.up_to_date:
        console.print(f"up to date: {result.index_path} ({result.n_tiles} tiles)")
        return
    table = Table("source", "split", "tiles", "boundary px", "stray px", title="prepared sources")
    for report in result.sources:
        table.add_row(report.source_id, report.split, str(report.tiles), str(report.boundary_pixels),
                      str(report.stray_pixels))  # fmt: skip
    console.print(table)
    for report in result.sources:
        if report.stray_pixels:
            console.print(
                f"warning: {report.source_id}: {report.stray_pixels} label pixels with colours outside the "
                "palette were set to the ignore index"
            )
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


if __name__ == "__main__":
    app()
