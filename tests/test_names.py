"""The name rule: ids that become path parts are checked where they enter (manifest, tile index, CLI) and again where
a path is built, so nothing is written outside its output folder and a NUL is one line, not a traceback."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app as flows_app
from manifests.errors import InputError
from manifests.names import check_name, safe_join
from manifests.tile_index import read_tile_index
from segmenter.cli import app as segmenter_app
from segmenter.engine.train import TrainSettings, train
from tests.helpers import demo_manifest

runner = CliRunner()


@pytest.mark.parametrize(
    ("value", "parts", "problem"),
    [
        ("../../../../tmp/x", False, "holds '/'"),
        ("..", False, "holds the part '..'"),
        ("vaihingen/../../x", True, "holds the part '..'"),
        ("/etc/passwd", True, "absolute path"),
        ("a\x00b", False, "control or format character '\\x00'"),
        ("line\nbreak", True, "control or format character '\\n'"),
        ("ann$\\frac{$x", False, "backslash"),
        ("", False, "is empty"),
        ("\u202eevil", False, "format character '\\u202e'"),  # a bidi override reorders what a report shows
        ("dem\u2215o", False, "looks like a slash"),
    ],
)
def test_the_rule_refuses_what_could_leave_a_folder_or_break_a_line(value, parts, problem):
    with pytest.raises(InputError, match=r"^--split: ") as caught:
        check_name(value, "--split", parts)
    assert problem in str(caught.value) and "\n" not in str(caught.value) and "\x00" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "parts"), [("area1", False), ("demo/area1/0000_0064", True), ("a..b", False), ("café_北京", False)]
)
def test_ordinary_ids_pass(value, parts):
    assert check_name(value, "id", parts) == value


def test_safe_join_keeps_writes_inside_the_folder_also_through_a_link(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert safe_join(out, "masks/demo/area1/0000_0000.png") == out / "masks/demo/area1/0000_0000.png"
    with pytest.raises(InputError, match=r"holds the part '\.\.'"):
        safe_join(out, "masks/../../x.png")
    os.symlink(tmp_path, out / "link")
    with pytest.raises(InputError, match="resolves outside its output folder"):
        safe_join(out, "link/x.png")


def test_prepare_refuses_a_dataset_id_that_climbs_out(vaihingen_root, tmp_path):
    manifest = tmp_path / "run.yaml"
    manifest.write_text(
        f'name: t\ndataset: {{name: vaihingen, root: {vaihingen_root}, id: "../../../../tmp/x"}}\n'
        f"tiling: {{size: 32, out: {tmp_path / 'tiles'}}}\n"
    )
    result = runner.invoke(segmenter_app, ["prepare", "--manifest", str(manifest)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "dataset.id: '../../../../tmp/x' holds '/'" in lines[0]
    assert not (tmp_path / "tiles").exists()


def test_a_nul_in_the_store_or_an_expert_name_is_one_line(small_index, tmp_path):
    manifest = demo_manifest(tmp_path, small_index)
    text = manifest.read_text()
    for captions, expected in [
        ('{store: "a\\0b", experts: [{name: ann, backend: annotation}]}', "key 'captions.store' holds a NUL"),
        ('{store: s, experts: [{name: "ann$\\\\frac{$x", backend: annotation}]}', "captions.experts.0.name: "),
        ('{store: s, experts: [{name: "a<b>x", backend: annotation}, {name: "../b", backend: annotation}]}',
         "captions.experts.1.name: '../b' holds '/'"),
    ]:  # fmt: skip
        manifest.write_text(f"{text}captions: {captions}\n")
        result = runner.invoke(flows_app, ["run", "generate-captions", "--manifest", str(manifest)])
        assert result.exit_code == 2, result.output
        assert result.output.strip().startswith("error: ") and expected in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def _index_with_tile_id(index, folder, tile_id: str):
    """A copy of ``index`` whose first tile id is ``tile_id``, written as another tool might (no checks)."""
    table = pq.read_table(index.root / "index.parquet")
    ids = table.column("tile_id").to_pylist()
    ids[0] = tile_id
    table = table.set_column(0, pa.field("tile_id", pa.string(), nullable=False), pa.array(ids))
    folder.mkdir(parents=True)
    for crops in index.root.glob("crops-*"):
        (folder / crops.name).symlink_to(crops)
    pq.write_table(table, folder / "index.parquet")
    return folder


def test_a_tile_index_from_elsewhere_is_data_not_a_path(small_index, tmp_path):
    escape = "demo/../../../../escaped/0000_0000"
    bad = _index_with_tile_id(small_index, tmp_path / "bad", escape)
    with pytest.raises(InputError, match=r"column tile_id: '.*' holds the part '\.\.'"):
        read_tile_index(bad)
    run = tmp_path / "notext"
    train(demo_manifest(tmp_path, small_index), run, TrainSettings(preset="test_tiny_notext", steps=1))
    predictions = tmp_path / "pred" / "classes.parquet"
    args = ["predict", "--run", str(run), "--index", str(bad), "--predictions", str(predictions)]
    result = runner.invoke(segmenter_app, args)
    assert result.exit_code == 2 and result.output.strip().startswith("error: tile index"), result.output
    assert not list(tmp_path.rglob("escaped")) and not predictions.exists()
