"""LQGA: the fused text token queries the visual map and returns channel weights that re-scale it.

``w = xi(softmax(q K^T / sqrt(d)) V)`` with q from the text token and K, V from the visual map, where
``xi`` is mean normalisation ``(a - mean(a)) / (max(a) - min(a))``; then ``F' = w * F + F`` and
``Z = Conv1x1([F', F])``.
"""

from __future__ import annotations

import torch
from torch import nn


def mean_normalize(values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(a - mean(a)) / (max(a) - min(a))`` over the last dimension: weights in [-1, 1], centred on 0."""
    spread = values.amax(-1, keepdim=True) - values.amin(-1, keepdim=True)
    return (values - values.mean(-1, keepdim=True)) / (spread + eps)


class LanguageQueryGate(nn.Module):
    def __init__(self, dim: int, text_dim: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads if dim % heads == 0 else 1
        self.query = nn.Linear(text_dim, dim)
        self.key = nn.Conv2d(dim, dim, 1)
        self.value = nn.Conv2d(dim, dim, 1)
        self.fuse = nn.Conv2d(dim * 2, dim, 1)

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        batch, dim, height, width = features.shape
        head_dim = dim // self.heads
        q = self.query(text).view(batch, self.heads, 1, head_dim)
        k = self.key(features).view(batch, self.heads, head_dim, height * width)
        v = self.value(features).view(batch, self.heads, head_dim, height * width)
        attention = ((q @ k) * head_dim**-0.5).softmax(-1)  # (B, h, 1, HW)
        pooled = (attention @ v.transpose(-1, -2)).reshape(batch, dim)
        weights = mean_normalize(pooled).view(batch, dim, 1, 1)
        gated = weights * features + features
        return self.fuse(torch.cat([gated, features], dim=1))
