"""What the ``flows`` commands and the demo show on the terminal: the caption run's progress bar and summary."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from rich.console import Console
from rich.table import Column, Table

if TYPE_CHECKING:
    from flows.generate_captions import CaptionRunSummary, ShardProgress

T = TypeVar("T")
console = Console(stderr=True, soft_wrap=True)


def say(line: str) -> None:
    """Print one line of the toolkit's own to the console, as it is (no markup)."""
    console.print(line, markup=False, highlight=False)


def with_progress(run: Callable[[ShardProgress], T]) -> T:
    """Call ``run`` with the callback of a progress bar over the caption run's shard tasks (its ``on_shard``)."""
    from segmenter.cli import progress

    with progress("captions") as on_shard:
        return run(on_shard)


def print_summary(summary: CaptionRunSummary, out: Console = console) -> None:
    """The per-expert pass-rate table, the protocol with the class source per split, the gate (mode and
    threshold(s)), and the run's totals."""
    # An expert's name is what a user passes to --experts: it is never cut (the other columns wrap instead).
    widest = max([len("expert"), *(len(name) for name in summary.table["expert"])])
    expert = Column("expert", no_wrap=True, min_width=widest)
    table = Table(expert, "prompt", "keys", "pass rate", "first try", "recovered", "not passed", "errored",
                  title="captions")  # fmt: skip
    for row in summary.table.itertuples(index=False):
        table.add_row(row.expert, row.prompt_id, str(row.keys), f"{row.pass_rate:.1%}", f"{row.first_try:.1%}",
                      str(int(row.recovered)), str(int(row.not_passed)), str(int(row.errored)))  # fmt: skip
    out.print(table)
    for expert, (keys, error) in summary.errors.items():
        out.print(f"{expert}: {keys} key(s) got no caption; most common error: {error}", markup=False, highlight=False)
    for expert, counts in summary.endpoints.items():
        if len(counts) > 1:  # one server's failures already show as errors; several are told apart here
            lines = "".join(f"\n  {stats.describe()}" for stats in counts)
            out.print(f"{expert} endpoints:{lines}", markup=False, highlight=False)
    out.print(summary.class_information())
    if summary.gate:
        out.print(summary.gate, markup=False, highlight=False)
    out.print(
        f"{summary.tiles} tiles, {summary.new_rows} new attempts, {summary.skipped_keys} keys already done, "
        f"{summary.seconds:.1f} s; store: {summary.store}"
    )
