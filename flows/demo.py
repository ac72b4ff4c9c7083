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


DEMO_STEPS = 300


def train_and_evaluate(console: Console, manifest_name: str, store: Path, runs: Path, steps: int) -> dict[str, object]:
    """Train the tiny text-guided preset and its no-text twin side by side; evaluate both on the test areas."""
    from segmenter.evaluate import evaluate
    from segmenter.train import TrainSettings, train

    results = {}
    for preset in ("test_tiny", "test_tiny_notext"):
        out = runs / preset
        settings = TrainSettings(preset=preset, steps=steps, batch_size=8, checkpoint_every=100, log_every=10)
        resume = (out / "checkpoints" / "latest").is_file()
        console.print(f"      training {preset} for {steps} steps -> {out}")
        train(manifest_name, out, settings, captions=store if preset == "test_tiny" else None, resume=resume,
              progress=True)  # fmt: skip
        results[preset] = evaluate(out, split="test")
    return results


def run_demo(console: Console, limit: int | None = None, steps: int = DEMO_STEPS) -> None:
    """Run every stage that has landed on the embedded default, in the working directory."""
    started = time.perf_counter()
    manifest = load_manifest("demo")
    console.print(f"[1/6] demo scenes -> {manifest.dataset.root}")
    write_demo_dataset(manifest.dataset.root)
    console.print(f"[2/6] tiles -> {manifest.tiling.out}")
    result = prepare_tiles(manifest.dataset, manifest.tiling)
    console.print(f"      {result.n_tiles} tiles{' (up to date)' if result.up_to_date else ''}")
    console.print("[3/6] tiny random-weight stand-ins for CLIP, Qwen2-VL and LLaVA (no download)")
    build_demo_models(manifest)
    console.print(f"[4/6] captions -> {manifest.captions.store}")
    from flows.cli import print_summary, with_progress

    print_summary(with_progress(lambda: generate_captions("demo", limit=limit)))
    report_dir = manifest.captions.store.parent / "report"
    console.print(f"[5/6] caption report -> {report_dir}")
    path = caption_report_flow(str(manifest.captions.store), str(report_dir), str(manifest.tiling.out))
    console.print(f"report: {path}")
    runs = manifest.captions.store.parent / "runs"
    console.print(f"[6/6] segmenter: test_tiny with captions and without, evaluated on the test areas -> {runs}")
    results = train_and_evaluate(console, "demo", manifest.captions.store, runs, steps)
    for preset, metrics in results.items():
        print(metrics.markdown(f"{preset} on the demo test areas (eroded GT)") + "\n")
    guided, plain = results["test_tiny"], results["test_tiny_notext"]
    console.print(
        f"captions add {100 * (guided.miou - plain.miou):+.2f} mIoU on the demo "
        f"({100 * guided.miou:.2f} with, {100 * plain.miou:.2f} without); demo done in "
        f"{time.perf_counter() - started:.0f} s"
    )
