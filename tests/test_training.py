"""Training, resume, DDP, NaN stop, evaluation and prediction on tiny demo tiles (CPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.transform import from_origin

from manifests.caption_store import StoreMeta, read_store, write_fragment
from manifests.class_predictions import read_class_predictions
from manifests.errors import InputError
from segmenter.engine import train as train_module
from segmenter.engine.evaluate import evaluate
from segmenter.engine.inference import SlidingWindows, sliding_window_logits
from segmenter.engine.options import TEXT_GUIDED_AUGMENTATION
from segmenter.engine.predict import predict, predict_index
from segmenter.engine.run_record import RunRecord
from segmenter.engine.runs import RunPaths
from segmenter.engine.train import TrainingError, TrainSettings, train
from segmenter.model import MPerSSegmenter, build_model
from tests.helpers import annotation_store, assert_same_classes, demo_manifest

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = ["annotation", "qwen-tiny", "llava-tiny"]


@pytest.fixture(scope="session")
def run_inputs(tmp_path_factory, small_index, clip_config):
    """A manifest over the small demo index and a caption store written by the annotation expert."""
    folder = tmp_path_factory.mktemp("train")
    store = annotation_store(folder, small_index, clip_config)
    return demo_manifest(folder, small_index), store


def settings(**changes) -> TrainSettings:
    base = {"preset": "test_tiny", "steps": 6, "batch_size": 2, "checkpoint_every": 3, "log_every": 1}
    return TrainSettings(**{**base, **changes})


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return MPerSSegmenter.load(checkpoint).state_dict()


def renamed_store(store: Path, out: Path, names: dict[str, str]) -> Path:
    """A copy of ``store`` whose experts are renamed (``names``: old -> new; an expert mapped to None is dropped)."""
    frame = read_store(store)
    copies = []
    for old, new in names.items():
        if new is not None:
            copies.append(frame[frame["expert"] == old].assign(expert=new))
    write_fragment(out, pd.concat(copies, ignore_index=True), StoreMeta(["a"], "tiny", 0.0))
    return out


def test_loss_goes_down(run_inputs, tmp_path):
    manifest, store = run_inputs
    train(manifest, tmp_path / "run", settings(steps=40, batch_size=4, checkpoint_every=40), captions=store)
    log = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert len(log) == 40 and {"gate_annotation", "images_per_s"} <= set(log.columns)
    assert [column for column in log.columns if column.startswith("gate_")] == ["gate_annotation"]
    assert log["loss"].tail(5).mean() < 0.8 * log["loss"].head(5).mean()
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_resume_after_a_stop_gives_the_uninterrupted_weights(run_inputs, tmp_path, monkeypatch, capsys):
    manifest, store = run_inputs
    uninterrupted = train(manifest, tmp_path / "a", settings(), captions=store)
    original = train_module.save_checkpoint

    def stop_after_first(*args, **kwargs):
        folder = original(*args, **kwargs)
        raise KeyboardInterrupt(f"stopped after {folder.name}")

    monkeypatch.setattr(train_module, "save_checkpoint", stop_after_first)
    with pytest.raises(KeyboardInterrupt, match="step_000003"):
        train(manifest, tmp_path / "b", settings(), captions=store)
    monkeypatch.setattr(train_module, "save_checkpoint", original)
    with pytest.raises(InputError, match="already holds a run"):
        train(manifest, tmp_path / "b", settings(), captions=store)
    record = RunRecord.read(tmp_path / "b")
    assert record.settings == settings() and record.experts == ["annotation"] and record.world_size == 1
    assert record.captions == str(store.resolve()) and len(record.captions_sha256 or "") == 64
    assert record.class_sources == {"train": {"annotation": ["labels"]}} and record.augmentation == "none"
    # --resume reads the typed record and keeps the experts it names.
    read, original_read = [], RunRecord.read
    monkeypatch.setattr(
        RunRecord, "read", classmethod(lambda cls, folder: read.append(folder) or original_read(folder))
    )
    capsys.readouterr()
    resumed = train(manifest, tmp_path / "b", settings(), captions=store, resume=True)
    printed = capsys.readouterr().out
    assert read == [tmp_path / "b"] and "experts (from the run record): ['annotation']" in printed
    assert "resuming at step 3 of 6 from " in printed
    monkeypatch.setattr(RunRecord, "read", original_read)
    assert resumed.name == uninterrupted.name == "step_000006"
    expected, got = weights(uninterrupted), weights(resumed)  # each read loads a model: once, not per tensor
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, msg=name)
    assert RunRecord.read(tmp_path / "b") == record  # rewritten on resume, the same facts


def test_resume_evaluate_and_predict_refuse_an_unversioned_run_record(run_inputs, tmp_path):
    """A run.json written before records were versioned is refused with one line, not read by guesswork."""
    manifest, store = run_inputs
    train(manifest, tmp_path / "run", settings(steps=1, checkpoint_every=1), captions=store)
    path = tmp_path / "run" / "run.json"
    old = json.loads(path.read_text())
    del old["schema_version"], old["captions_sha256"], old["class_sources"]
    path.write_text(json.dumps(old))
    where = re.escape(str(path))
    message = rf"run record {where}: an unversioned record, this toolkit reads schema_version 1; .* train it again"
    with pytest.raises(InputError, match=message):
        train(manifest, tmp_path / "run", settings(steps=2, checkpoint_every=1), captions=store, resume=True)
    with pytest.raises(InputError, match=message):
        evaluate(tmp_path / "run", split="test")
    with pytest.raises(InputError, match=message):
        predict(tmp_path / "run", [tmp_path], tmp_path / "pred", captions=store)
    old["schema_version"] = 1  # the right version, but the fields of the old layout: the missing one is named
    path.write_text(json.dumps(old))
    with pytest.raises(InputError, match=rf"run record {where}: key 'captions_sha256': field required"):
        evaluate(tmp_path / "run", split="test")


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
    assert RunRecord.read(tmp_path / "ddp").world_size == 2


def test_sliding_window_output_has_the_source_size():
    model = build_model("test_tiny_notext").eval()
    logits = sliding_window_logits(model, np.zeros((100, 70, 3), np.uint8), SlidingWindows(64, 0.5))
    assert logits.shape == (6, 100, 70)


def test_evaluate_and_predict_a_trained_run(run_inputs, tmp_path):
    manifest, store = run_inputs
    train(manifest, tmp_path / "run", settings(steps=2, checkpoint_every=2), captions=store)
    metrics = evaluate(tmp_path / "run", split="test", window=64, overlap=0.5)
    assert len(metrics.iou) == 6 and metrics.main_classes == list(small_index_main(manifest))
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
        # the file names its values: a GIS user reads class names and colours without the run folder
        names = json.loads(result.tags()["class_names"])
        assert names == metrics.class_names and result.tags(1)["class_5"] == names[5]
        colour_png = np.asarray(Image.open(tmp_path / "pred" / "scene_color.png").convert("RGB"))
        colours = result.colormap(1)
        values = result.read(1)
        np.testing.assert_array_equal(np.array([colours[v][:3] for v in values.ravel()]).reshape(96, 80, 3), colour_png)


def test_the_run_reads_the_experts_its_store_has(run_inputs, tmp_path, capsys):
    """Experts named unlike any preset are read, logged and saved; evaluation checks the store against them."""
    manifest, store = run_inputs
    two = renamed_store(store, tmp_path / "two", {"annotation": "alpha", "p": None})
    frame = read_store(two)
    write_fragment(two, frame.assign(expert="beta"), StoreMeta(["a"], "tiny", 0.0))
    checkpoint = train(manifest, tmp_path / "run", settings(steps=2, checkpoint_every=2), captions=two)
    assert MPerSSegmenter.load(checkpoint).config.experts == ["alpha", "beta"]
    record = RunRecord.read(tmp_path / "run")
    assert record.experts == ["alpha", "beta"] and record.masked_experts["train"] == {"alpha": 0, "beta": 0}
    log = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert [column for column in log.columns if column.startswith("gate_")] == ["gate_alpha", "gate_beta"]
    printed = capsys.readouterr().out
    assert "experts (from the caption store): ['alpha', 'beta']" in printed
    assert printed.count("text-feature cache: ") == 1  # resolved once per command, passed down
    # The gates are real: a tile with one expert masked gets a zero gate for it.
    model = MPerSSegmenter.load(checkpoint).eval()
    present = torch.tensor([[True, False]])
    output = model(torch.rand(1, 3, 64, 64), torch.randn(1, 2, model.config.text_dim), present)
    assert output.gates[0, 1] == 0 and output.gates[0, 0] > 0

    only_alpha = renamed_store(store, tmp_path / "alpha", {"annotation": "alpha"})
    with pytest.raises(InputError, match=r"lacks the run's expert\(s\) \['beta'\]"):
        evaluate(tmp_path / "run", split="test", captions=only_alpha)
    other = renamed_store(store, tmp_path / "other", {"annotation": "gamma"})
    with pytest.raises(InputError, match=r"lacks the run's expert\(s\) \['alpha', 'beta'\] and has expert\(s\) "
                                         r"\['gamma'\] the run was not trained with"):  # fmt: skip
        evaluate(tmp_path / "run", split="test", captions=other)
    metrics = evaluate(tmp_path / "run", split="test", captions=only_alpha, missing_captions="mask")
    test_tiles = 4
    assert metrics.captions is not None and metrics.captions.masked_experts == {"alpha": 0, "beta": test_tiles}
    assert "expert beta: not in caption store" in capsys.readouterr().out
    assert (tmp_path / "run" / "eval_test_eroded_alpha" / "metrics.json").is_file()  # the run's own report stays
    assert not (tmp_path / "run" / "eval_test_eroded").exists()
    rejected = tmp_path / "rejected"  # beta is in the store, but none of its captions passed the gate
    write_fragment(rejected, read_store(two).pipe(lambda f: f.assign(passed=f["expert"] == "alpha")),
                   StoreMeta(["a"], "tiny", 0.0))  # fmt: skip
    with pytest.raises(InputError, match=r"no usable caption .* of expert\(s\) \['beta'\] on any of the 4 tiles"):
        evaluate(tmp_path / "run", split="test", captions=rejected)
    with pytest.raises(InputError, match=r"--experts: caption store .* has no captions of \['delta'\]"):
        train(manifest, tmp_path / "r2", settings(steps=1, experts=["alpha", "delta"]), captions=two)
    checkpoint = train(manifest, tmp_path / "r3", settings(steps=1, experts=["beta"]), captions=two)
    assert MPerSSegmenter.load(checkpoint).config.experts == ["beta"]


def test_text_guided_evaluation_reads_each_window_its_own_tile_caption(run_inputs, tmp_path):
    manifest, store = run_inputs
    train(manifest, tmp_path / "run", settings(steps=1, checkpoint_every=1), captions=store)
    metrics = evaluate(tmp_path / "run", split="test")
    windows = pd.read_csv(tmp_path / "run" / "eval_test_eroded" / "windows.csv")
    expected = {f"demo/area7/{y:04d}_{x:04d}" for y in (0, 64) for x in (0, 64)}
    assert set(windows["caption_tile_id"]) == expected and windows["on_captioned_grid"].all() and len(windows) == 4
    assert metrics.captions is not None and metrics.captions.windows_on_grid == 4
    assert metrics.captions.class_sources == {"annotation": ["labels"]}
    assert json.loads((tmp_path / "run" / "eval_test_eroded" / "metrics.json").read_text())["captions"]["windows"] == 4
    assert "4 of 4 windows are captioned tiles" in (tmp_path / "run" / "eval_test_eroded" / "metrics.md").read_text()
    overlapped = evaluate(tmp_path / "run", split="test", overlap=0.5)
    windows = pd.read_csv(tmp_path / "run" / "eval_test_eroded" / "windows.csv")
    assert overlapped.captions is not None
    assert len(windows) == 9 and windows["on_captioned_grid"].sum() == 4 == overlapped.captions.windows_on_grid
    centre = windows[(windows["y"] == 32) & (windows["x"] == 32)].iloc[0]
    assert centre["caption_tile_id"] in expected and not centre["on_captioned_grid"]


def test_predicted_tile_classes_of_an_index(run_inputs, small_index, tmp_path):
    manifest, store = run_inputs
    train(manifest, tmp_path / "plain", settings(preset="test_tiny_notext", steps=2, checkpoint_every=2))
    path = predict_index(tmp_path / "plain", small_index.root, tmp_path / "pred" / "classes.parquet", ["test"])
    predictions = read_class_predictions(path, small_index.class_names)
    assert sorted(predictions.frame["tile_id"]) == sorted(small_index.split("test")["tile_id"])
    model = MPerSSegmenter.load(RunPaths(tmp_path / "plain").latest).eval()
    tiles = small_index.frame.set_index("tile_id")
    for tile_id in predictions.frame["tile_id"]:
        mask = np.asarray(Image.open(predictions.mask_path(tile_id)))
        crop = np.array(Image.open(small_index.path(tiles.at[tile_id, "image_path"])))
        with torch.no_grad():
            logits = model(torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255).logits
        assert_same_classes(mask, logits[0])  # the mask is the model's prediction
        expected = np.bincount(mask.ravel(), minlength=6)[:6] / mask.size  # fractions recomputed from the mask
        np.testing.assert_allclose(predictions.fractions(tile_id), expected, atol=1e-6)
        assert predictions.frame.at[tile_id, "model"] == "test_tiny_notext"
    train(manifest, tmp_path / "guided", settings(steps=1, checkpoint_every=1), captions=store)
    with pytest.raises(InputError, match="is text-guided"):
        predict_index(tmp_path / "guided", small_index.root, tmp_path / "p2.parquet")


def test_evaluate_and_predict_apply_one_missing_expert_rule(run_inputs, small_index, clip_config, tmp_path, capsys):
    """The annotation expert has no caption on the test tiles (class source `none` there), another expert has: both
    `evaluate` and `predict --captions` refuse naming it, before anything is written, or mask it when told and say
    on how many windows."""
    from typer.testing import CliRunner

    from segmenter.cli import app

    store = annotation_store(tmp_path, small_index, clip_config, class_source={"test": "none"})
    assert set(read_store(store)["split"]) == {"train"}  # the annotation expert did not run on the test tiles
    second = read_store(run_inputs[1]).assign(expert="second")  # captions of every tile, under another name
    write_fragment(store, second, StoreMeta(small_index.class_names, "tiny", 0.0))
    train(demo_manifest(tmp_path, small_index), tmp_path / "run", settings(steps=1, checkpoint_every=1), captions=store)
    photo = small_index.root.parent / "raw" / "ISPRS_semantic_labeling_Vaihingen" / "top" / "top_mosaic_09cm_area7.tif"
    refused = r"no usable caption .* of expert\(s\) \['annotation'\] on any of the 4 tiles that the 4 windows of "
    with pytest.raises(InputError, match=refused + "split 'test' read; caption them or pass --missing-captions mask"):
        evaluate(tmp_path / "run", split="test")
    with pytest.raises(InputError, match=refused + "image top_mosaic_09cm_area7.tif read"):
        predict(tmp_path / "run", [photo], tmp_path / "pred", captions=store)
    assert not (tmp_path / "pred").exists() and not (tmp_path / "run" / "eval_test_eroded").exists()
    args = ["predict", "--run", str(tmp_path / "run"), "--images", str(photo), "--out", str(tmp_path / "pred"),
            "--captions", str(store)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "['annotation']" in result.output and not (tmp_path / "pred").exists()
    capsys.readouterr()

    metrics = evaluate(tmp_path / "run", split="test", missing_captions="mask")
    [written] = predict(tmp_path / "run", [photo], tmp_path / "pred", captions=store, missing_captions="mask")
    printed = capsys.readouterr().out
    assert "expert annotation masked on 4 of 4 windows of split 'test'" in printed
    assert "expert annotation masked on 4 of 4 windows of image top_mosaic_09cm_area7.tif" in printed
    assert "expert second masked" not in printed
    assert metrics.captions is not None and metrics.captions.masked_windows == {"annotation": 4, "second": 0}
    report = tmp_path / "run" / "eval_test_eroded"
    assert json.loads((report / "metrics.json").read_text())["captions"]["masked_windows"]["annotation"] == 4
    assert "of the 4 windows, experts masked: annotation on 4" in (report / "metrics.md").read_text()
    for record in (report / "windows.csv", tmp_path / "pred" / "top_mosaic_09cm_area7_captions.csv"):
        assert (pd.read_csv(record)["masked_experts"] == "annotation").all() and len(pd.read_csv(record)) == 4
    with rasterio.open(written) as result:
        assert (result.height, result.width) == (128, 128)


def test_predict_reads_the_captions_of_the_tiles_with_the_same_pixels(run_inputs, small_index, tmp_path, capsys):
    """An orthophoto under its provider's name (not the tile id's `area7`) still gets its own tiles' captions."""
    manifest, store = run_inputs
    train(manifest, tmp_path / "run", settings(steps=1, checkpoint_every=1), captions=store)
    photo = small_index.root.parent / "raw" / "ISPRS_semantic_labeling_Vaihingen" / "top" / "top_mosaic_09cm_area7.tif"
    scene = tmp_path / "in" / photo.name
    scene.parent.mkdir()
    scene.write_bytes(photo.read_bytes())
    predict(tmp_path / "run", [scene], tmp_path / "pred", captions=store)
    used = pd.read_csv(tmp_path / "pred" / "top_mosaic_09cm_area7_captions.csv")
    assert sorted(used["caption_tile_id"]) == sorted(small_index.frame.query("source_id == 'area7'")["tile_id"])
    assert used["on_captioned_grid"].all()
    assert "4 of 4 windows read captions" in capsys.readouterr().out
    other = tmp_path / "other.tif"
    with rasterio.open(other, "w", driver="GTiff", height=128, width=128, count=3, dtype="uint8") as sink:
        sink.write(np.zeros((3, 128, 128), np.uint8))
    predict(tmp_path / "run", [other], tmp_path / "pred", captions=store)
    assert "warning: other.tif: no window matched a captioned tile" in capsys.readouterr().out


def test_augmentations_move_captions_with_the_pixels(run_inputs, small_index, tmp_path):
    """d4_rewrite reads the text variant of the very flip/rotation the tile got; none leaves tiles as they are."""
    from segmenter.data.raster_io import read_crop
    from segmenter.data.samples import TileSamples, augment, d4_variant
    from segmenter.text import TextEncoder, TextFeatureCache, expert_text_features

    _, store = run_inputs
    cache = TextFeatureCache(tmp_path / "cache", TextEncoder("test-tiny-clip"))
    text = expert_text_features(store, ["annotation"], cache, direction_variants=True)
    rewrite = TileSamples(small_index, "train", text, augmentation="d4_rewrite")
    plain = TileSamples(small_index, "train", text, augmentation="none")
    seed = next(s for s in range(100) if d4_variant(s) != 0)  # a seed that transforms the tile
    variant = d4_variant(seed)
    item = rewrite.sample(0, seed)
    tile_id = item["tile_id"]
    original = read_crop(small_index.path(rewrite.frame.loc[0, "image_path"]))[..., :3]
    expected, _ = augment(original, np.zeros(original.shape[:2], np.uint8), variant)
    np.testing.assert_array_equal((item["image"] * 255).round().byte().permute(1, 2, 0).numpy(), expected)
    torch.testing.assert_close(item["text"], text.lookup(tile_id, variant)[0])
    untouched = plain.sample(0, seed)
    np.testing.assert_array_equal((untouched["image"] * 255).round().byte().permute(1, 2, 0).numpy(), original)
    torch.testing.assert_close(untouched["text"], text.lookup(tile_id, 0)[0])
    assert settings().augmentation_for(build_model("test_tiny_notext").config) == "d4"
    assert settings().augmentation_for(build_model("test_tiny", experts=["a"]).config) == TEXT_GUIDED_AUGMENTATION


def small_index_main(manifest: Path) -> tuple[str, ...]:
    from manifests.run_manifest import load_manifest
    from manifests.tile_index import read_tile_index

    return read_tile_index(load_manifest(manifest).tiling.out).vocabulary.main_classes


def test_evaluate_reports_what_an_independent_computation_of_its_predictions_gives(run_inputs, tmp_path):
    """The metrics equal sklearn's on the maps `predict` writes for the same scene, against the eroded GT."""
    from sklearn.metrics import f1_score, jaccard_score

    from manifests.run_manifest import load_manifest
    from segmenter.data.datasets import build_dataset
    from segmenter.data.raster_io import three_bands
    from segmenter.data.windowed_read import read_raster

    manifest, _ = run_inputs
    run = tmp_path / "run"
    train(manifest, run, settings(preset="test_tiny_notext", steps=3, checkpoint_every=3))
    metrics = evaluate(run, split="test", window=64, overlap=0.0)
    dataset = build_dataset(load_manifest(manifest).dataset)
    [source] = [source for source in dataset.sources() if source.split == "test"]
    scene = tmp_path / "scene.tif"
    image = three_bands(read_raster(source.image))
    with rasterio.open(scene, "w", driver="GTiff", height=image.shape[0], width=image.shape[1], count=3,
                       dtype="uint8") as sink:  # fmt: skip
        sink.write(image.transpose(2, 0, 1))
    [written] = predict(run, [scene], tmp_path / "pred", window=64, overlap=0.0)
    with rasterio.open(written) as opened:
        prediction = opened.read(1).ravel()
    label = dataset.read_label(source.eval_label)[0].ravel()
    keep = label != 255
    present = sorted(set(label[keep]) | set(prediction[keep]))
    iou = jaccard_score(label[keep], prediction[keep], labels=present, average=None)
    f1 = f1_score(label[keep], prediction[keep], labels=present, average=None)
    np.testing.assert_allclose([metrics.iou[i] for i in present], iou)
    # F1 of a class without a true positive is undefined (mmsegmentation's convention, the default); sklearn says 0
    true_positives = np.array([((label[keep] == i) & (prediction[keep] == i)).sum() for i in present])
    np.testing.assert_allclose([metrics.f1[i] for i in present], np.where(true_positives > 0, f1, np.nan))
    assert metrics.oa == pytest.approx((label[keep] == prediction[keep]).mean())
    main = [i for i in present if metrics.class_names[i] in metrics.main_classes]
    assert "clutter" not in metrics.main_classes  # the ISPRS rule, from the tile index's class vocabulary
    assert metrics.miou == pytest.approx(np.mean([iou[present.index(i)] for i in main]))


def test_a_corrupted_checkpoint_is_refused_and_the_earlier_report_kept(run_inputs, tmp_path):
    manifest, _ = run_inputs
    run = tmp_path / "run"
    checkpoint = train(manifest, run, settings(preset="test_tiny_notext", steps=2, checkpoint_every=2))
    evaluate(run, split="test", window=64, overlap=0.0)
    report = run / "eval_test_eroded" / "metrics.json"
    before = report.read_bytes()
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"model.safetensors: SHA-256 .* differs"):
        evaluate(run, split="test", window=64, overlap=0.0)
    with pytest.raises(InputError, match=r"model.safetensors: SHA-256 .* differs"):
        predict_index(run, load_manifest_tiles(manifest), tmp_path / "p.parquet", ["test"])
    assert report.read_bytes() == before and not (tmp_path / "p.parquet").exists()


def load_manifest_tiles(manifest: Path) -> Path:
    from manifests.run_manifest import load_manifest

    return load_manifest(manifest).tiling.out


def test_predict_refuses_pixels_that_are_not_8_bit_unless_told_how_to_stretch_them(run_inputs, tmp_path):
    manifest, _ = run_inputs
    run = tmp_path / "run"
    train(manifest, run, settings(preset="test_tiny_notext", steps=1, checkpoint_every=1))
    pixels = np.random.default_rng(1).integers(1000, 5000, size=(3, 64, 64), dtype=np.uint16)
    deep = tmp_path / "deep.tif"
    with rasterio.open(deep, "w", driver="GTiff", height=64, width=64, count=3, dtype="uint16") as sink:
        sink.write(pixels)
    with pytest.raises(InputError, match=r"deep.tif: uint16 pixels, the model was trained on 8-bit .* --scale minmax"):
        predict(run, [deep], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    # minmax: the class map equals that of the image stretched by hand, band by band, to 0-255
    low, high = pixels.min(axis=(1, 2), keepdims=True), pixels.max(axis=(1, 2), keepdims=True)
    by_hand = np.round((pixels - low) / (high - low) * 255).astype(np.uint8)
    eight = tmp_path / "eight.tif"
    with rasterio.open(eight, "w", driver="GTiff", height=64, width=64, count=3, dtype="uint8") as sink:
        sink.write(by_hand)
    [stretched] = predict(run, [deep], tmp_path / "minmax", scale="minmax")
    [reference] = predict(run, [eight], tmp_path / "reference")
    with rasterio.open(stretched) as a, rasterio.open(reference) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))


def test_resume_falls_back_to_the_newest_complete_checkpoint_and_keeps_the_broken_one(run_inputs, tmp_path, capsys):
    manifest, _ = run_inputs
    plain = settings(preset="test_tiny_notext", steps=4, checkpoint_every=2, keep_checkpoints=3)
    whole = train(manifest, tmp_path / "whole", plain)
    cut = train(manifest, tmp_path / "cut", plain)
    (cut / "optimizer.pt").unlink()  # the newest checkpoint lost a file (a copy cut short)
    assert RunPaths(tmp_path / "cut").latest.name == "step_000002"
    resumed = train(manifest, tmp_path / "cut", plain, resume=True)
    out = capsys.readouterr().out
    assert (
        "checkpoint step_000004 is incomplete (no optimizer.pt): moved to" in out and "resuming from step_000002" in out
    )
    assert (tmp_path / "cut" / "checkpoints" / "incomplete" / "step_000004" / "model.safetensors").is_file()
    a, b = MPerSSegmenter.load(whole).state_dict(), MPerSSegmenter.load(resumed).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)  # the steps redone from step 2 give the same weights
    assert not list((tmp_path / "cut" / "checkpoints").glob(".step_*"))  # no staging folder left


def test_loader_batches_are_those_of_the_plan_whatever_the_workers(small_index):
    """Worker processes decode the batches of (seed, step) in step order; a plan resumed at step k starts there."""
    import multiprocessing
    import pickle

    from segmenter.data.samples import PlannedBatches, TileSamples, sample_plan, training_loader

    samples = TileSamples(small_index, "train", None, augmentation="d4")
    n, seed = len(samples), 7
    for step in (0, 5):  # the plan of runs started before the loader existed, so that their --resume stays exact
        positions, seeds = sample_plan(step, 3, n, seed, rank=1, world=2)
        counters = [step * 6 + j for j in range(3, 6)]
        order = [np.random.default_rng([seed, c // n]).permutation(n)[c % n] for c in counters]
        assert positions == order and seeds == [seed * 1_000_003 + c for c in counters]
    plan = PlannedBatches(3, 6, 3, n, seed)
    assert len(plan) == 3
    # auto: no worker on the CPU (the model's threads use every core), one CPU left to each process on a GPU
    assert settings().loader_workers(cuda=False) == 0 and settings(workers=3).loader_workers(cuda=False) == 3
    assert settings().loader_workers(cuda=True, processes=10_000) == 0
    before = set(multiprocessing.active_children())
    loaded = list(training_loader(pickle.loads(pickle.dumps(samples)), plan, 2, 1, pin_memory=False))
    assert set(multiprocessing.active_children()) == before  # the workers are gone once the plan is read
    for step, batch in zip(range(3, 6), loaded, strict=True):
        expected = samples.batch(*sample_plan(step, 3, n, seed, 0, 1))
        assert batch["tile_id"] == expected["tile_id"]
        torch.testing.assert_close(batch["image"], expected["image"], rtol=0, atol=0)
        torch.testing.assert_close(batch["label"], expected["label"], rtol=0, atol=0)


def test_resume_with_loader_workers_gives_the_weights_of_a_run_without(run_inputs, tmp_path, monkeypatch):
    import multiprocessing

    manifest, store = run_inputs
    short = {"steps": 4, "checkpoint_every": 2}
    uninterrupted = train(manifest, tmp_path / "a", settings(**short, workers=0), captions=store)
    original = train_module.save_checkpoint

    def stop_after_first(*args, **kwargs):
        folder = original(*args, **kwargs)
        raise KeyboardInterrupt(f"stopped after {folder.name}")

    before = set(multiprocessing.active_children())
    monkeypatch.setattr(train_module, "save_checkpoint", stop_after_first)
    with pytest.raises(KeyboardInterrupt, match="step_000002"):
        train(manifest, tmp_path / "b", settings(**short, workers=2), captions=store)
    assert set(multiprocessing.active_children()) == before  # a stopped run leaves no loader worker behind
    monkeypatch.setattr(train_module, "save_checkpoint", original)
    resumed = train(manifest, tmp_path / "b", settings(**short, workers=2), captions=store, resume=True)
    assert resumed.name == uninterrupted.name == "step_000004"
    expected, got = weights(uninterrupted), weights(resumed)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def test_resume_refuses_other_settings_or_another_manifest_and_keeps_the_record(run_inputs, tmp_path):
    """A resumed run that would go on with another learning rate, seed or manifest is refused in one line naming
    each difference; run.json still describes the run. More steps (the point of resuming) are accepted."""
    manifest, _ = run_inputs
    base = {"preset": "test_tiny_notext", "checkpoint_every": 1}
    train(manifest, tmp_path / "run", settings(steps=1, **base))
    record = (tmp_path / "run" / "run.json").read_text()
    changed = r"--resume: --lr 0\.5 \(the run's: .*\); --seed 7 \(the run's: 0\).*may change"
    with pytest.raises(InputError, match=changed):
        train(manifest, tmp_path / "run", settings(steps=2, lr=0.5, seed=7, **base), resume=True)
    other = tmp_path / "other.yaml"
    other.write_text(Path(manifest).read_text() + "\n# another manifest\n")
    with pytest.raises(InputError, match=r"--resume: --manifest \(its text differs from .*when the run started\)"):
        train(other, tmp_path / "run", settings(steps=2, **base), resume=True)
    assert (tmp_path / "run" / "run.json").read_text() == record
    train(manifest, tmp_path / "run", settings(steps=2, **base), resume=True)
    assert RunRecord.read(tmp_path / "run").settings.steps == 2
