"""The CLIP trained offline on label captions: deterministic, loaded through the normal paths, and it learns."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caption_pipeline.clip_models import ChunkedTextEncoder, ClipWeights, create_clip
from caption_pipeline.clip_training import (
    ClipTrainingSettings,
    contrastive_loss,
    label_views,
    share_targets,
    train_clip,
)
from caption_pipeline.prompts import readable
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
    views = label_views(small_index, "train", views=3, seed=0)
    assert len(views.images) == len(views.captions) == len(views.shares) == 3 * len(small_index.split("train"))
    assert all(len(phrasings) == 3 and phrasings[0].startswith("An aerial image") for phrasings in views.captions)
    assert views.images[1].size != views.images[2].size or views.images[2].size[0] < 64  # the third view is a crop
    np.testing.assert_allclose(views.shares.sum(axis=1), 1.0, rtol=1e-6)
    names = [readable(name) for name in small_index.class_names]
    for (_, shares_caption, _), shares in zip(views.captions, views.shares, strict=True):
        # the p2 caption names the view's own shares, largest first
        first = shares_caption.removeprefix("An aerial image covered by ").split(" (")[0]
        assert shares[names.index(first)] == shares.max()
        assert f"({shares.max() * 100:.0f}%)" in shares_caption


def test_share_targets_spread_over_tiles_of_like_shares():
    shares = torch.tensor([[0.8, 0.2, 0.0], [0.8, 0.2, 0.0], [0.75, 0.25, 0.0], [0.0, 0.1, 0.9]])
    targets = share_targets(shares, temperature=0.1)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
    distances = torch.cdist(shares, shares, p=1)
    torch.testing.assert_close(targets[1], torch.softmax(-distances[1] / 0.1, dim=0))
    assert targets[0, 0] == targets[0, 1]  # the same shares: the same caption could be true of either
    assert targets[0, 2] > 100 * targets[0, 3]  # 0.1 apart in L1 against 1.8
    assert targets[3, 3] > 0.99  # a tile unlike the others keeps CLIP's one-hot target
    torch.testing.assert_close(share_targets(shares, temperature=0.0), torch.eye(4))


def _features(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, 8, generator=generator), dim=-1)


def test_one_hot_targets_are_clips_loss():
    images, texts, scale = _features(5, 0), _features(5, 1), torch.tensor(2.0)
    logits = scale.exp() * images @ texts.T
    order = torch.arange(5)
    clip = (F.cross_entropy(logits, order) + F.cross_entropy(logits.T, order)) / 2
    torch.testing.assert_close(contrastive_loss(images, texts, scale), clip)
    torch.testing.assert_close(contrastive_loss(images, texts, scale, share_targets(torch.rand(5, 3), 0.0)), clip)


def test_soft_targets_weigh_each_direction_by_its_anchors_row():
    """Image i is scored over the captions with row i of the targets, and caption j over the images with row j."""
    images, texts, scale = _features(4, 2), _features(4, 3), torch.tensor(1.5)
    targets = share_targets(torch.tensor([[0.9, 0.1, 0.0], [0.7, 0.3, 0.0], [0.5, 0.0, 0.5], [0.0, 0.2, 0.8]]), 0.2)
    assert not torch.allclose(targets, targets.T)  # rows normalised one by one: a transposed use would differ
    logits = scale.exp() * images @ texts.T
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(contrastive_loss(images, texts, scale, targets), (image_to_text + text_to_image) / 2)


def test_a_negative_temperature_is_refused():
    with pytest.raises(ValueError, match="share_temperature must be >= 0"):
        share_targets(torch.rand(3, 2), -0.1)


def test_training_reads_the_share_temperature(trained, small_index, tmp_path):
    one_hot = train_clip(
        small_index.root, tmp_path, "trained-tiny-clip-one-hot", replace(FEW_STEPS, share_temperature=0)
    )
    soft, hard = torch.load(trained.checkpoint), torch.load(one_hot.checkpoint)
    assert not torch.allclose(soft["text_projection"], hard["text_projection"])


def test_memoized_tokens_are_the_tokens(trained):
    model, _ = create_clip(ClipWeights("trained-tiny-clip", checkpoint=trained.checkpoint))
    plain = ChunkedTextEncoder(model, "trained-tiny-clip")
    memoized = ChunkedTextEncoder(model, "trained-tiny-clip", memoize_tokens=True)
    caption = "An aerial image covered by tree (60%), building (40%). " * 12  # longer than one context
    first = memoized.token_chunks(caption)
    first[0].clear()  # a caller changing what it got leaves the memo alone
    assert memoized.token_chunks(caption) == plain.token_chunks(caption) and len(plain.token_chunks(caption)) > 1
    torch.testing.assert_close(memoized.encode([caption])[0], plain.encode([caption])[0])


def test_a_split_without_labels_is_refused(small_index, tmp_path):
    with pytest.raises(InputError, match="no labelled tiles in split 'val'"):
        train_clip(small_index.root, tmp_path, "nothing", ClipTrainingSettings(split="val"))
