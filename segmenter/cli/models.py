"""``segmenter models``: the model presets, as a table, one line each, or JSON."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.padding import Padding
from rich.table import Table

from segmenter.cli.app import app

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
