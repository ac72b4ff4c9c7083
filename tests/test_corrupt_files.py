"""Corrupt or truncated files end in one line naming the file (exit code 2 from the CLIs), never a traceback:
a checkpoint's weights, optimizer, state, record of digests and configuration, and a caption store's data pages.
And ``predict`` never overwrites one image's outputs with another's (``a.tif`` and ``a.png``)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from typer.testing import CliRunner

from manifests.caption_store import read_store, selected_captions, write_fragment
from manifests.errors import InputError
from segmenter.cli import app as segmenter_app
from segmenter.engine.options import TrainSettings
from segmenter.engine.predict import image_files
from segmenter.engine.runs import restore_checkpoint
from segmenter.engine.train import _optimizer, train
from segmenter.model import MPerSSegmenter, build_model
from tests.helpers import META, row

runner = CliRunner()
TRAIN = {"preset": "test_tiny_notext", "steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_index) -> tuple[Path, Path]:
    """A manifest over the small demo index and a run folder with one checkpoint (two steps of a text-free model)."""
    folder = tmp_path_factory.mktemp("corrupt")
    manifest = folder / "run.yaml"
    manifest.write_text(
        f"name: t\ndataset: {{name: vaihingen, id: demo, root: {small_index.root.parent / 'raw'}, split: custom, "
        f"custom_splits: {{train: ['1', '3'], test: ['7']}}}}\ntiling: {{size: 64, out: {small_index.root}}}\n"
    )
    train(manifest, folder / "run", TrainSettings(**TRAIN))
    return manifest, folder / "run"


def damaged_copy(run: Path, folder: Path, name: str, damage: str) -> Path:
    """A copy of the run whose newest checkpoint's ``name`` is truncated to half, or has one byte flipped."""
    copy = shutil.copytree(run, folder / "run")
    [checkpoint] = sorted((copy / "checkpoints").glob("step_*"))
    path = checkpoint / name
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return copy


def resume(manifest: Path, run: Path):
    args = ["train", "--manifest", str(manifest), "--out", str(run), "--resume",
            *[f"--{key.replace('_', '-')}={value}" for key, value in TRAIN.items() if key != "log_every"]]  # fmt: skip
    return runner.invoke(segmenter_app, args)


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_a_checkpoint_records_the_digest_of_every_file_resume_reads(trained):
    [checkpoint] = sorted((trained[1] / "checkpoints").glob("step_*"))
    assert set(json.loads((checkpoint / "checksums.json").read_text())) == {
        "model.safetensors",
        "optimizer.pt",
        "state.json",
    }


def test_segmenter_train_resume_from_a_truncated_optimizer_exits_2_with_one_line(trained, tmp_path):
    manifest, run = trained
    copy = damaged_copy(run, tmp_path, "optimizer.pt", "truncated")
    line = one_error_line(resume(manifest, copy))
    assert "optimizer.pt: SHA-256 " in line and "the file is corrupted or was replaced" in line
    assert len((copy / "metrics.csv").read_text().splitlines()) == 3  # header + the two steps: nothing trained again


@pytest.fixture(scope="module")
def model() -> MPerSSegmenter:
    return build_model(TRAIN["preset"])


def restore(model: MPerSSegmenter, checkpoint: Path) -> int:
    """What ``--resume`` does with a checkpoint (weights, optimizer, schedule), without building a model per case."""
    optimizer, scheduler = _optimizer(model, TrainSettings(**TRAIN))
    return restore_checkpoint(checkpoint, model, optimizer, scheduler, torch.device("cpu"))


def test_an_intact_checkpoint_restores(trained, model):
    [checkpoint] = sorted((trained[1] / "checkpoints").glob("step_*"))
    assert restore(model, checkpoint) == 2


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "state.json"])
def test_resume_from_a_damaged_checkpoint_is_one_line(trained, model, tmp_path, name, damage):
    copy = damaged_copy(trained[1], tmp_path, name, damage)
    [checkpoint] = sorted((copy / "checkpoints").glob("step_*"))
    with pytest.raises(InputError, match=re.escape(f"{name}: SHA-256 ")) as raised:
        restore(model, checkpoint)
    assert "the file is corrupted or was replaced" in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [("optimizer.pt", None), ("optimizer.pt", b"not a torch file"), ("state.json", None), ("state.json", b"{}")],
)
def test_resume_from_a_damaged_file_of_an_older_checkpoint_without_its_digest_is_one_line(
    trained, model, tmp_path, name, content
):
    """Checkpoints written before the optimizer and state were recorded: a damaged file still fails in one line."""
    copy = damaged_copy(trained[1], tmp_path, name, "truncated")
    [checkpoint] = sorted((copy / "checkpoints").glob("step_*"))
    if content is not None:
        (checkpoint / name).write_bytes(content)
    digests = json.loads((checkpoint / "checksums.json").read_text())
    (checkpoint / "checksums.json").write_text(json.dumps({"model.safetensors": digests["model.safetensors"]}))
    with pytest.raises(InputError, match=re.escape(f"{name}: cannot resume from it (")) as raised:
        restore(model, checkpoint)
    assert "to resume from the one before" in str(raised.value) and "\n" not in str(raised.value)


def copied_checkpoint(run: Path, folder: Path) -> Path:
    [checkpoint] = sorted((run / "checkpoints").glob("step_*"))
    return shutil.copytree(checkpoint, folder / checkpoint.name)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"model.safetensors": ', "checksums.json: not valid JSON"),
        ('["model.safetensors"]', "checksums.json: expected a JSON object of file name -> SHA-256"),
        ('{"optimizer.pt": "00"}', "model.safetensors: no SHA-256 recorded for it in checksums.json"),
    ],
)
def test_loading_weights_with_a_damaged_record_of_digests_is_one_line(trained, model, tmp_path, content, message):
    checkpoint = copied_checkpoint(trained[1], tmp_path)
    (checkpoint / "checksums.json").write_text(content)
    with pytest.raises(InputError, match=re.escape(message)) as raised:
        model.load_weights(checkpoint)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"name": "test_tiny_notext", "dim": ', "config.json: not valid JSON"),
        ('{"dim": "wide"}', "config.json: not a model configuration of this version (dim:"),
        (None, "config.json: file not found (a checkpoint folder holds config.json"),
    ],
)
def test_loading_a_checkpoint_with_a_damaged_config_is_one_line(trained, tmp_path, content, message):
    checkpoint = copied_checkpoint(trained[1], tmp_path)
    if content is None:
        (checkpoint / "config.json").unlink()
    else:
        (checkpoint / "config.json").write_text(content)
    with pytest.raises(InputError, match=re.escape(message)) as raised:
        MPerSSegmenter.load(checkpoint)
    assert "\n" not in str(raised.value)


# --- caption store Parquet fragments --------------------------------------------------------------------------------


def caption_chunk(store: Path) -> tuple[Path, int, int]:
    """The fragment of a one-fragment store and the byte range of its ``caption`` column chunk (dictionary and data
    pages, with their headers)."""
    [fragment] = list(store.glob("*.parquet"))
    group = pq.ParquetFile(fragment).metadata.row_group(0)
    chunk = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == "caption")
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    return fragment, start, chunk.total_compressed_size


@pytest.fixture
def store(tmp_path) -> Path:
    rows = [row(f"t{i:02d}", caption=f"caption number {i} of a tile " * 4) for i in range(40)]
    write_fragment(tmp_path / "store", rows, META)
    return tmp_path / "store"


@pytest.mark.parametrize("reader", [read_store, selected_captions])
def test_a_corrupt_data_page_is_one_line(store, reader):
    fragment, start, size = caption_chunk(store)
    data = bytearray(fragment.read_bytes())
    middle = start + size // 2
    data[middle : middle + 8] = bytes(byte ^ 0x5A for byte in data[middle : middle + 8])
    fragment.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"caption store {fragment}") as raised:
        reader(store)
    assert "\n" not in str(raised.value)


def test_a_flipped_byte_in_a_page_never_reads_back_as_other_captions(store):
    """Every 16th byte of the caption column chunk flipped in turn: each read is refused in one line or unchanged."""
    expected = read_store(store)["caption"].tolist()
    fragment, start, size = caption_chunk(store)
    original = fragment.read_bytes()
    silently_different = []
    for offset in range(start, start + size, 16):
        data = bytearray(original)
        data[offset] ^= 0xFF
        fragment.write_bytes(bytes(data))
        try:
            if read_store(store)["caption"].tolist() != expected:
                silently_different.append(offset - start)
        except InputError:
            pass
    assert not silently_different, f"flipped bytes at {silently_different} of the chunk changed captions silently"


# --- predict: outputs are named by the image's stem -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "clash"),
    [(["a.tif", "a.png"], ("a.tif", "a.png")), (["x/s1.tif", "y/s1.tif"], ("x/s1.tif", "y/s1.tif")),
     (["S1.TIF", "s1.jpg"], ("S1.TIF", "s1.jpg"))],
)  # fmt: skip
def test_predict_refuses_two_images_with_one_stem_before_anything_is_written(
    trained, tmp_path, monkeypatch, names, clash
):
    monkeypatch.chdir(tmp_path)
    for name in names:
        Path(name).parent.mkdir(exist_ok=True)
        Path(name).write_bytes(b"")
    images = [arg for name in names for arg in ("--images", name)]
    result = runner.invoke(segmenter_app, ["predict", "--run", str(trained[1]), *images, "--out", "out"])
    line = one_error_line(result)
    assert f"--images: {clash[0]} and {clash[1]} have the same stem" in line and "overwrite each other" in line
    assert not Path("out").exists()


def test_predict_reads_a_file_named_twice_once_and_keeps_distinct_stems(tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    for name in ("a.tif", "b.png", "notes.txt"):
        (folder / name).write_bytes(b"")
    files = image_files([folder, folder / "a.tif", tmp_path / "scenes" / ".." / "scenes" / "b.png"])
    assert [path.name for path in files] == ["a.tif", "b.png"]


def test_predict_refuses_an_out_folder_where_a_prediction_would_replace_its_image(trained, tmp_path):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    image = scenes / "e.tif"
    with rasterio.open(image, "w", driver="GTiff", height=64, width=64, count=3, dtype="uint8") as sink:
        sink.write(np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8))
    before = image.read_bytes()
    result = runner.invoke(segmenter_app, ["predict", "--run", str(trained[1]), "--images", str(scenes), "--out",
                                           str(scenes)])  # fmt: skip
    line = one_error_line(result)
    assert f"the prediction of {image} would be written to {image}" in line and "--out" in line
    assert image.read_bytes() == before and sorted(p.name for p in scenes.iterdir()) == ["e.tif"]


def test_predict_on_a_png_writes_its_maps_without_a_georeferencing_warning(trained, tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(segmenter_app, ["predict", "--run", str(trained[1]), "--images", str(image), "--out",
                                               str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "photo.tif").is_file() and (tmp_path / "out" / "photo_color.png").is_file()
    assert not [w for w in caught if issubclass(w.category, NotGeoreferencedWarning)]


def test_predict_refuses_an_image_over_its_pixel_budget_before_reading_it(trained, tmp_path):
    image = tmp_path / "wide.png"
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(image)
    result = runner.invoke(segmenter_app, ["predict", "--run", str(trained[1]), "--images", str(image), "--out",
                                           str(tmp_path / "out"), "--max-pixels", "4096"])  # fmt: skip
    line = one_error_line(result)
    assert f"{image}: 96 x 64 px (6,144 pixels) is over the pixel budget of 4,096" in line and "--max-pixels" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_run_of_an_older_version_says_what_its_checkpoint_lacks(tmp_path):
    from segmenter.engine.options import InferenceSettings
    from segmenter.engine.runs import open_run

    step = tmp_path / "run" / "checkpoints" / "step_000300"
    step.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "optimizer.pt", "state.json"):
        (step / name).write_text("{}")
    (step.parent / "latest").write_text("step_000300")
    with pytest.raises(InputError, match=r"step_000300 lacks checksums\.json \(written by an older version"):
        open_run(tmp_path / "run", InferenceSettings(device="cpu"))
    with pytest.raises(InputError, match=r"has no step_\* folder"):
        open_run(tmp_path / "empty", InferenceSettings(device="cpu"))
