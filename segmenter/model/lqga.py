"""LQGA: the fused text token queries the visual map and returns channel weights that re-scale it.

``w = xi(softmax(q K^T / sqrt(d)) V)`` with q from the text token and K, V from the visual map F, where
``xi`` is mean normalisation ``(a - mean(a)) / (max(a) - min(a))``; then ``F' = w * F + F`` and
``Z = Conv1x1([F', f])``. At a single level ``f`` is the visual feature F itself. When LQGA is stacked over
several stages (``ChainedLanguageQueryGates``), the first level's ``f`` is its deep visual feature and each later
level's ``f`` is the previous level's output Z, resampled to that level's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mean_normalize(values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(a - mean(a)) / (max(a) - min(a))`` over the last dimension: weights in [-1, 1], centred on 0."""
    spread = values.amax(-1, keepdim=True) - values.amin(-1, keepdim=True)
    return (values - values.mean(-1, keepdim=True)) / (spread + eps)


def resample(features: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """A map brought to another level's size: area-averaged when it shrinks, bilinear when it grows."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    if features.shape[-2] >= size[0] and features.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(features, size)
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


class LanguageQueryGate(nn.Module):
    """LQGA at one stage: the fused text queries the visual map for channel weights; ``Z = Conv1x1([F', f])``."""

    def __init__(self, dim: int, text_dim: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads if dim % heads == 0 else 1
        self.query = nn.Linear(text_dim, dim)
        self.key = nn.Conv2d(dim, dim, 1)
        self.value = nn.Conv2d(dim, dim, 1)
        self.fuse = nn.Conv2d(dim * 2, dim, 1)

    def forward(self, features: torch.Tensor, text: torch.Tensor, carried: torch.Tensor | None = None) -> torch.Tensor:
        """``Z`` of one level: ``features`` is F, ``carried`` the ``f`` concatenated with ``F'`` (F when None)."""
        batch, dim, height, width = features.shape
        head_dim = dim // self.heads
        q = self.query(text).view(batch, self.heads, 1, head_dim)
        k = self.key(features).view(batch, self.heads, head_dim, height * width)
        v = self.value(features).view(batch, self.heads, head_dim, height * width)
        attention = ((q @ k) * head_dim**-0.5).softmax(-1)  # (B, h, 1, HW)
        pooled = (attention @ v.transpose(-1, -2)).reshape(batch, dim)
        weights = mean_normalize(pooled).view(batch, dim, 1, 1)
        gated = weights * features + features
        context = features if carried is None else resample(carried, (height, width))
        return self.fuse(torch.cat([gated, context], dim=1))


class ChainedLanguageQueryGates(nn.ModuleDict):
    """LQGA at several pyramid stages, stacked from the deepest stage to the shallowest.

    The deepest gated stage is the first level (its ``f`` is its own visual feature, so a single stage is exactly
    ``LanguageQueryGate``); each shallower stage concatenates the previous level's Z, upsampled, as its ``f``. The
    text guidance thus flows the way the decoder reads the pyramid, from the deep map to the detailed ones. The
    gates are keyed by stage number, so checkpoint keys are ``lqga.<stage>.*`` as for unchained gates.
    """

    def __init__(self, stages: list[int], dim: int, text_dim: int, heads: int = 8) -> None:
        order = sorted(set(stages), reverse=True)
        super().__init__({str(stage): LanguageQueryGate(dim, text_dim, heads) for stage in order})
        self.order = order

    def forward(self, pyramid: list[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid with each gated stage (1-based) replaced by its level's Z."""
        pyramid = list(pyramid)
        carried = None
        for stage in self.order:
            level = stage - 1
            carried = self[str(stage)](pyramid[level], text, carried)
            pyramid[level] = carried
        return pyramid
