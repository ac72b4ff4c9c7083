"""The ``segmenter`` typer app, its console and progress bar, and the options its commands share.

A command builds one settings object from its options (:func:`segmenter.engine.options.build_settings`) and passes
it down; the defaults shown in ``--help`` are read from those settings, never written twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from manifests.devices import DEVICE_HELP
from segmenter.engine.options import MissingCaptions

app = typer.Typer(
    help="Stage 2 of MPerS: tiles, the caption-guided segmenter, its training and evaluation.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)

OVERLAP_HELP = "window overlap in [0, 1) (default: the captioned tile grid for text-guided models, 0.25 otherwise)"
TEXT_CACHE_HELP = "text-feature cache folder (default: beside the caption store when writable, else the run folder)"
MOVED_HELP = "the run's local {} if they moved since training (checked to be the same)"
MISSING_HELP = (
    "a store lacking some of the run's experts or having others, or an expert without a usable caption on any "
    "window: stop, or mask (said: on how many windows)"
)

RunOption = Annotated[Path, typer.Option(help="run folder written by `segmenter train`")]
WindowOption = Annotated[int | None, typer.Option(help="sliding window (default: the tile size)")]
OverlapOption = Annotated[float | None, typer.Option(help=OVERLAP_HELP)]
DeviceOption = Annotated[str, typer.Option(help=DEVICE_HELP)]
MissingOption = Annotated[MissingCaptions, typer.Option(help=MISSING_HELP)]
BatchOption = Annotated[int | None, typer.Option(help="windows per forward (default 8)")]
TextCacheOption = Annotated[Path | None, typer.Option(help=TEXT_CACHE_HELP)]
MovedBackboneOption = Annotated[Path | None, typer.Option(help=MOVED_HELP.format("backbone weights"))]
MovedTextOption = Annotated[Path | None, typer.Option(help=MOVED_HELP.format("text-encoder weights"))]


def default(settings: type[BaseModel], field: str) -> Any:
    """The default of a setting: the CLI takes it from the settings model, never repeats it."""
    return settings.model_fields[field].default


def absolute(path: Path | None) -> str | None:
    """A path option as the absolute path a run records (None when not given)."""
    return str(path.resolve()) if path is not None else None


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
