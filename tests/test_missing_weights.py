"""Weights that cannot be found end in one line naming what was looked for, where, and how to provide it (exit 2):
the DINOv3 backbone, CLIP (scorer and segmenter text encoder) and the transformers experts. Offline (conftest sets
HF_HUB_OFFLINE) every case fails fast: nothing is downloaded, nothing waits for the network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file
from typer.testing import CliRunner

from caption_pipeline.clip_models import ClipWeights, create_clip
from caption_pipeline.experts.base import ExpertUnavailable
from caption_pipeline.tiny_models import build_tiny_clip
from flows.cli import app as flows_app
from manifests.caption_store import write_fragment
from manifests.errors import InputError
from manifests.run_manifest import TransformersExpertConfig
from segmenter.cli import app as segmenter_app
from segmenter.model import SegmenterConfig, build_model
from segmenter.model.backbone import create_dinov3
from tests.helpers import META, demo_data_yaml, row

runner = CliRunner()
DINOV3_L = "vit_large_patch16_dinov3.lvd1689m"
TINY = "vit_tiny_patch16_dinov3_qkvb"  # timm's tiny DINOv3: its pretrained tag resolves to a hub id
NOT_CACHED_EXPERT = "Qwen/Qwen2.5-VL-3B-Instruct"


def one_error_line(result) -> str:
    """The single error line of a command that refused its input with exit code 2, with no traceback. (``flows``
    draws its progress bar on stderr before it validates: that line may come first.)"""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("captions ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def assert_says_how_to_provide(message: str, hub_id: str) -> None:
    assert f"hub id {hub_id} is not in the Hugging Face cache {hub_constants.HF_HUB_CACHE}" in message
    assert "offline" in message and f"`hf download {hub_id}`" in message and "HF_HOME" in message


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """A Hugging Face cache holding ``files`` of a model repo at one snapshot, laid out as ``hf download`` does."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, content in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


# --- the DINOv3 backbone -------------------------------------------------------------------------------------------


def test_backbone_not_cached_offline_is_refused_before_the_network_is_built():
    with pytest.raises(InputError) as raised:
        build_model("mpers_vitl16", experts=["a"])
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"backbone {DINOV3_L}: weights not found")
    assert_says_how_to_provide(message, f"timm/{DINOV3_L}")
    assert "pass --backbone-file /path/to/dinov3_vitl16_pretrain_lvd1689m-" in message


def test_backbone_file_missing_names_the_file(tmp_path):
    missing = tmp_path / "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"
    with pytest.raises(InputError, match=rf"^backbone_file: {missing} not found \(local weights for {DINOV3_L};"):
        create_dinov3(SegmenterConfig(backbone_file=str(missing)))


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        ("vit_large_patch16_dinov3.lvd1698m", "has no such pretrained tag (known: vit_large_patch16_dinov3.lvd1689m"),
        ("vit_larg_patch16_dinov3.lvd1689m", "unknown timm model 'vit_larg_patch16_dinov3.lvd1689m' (DINOv3 models:"),
    ],
)
def test_a_typo_in_the_backbone_id_is_one_line(backbone, message):
    with pytest.raises(InputError) as raised:
        create_dinov3(SegmenterConfig(backbone=backbone))
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> tuple[str, Path]:
    """The tiny DINOv3's hub id and a safetensors file of random weights for it (its cls token set to 7)."""
    reference = create_dinov3(SegmenterConfig(backbone=TINY, backbone_pretrained=False))
    state = {key: value.contiguous() for key, value in reference.state_dict().items()}
    state["cls_token"] = torch.full_like(state["cls_token"], 7.0)
    path = tmp_path_factory.mktemp("backbone") / "model.safetensors"
    save_file(state, str(path))
    return reference.pretrained_cfg["hf_hub_id"], path


def test_cached_backbone_weights_load_offline(tiny_backbone, tmp_path, monkeypatch):
    """The offline refusal looks where timm reads: weights in the cache load, and are the ones in the cache."""
    hub_id, weights = tiny_backbone
    with pytest.raises(InputError, match="weights not found"):
        create_dinov3(SegmenterConfig(backbone=TINY))  # not cached yet
    fake_hub_cache(tmp_path, hub_id, {"model.safetensors": weights.read_bytes()})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = create_dinov3(SegmenterConfig(backbone=TINY))
    assert bool((loaded.state_dict()["cls_token"] == 7.0).all())


def test_a_truncated_backbone_file_is_one_line(tiny_backbone, tmp_path):
    path = tmp_path / "dinov3_tiny.safetensors"
    path.write_bytes(tiny_backbone[1].read_bytes()[:100_000])
    with pytest.raises(InputError, match=rf"^backbone_file {path}: cannot load weights into {TINY}: "):
        create_dinov3(SegmenterConfig(backbone=TINY, backbone_file=str(path)))


def test_segmenter_train_offline_says_which_backbone_weights_and_exits_2(small_index, tmp_path):
    manifest = tmp_path / "run.yaml"
    manifest.write_text(
        f"name: t\ndataset: {{name: vaihingen, id: demo, root: {small_index.root.parent / 'raw'}, split: custom, "
        f"custom_splits: {{train: ['1', '3'], test: ['7']}}}}\ntiling: {{size: 64, out: {small_index.root}}}\n"
    )
    store = tmp_path / "captions"
    write_fragment(store, [row("demo/1/0000_0000")], META)
    result = runner.invoke(segmenter_app, ["train", "--preset", "mpers_vitl16", "--manifest", str(manifest),
                                           "--captions", str(store), "--out", str(tmp_path / "run")])  # fmt: skip
    line = one_error_line(result)
    assert line.startswith(f"error: backbone {DINOV3_L}: weights not found")
    assert_says_how_to_provide(line, f"timm/{DINOV3_L}")
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- CLIP: the caption scorer and the segmenter's text encoder -----------------------------------------------------


def test_clip_tag_not_cached_offline_is_refused_by_check_and_create():
    weights = ClipWeights("ViT-B-32", "openai")
    for attempt in (weights.check, lambda: create_clip(weights)):
        with pytest.raises(InputError) as raised:
            attempt()
        message = str(raised.value)
        assert "\n" not in message and message.startswith("CLIP ViT-B-32 (pretrained openai): weights not found")
        assert_says_how_to_provide(message, "timm/vit_base_patch32_clip_224.openai")
        assert "captions.clip.checkpoint" in message and "--text-checkpoint" in message


def test_clip_tag_in_the_cache_passes_the_offline_check(tmp_path, monkeypatch):
    fake_hub_cache(tmp_path, "timm/vit_base_patch32_clip_224.openai", {"open_clip_model.safetensors": b"x"})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    ClipWeights("ViT-B-32", "openai").check()  # no download, no refusal


def test_segmenter_text_encoder_clip_not_cached_offline():
    from segmenter.text.encoder import TextEncoder

    with pytest.raises(InputError) as raised:
        TextEncoder("clip-vit-b16")
    assert str(raised.value).startswith("CLIP ViT-B-16 (pretrained openai): weights not found")
    assert_says_how_to_provide(str(raised.value), "timm/vit_base_patch16_clip_224.openai")


def test_a_truncated_clip_checkpoint_is_one_line(tmp_path):
    _, checkpoint = build_tiny_clip(tmp_path, name="truncated-tiny-clip")
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(InputError, match=rf"^CLIP truncated-tiny-clip \({checkpoint}\): cannot load: ") as raised:
        create_clip(ClipWeights("truncated-tiny-clip", None, checkpoint))
    assert "\n" not in str(raised.value)


# --- transformers experts ------------------------------------------------------------------------------------------


def test_transformers_expert_hub_id_not_cached_offline():
    from caption_pipeline.experts.transformers_backend import TransformersExpert

    config = TransformersExpertConfig(name="qwen", backend="transformers", model=NOT_CACHED_EXPERT, device="cpu")
    with pytest.raises(ExpertUnavailable) as raised:
        TransformersExpert(config)
    message = str(raised.value)
    assert message.startswith(f"expert qwen: model {NOT_CACHED_EXPERT} not found") and "\n" not in message
    assert_says_how_to_provide(message, NOT_CACHED_EXPERT)


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_transformers_expert_folder_missing_or_empty(tmp_path, kind):
    from caption_pipeline.experts.transformers_backend import TransformersExpert

    folder = tmp_path / "qwen2-vl"
    if kind == "empty":
        folder.mkdir()
    config = TransformersExpertConfig(name="qwen", backend="transformers", model=str(folder), device="cpu")
    expected = f"model folder {folder} not found" if kind == "missing" else f"cannot load model {folder}: "
    with pytest.raises(ExpertUnavailable) as raised:
        TransformersExpert(config)
    assert str(raised.value).startswith(f"expert qwen: {expected}") and "\n" not in str(raised.value)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"), name="missing-weights-tiny-clip")


def caption_manifest(folder: Path, index, clip: str, expert: str) -> Path:
    path = folder / "run.yaml"
    path.write_text(
        f"""
name: missing-weights
{demo_data_yaml(index)}
captions:
  store: {folder / "store"}
  clip: {clip}
  prompts: {{protocol: oracle, allow_labels_on_eval: true}}
  experts:
    - {expert}
"""
    )
    return path


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (NOT_CACHED_EXPERT, f"error: expert qwen: model {NOT_CACHED_EXPERT} not found: hub id {NOT_CACHED_EXPERT}"),
        ("/nonexistent/qwen2-vl", "error: expert qwen: model folder /nonexistent/qwen2-vl not found"),
    ],
)
def test_flows_refuses_a_transformers_expert_without_weights_before_prefect_starts(
    small_index, tiny_clip, tmp_path, model, message
):
    config, checkpoint = tiny_clip
    clip = f"{{model: missing-weights-tiny-clip, pretrained: null, config: {config}, checkpoint: {checkpoint}}}"
    expert = f"{{name: qwen, backend: transformers, model: {model}, device: cpu}}"
    result = runner.invoke(flows_app, ["run", "generate-captions", "--manifest",
                                       str(caption_manifest(tmp_path, small_index, clip, expert))])  # fmt: skip
    assert one_error_line(result).startswith(message)
    assert not (tmp_path / "store").exists()


def test_flows_refuses_clip_openai_offline(small_index, tmp_path):
    manifest = caption_manifest(
        tmp_path, small_index, "{model: ViT-B-32, pretrained: openai}", "{name: annotation, backend: annotation}"
    )
    result = runner.invoke(flows_app, ["run", "generate-captions", "--manifest", str(manifest)])
    line = one_error_line(result)
    assert line.startswith("error: CLIP ViT-B-32 (pretrained openai): weights not found")
    assert_says_how_to_provide(line, "timm/vit_base_patch32_clip_224.openai")
