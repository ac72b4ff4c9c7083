"""The ``flows`` command: ``flows run <flow>``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from manifests.errors import exit_on_input_error

app = typer.Typer(help="Prefect flows of the MPerS toolkit.", no_args_is_help=True, add_completion=False)
run_app = typer.Typer(help="Run one flow.", no_args_is_help=True)
app.add_typer(run_app, name="run")
console = Console(stderr=True, soft_wrap=True)


def with_progress(run):
    """Run a caption flow with a progress bar over its shard tasks."""
    from flows import generate_captions as module
    from segmenter.cli import progress

    with progress("captions") as on_shard:
        module.progress_hook = on_shard
        try:
            return run()
        finally:
            module.progress_hook = None


def print_summary(summary) -> None:
    """The per-expert pass-rate table, the protocol with the class source per split, and the run's totals."""
    table = Table("expert", "prompt", "keys", "pass rate", "first try", "recovered", "not passed", "errored",
                  title="captions")  # fmt: skip
    for row in summary.table.itertuples(index=False):
        table.add_row(row.expert, row.prompt_id, str(row.keys), f"{row.pass_rate:.1%}", f"{row.first_try:.1%}",
                      str(int(row.recovered)), str(int(row.not_passed)), str(int(row.errored)))  # fmt: skip
    console.print(table)
    console.print(summary.class_information())
    console.print(
        f"{summary.tiles} tiles, {summary.new_rows} new attempts, {summary.skipped_keys} keys already done, "
        f"{summary.seconds:.1f} s; store: {summary.store}"
    )


@run_app.command("generate-captions")
@exit_on_input_error
def generate_captions(
    manifest: Annotated[str, typer.Option(help="run manifest (path or packaged name)")],
    limit: Annotated[int | None, typer.Option(help="caption only the first N tiles (by tile id)")] = None,
    experts: Annotated[str | None, typer.Option(help="comma-separated expert names (default: all)")] = None,
    runner: Annotated[str, typer.Option(help="threads | dask")] = "threads",
    address: Annotated[str | None, typer.Option(help="Dask scheduler address (default: a LocalCluster)")] = None,
    store: Annotated[Path | None, typer.Option(help="caption store (default: the manifest's)")] = None,
    shard_size: Annotated[int | None, typer.Option(help="tiles per task (default: the manifest's)")] = None,
) -> None:
    """Caption every tile with every expert and prompt, gate with CLIP, re-prompt failures; resumable."""
    from flows import generate_captions as module

    names = [name.strip() for name in experts.split(",")] if experts else None
    print_summary(with_progress(lambda: module.generate_captions(manifest, store, names, limit, runner, address,
                                                                 shard_size)))  # fmt: skip


@run_app.command("caption-report")
@exit_on_input_error
def caption_report(
    store: Annotated[Path, typer.Option(help="caption store (file or fragment folder)")],
    out: Annotated[Path, typer.Option(help="folder for report.html and its data")],
    index: Annotated[Path | None, typer.Option(help="tile index, for class recall and hallucinations")] = None,
) -> None:
    """Pass rates, recovery, similarity histograms, tau sweep, class recall, hallucinations, worst captions."""
    from flows.report import caption_report_flow

    path = caption_report_flow(str(store), str(out), str(index) if index else None)
    console.print(f"report: {path}")


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
