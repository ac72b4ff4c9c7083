"""LDPE: a lightweight trainable CNN detail prior at strides 4/8/16, added to the DINOv3 pyramid."""

from __future__ import annotations

import torch
from torch import nn


def _conv(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.GELU()
    )


class DetailPrior(nn.Module):
    """Stem to stride 4, then stride 8 and 16; each level is projected to the pyramid width."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(3, width, 2), _conv(width, width, 2))
        self.down8 = _conv(width, width * 2, 2)
        self.down16 = _conv(width * 2, width * 4, 2)
        self.project = nn.ModuleList([nn.Conv2d(c, dim, 1) for c in (width, width * 2, width * 4)])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The detail priors at strides 4, 8 and 16, projected to the model width."""
        s4 = self.stem(images)
        s8 = self.down8(s4)
        s16 = self.down16(s8)
        return [project(feature) for project, feature in zip(self.project, (s4, s8, s16), strict=True)]
