"""Local weights of a run (``--backbone-file``, ``--text-checkpoint``): the frozen parts a checkpoint does not hold
are checked on every load, and can be pointed at their new place on another machine."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from manifests.errors import InputError
from segmenter.engine.evaluate import evaluate
from segmenter.engine.train import TrainSettings, train
from segmenter.model import preset_config
from segmenter.model import presets as registry
from segmenter.text.dinotxt import write_tiny_dinotxt_checkpoint
from tests.helpers import annotation_store, demo_manifest


def tiny_backbone(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(timm.create_model("vit_tiny_patch16_dinov3_qkvb", num_classes=0).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_index, clip_config) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("local_weights")
    return demo_manifest(folder, small_index), annotation_store(folder, small_index, clip_config)


def test_a_replaced_backbone_file_is_refused_and_a_moved_one_found(inputs, tmp_path):
    manifest, _ = inputs
    weights = tiny_backbone(tmp_path / "dinov3.safetensors", seed=0)
    settings = TrainSettings(preset="test_tiny_notext", steps=2, batch_size=2, checkpoint_every=2,
                             backbone_file=str(weights))  # fmt: skip
    train(manifest, tmp_path / "run", settings)
    reference = evaluate(tmp_path / "run", window=64)
    moved = shutil.move(weights, tmp_path / "elsewhere.safetensors")
    with pytest.raises(InputError, match=r"backbone_file: .*dinov3\.safetensors not found"):
        evaluate(tmp_path / "run", window=64)
    again = evaluate(tmp_path / "run", window=64, backbone_file=Path(moved))
    np.testing.assert_array_equal(again.iou, reference.iou)  # NaN where a class is absent: equal too
    # another file at the recorded place (same architecture, other values): its frozen features would differ
    tiny_backbone(weights, seed=1)
    with pytest.raises(InputError, match="is not the file this model was trained with"):
        evaluate(tmp_path / "run", window=64)
    with pytest.raises(InputError, match=r"--backbone-file: .*nowhere\.pth not found"):
        evaluate(tmp_path / "run", window=64, backbone_file=tmp_path / "nowhere.pth")


def test_other_text_weights_are_refused_at_evaluation(inputs, tmp_path, monkeypatch):
    manifest, store = inputs
    checkpoint = write_tiny_dinotxt_checkpoint(tmp_path / "dinotxt.pth")
    tiny = preset_config("test_tiny", text_encoder="test-tiny-dinotxt", text_dim=32)
    monkeypatch.setitem(registry._PRESETS, "test_tiny_dinotxt", lambda: tiny.model_copy(update={"name": "t"}))
    settings = TrainSettings(preset="test_tiny_dinotxt", steps=1, batch_size=2, checkpoint_every=1,
                             text_checkpoint=str(checkpoint))  # fmt: skip
    train(manifest, tmp_path / "run", settings, captions=store)
    evaluate(tmp_path / "run", window=64)
    other = write_tiny_dinotxt_checkpoint(tmp_path / "other.pth", seed=1)
    with pytest.raises(InputError, match=r"was trained on caption features of test-tiny-dinotxt:dinotxt\.pth@"):
        evaluate(tmp_path / "run", window=64, text_checkpoint=other)
    copied = shutil.copy(checkpoint, tmp_path / "copy.pth")  # the same weights elsewhere: the same features
    evaluate(tmp_path / "run", window=64, text_checkpoint=Path(copied))
