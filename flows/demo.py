"""The embedded demo: synthetic scenes -> tiles -> tiny local models -> captions -> report."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from caption_pipeline.tiny_models import build_tiny_clip, build_tiny_llava, build_tiny_qwen2_vl
from flows.generate_captions import generate_captions
from flows.report import caption_report_flow
from manifests.run_manifest import load_manifest
from segmenter.demo_scenes import write_demo_dataset
from segmenter.prepare import prepare_tiles


def build_demo_models(manifest) -> None:
    """The random-weight stand-ins the demo manifest points at, built once."""
    clip = manifest.captions.clip
    if clip.checkpoint is not None and not clip.checkpoint.is_file():
        build_tiny_clip(clip.config, name=clip.model)
    builders = {"qwen2-vl-tiny": build_tiny_qwen2_vl, "llava-tiny": build_tiny_llava}
    for expert in manifest.captions.experts:
        folder = Path(expert.model or "")
        if expert.backend == "transformers" and not (folder / "config.json").is_file():
            builders[folder.name](folder)


def run_demo(console: Console, limit: int | None = None) -> None:
    """Run every stage that has landed on the embedded default, in the working directory."""
    started = time.perf_counter()
    manifest = load_manifest("demo")
    console.print(f"[1/5] demo scenes -> {manifest.dataset.root}")
    write_demo_dataset(manifest.dataset.root)
    console.print(f"[2/5] tiles -> {manifest.tiling.out}")
    result = prepare_tiles(manifest.dataset, manifest.tiling)
    console.print(f"      {result.n_tiles} tiles{' (up to date)' if result.up_to_date else ''}")
    console.print("[3/5] tiny random-weight stand-ins for CLIP, Qwen2-VL and LLaVA (no download)")
    build_demo_models(manifest)
    console.print(f"[4/5] captions -> {manifest.captions.store}")
    summary = generate_captions("demo", limit=limit)
    from flows.cli import print_summary

    print_summary(summary)
    report_dir = manifest.captions.store.parent / "report"
    console.print(f"[5/5] caption report -> {report_dir}")
    path = caption_report_flow(str(manifest.captions.store), str(report_dir), str(manifest.tiling.out))
    console.print(f"store:  {manifest.captions.store}\nreport: {path}")
    console.print(
        "The segmenter (training, evaluation) is not part of the demo yet; "
        f"demo done in {time.perf_counter() - started:.0f} s"
    )
