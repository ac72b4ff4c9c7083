"""Training, resume, DDP, NaN stop, evaluation and prediction on tiny demo tiles (CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from caption_pipeline.experts import build_expert
from caption_pipeline.gate import GateSettings, RunInfo, caption_tiles, tile_tasks
from caption_pipeline.scoring import ClipScorer
from manifests.caption_store import StoreMeta, write_fragment
from manifests.errors import InputError
from manifests.run_manifest import ExpertConfig, PromptConfig
from segmenter import train as train_module
from segmenter.evaluate import evaluate
from segmenter.inference import sliding_window_logits
from segmenter.model import MPerSSegmenter, build_model
from segmenter.predict import predict
from segmenter.train import TrainingError, TrainSettings, train

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = ["annotation", "qwen-tiny", "llava-tiny"]


@pytest.fixture(scope="session")
def run_inputs(tmp_path_factory, small_index, clip_config):
    """A manifest over the small demo index and a caption store written by the annotation expert."""
    folder = tmp_path_factory.mktemp("train")
    store = folder / "captions"
    prompts = PromptConfig(class_source={"train": "labels", "test": "labels"}, allow_labels_on_eval=True)
    rows = caption_tiles(tile_tasks(small_index, small_index.frame, prompts),
                         build_expert(ExpertConfig(name="annotation", backend="annotation")), ClipScorer(clip_config),
                         GateSettings(tau=0.0, max_attempts=1), RunInfo("r"))  # fmt: skip
    write_fragment(store, rows, StoreMeta(small_index.class_names, "tiny", 0.0))
    manifest = folder / "run.yaml"
    manifest.write_text(
        f"name: tiny\ndataset: {{name: vaihingen, id: demo, root: {small_index.root.parent / 'raw'}, split: custom, "
        f"custom_splits: {{train: ['1', '3'], test: ['7']}}}}\ntiling: {{size: 64, out: {small_index.root}}}\n"
    )
    return manifest, store


def settings(**changes) -> TrainSettings:
    base = {"preset": "test_tiny", "steps": 6, "batch_size": 2, "checkpoint_every": 3, "log_every": 1}
    return TrainSettings(**{**base, **changes})


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return MPerSSegmenter.load(checkpoint).state_dict()


def test_loss_goes_down(run_inputs, tmp_path):
    manifest, store = run_inputs
    train(manifest, tmp_path / "run", settings(steps=40, batch_size=4, checkpoint_every=40), captions=store)
    log = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert len(log) == 40 and {"gate_annotation", "images_per_s"} <= set(log.columns)
    assert log["loss"].tail(5).mean() < 0.8 * log["loss"].head(5).mean()
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_resume_after_a_stop_gives_the_uninterrupted_weights(run_inputs, tmp_path, monkeypatch):
    manifest, store = run_inputs
    uninterrupted = train(manifest, tmp_path / "a", settings(), captions=store)
    original = train_module._save_checkpoint

    def stop_after_first(*args, **kwargs):
        folder = original(*args, **kwargs)
        raise KeyboardInterrupt(f"stopped after {folder.name}")

    monkeypatch.setattr(train_module, "_save_checkpoint", stop_after_first)
    with pytest.raises(KeyboardInterrupt, match="step_000003"):
        train(manifest, tmp_path / "b", settings(), captions=store)
    monkeypatch.setattr(train_module, "_save_checkpoint", original)
    with pytest.raises(InputError, match="already holds a run"):
        train(manifest, tmp_path / "b", settings(), captions=store)
    resumed = train(manifest, tmp_path / "b", settings(), captions=store, resume=True)
    assert resumed.name == uninterrupted.name == "step_000006"
    for name, tensor in weights(uninterrupted).items():
        torch.testing.assert_close(weights(resumed)[name], tensor, msg=name)


def test_non_finite_loss_stops_naming_step_and_batch(run_inputs, tmp_path, monkeypatch):
    manifest, store = run_inputs
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(train_module.F, "cross_entropy", poisoned)
    with pytest.raises(
        TrainingError, match=r"step 4: loss is nan on batch \['demo/area.*last good checkpoint: .*step_000003"
    ):
        train(manifest, tmp_path / "run", settings(), captions=store)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_000003"


def test_missing_captions_policy(run_inputs, tmp_path):
    manifest, _ = run_inputs
    empty = tmp_path / "store"
    write_fragment(empty, [], StoreMeta([], "x", 0.5))
    with pytest.raises(InputError, match="give a caption store"):
        train(manifest, tmp_path / "r0", settings())
    partial = tmp_path / "partial"
    from manifests.caption_store import read_store

    frame = read_store(run_inputs[1])
    write_fragment(partial, frame[frame["tile_id"].str.contains("area1/")], StoreMeta(["a"], "x", 0.0))
    with pytest.raises(InputError, match=r"4 of 8 train tiles have no passed caption"):
        train(manifest, tmp_path / "r1", settings(missing_captions="error"), captions=partial)
    assert train(manifest, tmp_path / "r2", settings(steps=1), captions=partial).name == "step_000001"


def test_ddp_with_two_gloo_processes_and_single_process_load(run_inputs, tmp_path):
    manifest, store = run_inputs
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "segmenter.cli", "train", "--manifest", str(manifest), "--out", str(tmp_path / "ddp"),
               "--captions", str(store), "--preset", "test_tiny", "--steps", "2", "--batch-size", "2",
               "--checkpoint-every", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    model = MPerSSegmenter.load(tmp_path / "ddp" / "checkpoints" / "step_000002")
    assert model.config.name == "test_tiny"
    import json

    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["world_size"] == 2


def test_sliding_window_output_has_the_source_size():
    model = build_model("test_tiny_notext").eval()
    logits = sliding_window_logits(model, np.zeros((100, 70, 3), np.uint8), window=64, overlap=0.5)
    assert logits.shape == (6, 100, 70)


def test_evaluate_and_predict_a_trained_run(run_inputs, tmp_path):
    manifest, store = run_inputs
    train(manifest, tmp_path / "run", settings(steps=2, checkpoint_every=2), captions=store)
    metrics = evaluate(tmp_path / "run", split="test", window=64, overlap=0.5)
    assert 0 <= metrics.oa <= 1 and len(metrics.iou) == 6
    report = tmp_path / "run" / "eval_test_eroded"
    assert "| IoU |" in (report / "metrics.md").read_text() and (report / "metrics.json").is_file()
    source = tmp_path / "scene.tif"
    transform = from_origin(500000.0, 5400000.0, 0.09, 0.09)
    pixels = np.random.default_rng(0).integers(0, 255, size=(3, 96, 80), dtype=np.uint8)
    with rasterio.open(source, "w", driver="GTiff", height=96, width=80, count=3, dtype="uint8",
                       crs="EPSG:32632", transform=transform) as sink:  # fmt: skip
        sink.write(pixels)
    [written] = predict(tmp_path / "run", [source], tmp_path / "pred", captions=store, window=64)
    with rasterio.open(written) as result:
        assert result.crs.to_epsg() == 32632 and result.transform == transform
        assert (result.height, result.width, result.count) == (96, 80, 1)
        assert result.read(1).max() < 6
    assert (tmp_path / "pred" / "scene_color.png").is_file()
