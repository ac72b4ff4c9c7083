"""The ``flows`` command: ``flows run <flow>``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.console import console, print_summary, say, with_progress
from manifests.errors import exit_on_input_error

app = typer.Typer(help="Prefect flows of the MPerS toolkit.", no_args_is_help=True, add_completion=False)
run_app = typer.Typer(help="Run one flow.", no_args_is_help=True)
app.add_typer(run_app, name="run")


@run_app.command("generate-captions")
@exit_on_input_error
def generate_captions(
    manifest: Annotated[str, typer.Option(help="run manifest (path or packaged name)")],
    limit: Annotated[int | None, typer.Option(help="caption only the first N tiles (by tile id)")] = None,
    experts: Annotated[str | None, typer.Option(help="comma-separated expert names (default: all)")] = None,
    runner: Annotated[
        str, typer.Option(help="threads (of this process) | dask (worker processes; a cluster with --address)")
    ] = "threads",
    address: Annotated[
        str | None,
        typer.Option(help="Dask scheduler, tcp://host:8786 (with --runner dask; default: local worker processes)"),
    ] = None,
    store: Annotated[Path | None, typer.Option(help="caption store (default: the manifest's)")] = None,
    shard_size: Annotated[int | None, typer.Option(help="tiles per task (default: the manifest's)")] = None,
) -> None:
    """Caption every tile with every expert and prompt, gate with CLIP, re-prompt failures; resumable."""
    from flows.prefect_api import process_api
    from manifests.run_manifest import load_caption_manifest

    load_caption_manifest(manifest)  # a manifest that cannot be captioned is refused before anything starts
    process_api(say)  # Prefect's server boots while the caption modules import and the inputs are checked
    from flows import generate_captions as module

    names = [name.strip() for name in experts.split(",")] if experts else None
    run = module.CaptionRunSettings(manifest, store, names, limit, runner, address, shard_size)
    summary = with_progress(lambda on_shard: module.generate_captions(run, on_shard=on_shard, say=say))
    print_summary(summary)


@run_app.command("caption-report")
@exit_on_input_error
def caption_report(
    store: Annotated[Path, typer.Option(help="caption store (file or fragment folder)")],
    out: Annotated[Path, typer.Option(help="folder for report.html and its data")],
    index: Annotated[
        Path | None, typer.Option(help="tile index, for thumbnails, class recall and hallucinations")
    ] = None,
    sample: Annotated[int, typer.Option(help="tiles shown in captions.html", min=1)] = 200,
    seed: Annotated[
        int | None, typer.Option(help="draw the captions.html tiles at random (default: the first by tile id)")
    ] = None,
) -> None:
    """Pass rates, recovery, similarity histograms, tau sweep, class recall, hallucinations, worst captions."""
    from flows.prefect_api import process_api

    api = process_api(say)  # Prefect's server boots while the report's modules import
    from flows.report import caption_report_flow

    api.wait()
    path = caption_report_flow(str(store), str(out), str(index) if index else None, sample, seed)
    console.print(f"report: {path}", markup=False, highlight=False)
    console.print(f"captions: {path.parent / 'captions.html'}", markup=False, highlight=False)


@run_app.command("calibrate-gate")
@exit_on_input_error
def calibrate_gate(
    manifest: Annotated[str, typer.Option(help="run manifest (path or packaged name)")],
    sample: Annotated[int, typer.Option(help="tiles to draw from those with usable captions")] = 64,
    store: Annotated[Path | None, typer.Option(help="caption store (default: the manifest's)")] = None,
    false_pass: Annotated[float, typer.Option(help="share of shuffled pairs the suggested tau may pass")] = 0.05,
    seed: Annotated[int, typer.Option(help="draws the sample and the shuffle")] = 0,
    split: Annotated[str | None, typer.Option(help="draw only tiles of this split (default: every split)")] = None,
) -> None:
    """Own-tile vs shuffled-tile CLIP similarities of stored captions: AUC, suggested tau, pass rate per gate mode."""
    from flows.calibrate import TileSample, print_calibration
    from flows.calibrate import calibrate_gate as calibrate

    print_calibration(calibrate(manifest, TileSample(sample, seed, split), store, false_pass))


@run_app.command("demo")
@exit_on_input_error
def demo(
    limit: Annotated[int | None, typer.Option(help="caption only the first N tiles")] = None,
    steps: Annotated[int, typer.Option(help="training steps of each demo segmenter")] = 300,
) -> None:
    """The whole workflow on the embedded default (data/demo under the working directory); no network, no GPU."""
    from flows.demo import run_demo

    run_demo(console, limit, steps)


@app.callback()
def main() -> None:
    """Prefect flows of the MPerS toolkit."""


if __name__ == "__main__":
    app()
