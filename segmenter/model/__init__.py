"""The MPerS segmenter and its presets."""

from __future__ import annotations

from typing import Any

from segmenter.model.config import MODEL_STRIDE, SegmenterConfig
from segmenter.model.presets import list_presets, preset_config, register_preset
from segmenter.model.segmenter import MPerSSegmenter, SegmenterOutput


def build_model(preset: str | SegmenterConfig, **overrides: Any) -> MPerSSegmenter:
    """A model from a preset name or a configuration."""
    config = preset_config(preset, **overrides) if isinstance(preset, str) else preset.model_copy(update=overrides)
    return MPerSSegmenter(config)


__all__ = ["MODEL_STRIDE", "MPerSSegmenter", "SegmenterConfig", "SegmenterOutput", "build_model", "list_presets",
           "preset_config", "register_preset"]  # fmt: skip
