"""Presets as small registered builder functions (timm style): the paper's model, its ablations, a tiny one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from segmenter.model.config import SegmenterConfig

_PRESETS: dict[str, Callable[..., SegmenterConfig]] = {}


def register_preset(fn: Callable[..., SegmenterConfig]) -> Callable[..., SegmenterConfig]:
    _PRESETS[fn.__name__] = fn
    return fn


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def preset_config(name: str, **overrides: Any) -> SegmenterConfig:
    """The configuration of a preset, with keyword overrides (e.g. ``num_classes=7``)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset '{name}' (see `segmenter models`)")
    config = _PRESETS[name]()
    return config.model_copy(update=overrides) if overrides else config


def _paper(name: str, **changes: Any) -> SegmenterConfig:
    """The paper's model: DINOv3 ViT-L/16 (LVD-1689M), LDPE, SWDA r=1, CLIP ViT-B text, DMTE at stage 4, U-Net."""
    settings = {"backbone": "vit_large_patch16_dinov3.lvd1689m", "text_encoder": "clip-vit-b16", "text_dim": 512}
    return SegmenterConfig(name=name, **{**settings, **changes})


@register_preset
def mpers_vitl16() -> SegmenterConfig:
    """The full MPerS model as reported (Vaihingen mIoU 77.10)."""
    return _paper("mpers_vitl16")


@register_preset
def mpers_vitl16_notext() -> SegmenterConfig:
    """DINOv3 + LDPE + adapter without captions (text encoder none, 74.68)."""
    return _paper("mpers_vitl16_notext", text_encoder="none")


@register_preset
def mpers_vitl16_sat() -> SegmenterConfig:
    """The satellite-pretrained DINOv3 ViT-L/16 (SAT-493M) backbone."""
    return _paper("mpers_vitl16_sat", backbone="vit_large_patch16_dinov3.sat493m")


@register_preset
def mpers_vit7b16() -> SegmenterConfig:
    """The 7B DINOv3 backbone (needs a large GPU)."""
    return _paper("mpers_vit7b16", backbone="vit_7b_patch16_dinov3.lvd1689m")


# Supplement ablations: text encoder.
@register_preset
def mpers_vitl16_text_clip_vitl14() -> SegmenterConfig:
    return _paper("mpers_vitl16_text_clip_vitl14", text_encoder="clip-vit-l14", text_dim=768)


@register_preset
def mpers_vitl16_text_remoteclip() -> SegmenterConfig:
    """RemoteCLIP ViT-B/32: set ``text_checkpoint`` to the RemoteCLIP-ViT-B-32.pt file."""
    return _paper("mpers_vitl16_text_remoteclip", text_encoder="remoteclip-vit-b32", text_dim=512)


# Adapter.
@register_preset
def mpers_vitl16_mhsa() -> SegmenterConfig:
    return _paper("mpers_vitl16_mhsa", adapter="mhsa")


@register_preset
def mpers_vitl16_r2() -> SegmenterConfig:
    return _paper("mpers_vitl16_r2", dilation=2)


@register_preset
def mpers_vitl16_r3() -> SegmenterConfig:
    return _paper("mpers_vitl16_r3", dilation=3)


# Decoder.
@register_preset
def mpers_vitl16_fpn() -> SegmenterConfig:
    return _paper("mpers_vitl16_fpn", decoder="fpn")


@register_preset
def mpers_vitl16_pixelup() -> SegmenterConfig:
    return _paper("mpers_vitl16_pixelup", decoder="pixelup")


# Where DMTE/LQGA guidance enters.
@register_preset
def mpers_vitl16_dmte_s1() -> SegmenterConfig:
    return _paper("mpers_vitl16_dmte_s1", lqga_stages=[1])


@register_preset
def mpers_vitl16_dmte_s2() -> SegmenterConfig:
    return _paper("mpers_vitl16_dmte_s2", lqga_stages=[2])


@register_preset
def mpers_vitl16_dmte_s3() -> SegmenterConfig:
    return _paper("mpers_vitl16_dmte_s3", lqga_stages=[3])


@register_preset
def mpers_vitl16_dmte_s34() -> SegmenterConfig:
    return _paper("mpers_vitl16_dmte_s34", lqga_stages=[3, 4])


# The component ablation of the main paper.
@register_preset
def dinov3_vitl16_only() -> SegmenterConfig:
    """DINOv3 alone with the decoder (73.76): no LDPE, no adapter, no text."""
    return _paper("dinov3_vitl16_only", ldpe=False, adapter="none", text_encoder="none")


@register_preset
def test_tiny() -> SegmenterConfig:
    """vit_tiny DINOv3 (random), tiny CLIP text, small widths: for tests and the CPU demo."""
    return SegmenterConfig(
        name="test_tiny", backbone="vit_tiny_patch16_dinov3_qkvb", backbone_pretrained=False, dim=32,
        ldpe_width=8, adapter_depth=1, adapter_heads=4, text_encoder="test-tiny-clip", text_dim=32,
        dmte_heads=4, lqga_heads=4,
    )  # fmt: skip


@register_preset
def test_tiny_notext() -> SegmenterConfig:
    return test_tiny().model_copy(update={"name": "test_tiny_notext", "text_encoder": "none"})
