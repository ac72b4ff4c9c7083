"""The ``segmenter`` and ``flows`` commands: help everywhere, one-line errors with exit code 2, defaults and choices
from the settings model, preset names never cut."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from flows.cli import app as flows_app
from segmenter.cli import app as segmenter_app
from segmenter.cli import preset_rows, render_presets
from segmenter.engine.options import TrainSettings
from segmenter.model import list_presets

runner = CliRunner()
TRAIN = ["train", "--manifest", "m", "--out", "o"]


@pytest.mark.parametrize(
    ("app", "args", "listed"),
    [
        (segmenter_app, [], ["prepare", "demo-data", "models", "train", "evaluate", "predict"]),
        (segmenter_app, ["prepare"], ["--manifest", "--dataset", "vaihingen", "potsdam", "syndrone", "--size"]),
        (segmenter_app, ["demo-data"], ["--out"]),
        (flows_app, [], ["run"]),
        (flows_app, ["run"], ["generate-captions", "caption-report", "demo"]),
        (flows_app, ["run", "demo"], ["--limit", "--steps"]),
    ],
)
def test_help_lists_every_command_and_choice(app, args, listed):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0
    missing = [word for word in listed if word not in result.output]
    assert not missing, result.output


def test_prepare_from_flags_then_up_to_date(vaihingen_root, tmp_path):
    args = ["prepare", "--dataset", "vaihingen", "--root", str(vaihingen_root), "--out", str(tmp_path / "t"),
            "--size", "32", "--stride", "16"]  # fmt: skip
    first = runner.invoke(segmenter_app, args)
    assert first.exit_code == 0, first.output
    assert "wrote" in first.output and "(128 tiles)" in first.output
    second = runner.invoke(segmenter_app, args)
    assert second.exit_code == 0 and "up to date" in second.output


def test_prepare_from_manifest_warns_about_stray_colours(tmp_path):
    from tests.data.isprs.generate import make_vaihingen

    root = make_vaihingen(tmp_path / "v", stray_in="13")
    manifest = tmp_path / "run.yaml"
    manifest.write_text(
        f"name: t\ndataset: {{name: vaihingen, root: {root}}}\ntiling: {{size: 72, out: {tmp_path / 't'}}}\n"
    )
    result = runner.invoke(segmenter_app, ["prepare", "--manifest", str(manifest)])
    assert result.exit_code == 0, result.output
    assert "warning: area13: 3 label pixels with colours outside the palette" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prepare", "--dataset", "vaihingen", "--root", "/nonexistent", "--out", "x"], "--root: directory"),
        (["prepare"], "give --manifest"),
        (["prepare", "--manifest", "missing.yaml"], "file not found"),
        (["demo-data", "--areas", "0", "--out", "x"], "n_areas must be within"),
        (["predict", "--run", "r", "--index", "t"], "give --index with --predictions"),
        (["predict", "--run", "r", "--images", "a.tif"], "give --images with --out"),
        (["predict", "--run", "r", "--index", "t", "--predictions", "p.parquet", "--out", "o"], "give --index with"),
        (["evaluate", "--run", "r", "--device", "gpu"], "--device: 'gpu' is not a device"),
        (["predict", "--run", "r", "--images", "a.tif", "--out", "o", "--device", "cuda:x"], "--device: 'cuda:x'"),
        ([*TRAIN, "--preset", "nope"], "--preset: unknown preset 'nope'"),
        ([*TRAIN, "--batch-size", "0"], "--batch-size: input should be greater than or equal to 1 (got 0)"),
        ([*TRAIN, "--steps", "-5"], "--steps: input should be greater than or equal to 1 (got -5)"),
        ([*TRAIN, "--lr", "nan"], "--lr: input should be a finite number (got nan)"),
        ([*TRAIN, "--lr", "0"], "--lr: input should be greater than 0 (got 0.0)"),
        (["prepare", "--dataset", "vaihingen", "--root", ".", "--out", "x", "--size", "0"], "--size: input should be"),
        (["evaluate", "--run", "r", "--window", "-5"], "--window: expected a window of 16 px or more, got -5"),
        (["evaluate", "--run", "r", "--overlap", "nan"], "--overlap: expected a value in [0, 1), got nan"),
        (["predict", "--run", "r", "--images", "a.tif", "--out", "o", "--window", "0"], "--window: expected a window"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(segmenter_app, args)
    assert result.exit_code == 2
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert not (tmp_path / "x" / "index.parquet").exists()


@pytest.mark.parametrize(
    ("args", "option", "choices"),
    [
        ([*TRAIN, "--augmentation", "flip"], "--augmentation", "auto|d4|d4_rewrite|none"),
        ([*TRAIN, "--missing-captions", "drop"], "--missing-captions", "mask|error"),
        (["evaluate", "--run", "r", "--missing-captions", "drop"], "--missing-captions", "mask|error"),
        (["evaluate", "--run", "r", "--gt", "coarse"], "--gt", "eroded|full"),
        (["prepare", "--dataset", "isaid", "--root", ".", "--out", "x"], "--dataset", "vaihingen|potsdam|syndrone"),
    ],
)  # fmt: skip
def test_a_bad_choice_is_refused_by_typer_and_help_lists_the_choices(tmp_path, monkeypatch, args, option, choices):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(segmenter_app, args)
    assert result.exit_code == 2 and "Invalid value" in result.output and option in result.output
    assert not list(tmp_path.iterdir())  # nothing ran
    shown = runner.invoke(segmenter_app, [args[0], "--help"], env={"COLUMNS": "200"}).output
    assert choices in shown


def test_train_defaults_are_the_settings_defaults(tmp_path, monkeypatch):
    """`segmenter train` with no optional flag trains exactly TrainSettings() (defaults in one place)."""
    import segmenter.engine.train

    calls = []
    monkeypatch.setattr(
        segmenter.engine.train, "train", lambda *args, **kwargs: calls.append((args, kwargs)) or Path("c")
    )
    result = runner.invoke(segmenter_app, ["train", "--manifest", "m", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    [(args, kwargs)] = calls
    assert args[2] == TrainSettings() and kwargs["resume"] is False and kwargs["captions"] is None
    shown = runner.invoke(segmenter_app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for field in ("steps", "batch_size", "lr", "checkpoint_every", "seed", "preset"):
        assert f"[default: {TrainSettings.model_fields[field].default}]" in shown, field
    changed = ["--steps", "7", "--augmentation", "d4_rewrite", "--missing-captions", "error", "--experts", "b,a"]
    assert runner.invoke(segmenter_app, [*TRAIN, *changed]).exit_code == 0
    assert calls[1][0][2] == TrainSettings(steps=7, augmentation="d4_rewrite", missing_captions="error",
                                           experts=["b", "a"])  # fmt: skip


def test_models_prints_every_preset_name_whole_in_a_pipe_and_as_json():
    names = list_presets()
    plain = runner.invoke(segmenter_app, ["models"])  # CliRunner's stdout is not a terminal
    assert plain.exit_code == 0
    lines = plain.output.splitlines()
    assert lines[0].split("\t")[0] == "preset" and [line.split("\t")[0] for line in lines[1:]] == names
    as_json = runner.invoke(segmenter_app, ["models", "--json"])
    rows = json.loads(as_json.output)
    assert [row["preset"] for row in rows] == names
    assert rows[names.index("test_tiny")]["text"] == "test-tiny-clip" and set(rows[0]) >= {"backbone", "note"}
    blip2 = rows[names.index("mpers_vitl16_text_blip2_flant5")]
    assert (blip2["paper_row"], blip2["paper_miou"]) == ("Table 1 (text encoder): BLIP-2 (FLAN-T5)", 76.42)
    assert rows[names.index("test_tiny")]["paper_miou"] is None and blip2["lqga_stages"] == [4]
    assert rows[names.index("mpers_vitl16_dmte_s34")]["lqga_stages"] == [3, 4]


@pytest.mark.parametrize("width", [60, 80, 120, 200])
def test_models_in_a_terminal_never_cuts_a_preset_name(width):
    out = io.StringIO()
    render_presets(preset_rows(), Console(file=out, width=width, force_terminal=True, color_system=None))
    text = out.getvalue()
    for name in list_presets():
        assert any(name == cell.strip() for line in text.splitlines() for cell in line.split("\u2502")), name
    assert "\u2026" not in text  # no ellipsis anywhere


def test_one_device_rule(monkeypatch):
    """`auto` is the GPU when there is one (this rank's under torchrun), else the CPU; a bad request is one line."""
    import torch

    from manifests.devices import resolve_device
    from manifests.errors import InputError

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
    with pytest.raises(InputError, match=r"--device: 'cuda' asked for, but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(InputError, match=r"captions.clip.device: 'tpu0' is not a device \(expected auto"):
        resolve_device("tpu0", source="captions.clip.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda", 0) and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InputError, match=r"'cuda:2' asked for, but this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
