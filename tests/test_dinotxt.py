"""The dino.txt text tower: released key layout, loading checks, tokenizer and whole-caption chunking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from manifests.atomic import file_digest
from manifests.errors import InputError
from segmenter.text.dinotxt import (
    DINOTXT_TINY,
    DINOTXT_VITL16,
    RELEASED_FILE,
    DinoTxtConfig,
    DinoTxtTextEncoder,
    DinoTxtTextTower,
    dinotxt_tokenizer,
    expected_text_shapes,
    write_tiny_dinotxt_checkpoint,
)

SENTENCE = "A red-roofed building next to a tree and two cars."
# Token ids of SENTENCE from the official tokenizer (dinov3/eval/text/tokenizer.py at facebookresearch/dinov3
# 6876159a11b4df116f30f667f8c9888617df0751 with bpe_simple_vocab_16e6), computed once with that code.
OFFICIAL_IDS = [49406, 320, 736, 268, 9120, 538, 2307, 1131, 531, 320, 2677, 537, 1237, 3346, 269, 49407]
# First values of the normalised embedding of REFERENCE_TEXT by the official TextTower (same commit, tiny config,
# weights of write_tiny_dinotxt_checkpoint(seed=0)): pins the port's numerics to the official code.
REFERENCE_TEXT = "Two cars are parked beside a building with a flat roof."
OFFICIAL_EMBEDDING_HEAD = [0.038398, -0.092343, -0.139976, 0.130255, -0.087063, -0.003364]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dinotxt_checkpoint(tmp_path_factory.mktemp("dinotxt") / "tiny_dinotxt.pth")


@pytest.fixture(scope="module")
def tiny_encoder(tiny_checkpoint: Path) -> DinoTxtTextEncoder:
    return DinoTxtTextEncoder(tiny_checkpoint, DINOTXT_TINY)


def _block_keys(index: int) -> dict[str, tuple[int, ...]]:
    """The official ViT-L/16 dino.txt text block ``index``: names and shapes written out from the release's code."""
    prefix = f"backbone.blocks.{index}."
    return {
        prefix + "attention_norm.weight": (1280,),
        prefix + "attention_norm.bias": (1280,),
        prefix + "attention.qkv.weight": (3840, 1280),
        prefix + "attention.proj.weight": (1280, 1280),
        prefix + "attention.proj.bias": (1280,),
        prefix + "ffn_norm.weight": (1280,),
        prefix + "ffn_norm.bias": (1280,),
        prefix + "feed_forward.fc1.weight": (5120, 1280),
        prefix + "feed_forward.fc1.bias": (5120,),
        prefix + "feed_forward.fc2.weight": (1280, 5120),
        prefix + "feed_forward.fc2.bias": (1280,),
    }


def test_official_config_has_the_released_key_layout() -> None:
    shapes = expected_text_shapes(DINOTXT_VITL16)
    expected = {
        "backbone.token_embedding.weight": (49408, 1280),
        "backbone.positional_embedding": (77, 1280),
        "backbone.ln_final.weight": (1280,),
        "backbone.ln_final.bias": (1280,),
        "head.linear_projection.weight": (2048, 1280),
    }
    for index in range(24):
        expected |= _block_keys(index)
    assert shapes == expected
    assert "backbone.blocks.24.ffn_norm.weight" not in shapes  # 24 layers, 20 heads: not 20 layers
    # 63.2 M embedding + 24 x 19.67 M blocks + 2.6 M projection, as the official TextTower of the hub entry
    assert sum(torch.Size(shape).numel() for shape in shapes.values()) == 538_131_200
    with torch.device("meta"):
        tower = DinoTxtTextTower(DINOTXT_VITL16)
    assert tower.backbone.blocks[0].attention.heads == 20
    assert DINOTXT_VITL16.output_dim == 2048 and DINOTXT_VITL16.context_length == 77


def test_tiny_config_has_the_same_key_names() -> None:
    def pattern(config: DinoTxtConfig) -> set[str]:
        return {key.replace("blocks.1.", "blocks.0.") for key in expected_text_shapes(config)}

    assert pattern(DINOTXT_TINY) == pattern(DinoTxtConfig(name="two", width=1280, depth=2, heads=20))
    assert {key for key in expected_text_shapes(DINOTXT_TINY) if "blocks." not in key} == {
        "backbone.token_embedding.weight",
        "backbone.positional_embedding",
        "backbone.ln_final.weight",
        "backbone.ln_final.bias",
        "head.linear_projection.weight",
    }


def test_tiny_checkpoint_has_the_released_prefix_and_vision_keys(tiny_checkpoint: Path) -> None:
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    text = {key for key in state if key.startswith("text_model.")}
    assert text == {f"text_model.{key}" for key in expected_text_shapes(DINOTXT_TINY)}
    assert "logit_scale" in state and any(key.startswith("visual_model.head.") for key in state)


def test_tiny_checkpoint_round_trips(tiny_checkpoint: Path, tiny_encoder: DinoTxtTextEncoder) -> None:
    texts = [SENTENCE, "low vegetation and impervious surfaces", ""]
    first = tiny_encoder.encode(texts)
    assert first.shape == (3, DINOTXT_TINY.output_dim) and tiny_encoder.dim == 48
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.allclose(first.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(first[0], first[1])
    again = DinoTxtTextEncoder(tiny_checkpoint, DINOTXT_TINY).encode(texts)
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-6)
    assert tiny_encoder.weights_label == f"tiny_dinotxt.pth@{file_digest(tiny_checkpoint)[:12]}"
    assert tiny_encoder.context_length == 77 and tiny_encoder.device.type == "cpu"
    assert not any(parameter.requires_grad for parameter in tiny_encoder.parameters())


def test_port_matches_the_official_tower_numerically(tiny_encoder: DinoTxtTextEncoder) -> None:
    embedding = tiny_encoder.encode([REFERENCE_TEXT])[0]
    assert embedding[:6].tolist() == pytest.approx(OFFICIAL_EMBEDDING_HEAD, abs=1e-5)


def test_safetensors_and_prefix_free_files_load_the_same(tmp_path: Path, tiny_encoder: DinoTxtTextEncoder) -> None:
    from safetensors.torch import save_file

    safetensors_file = write_tiny_dinotxt_checkpoint(tmp_path / "tiny.safetensors")
    expected = tiny_encoder.encode([SENTENCE])
    # another load path: equal to a tolerance far below what another weight would change (about 1e-1)
    torch.testing.assert_close(
        DinoTxtTextEncoder(safetensors_file, DINOTXT_TINY).encode([SENTENCE]), expected, rtol=1e-5, atol=1e-6
    )
    state = torch.load(write_tiny_dinotxt_checkpoint(tmp_path / "tiny.pth"), weights_only=True)
    bare = {key.removeprefix("text_model."): value for key, value in state.items() if key.startswith("text_model.")}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    bare_encoding = DinoTxtTextEncoder(tmp_path / "bare.safetensors", DINOTXT_TINY).encode([SENTENCE])
    torch.testing.assert_close(bare_encoding, expected, rtol=1e-5, atol=1e-6)


def test_long_caption_is_the_renormalised_mean_of_its_chunks(tiny_encoder: DinoTxtTextEncoder) -> None:
    tokenizer = dinotxt_tokenizer()
    caption = " ".join(f"building {i} stands north of tree {i} near the road." for i in range(20))
    tokens = tokenizer.encode(caption)
    assert len(tokens) > 2 * 75
    rows = []
    for start in range(0, len(tokens), 75):
        ids = [tokenizer.sot_token_id, *tokens[start : start + 75], tokenizer.eot_token_id]
        rows.append(ids + [0] * (77 - len(ids)))
    with torch.no_grad():
        chunks = F.normalize(tiny_encoder.model(torch.tensor(rows)), dim=-1)
    expected = F.normalize(chunks.mean(dim=0), dim=-1)
    got = tiny_encoder.encode([caption])[0]
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, chunks[0], atol=1e-3)  # the tail of the caption counts


def test_tokenizer_matches_the_release() -> None:
    tokenizer = dinotxt_tokenizer()
    ids = tokenizer([SENTENCE])
    assert ids.shape == (1, 77)
    assert ids[0, : len(OFFICIAL_IDS)].tolist() == OFFICIAL_IDS
    assert not ids[0, len(OFFICIAL_IDS) :].any()  # zero padding, so argmax pooling finds the end token
    assert len(tokenizer.encoder) == DINOTXT_VITL16.vocab_size == 49408
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)


def test_random_weights_need_no_file() -> None:
    encoder = DinoTxtTextEncoder(None, DINOTXT_TINY, random_weights=True)
    assert encoder.weights_label == "random"
    again = DinoTxtTextEncoder(None, DINOTXT_TINY, random_weights=True)
    assert torch.equal(encoder.encode([SENTENCE]), again.encode([SENTENCE]))


def _single_line_error(checkpoint: Path | None, config: DinoTxtConfig = DINOTXT_TINY) -> str:
    with pytest.raises(InputError) as info:
        DinoTxtTextEncoder(checkpoint, config)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_checkpoint_says_what_to_get(tmp_path: Path) -> None:
    message = _single_line_error(tmp_path / "absent.pth")
    assert "absent.pth" in message and RELEASED_FILE in message and "dinov3-downloads" in message
    assert RELEASED_FILE in _single_line_error(None)


def test_truncated_checkpoint_is_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    for name in ("cut.pth", "cut.safetensors"):
        cut = tmp_path / name
        cut.write_bytes(tiny_checkpoint.read_bytes()[:5000])
        assert name in _single_line_error(cut)


def test_wrong_keys_shapes_and_values_are_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)

    def saved(name: str, edited: dict[str, torch.Tensor]) -> Path:
        torch.save(edited, tmp_path / name)
        return tmp_path / name

    missing = {key: value for key, value in state.items() if key != "text_model.backbone.ln_final.bias"}
    assert "backbone.ln_final.bias" in _single_line_error(saved("missing.pth", missing))
    extra = state | {"text_model.backbone.blocks.2.ffn_norm.weight": torch.ones(32)}
    assert "blocks.2.ffn_norm" in _single_line_error(saved("extra.pth", extra))
    vision_only = {key: value for key, value in state.items() if not key.startswith("text_model.")}
    assert "missing" in _single_line_error(saved("vision_only.pth", vision_only))
    # the same names at another width
    wider = DinoTxtConfig(name="wider", width=64, depth=2, heads=2, output_dim=48)
    assert "has shape (77, 32), expected (77, 64)" in _single_line_error(tiny_checkpoint, wider)
    assert "22 missing" in _single_line_error(tiny_checkpoint, DinoTxtConfig(name="deeper", width=32, depth=4, heads=2))
    poisoned = dict(state)
    poisoned["text_model.head.linear_projection.weight"] = state["text_model.head.linear_projection.weight"].clone()
    poisoned["text_model.head.linear_projection.weight"][0, 0] = float("nan")
    assert "non-finite" in _single_line_error(saved("nan.pth", poisoned))
    assert "not a flat state dict" in _single_line_error(saved("nested.pth", {"model": state}))
