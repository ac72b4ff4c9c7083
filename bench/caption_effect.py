"""What captions add on the demo: test_tiny with and without captions, per caption protocol, over seeds.

Runs in its own work folder (default ``data/bench/caption_effect``, resumable): the demo scenes, tiles, the demo's
CLIP trained on the train tiles (the gate's scorer and the text tower of ``test_tiny``) and the random-weight expert
stand-ins, then
- ``test_tiny_notext`` (no captions) for every seed, with the flips and rotations of its preset (``d4``), and
  also without them where a text-guided row has none; seed 0 (``d4``) predicts the test tiles' classes;
- per protocol (``predicted``: labels describe train tiles, the text-free model's predictions describe test tiles;
  ``blind``: no class information in any prompt) one caption store and ``test_tiny`` for every seed with the
  default augmentation;
- with ``--augmentation-study``, ``test_tiny`` under ``predicted`` also with flips/rotations that leave the captions
  as they are (``d4``), with direction words moved (``d4_rewrite``) and without geometric augmentation (``none``);
and prints mIoU (5 classes, eroded GT, every model with windows on the tile grid) as mean +- std over seeds, and
each text-guided row's difference to the text-free model under the same augmentation, paired by seed.
Usage: ``python bench/caption_effect.py [--steps 200] [--seeds 0 1 2] [--augmentation-study]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import time
from pathlib import Path

import yaml

from flows.demo import DEMO_SCENE_SIZE, TEXT_FREE, TEXT_GUIDED

ROOT = Path(__file__).resolve().parents[1]


def _spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{100 * mean:6.2f} +- {100 * std:5.2f}"


def protocol_manifest(protocol: str, folder: Path) -> Path:
    """The demo manifest with its own caption store and the given caption protocol."""
    from manifests.run_manifest import packaged_manifests

    data = yaml.safe_load(packaged_manifests()["demo"].read_text())
    prompts = data["captions"].setdefault("prompts", {})
    prompts["protocol"] = protocol
    if protocol != "predicted":
        prompts.pop("predictions", None)
    data["name"] = f"demo_{protocol}"
    data["captions"]["store"] = f"data/demo/captions_{protocol}"
    path = folder / f"demo_{protocol}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Bench:
    """The runs of the bench: each trains (or resumes) one model and evaluates it on the demo test areas."""

    def __init__(self, args: argparse.Namespace) -> None:
        from rich.console import Console

        self.args = args
        self.console = Console(stderr=True)
        self.quiet = contextlib.redirect_stdout(io.StringIO())
        self.started = time.perf_counter()
        self.runs = Path("data/demo/bench_runs")
        self.results: dict[str, list[float]] = {}
        # The text tower of every text-guided run: the demo's trained CLIP (None: the preset's seeded random tower).
        self.text_checkpoint: Path | None = None

    def run(
        self, row: str, preset: str, name: str, manifest: str, seed: int, store=None, augmentation: str = "auto"
    ) -> Path:
        """Train ``preset`` (with the captions of ``store``), evaluate it and record its mIoU under ``row``."""
        from segmenter.engine.evaluate import evaluate
        from segmenter.engine.train import TrainSettings, train

        out = self.runs / f"{name}_seed{seed}"
        text_checkpoint = str(self.text_checkpoint) if store is not None and self.text_checkpoint else None
        settings = TrainSettings(preset=preset, steps=self.args.steps, batch_size=8, checkpoint_every=self.args.steps,
                                 log_every=50, seed=seed, augmentation=augmentation,
                                 text_checkpoint=text_checkpoint)  # fmt: skip
        with self.quiet:
            train(manifest, out, settings, captions=store, resume=(out / "checkpoints" / "latest").is_file())
            # Every model on the captioned tile grid (the text-guided default): rows differ only by what they train on.
            miou = evaluate(out, split="test", overlap=0.0).miou
        self.results.setdefault(row, []).append(miou)
        self.console.print(
            f"{row:<45} seed {seed}: mIoU {100 * miou:.2f}  ({time.perf_counter() - self.started:.0f} s)"
        )
        return out

    def text_free(self, studied: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
        """The text-free rows, one per augmentation a text-guided row is compared under: (augmentation -> the
        augmentation of its text-free row, augmentation of a text-free row -> its row name)."""
        plain_for = {augmentation: "none" if augmentation == "none" else "d4" for augmentation in studied}
        # d4 always: its seed-0 model predicts the test tiles' classes for the `predicted` protocol
        plain_rows = {augmentation: f"{TEXT_FREE} (no captions), augmentation {augmentation}"
                      for augmentation in sorted({"d4", *plain_for.values()})}  # fmt: skip
        for augmentation, row in plain_rows.items():
            for seed in self.args.seeds:
                name = "notext" if augmentation == "d4" else f"notext_{augmentation}"
                self.run(row, TEXT_FREE, name, "demo", seed, augmentation=augmentation)
        return plain_for, plain_rows

    def text_guided(self, protocol: str, augmentations: tuple[str, ...], predictor: Path) -> list[str]:
        """Caption the demo under ``protocol`` (test tiles described by ``predictor``) and train the text-guided
        rows; returns their names."""
        from flows.demo import write_predicted_classes
        from flows.generate_captions import generate_captions
        from manifests.run_manifest import load_manifest

        manifest = protocol_manifest(protocol, self.args.work)
        loaded = load_manifest(manifest)
        with self.quiet:
            write_predicted_classes(self.console, loaded, predictor)
            generate_captions(manifest)
        rows = []
        for augmentation in augmentations:
            rows.append(f"{TEXT_GUIDED}, {protocol}, augmentation {augmentation}")
            for seed in self.args.seeds:
                self.run(rows[-1], TEXT_GUIDED, f"{protocol}_{augmentation}", str(manifest), seed,
                         store=loaded.captions.store, augmentation=augmentation)  # fmt: skip
        return rows


def print_table(bench: Bench, text_rows: dict[str, str]) -> None:
    """mIoU mean +- std per row, and each text-guided row's difference to its text-free row, paired by seed."""
    args, results = bench.args, bench.results
    print(f"\nmIoU (5 classes, eroded GT) on the demo test areas; {len(args.seeds)} seeds, {args.steps} steps each")
    print(f"| model | mIoU mean +- std | difference to {TEXT_FREE} with the same augmentation, paired by seed |")
    print("|---|---|---|")
    for row, values in results.items():
        diff = "-"
        if row in text_rows:
            diff = _spread([a - b for a, b in zip(values, results[text_rows[row]], strict=True)])
        print(f"| {row} | {_spread(values)} | {diff} |")


def prepare_demo(bench: Bench, scene_size: int = DEMO_SCENE_SIZE) -> None:
    """The demo's scenes (of ``scene_size`` px), tiles and models in the work folder; the trained CLIP becomes the
    text tower of the bench's text-guided runs."""
    from flows.demo import build_demo_models
    from manifests.run_manifest import load_manifest
    from segmenter.data.demo_scenes import write_demo_dataset
    from segmenter.data.prepare import prepare_tiles

    base = load_manifest("demo")
    write_demo_dataset(base.dataset.root, size=scene_size)
    prepare_tiles(base.dataset, base.tiling)
    build_demo_models(bench.console, base)
    bench.text_checkpoint = base.captions.clip.checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--augmentation-study", action="store_true", help="also compare d4, d4_rewrite and none")
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "bench" / "caption_effect")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.chdir(args.work)  # the demo manifest's relative paths resolve here

    from segmenter.engine.options import TEXT_GUIDED_AUGMENTATION

    bench = Bench(args)
    prepare_demo(bench)
    default = TEXT_GUIDED_AUGMENTATION
    studied = ("d4", "d4_rewrite", "none") if args.augmentation_study else (default,)
    # Each text-guided row is compared with the text-free model under the same flips and rotations.
    plain_for, plain_rows = bench.text_free(studied)
    predictor = bench.runs / f"notext_seed{args.seeds[0]}"
    text_rows: dict[str, str] = {}
    for protocol, augmentations in (("predicted", studied), ("blind", (default,))):
        for augmentation, row in zip(augmentations, bench.text_guided(protocol, augmentations, predictor), strict=True):
            text_rows[row] = plain_rows[plain_for[augmentation]]
    print_table(bench, text_rows)
    (args.work / "results.json").write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, **bench.results}))
    print(f"\n{time.perf_counter() - bench.started:.0f} s in all")


if __name__ == "__main__":
    main()
