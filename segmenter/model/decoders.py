"""Decoders from the 4-level pyramid (strides 4/8/16/32) to class logits at the input resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(True)
    )


class UNetDecoder(nn.Module):
    """Upsample the deepest map and merge the three skip features (strides 16, 8, 4), U-Net style."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList([_block(dim * 2, dim) for _ in range(3)])
        self.head = nn.Conv2d(dim, num_classes, 1)

    def forward(self, pyramid: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``(B, K, *size)`` logits from the pyramid (strides 4 to 32)."""
        x = pyramid[3]
        for stage, skip in zip(self.stages, reversed(pyramid[:3]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], dim=1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


class FPNDecoder(nn.Module):
    """Top-down pathway with lateral connections, all levels merged at stride 4."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(dim, dim, 1) for _ in range(4)])
        self.smooth = nn.ModuleList([_block(dim, dim) for _ in range(4)])
        self.head = nn.Conv2d(dim, num_classes, 1)

    def forward(self, pyramid: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``(B, K, *size)`` logits from the pyramid (strides 4 to 32)."""
        laterals = [lateral(feature) for lateral, feature in zip(self.lateral, pyramid, strict=True)]
        for level in range(3, 0, -1):
            laterals[level - 1] = laterals[level - 1] + F.interpolate(
                laterals[level], size=laterals[level - 1].shape[-2:], mode="nearest"
            )
        target = laterals[0].shape[-2:]
        merged = sum(
            F.interpolate(smooth(x), size=target, mode="bilinear", align_corners=False)
            for smooth, x in zip(self.smooth, laterals, strict=True)
        )
        return F.interpolate(self.head(merged), size=size, mode="bilinear", align_corners=False)


class PixelUpDecoder(nn.Module):
    """No skips: a head on the deepest map, upsampled straight to the input size."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Sequential(_block(dim, dim), nn.Conv2d(dim, num_classes, 1))

    def forward(self, pyramid: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``(B, K, *size)`` logits from the deepest map alone."""
        return F.interpolate(self.head(pyramid[3]), size=size, mode="bilinear", align_corners=False)


DECODERS = {"unet": UNetDecoder, "fpn": FPNDecoder, "pixelup": PixelUpDecoder}
