"""``make demo`` at a small scale: the same ``run_demo`` on three small scenes, one training step per model."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from rich.console import Console

from flows.demo import TEXT_FREE, TEXT_GUIDED, run_demo
from manifests.caption_store import read_store
from manifests.run_manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]


def scaled_manifest(folder: Path) -> Path:
    """The demo manifest with every path under ``folder``, three areas in a custom split (the ``mpers`` one needs
    all 16) cut into 64 px tiles, and short captions."""
    text = (ROOT / "manifests" / "demo.yaml").read_text().replace("data/demo/", f"{folder}/")
    text = text.replace("split: mpers", 'split: custom\n  custom_splits: {train: ["1", "3"], test: ["7"]}')
    text = text.replace("size: 256\n  stride: 256", "size: 64\n  stride: 64").replace(
        "max_new_tokens: 24", "max_new_tokens: 4"
    )
    path = folder / "demo.yaml"
    path.write_text(text)
    return path


def test_the_demo_runs_every_stage_at_a_small_scale(prefect_api, tmp_path, capsys):
    manifest_path = scaled_manifest(tmp_path)
    manifest = load_manifest(manifest_path)
    assert manifest.dataset.root == tmp_path / "raw" and manifest.captions.store == tmp_path / "captions"
    assert (manifest.dataset.split, manifest.tiling.size) == ("custom", 64)  # the scaled copy took
    out = io.StringIO()
    run_demo(Console(file=out, width=200), steps=1, manifest_path=manifest_path, scenes=3, scene_size=128)
    shown, printed = out.getvalue(), capsys.readouterr().out
    for stage in range(1, 8):
        assert f"[{stage}/7]" in shown
    assert "12 tiles" in shown and "demo done in" in shown
    train_tiles = 8  # areas 1 and 3, 4 tiles each
    assert f"CLIP demo-tiny-clip trained on {train_tiles} train tiles" in " ".join(shown.split())
    assert manifest.captions.clip.checkpoint.is_file()
    # the AUC of every expert on the 4 test tiles, from calibrate-gate, whose files the report then reads
    assert all(f"{expert} " in shown for expert in ("annotation", "qwen-tiny", "llava-tiny"))
    assert "gate ROC AUC, own vs shuffled captions of 4 test tiles" in " ".join(shown.split())
    calibration = json.loads((manifest.captions.store / "calibration" / "calibration.json").read_text())
    assert calibration["sample_size"] == 4 and set(calibration["experts"]) == {"annotation", "qwen-tiny", "llava-tiny"}
    assert "class information in prompts: protocol predicted (test: predictions, train: labels)" in shown
    store = read_store(manifest.captions.store)
    assert set(store["expert"]) == {"annotation", "qwen-tiny", "llava-tiny"}
    assert (tmp_path / "predictions" / "class_predictions.parquet").is_file()
    assert (tmp_path / "report" / "report.html").is_file()
    guided = json.loads((tmp_path / "runs" / TEXT_GUIDED / "run.json").read_text())
    assert str(manifest.captions.clip.checkpoint) in json.dumps(guided)  # it reads captions through the trained CLIP
    for preset in (TEXT_GUIDED, TEXT_FREE):
        metrics = json.loads((tmp_path / "runs" / preset / "eval_test_eroded" / "metrics.json").read_text())
        assert math.isfinite(metrics["miou"]), preset
        assert f"### {preset} on the demo test areas" in printed
