"""Presets as small registered builder functions (timm style): the paper's model, its ablations, a tiny one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from segmenter.model.config import SegmenterConfig

Builder = Callable[..., SegmenterConfig]
_PRESETS: dict[str, Builder] = {}
_PAPER_ROWS: dict[str, PaperRow] = {}
# The supplement's ablation tables (all on Vaihingen, everything else as the full model).
TEXT_TABLE, ADAPTER_TABLE = "Table 1 (text encoder)", "Table 2 (adapter)"
DECODER_TABLE, STAGE_TABLE = "Table 3 (decoder)", "Table 4 (DMTE/LQGA stages)"


@dataclass(frozen=True)
class PaperRow:
    """The row of the paper's tables a preset reproduces, with the Vaihingen mIoU reported for it."""

    table: str
    row: str
    miou: float | None = None


def register_preset(fn: Builder) -> Builder:
    """Register a preset builder under its function name (``segmenter models`` lists it)."""
    _PRESETS[fn.__name__] = fn
    return fn


def reproduces(table: str, row: str, miou: float | None = None) -> Callable[[Builder], Builder]:
    """Record the paper's row a preset reproduces (place it under ``@register_preset``)."""

    def record(fn: Builder) -> Builder:
        _PAPER_ROWS[fn.__name__] = PaperRow(table, row, miou)
        return fn

    return record


def paper_row(name: str) -> PaperRow | None:
    """The paper's row a preset reproduces; None for presets of this toolkit only (the tiny test models)."""
    return _PAPER_ROWS.get(name)


def list_presets() -> list[str]:
    """The names of the registered presets, sorted."""
    return sorted(_PRESETS)


def preset_config(name: str, **overrides: Any) -> SegmenterConfig:
    """The configuration of a preset, with keyword overrides (e.g. ``num_classes=7``)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset '{name}' (see `segmenter models`)")
    config = _PRESETS[name]()
    return config.model_copy(update=overrides) if overrides else config


def _paper(name: str, **changes: Any) -> SegmenterConfig:
    """The paper's model: DINOv3 ViT-L/16 (LVD-1689M), LDPE, SWDA r=1, CLIP ViT-B text, DMTE at stage 4, U-Net.

    LQGA has one head: the method's equation is one query-key product, softmax(q K^T / sqrt(d)) V, and the paper
    names no head count (no code of the authors' was found); ``segmenter train --lqga-heads 8`` splits it in eight.
    """
    settings = {
        "backbone": "vit_large_patch16_dinov3.lvd1689m",
        "text_encoder": "clip-vit-b16",
        "text_dim": 512,
        "lqga_heads": 1,
    }
    return SegmenterConfig(name=name, **{**settings, **changes})


@register_preset
@reproduces("main results; reference row of Tables 1-4", "MPerS: CLIP ViT-B, SWDA r=1, U-Net, stage 4", 77.10)
def mpers_vitl16() -> SegmenterConfig:
    """The full MPerS model as reported (Vaihingen mIoU 77.10)."""
    return _paper("mpers_vitl16")


@register_preset
@reproduces(TEXT_TABLE, "none", 74.68)
def mpers_vitl16_notext() -> SegmenterConfig:
    """DINOv3 + LDPE + adapter without captions (text encoder none, 74.68)."""
    return _paper("mpers_vitl16_notext", text_encoder="none")


@register_preset
@reproduces("Table 5 (DINOv3 weights)", "SAT-493M (only the averages are reported)")
def mpers_vitl16_sat() -> SegmenterConfig:
    """The satellite-pretrained DINOv3 ViT-L/16 (SAT-493M) backbone."""
    return _paper("mpers_vitl16_sat", backbone="vit_large_patch16_dinov3.sat493m")


@register_preset
@reproduces("main results", "MPerS with the 7B DINOv3", 78.42)
def mpers_vit7b16() -> SegmenterConfig:
    """The 7B DINOv3 backbone (needs a large GPU)."""
    return _paper("mpers_vit7b16", backbone="vit_7b_patch16_dinov3.lvd1689m")


# Supplement ablations: text encoder.
@register_preset
@reproduces(TEXT_TABLE, "CLIP ViT-L", 76.83)
def mpers_vitl16_text_clip_vitl14() -> SegmenterConfig:
    """CLIP ViT-L/14 text tower (768-d guidance)."""
    return _paper("mpers_vitl16_text_clip_vitl14", text_encoder="clip-vit-l14", text_dim=768)


@register_preset
@reproduces(TEXT_TABLE, "RemoteCLIP ViT-B", 76.91)
def mpers_vitl16_text_remoteclip() -> SegmenterConfig:
    """RemoteCLIP ViT-B/32: set ``text_checkpoint`` to the RemoteCLIP-ViT-B-32.pt file."""
    return _paper("mpers_vitl16_text_remoteclip", text_encoder="remoteclip-vit-b32", text_dim=512)


@register_preset
@reproduces(TEXT_TABLE, "BLIP-2 (FLAN-T5)", 76.42)
def mpers_vitl16_text_blip2_flant5() -> SegmenterConfig:
    """The FLAN-T5-XL encoder of BLIP-2 (mean-pooled, 2048-d, learned map to 512): a hub id or local folder."""
    return _paper("mpers_vitl16_text_blip2_flant5", text_encoder="blip2-flan-t5-xl", text_dim=512)


@register_preset
@reproduces(TEXT_TABLE, "DINOv3-Text ViT-L", 76.98)
def mpers_vitl16_text_dinotxt() -> SegmenterConfig:
    """dino.txt's text tower (learned map to 512): set ``text_checkpoint`` to the released dino.txt file."""
    return _paper("mpers_vitl16_text_dinotxt", text_encoder="dinotxt-vitl16", text_dim=512)


# Adapter.
@register_preset
@reproduces(ADAPTER_TABLE, "MHSA", 76.49)
def mpers_vitl16_mhsa() -> SegmenterConfig:
    """Plain global multi-head self-attention (MHSA) in the adapter instead of SWDA."""
    return _paper("mpers_vitl16_mhsa", adapter="mhsa")


@register_preset
@reproduces(ADAPTER_TABLE, "SWDA r=2", 76.65)
def mpers_vitl16_r2() -> SegmenterConfig:
    """SWDA with dilation 2 in the adapter."""
    return _paper("mpers_vitl16_r2", dilation=2)


@register_preset
@reproduces(ADAPTER_TABLE, "SWDA r=3", 76.73)
def mpers_vitl16_r3() -> SegmenterConfig:
    """SWDA with dilation 3 in the adapter."""
    return _paper("mpers_vitl16_r3", dilation=3)


# Decoder.
@register_preset
@reproduces(DECODER_TABLE, "FPN", 76.32)
def mpers_vitl16_fpn() -> SegmenterConfig:
    """The FPN decoder instead of the U-Net."""
    return _paper("mpers_vitl16_fpn", decoder="fpn")


@register_preset
@reproduces(DECODER_TABLE, "pixelUp", 74.88)
def mpers_vitl16_pixelup() -> SegmenterConfig:
    """The pixelUp decoder (no skips) instead of the U-Net."""
    return _paper("mpers_vitl16_pixelup", decoder="pixelup")


# Where DMTE/LQGA guidance enters.
@register_preset
@reproduces(STAGE_TABLE, "stage 1", 76.22)
def mpers_vitl16_dmte_s1() -> SegmenterConfig:
    """Text guidance (DMTE/LQGA) at stage 1 only."""
    return _paper("mpers_vitl16_dmte_s1", lqga_stages=[1])


@register_preset
@reproduces(STAGE_TABLE, "stage 2", 76.83)
def mpers_vitl16_dmte_s2() -> SegmenterConfig:
    """Text guidance (DMTE/LQGA) at stage 2 only."""
    return _paper("mpers_vitl16_dmte_s2", lqga_stages=[2])


@register_preset
@reproduces(STAGE_TABLE, "stage 3", 76.49)
def mpers_vitl16_dmte_s3() -> SegmenterConfig:
    """Text guidance (DMTE/LQGA) at stage 3 only."""
    return _paper("mpers_vitl16_dmte_s3", lqga_stages=[3])


@register_preset
@reproduces(STAGE_TABLE, "stage 3 + stage 4 (chained)", 76.98)
def mpers_vitl16_dmte_s34() -> SegmenterConfig:
    """Text guidance at stages 3 and 4, chained from the deeper one."""
    return _paper("mpers_vitl16_dmte_s34", lqga_stages=[3, 4])


# The component ablation of the main paper.
@register_preset
@reproduces("component ablation", "DINOv3 alone", 73.76)
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
    """``test_tiny`` without captions: for tests and the demo's text-free model."""
    return test_tiny().model_copy(update={"name": "test_tiny_notext", "text_encoder": "none"})
