"""The CLIP networks both stages build: the activation their weights need, and ids that say which one ran."""

from __future__ import annotations

import re
from pathlib import Path

import open_clip
import pytest
import torch

from caption_pipeline.clip_models import ClipWeights, create_clip, network_activation
from caption_pipeline.scoring import ClipScorer, clip_weights
from manifests.errors import InputError
from manifests.run_manifest import ClipConfig, load_manifest, packaged_manifests
from segmenter.model.presets import list_presets, preset_config
from segmenter.text.encoder import TextEncoder, text_encoder_spec, text_encoder_weights

TAG = "tiny_openai_style"  # a pretrained tag whose weights, like OpenAI's, were trained with QuickGELU


def expected_activation(weights: ClipWeights) -> str:
    """What the weights were trained with, read from open_clip's own pretrained config (RemoteCLIP: see README)."""
    if weights.pretrained == "remoteclip":
        return "quickgelu"
    tag = open_clip.get_pretrained_cfg(weights.model, weights.pretrained) if weights.pretrained else {}
    return "quickgelu" if tag.get("quick_gelu") else "gelu"


def built_activation(weights: ClipWeights) -> str:
    """The activation of the network as built (architecture only, on the meta device: nothing downloaded)."""
    model, _ = create_clip(weights, device="meta", load_weights=False, transforms=False)
    return network_activation(model)


@pytest.mark.parametrize("name", sorted(set(packaged_manifests()) - {"demo"}))
def test_every_shipped_manifest_scores_with_the_activation_of_its_weights(name):
    weights = clip_weights(load_manifest(name).captions.clip)
    assert weights.pretrained == "openai" and expected_activation(weights) == "quickgelu"
    assert built_activation(weights) == "quickgelu"
    assert weights.model_id.endswith(":quickgelu")


def test_every_preset_text_encoder_gets_the_activation_of_its_weights():
    encoders = {preset_config(name).text_encoder for name in list_presets()} - {"none", "test-tiny-clip"}
    encoders = {name for name in encoders if text_encoder_spec(name).family == "clip"}
    assert encoders == {"clip-vit-b16", "clip-vit-l14", "remoteclip-vit-b32"}
    for encoder in sorted(encoders):
        weights = text_encoder_weights(encoder)
        assert built_activation(weights) == expected_activation(weights) == "quickgelu", encoder


def test_activation_is_part_of_every_id():
    assert ClipWeights("ViT-B-32", "openai").model_id == "ViT-B-32:openai:quickgelu"
    assert ClipWeights("ViT-B-32", "openai", quick_gelu=False).model_id == "ViT-B-32:openai:gelu"
    assert ClipWeights("ViT-B-32", "laion2b_s34b_b79k").model_id == "ViT-B-32:laion2b_s34b_b79k:gelu"
    assert ClipWeights("ViT-B-32-quickgelu", "laion400m_e32").activation == "quickgelu"
    assert TextEncoder("test-tiny-clip").weights_id == "test-tiny-clip:seed0:gelu"
    remote = TextEncoder("remoteclip-vit-b32", random_weights=True, device="meta")
    assert remote.weights_id == "remoteclip-vit-b32:random:quickgelu"
    assert remote.encoder_id == "remoteclip-vit-b32:random:quickgelu:chunk_mean"  # the text-feature id adds pooling


@pytest.fixture
def tiny_tag(monkeypatch, tiny_models):
    """A pretrained tag of the tiny CLIP, registered as open_clip registers its own (weights from a local file)."""
    open_clip.add_model_config(tiny_models["clip_dir"])
    entry = {TAG: {"file": str(tiny_models["clip_checkpoint"]), "quick_gelu": True}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "demo-tiny-clip", entry)
    return ClipConfig(model="demo-tiny-clip", pretrained=TAG, config=tiny_models["clip_dir"], device="cpu")


def test_a_quickgelu_tag_builds_quickgelu_through_the_real_tag_path(tiny_tag, tiny_models):
    scorer = ClipScorer(tiny_tag)
    assert network_activation(scorer.model) == "quickgelu"
    assert scorer.model_id == f"demo-tiny-clip:{TAG}:quickgelu"
    # the same weights in a GELU network give other embeddings: the activation changes every stored number
    gelu, _ = create_clip(ClipWeights("demo-tiny-clip", checkpoint=tiny_models["clip_checkpoint"]))
    tokens = open_clip.get_tokenizer("demo-tiny-clip")(["an aerial image with buildings and trees"])
    with torch.no_grad():
        assert not torch.allclose(scorer.model.encode_text(tokens), gelu.encode_text(tokens), atol=1e-4)


def test_an_activation_against_the_tag_is_refused_before_anything_loads(tiny_tag, tiny_models):
    with pytest.raises(InputError, match=r"quick_gelu false contradicts the weights of tag 'tiny_openai_style', "
                                         r"trained with QuickGELU$") as info:  # fmt: skip
        ClipScorer(tiny_tag.model_copy(update={"quick_gelu": False}))
    assert "\n" not in str(info.value)
    local = ClipWeights("ViT-B-32", "openai", tiny_models["clip_checkpoint"], quick_gelu=False)  # a local copy
    with pytest.raises(InputError, match=r"contradicts the weights of tag 'openai'"):
        local.check()


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (ClipWeights("ViT-B-32", "opanai"), r"unknown pretrained tag 'opanai' \(known: .*openai"),
        (ClipWeights("ViT-B-32", "remoteclip"), r"'remoteclip' names where a checkpoint's weights come from"),
        (ClipWeights("ViT-B-32", None), r"no weights \(give a pretrained tag or a checkpoint file\)"),
        (ClipWeights("ViT-B-32", "openai", Path("no/such.pt")), r"checkpoint no/such.pt not found"),
    ],
)
def test_weights_that_cannot_be_meant_are_refused_instead_of_a_random_network(weights, message):
    with pytest.raises(InputError, match=message):
        create_clip(weights, device="meta")


def test_a_checkpoint_is_known_by_its_content_and_its_origin(tiny_models, tmp_path):
    weights = ClipWeights("demo-tiny-clip", "remoteclip", tiny_models["clip_checkpoint"])
    open_clip.add_model_config(tiny_models["clip_dir"])
    model, _ = create_clip(weights)
    assert network_activation(model) == "quickgelu"
    assert re.fullmatch(r"demo-tiny-clip:remoteclip=demo-tiny-clip\.pt@[0-9a-f]{12}:quickgelu", weights.model_id)
    other = tmp_path / "demo-tiny-clip.pt"  # the same file name, other weights: another id
    state = torch.load(tiny_models["clip_checkpoint"], weights_only=True)
    torch.save({key: value + 1 for key, value in state.items()}, other)
    assert ClipWeights("demo-tiny-clip", "remoteclip", other).model_id != weights.model_id
