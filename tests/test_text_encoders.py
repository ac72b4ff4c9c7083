"""The text encoders of Table 1 beyond CLIP (BLIP-2 FLAN-T5, DINOv3-Text): presets that train on the demo tiles
with tiny stand-ins loaded through the real paths, the learned width map, and a feature cache that never mixes
two encoders."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from caption_pipeline.clip_models import TEXT_POOLINGS
from manifests.errors import InputError
from segmenter.engine.evaluate import evaluate
from segmenter.engine.train import TrainSettings, train
from segmenter.model import MPerSSegmenter, preset_config
from segmenter.model import presets as registry
from segmenter.model.config import TextPooling
from segmenter.text import TextEncoder, TextFeatureCache, expert_text_features
from segmenter.text.dinotxt import DINOTXT_TINY, write_tiny_dinotxt_checkpoint
from segmenter.text.encoder import text_feature_width
from segmenter.text.flan_t5 import build_tiny_flan_t5
from tests.helpers import annotation_store, demo_manifest

TINY_PARTS = {"backbone": "vit_tiny_patch16_dinov3_qkvb", "backbone_pretrained": False, "dim": 32, "ldpe_width": 8,
              "adapter_depth": 1, "adapter_heads": 4, "text_dim": 16, "dmte_heads": 4, "lqga_heads": 4}  # fmt: skip


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """A tiny BLIP-2 FLAN-T5 folder and a tiny dino.txt checkpoint in the released key layout."""
    folder = tmp_path_factory.mktemp("text_encoders")
    return {
        "blip2": build_tiny_flan_t5(folder / "blip2-flan-t5-tiny", blip2=True),
        "dinotxt": write_tiny_dinotxt_checkpoint(folder / "dinotxt_tiny.pth"),
    }


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, small_index, clip_config) -> tuple[Path, Path]:
    """A manifest over the small demo index and a caption store written by the annotation expert."""
    folder = tmp_path_factory.mktemp("text_runs")
    store = annotation_store(folder, small_index, clip_config)
    return demo_manifest(folder, small_index), store


def stand_in(preset: str, stand_ins: dict[str, Path]) -> dict:
    """The preset's parts made tiny; its text encoder stays the preset's family, loaded from a tiny file."""
    if "blip2" in preset:
        return {**TINY_PARTS, "text_checkpoint": str(stand_ins["blip2"])}
    return {**TINY_PARTS, "text_encoder": "test-tiny-dinotxt", "text_checkpoint": str(stand_ins["dinotxt"])}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["mpers_vitl16_text_blip2_flant5", "mpers_vitl16_text_dinotxt"])
def test_new_text_presets_train_save_and_reload_with_identical_logits(
    preset, stand_ins, demo_run, tmp_path, monkeypatch
):
    manifest, store = demo_run
    name = f"test_{preset}"
    tiny = preset_config(preset, **stand_in(preset, stand_ins)).model_copy(update={"name": name})
    monkeypatch.setitem(registry._PRESETS, name, lambda: tiny)
    settings = TrainSettings(preset=name, steps=20, batch_size=2, checkpoint_every=20, log_every=5)
    checkpoint = train(manifest, tmp_path / "run", settings, captions=store)
    model = MPerSSegmenter.load(checkpoint).eval()
    encoder = TextEncoder(model.config.text_encoder, model.config.text_checkpoint)
    # the encoder's features are wider than the guidance: the run recorded its width and learned the map
    assert model.config.text_input_dim == encoder.dim != model.config.text_dim
    assert model.text_projection.weight.shape == (model.config.text_dim, encoder.dim)
    torch.manual_seed(settings.seed)  # the run's initial weights, built as train builds them
    initial = MPerSSegmenter(model.config).text_projection.weight
    assert not torch.allclose(model.text_projection.weight, initial), "the width map was not trained"
    cache = TextFeatureCache(tmp_path / "cache", encoder)
    text = expert_text_features(store, list(model.config.experts), cache)
    tile = next(iter(text.features))
    features, present = text.lookup(tile)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(images, features[None], present[None]).logits
        reloaded = MPerSSegmenter.load(model.save(tmp_path / "copy")).eval()
        torch.testing.assert_close(reloaded(images, features[None], present[None]).logits, logits, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(logits).all()
    # evaluation feeds each window the encoder's (wider) features, and zeros of that width where none exist
    metrics = evaluate(tmp_path / "run", split="test", window=64, overlap=0.5)
    assert 0 <= metrics.miou <= 100


def test_feature_width_is_known_before_any_weights_load(stand_ins):
    assert (
        text_feature_width("blip2-flan-t5-xl", stand_ins["blip2"])
        == TextEncoder("blip2-flan-t5-xl", stand_ins["blip2"]).dim
    )
    assert text_feature_width("test-tiny-dinotxt") == DINOTXT_TINY.output_dim
    assert text_feature_width("clip-vit-b16") is None  # CLIP presets set text_dim to the tower's width


def test_the_text_cache_never_mixes_two_encoders(stand_ins, tmp_path):
    captions = ["two cars park north of a building", "low vegetation around a tree"]
    encoders = [
        TextEncoder("test-tiny-clip"),
        TextEncoder("test-tiny-dinotxt", stand_ins["dinotxt"]),
        TextEncoder("blip2-flan-t5-xl", stand_ins["blip2"]),
    ]
    assert len({encoder.encoder_id for encoder in encoders}) == 3
    vectors = []
    for encoder in encoders:
        cache = TextFeatureCache(tmp_path, encoder)
        vectors.append(cache.embeddings(captions))
        assert encoder.calls == 1
        again = TextFeatureCache(tmp_path, encoder)  # read back from disk: this encoder's entries only
        assert len(again) == 2 and torch.equal(again.embeddings(captions), vectors[-1]) and encoder.calls == 1
    assert len(list(tmp_path.iterdir())) == 3
    assert [v.shape[1] for v in vectors] == [encoder.dim for encoder in encoders]
    # two checkpoints of one encoder are two ids as well
    other = write_tiny_dinotxt_checkpoint(tmp_path / "other.pth", seed=1)
    assert TextEncoder("test-tiny-dinotxt", other).encoder_id != encoders[1].encoder_id


LONG_CAPTION = "Two cars park north of a red building beside low vegetation and a tall tree. " * 12


@pytest.mark.parametrize("encoder_name", ["test-tiny-clip", "test-tiny-dinotxt", "blip2-flan-t5-xl"])
def test_long_captions_are_pooled_as_asked(stand_ins, encoder_name):
    """truncate reads the first chunk (as CLIP's tokenizers do); chunk_mean gives every chunk the same weight;
    token_weighted weighs each chunk by its tokens, so a short tail weighs less than a full chunk."""
    checkpoint = {"test-tiny-dinotxt": stand_ins["dinotxt"], "blip2-flan-t5-xl": stand_ins["blip2"]}.get(encoder_name)
    encoders = {pooling: TextEncoder(encoder_name, checkpoint, pooling=pooling) for pooling in TEXT_POOLINGS}
    backend = encoders["chunk_mean"].backend
    chunked = getattr(backend, "chunked", backend)
    if encoder_name == "blip2-flan-t5-xl":
        backend.context_length = 40  # the tiny T5's 512-token context would hold the caption whole
        chunks = backend.token_chunks([LONG_CAPTION])[0]
        rows = backend.embed_token_rows(chunks)
    else:
        chunks = chunked.token_chunks(LONG_CAPTION)
        sot, eot = chunked.tokenizer.sot_token_id, chunked.tokenizer.eot_token_id
        ids = [[sot, *chunk, eot] + [0] * (chunked.context - len(chunk) - 2) for chunk in chunks]
        with torch.no_grad():
            rows = F.normalize(chunked.model.encode_text(torch.tensor(ids)).float(), dim=-1)
    for encoder in encoders.values():
        if encoder_name == "blip2-flan-t5-xl":
            encoder.backend.context_length = 40
    sizes = torch.tensor([len(chunk) for chunk in chunks], dtype=torch.float32)
    assert len(chunks) >= 2 and sizes[-1] < sizes[0]  # a short tail
    expected = {
        "truncate": rows[0],
        "chunk_mean": F.normalize(rows.mean(0), dim=-1),
        "token_weighted": F.normalize((rows * sizes[:, None]).sum(0), dim=-1),
    }
    for pooling, encoder in encoders.items():
        torch.testing.assert_close(encoder.encode([LONG_CAPTION])[0], expected[pooling], atol=1e-5, rtol=1e-4)
    assert len({encoder.encoder_id for encoder in encoders.values()}) == 3  # the pooling is part of the feature id
    assert len({encoder.weights_id for encoder in encoders.values()}) == 1  # the weights are the same


def test_the_pooling_names_of_the_model_and_the_encoders_agree():
    assert get_args(TextPooling) == TEXT_POOLINGS
    with pytest.raises(InputError, match="text pooling 'mean' unknown"):
        TextEncoder("test-tiny-clip", pooling="mean")
    with pytest.raises(ValueError, match="expected one of truncate, chunk_mean, token_weighted"):
        TrainSettings(text_pooling="mean")


def test_clip_presets_have_no_width_map_and_keep_their_keys():
    config = preset_config("test_tiny", experts=["a"])
    model = MPerSSegmenter(config)
    assert model.text_projection is None and not any(k.startswith("text_projection") for k in model.state_dict())


def test_every_row_of_tables_1_to_4_has_a_preset_with_the_papers_miou():
    rows = {name: registry.paper_row(name) for name in registry.list_presets()}
    table_rows = {(row.table.split(" (")[0], row.row) for row in rows.values() if row and row.table.startswith("Table")}
    assert {("Table 1", r) for r in ["none", "BLIP-2 (FLAN-T5)", "RemoteCLIP ViT-B", "DINOv3-Text ViT-L",
                                      "CLIP ViT-L"]} <= table_rows  # fmt: skip
    assert {("Table 2", "MHSA"), ("Table 2", "SWDA r=2"), ("Table 2", "SWDA r=3")} <= table_rows
    assert {("Table 3", "FPN"), ("Table 3", "pixelUp")} <= table_rows
    assert {("Table 4", f"stage {s}") for s in (1, 2, 3)} | {("Table 4", "stage 3 + stage 4 (chained)")} <= table_rows
    assert rows["mpers_vitl16_text_blip2_flant5"].miou == 76.42 and rows["mpers_vitl16_text_dinotxt"].miou == 76.98
    assert preset_config("mpers_vitl16_dmte_s34").lqga_stages == [3, 4]


def test_local_weights_given_at_training_reach_the_checkpoint(stand_ins, demo_run, tmp_path, monkeypatch):
    """`segmenter train --text-checkpoint` (a gated or offline file) is the weights the run's model reads."""
    manifest, store = demo_run
    tiny = preset_config("mpers_vitl16_text_dinotxt", **TINY_PARTS, text_encoder="test-tiny-dinotxt")
    monkeypatch.setitem(registry._PRESETS, "test_local_dinotxt", lambda: tiny.model_copy(update={"name": "x"}))
    settings = TrainSettings(preset="test_local_dinotxt", steps=1, batch_size=2, checkpoint_every=1,
                             text_checkpoint=str(stand_ins["dinotxt"]))  # fmt: skip
    model = MPerSSegmenter.load(train(manifest, tmp_path / "run", settings, captions=store))
    assert model.config.text_checkpoint == str(stand_ins["dinotxt"])
    with pytest.raises(InputError, match=r"--text-checkpoint: .*nothing\.pth not found"):
        train(manifest, tmp_path / "other", settings.model_copy(update={"text_checkpoint": "nothing.pth"}), store)
    text_free = TrainSettings(preset="test_tiny_notext", steps=1, text_checkpoint=str(stand_ins["dinotxt"]))
    with pytest.raises(InputError, match="--text-checkpoint: preset test_tiny_notext reads no captions"):
        train(manifest, tmp_path / "third", text_free)
