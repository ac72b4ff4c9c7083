"""The embedded demo: synthetic scenes -> tiles -> tiny local models -> captions -> report."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from caption_pipeline.clip_training import train_clip
from caption_pipeline.scoring import clip_weights
from caption_pipeline.tiny_models import build_tiny_llava, build_tiny_qwen2_vl
from flows.calibrate import TileSample, calibrate_gate
from flows.console import print_summary, with_progress
from flows.gate_store import check_scorer
from flows.generate_captions import CaptionRunSettings, generate_captions
from flows.prefect_api import PrefectApi, process_api
from flows.report import caption_report_flow
from manifests.errors import InputError
from manifests.run_manifest import RunManifest, load_manifest
from segmenter.data.demo_scenes import write_demo_dataset
from segmenter.data.prepare import prepare_tiles
from segmenter.engine.run_record import RunRecord


def build_demo_models(console: Console, manifest) -> None:
    """The models the demo manifest points at, made once: its CLIP trained on the train tiles (so the gate can
    judge and the text-guided model reads features that mean something) and the random-weight expert stand-ins."""
    clip = manifest.captions.clip
    if clip.checkpoint is not None and not clip.checkpoint.is_file():
        trained = train_clip(manifest.tiling.out, clip.config, clip.model)
        console.print(f"      CLIP {clip.model} trained on {trained.tiles} train tiles in {trained.seconds:.0f} s "
                      f"({trained.cpu_seconds:.0f} s of CPU; final contrastive loss {trained.final_loss:.2f}) -> "
                      f"{trained.checkpoint}")  # fmt: skip
    builders = {"qwen2-vl-tiny": build_tiny_qwen2_vl, "llava-tiny": build_tiny_llava}
    for expert in manifest.captions.experts:
        folder = Path(expert.model or "")
        if folder.name in builders and not (folder / "config.json").is_file():
            builders[folder.name](folder)


DEMO_STEPS = 300
DEMO_AUC_SAMPLE = 256  # every test tile of the demo (64)
DEMO_SCENES, DEMO_SCENE_SIZE = 16, 1024  # the 16 Vaihingen areas of the ``mpers`` split, 1024 px each
TEXT_FREE, TEXT_GUIDED = "test_tiny_notext", "test_tiny"


def train_preset(
    console: Console,
    manifest: str | Path,
    preset: str,
    out: Path,
    steps: int,
    store: Path | None = None,
) -> Path:
    """Train a tiny preset (resuming a run cut short); a text-guided one reads the captions of ``store`` through the
    text tower of the manifest's CLIP checkpoint (the demo's trained CLIP), the same network that gated them."""
    from segmenter.engine.train import TrainSettings, train

    clip = load_manifest(manifest).captions.clip.checkpoint if store is not None else None
    settings = TrainSettings(preset=preset, steps=steps, batch_size=8, checkpoint_every=100, log_every=10,
                             text_checkpoint=str(clip) if clip else None)  # fmt: skip
    resume = (out / "checkpoints" / "latest").is_file()
    console.print(f"      training {preset} for {steps} steps -> {out}")
    return train(manifest, out, settings, captions=store, resume=resume, progress=True)


def write_predicted_classes(console: Console, manifest, run: Path) -> Path | None:
    """The predicted tile classes of every split whose prompts read ``predictions`` (protocol ``predicted``),
    made by the text-free model: what a user without labels for those tiles can deploy."""
    from manifests.tile_index import read_tile_index
    from segmenter.engine.predict import predict_index

    prompts = manifest.captions.prompts
    splits = sorted(
        split for split in read_tile_index(manifest.tiling.out).frame["split"].unique()
        if prompts.source_for(split) == "predictions"
    )  # fmt: skip
    if not splits:
        return None
    path = predict_index(run, manifest.tiling.out, prompts.predictions, splits)
    console.print(f"      predicted tile classes of split(s) {', '.join(splits)} -> {path}")
    return path


def caption_stage(
    console: Console, manifest_path: str | Path, manifest: RunManifest, api: PrefectApi, limit: int | None
) -> None:
    """Stages 5 and 6 of the demo: caption the tiles of ``manifest`` (read from ``manifest_path``) once Prefect's API
    is up, then write the caption report."""
    store = manifest.captions.store
    console.print(f"[5/7] captions (protocol {manifest.captions.prompts.protocol}) -> {store}")
    api.wait()
    run = CaptionRunSettings(manifest_path, limit=limit)
    print_summary(with_progress(lambda on_shard: generate_captions(run, on_shard=on_shard)), console)
    print_gate_auc(console, manifest_path)
    report_dir = store.parent / "report"
    console.print(f"[6/7] caption report -> {report_dir}")
    path = caption_report_flow(str(store), str(report_dir), str(manifest.tiling.out))
    console.print(f"report: {path}")


def print_gate_auc(console: Console, manifest_path: str | Path, split: str = "test") -> None:
    """The gate's own-vs-shuffled ROC AUC per expert on the tiles of ``split`` (``flows run calibrate-gate``), which
    the CLIP never saw in training; the calibration is written beside the store, where the report reads it."""
    calibration = calibrate_gate(manifest_path, TileSample(DEMO_AUC_SAMPLE, split=split))
    aucs = ", ".join(f"{expert} {group.auc:.3f}" for expert, group in calibration.experts.items())
    console.print(f"      gate ROC AUC, own vs shuffled captions of {calibration.sample_size} {split} tiles: {aucs} "
                  f"(`flows run calibrate-gate --split {split}`; the CLIP never saw these tiles)")  # fmt: skip


def run_demo(
    console: Console,
    limit: int | None = None,
    steps: int = DEMO_STEPS,
    manifest_path: str | Path = "demo",
    scenes: int = DEMO_SCENES,
    scene_size: int = DEMO_SCENE_SIZE,
) -> None:
    """Run every stage on the embedded default (its paths are relative to the working directory), under the
    ``predicted`` protocol: labels describe the train tiles, a text-free model's predictions describe the test tiles.
    The defaults are ``make demo``'s; the tests run the same stages at a small scale.

    Args:
        console: where the stages are announced (the metrics tables go to stdout).
        limit: caption only the first ``limit`` tiles (by tile id).
        steps: training steps of each of the two segmenters.
        manifest_path: the run manifest (packaged name or path); its dataset root, tile folder, models and caption
            store say where everything is written. Its split must name areas among the first ``scenes`` demo areas.
        scenes: how many synthetic areas to write (the ``mpers`` split's train areas first, then its test areas).
        scene_size: the side of each scene in pixels.
    """
    from segmenter.engine.evaluate import evaluate

    started = time.perf_counter()
    manifest = load_manifest(manifest_path)
    store = manifest.captions.store
    runs = store.parent / "runs"
    try:  # a re-run resumes what an earlier demo left: refuse, before any stage runs, what an older version left
        check_scorer(store, clip_weights(manifest.captions.clip).model_id)
        for record in runs.glob("*/run.json"):
            RunRecord.read(record.parent)
    except InputError as exc:
        raise InputError(f"{exc}. It was made by an older version: remove {store.parent} and run again") from None
    # Prefect's server is needed from stage 5 on: it starts in the background while stages 1-4 run.
    api = process_api(lambda line: console.print(f"      {line}", markup=False, highlight=False))
    console.print(f"[1/7] demo scenes -> {manifest.dataset.root}")
    write_demo_dataset(manifest.dataset.root, n_areas=scenes, size=scene_size)
    console.print(f"[2/7] tiles -> {manifest.tiling.out}")
    result = prepare_tiles(manifest.dataset, manifest.tiling)
    console.print(f"      {result.n_tiles} tiles{' (up to date)' if result.up_to_date else ''}")
    console.print("[3/7] a tiny CLIP trained on the train tiles' label captions; random-weight stand-ins for "
                  "Qwen2-VL and LLaVA (no download)")  # fmt: skip
    build_demo_models(console, manifest)
    console.print(f"[4/7] text-free segmenter {TEXT_FREE}, whose predictions describe the test tiles -> {runs}")
    train_preset(console, manifest_path, TEXT_FREE, runs / TEXT_FREE, steps)
    write_predicted_classes(console, manifest, runs / TEXT_FREE)
    caption_stage(console, manifest_path, manifest, api, limit)
    console.print(f"[7/7] text-guided segmenter {TEXT_GUIDED}; both evaluated on the test areas -> {runs}")
    train_preset(console, manifest_path, TEXT_GUIDED, runs / TEXT_GUIDED, steps, store)
    # Both on the captioned tile grid (the text-guided default), so the two reports differ only by the captions.
    for preset in (TEXT_GUIDED, TEXT_FREE):
        metrics = evaluate(runs / preset, split="test", overlap=0.0)
        print(metrics.markdown(f"{preset} on the demo test areas (eroded GT, windows on the tile grid)") + "\n")
    console.print(
        f"demo done in {time.perf_counter() - started:.0f} s. One seed per model, so the two rows are not a claim "
        "about captions: `make bench` (bench/caption_effect.py) gives the effect as mean +- std over 3 seeds."
    )
