"""Frozen text encoders, the on-disk text-feature cache and per-expert caption features."""

from segmenter.text.cache import TextFeatureCache
from segmenter.text.encoder import TextEncoder
from segmenter.text.features import ExpertTextFeatures, expert_text_features

__all__ = ["ExpertTextFeatures", "TextEncoder", "TextFeatureCache", "expert_text_features"]
