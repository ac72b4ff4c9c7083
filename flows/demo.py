"""The embedded demo: everything from synthetic scenes to the stages that have landed so far."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from manifests.run_manifest import load_manifest
from segmenter.demo_scenes import write_demo_dataset
from segmenter.prepare import prepare_tiles


def run_demo(workdir: Path, console: Console) -> None:
    """Generate the demo scenes and prepare their tiles under ``workdir``."""
    started = time.perf_counter()
    manifest = load_manifest("demo")
    raw = workdir / "raw"
    tiles = workdir / "tiles"
    console.print(f"[1/2] demo scenes -> {raw}")
    write_demo_dataset(raw)
    console.print(f"[2/2] tiles -> {tiles}")
    dataset = manifest.dataset.model_copy(update={"root": raw})
    tiling = manifest.tiling.model_copy(update={"out": tiles})
    result = prepare_tiles(dataset, tiling)
    console.print(
        f"tile index: {result.index_path} ({result.n_tiles} tiles{', up to date' if result.up_to_date else ''})"
    )
    console.print(
        "stage 1 (captions) and stage 2 (training) are not part of the demo yet; "
        f"done in {time.perf_counter() - started:.1f} s"
    )
