"""The ``segmenter`` and ``flows`` commands: help everywhere, one-line errors with exit code 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app as flows_app
from segmenter.cli import app as segmenter_app

runner = CliRunner()


@pytest.mark.parametrize(
    ("app", "args"),
    [(segmenter_app, []), (segmenter_app, ["prepare"]), (segmenter_app, ["demo-data"]), (flows_app, []),
     (flows_app, ["run"]), (flows_app, ["run", "demo"])],
)  # fmt: skip
def test_help_on_every_command(app, args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


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
        (["prepare", "--dataset", "vaihingen", "--root", "/nonexistent", "--out", "x"], "dataset.root: directory"),
        (["prepare", "--dataset", "isaid", "--root", ".", "--out", "x"], "--dataset isaid"),
        (["prepare"], "give --manifest"),
        (["prepare", "--manifest", "missing.yaml"], "file not found"),
        (["demo-data", "--areas", "0", "--out", "x"], "n_areas must be within"),
        (["predict", "--run", "r", "--index", "t"], "give --index with --predictions"),
        (["predict", "--run", "r", "--images", "a.tif"], "give --images with --out"),
        (["predict", "--run", "r", "--index", "t", "--predictions", "p.parquet", "--out", "o"], "give --index with"),
        (["evaluate", "--run", "r", "--missing-captions", "drop"], "--missing-captions: expected error or mask"),
        (["train", "--manifest", "m", "--out", "o", "--augmentation", "flip"], "--augmentation: expected auto"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(segmenter_app, args)
    assert result.exit_code == 2
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert not (tmp_path / "x" / "index.parquet").exists()
