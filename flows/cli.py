"""The ``flows`` command: ``flows run <flow>``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from manifests.errors import exit_on_input_error

app = typer.Typer(help="Prefect flows of the MPerS toolkit.", no_args_is_help=True, add_completion=False)
run_app = typer.Typer(help="Run one flow.", no_args_is_help=True)
app.add_typer(run_app, name="run")
console = Console(stderr=True, soft_wrap=True)


@run_app.command("demo")
@exit_on_input_error
def demo(
    workdir: Annotated[Path, typer.Option(help="folder for the demo's data, models, stores and reports")] = Path(
        "data/demo"
    ),
) -> None:
    """The whole workflow on the embedded default: demo scenes, tiles, captions, report, segmenter."""
    from flows.demo import run_demo

    run_demo(workdir, console)


@app.callback()
def main() -> None:
    """Prefect flows of the MPerS toolkit."""
