"""The CLIP trained offline on label captions: deterministic, loaded through the normal paths, and it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caption_pipeline.clip_training import ClipTrainingSettings, label_views, train_clip
from caption_pipeline.scoring import ClipScorer
from manifests.errors import InputError
from manifests.run_manifest import ClipConfig
from segmenter.text.encoder import TINY_ENCODER, TextEncoder

FEW_STEPS = ClipTrainingSettings(steps=6, batch_size=4, warmup=2, views=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_index):
    return train_clip(small_index.root, tmp_path_factory.mktemp("clip"), "trained-tiny-clip", FEW_STEPS)


def test_training_is_deterministic(trained, small_index, tmp_path):
    again = train_clip(small_index.root, tmp_path, "trained-tiny-clip-again", FEW_STEPS)
    first, second = torch.load(trained.checkpoint), torch.load(again.checkpoint)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)  # repeated computation: the same bits
    assert trained.tiles == len(small_index.split("train")) and np.isfinite(trained.final_loss)
    other = train_clip(small_index.root, tmp_path, "trained-tiny-clip-seed1", ClipTrainingSettings(
        steps=6, batch_size=4, warmup=2, views=2, seed=1))  # fmt: skip
    assert not torch.equal(first["text_projection"], torch.load(other.checkpoint)["text_projection"])


def test_checkpoint_loads_as_the_gates_scorer(trained, small_index):
    config = ClipConfig(model="trained-tiny-clip", pretrained=None, config=trained.config.parent,
                        checkpoint=trained.checkpoint, device="cpu")  # fmt: skip
    scorer = ClipScorer(config)
    saved = torch.load(trained.checkpoint)
    torch.testing.assert_close(scorer.model.state_dict()["text_projection"], saved["text_projection"])
    assert trained.checkpoint.name in scorer.model_id
    rows = small_index.frame.head(2)
    scores = scorer.score(list(rows["image_sha256"]), [small_index.path(p) for p in rows["image_path"]],
                          ["An aerial image showing tree.", "An aerial image showing building."])  # fmt: skip
    assert len(scores) == 2


def test_checkpoint_loads_as_the_segmenters_text_tower(trained):
    encoder = TextEncoder(TINY_ENCODER, str(trained.checkpoint))
    features = encoder.encode(["An aerial image showing tree.", "An aerial image showing building."])
    assert features.shape == (2, 32)
    assert not torch.allclose(features[0], features[1])
    assert trained.checkpoint.name in encoder.encoder_id


def test_views_caption_their_own_label(small_index):
    """A view's captions are written from its own (flipped, rotated, cropped) label: its shares, not the tile's."""
    images, captions = label_views(small_index, "train", views=3, seed=0)
    assert len(images) == 3 * len(small_index.split("train"))
    assert all(len(phrasings) == 3 and phrasings[0].startswith("An aerial image") for phrasings in captions)
    assert images[1].size != images[2].size or images[2].size[0] < 64  # the third view is a crop


def test_a_split_without_labels_is_refused(small_index, tmp_path):
    with pytest.raises(InputError, match="no labelled tiles in split 'val'"):
        train_clip(small_index.root, tmp_path, "nothing", ClipTrainingSettings(split="val"))
