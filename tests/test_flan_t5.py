"""The FLAN-T5 text encoder: both checkpoint layouts, BLIP-2 encoder-only loading, pooling, chunking, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants

from manifests.errors import InputError
from segmenter.text.flan_t5 import FlanT5TextEncoder, build_tiny_flan_t5

SHORT = "Roofs in the north-west and 3 cars."
LONG = "An aerial image with buildings, trees, low vegetation, impervious surfaces, cars and clutter. " * 6
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("flan_t5")
    return {"t5": build_tiny_flan_t5(folder / "t5"), "blip2": build_tiny_flan_t5(folder / "blip2", blip2=True)}


def _mean_pooled(encoder: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """The reference: a full model's encoder, mean over the tokenizer's own (padded) batch, normalised."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.parametrize("layout", ["t5", "blip2"])
def test_both_layouts_load_through_one_path_and_match_the_full_model(tiny, layout):
    from transformers import Blip2ForConditionalGeneration, T5ForConditionalGeneration

    encoder = FlanT5TextEncoder(tiny[layout])
    embeddings = encoder.encode([SHORT, "Trees in the east."])
    assert embeddings.shape == (2, 32) and embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
    assert encoder.dim == 32 and encoder.context_length == 512
    assert encoder.weights_label.startswith(f"{layout}@") and len(encoder.weights_label) == len(layout) + 13
    full_class = Blip2ForConditionalGeneration if layout == "blip2" else T5ForConditionalGeneration
    full = full_class.from_pretrained(tiny[layout]).eval()
    owner = full.language_model if layout == "blip2" else full
    expected = _mean_pooled(owner.get_encoder(), encoder.tokenizer, [SHORT, "Trees in the east."])
    torch.testing.assert_close(embeddings, expected, atol=1e-6, rtol=1e-5)


def test_blip2_reads_only_the_encoder_tensors(tiny, tmp_path):
    from transformers import Blip2ForConditionalGeneration, T5EncoderModel

    # re-saved in many small shards, then every shard without an encoder tensor is deleted: loading still works
    sharded = tmp_path / "sharded"
    Blip2ForConditionalGeneration.from_pretrained(tiny["blip2"]).save_pretrained(sharded, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny["blip2"] / name, sharded / name)
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    encoder_key = ("language_model.encoder.", "language_model.shared.")
    needed = {shard for key, shard in weight_map.items() if key.startswith(encoder_key)}
    dropped = set(weight_map.values()) - needed
    assert any("vision_model" in key for key, shard in weight_map.items() if shard in dropped)
    for shard in dropped:
        (sharded / shard).unlink()

    encoder = FlanT5TextEncoder(sharded)
    assert isinstance(encoder.model, T5EncoderModel)
    assert encoder.loaded_keys and all(key.startswith(encoder_key) for key in encoder.loaded_keys)
    names = [name for name, _ in encoder.named_parameters()]
    assert not [name for name in names if "vision" in name or "qformer" in name or "decoder" in name]
    reference = FlanT5TextEncoder(tiny["blip2"])
    torch.testing.assert_close(encoder.encode([SHORT]), reference.encode([SHORT]))


def _as_torch_shards(source: Path, target: Path, shards: int = 3) -> dict[str, str]:
    """Re-save a safetensors checkpoint as ``pytorch_model-*.bin`` shards with their index, as older
    ``save_pretrained`` wrote them; returns the index's weight map."""
    from safetensors.torch import load_file

    target.mkdir()
    for path in source.iterdir():
        if not path.name.startswith("model") and path.is_file():
            shutil.copy(path, target / path.name)
    state = load_file(source / "model.safetensors")
    names = sorted(state)
    weight_map = {}
    for number in range(shards):
        shard = f"pytorch_model-{number + 1:05d}-of-{shards:05d}.bin"
        part = {name: state[name] for name in names[number::shards]}
        torch.save(part, target / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (target / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_blip2_reads_the_encoder_of_a_sharded_pytorch_checkpoint(tiny, tmp_path):
    weight_map = _as_torch_shards(tiny["blip2"], tmp_path / "bin")
    encoder_key = ("language_model.encoder.", "language_model.shared.")
    encoder = FlanT5TextEncoder(tmp_path / "bin")
    assert encoder.loaded_keys and all(key.startswith(encoder_key) for key in encoder.loaded_keys)
    assert sorted(encoder.loaded_keys) == sorted(key for key in weight_map if key.startswith(encoder_key))
    torch.testing.assert_close(encoder.encode([SHORT, LONG]), FlanT5TextEncoder(tiny["blip2"]).encode([SHORT, LONG]))
    # the weights are named by the files read, so features of the .bin copy get their own cache entry
    assert encoder.weights_label.startswith("bin@")


def test_a_pytorch_shard_with_code_in_its_pickle_is_refused(tiny, tmp_path):
    weight_map = _as_torch_shards(tiny["blip2"], tmp_path / "bin")
    shard = tmp_path / "bin" / weight_map["language_model.shared.weight"]
    torch.save({"language_model.shared.weight": Path("not/a/tensor")}, shard)  # a pickled object, not a tensor
    with pytest.raises(InputError, match=r"cannot be read as PyTorch weights with weights_only=True") as error:
        FlanT5TextEncoder(tmp_path / "bin")
    assert str(shard) in str(error.value) and "\n" not in str(error.value)


def _fake_hub_cache(cache: Path, repo_id: str, source: Path, skip: set[str] = frozenset()) -> Path:
    """Lay ``source``'s files out as the Hugging Face cache would after a download of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot, ignore=lambda _folder, names: [n for n in names if n in skip])
    return snapshot


def test_a_cached_hub_id_loads_offline_with_its_revision(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path / "hub", "tiny-org/blip2-flan-t5-tiny", tiny["blip2"])
    encoder = FlanT5TextEncoder("tiny-org/blip2-flan-t5-tiny")
    assert encoder.weights_label == f"tiny-org/blip2-flan-t5-tiny@{COMMIT[:12]}"
    torch.testing.assert_close(encoder.encode([SHORT]), FlanT5TextEncoder(tiny["blip2"]).encode([SHORT]))


def test_padding_does_not_change_a_caption(tiny):
    encoder = FlanT5TextEncoder(tiny["blip2"])
    encoder.batch_size = 2  # the short caption shares a padded batch with the long one
    alone = encoder.encode([SHORT])
    together = encoder.encode([LONG, SHORT])
    assert len(encoder.token_chunks([LONG])[0][0]) > 3 * len(encoder.token_chunks([SHORT])[0][0])
    torch.testing.assert_close(together[1:], alone, atol=1e-6, rtol=1e-5)


def test_a_caption_over_the_context_is_the_normalised_mean_of_its_chunks(tiny):
    encoder = FlanT5TextEncoder(tiny["t5"])
    encoder.context_length = 8
    chunks = encoder.token_chunks([LONG])[0]
    full_ids = encoder.tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert len(chunks) > 2 and all(len(chunk) <= 7 for chunk in chunks)
    assert [token for chunk in chunks for token in chunk] == full_ids
    with torch.no_grad():
        pieces = [
            F.normalize(encoder.model(input_ids=torch.tensor([[*chunk, 1]])).last_hidden_state.mean(1), dim=-1)
            for chunk in chunks
        ]
    expected = F.normalize(torch.cat(pieces).mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(encoder.encode([LONG]), expected, atol=1e-6, rtol=1e-5)
    # a caption that fits is one chunk, whatever the context
    assert len(encoder.token_chunks(["cars"])[0]) == 1


def test_random_weights_load_nothing_and_are_reproducible(tiny, tmp_path):
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny["blip2"] / name, config_only / name)
    first, second = (
        FlanT5TextEncoder(config_only, random_weights=True),
        FlanT5TextEncoder(tiny["t5"], random_weights=True),
    )
    assert first.weights_label == "random" and not first.loaded_keys
    torch.testing.assert_close(first.encode([SHORT]), second.encode([SHORT]))
    assert not torch.allclose(first.encode([SHORT]), FlanT5TextEncoder(tiny["blip2"]).encode([SHORT]))


def test_missing_weights_are_one_line_input_errors(tiny, tmp_path, monkeypatch):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(InputError, match="not found") as error:
        FlanT5TextEncoder(missing)
    assert str(missing) in str(error.value)

    config_only = tmp_path / "config_only"
    config_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny["t5"] / name, config_only / name)
    with pytest.raises(InputError, match=r"no weights \(model\.safetensors\.index\.json, model\.safetensors"):
        FlanT5TextEncoder(config_only)

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for repo_id in ("Salesforce/blip2-flan-t5-xl", "google/flan-t5-xl"):
        with pytest.raises(InputError) as error:
            FlanT5TextEncoder(repo_id)
        message = str(error.value)
        assert repo_id in message and str(cache) in message and f"hf download {repo_id}" in message
        assert "\n" not in message

    # the metadata is cached but the weights are not
    _fake_hub_cache(cache, "tiny-org/no-weights", tiny["blip2"], skip={"model.safetensors"})
    with pytest.raises(InputError, match=r"model\.safetensors of hub id 'tiny-org/no-weights'.*hf download"):
        FlanT5TextEncoder("tiny-org/no-weights")


def test_a_folder_without_its_tokenizer_is_refused(tiny, tmp_path):
    """A model saved without its tokenizer would read every word as unknown: refused, not trained on."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in tiny["t5"].iterdir():
        if path.name.endswith(".safetensors") or path.name == "config.json":
            shutil.copy(path, bare / path.name)
    with pytest.raises(InputError, match="has no tokenizer") as error:
        FlanT5TextEncoder(bare)
    assert "\n" not in str(error.value)
