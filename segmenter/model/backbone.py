"""Frozen timm DINOv3 ViT: features of 4 evenly spaced blocks turned into a pyramid at strides 4/8/16/32."""

from __future__ import annotations

import timm
import torch
from torch import nn

from segmenter.model.config import SegmenterConfig


def create_dinov3(config: SegmenterConfig) -> nn.Module:
    """The timm model from a hub id (``arch.tag``), with weights from the hub or a local file."""
    kwargs = {"pretrained": config.backbone_pretrained or bool(config.backbone_file), "num_classes": 0}
    if config.backbone_file:
        kwargs["pretrained_cfg_overlay"] = {"file": config.backbone_file}
    return timm.create_model(config.backbone, dynamic_img_size=True, **kwargs)


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-16 map to strides 4 (2 deconvs), 8, 16 and 32 (pool)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()

        def project(*layers: nn.Module) -> nn.Sequential:
            return nn.Sequential(*layers, nn.Conv2d(in_dim, dim, 1), nn.GroupNorm(1, dim))

        self.levels = nn.ModuleList(
            [
                project(nn.ConvTranspose2d(in_dim, in_dim, 2, 2), nn.GELU(), nn.ConvTranspose2d(in_dim, in_dim, 2, 2)),
                project(nn.ConvTranspose2d(in_dim, in_dim, 2, 2)),
                project(),
                project(nn.MaxPool2d(2)),
            ]
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [level(feature) for level, feature in zip(self.levels, features, strict=True)]


class DinoV3Backbone(nn.Module):
    """Frozen DINOv3 (always in eval mode, never trained) plus a trainable simple pyramid."""

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.vit = create_dinov3(config)
        self.vit.requires_grad_(False)
        depth = len(self.vit.blocks)
        self.indices = [depth * (i + 1) // 4 - 1 for i in range(4)]
        cfg = self.vit.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.pyramid = SimplePyramid(self.vit.embed_dim, config.dim)

    def train(self, mode: bool = True) -> DinoV3Backbone:
        super().train(mode)
        self.vit.eval()
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to the backbone's pretrained normalisation."""
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            blocks = self.vit.forward_intermediates(
                self.normalize(images), indices=self.indices, intermediates_only=True
            )
        return self.pyramid([block.detach() for block in blocks])
