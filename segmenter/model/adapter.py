"""The adapter on the deepest fused features: DilateFormer blocks (SWDA) or plain multi-head self-attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segmenter.model.config import SegmenterConfig
from segmenter.model.swda import swda


class ChannelsLastNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each pixel's channels."""
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SlidingDilatedAttention(nn.Module):
    """qkv projection, SWDA per head, output projection."""

    def __init__(self, dim: int, heads: int, kernel: int = 3, dilation: int = 1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.kernel, self.dilation = heads, kernel, dilation
        self.qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of every pixel over its dilated 3 x 3 neighbourhood (SWDA), per head."""
        batch, dim, height, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, 3, self.heads, dim // self.heads, height, width).unbind(1)
        out = swda(q, k, v, self.kernel, self.dilation)
        return self.proj(out.reshape(batch, dim, height, width))


class SelfAttention(nn.Module):
    """Global multi-head self-attention over all pixels (the supplement's MHSA row), via fused SDPA kernels."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of every pixel over all pixels, per head."""
        batch, dim, height, width = x.shape
        qkv = self.qkv(x).reshape(batch, 3, self.heads, dim // self.heads, height * width).transpose(-1, -2)
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (B, h, HW, d)
        return self.proj(out.transpose(-1, -2).reshape(batch, dim, height, width))


class AttentionBlock(nn.Module):
    """DilateFormer block: optional depth-wise conv position encoding, x + Attn(LN x), x + MLP(LN x)."""

    def __init__(self, attention: nn.Module, dim: int, position_encoding: bool = True, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.position = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if position_encoding else None
        self.norm1 = ChannelsLastNorm(dim)
        self.attention = attention
        self.norm2 = ChannelsLastNorm(dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, dim * mlp_ratio, 1), nn.GELU(), nn.Conv2d(dim * mlp_ratio, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + attention(LN x)`` then ``x + MLP(LN x)``, after the depth-wise position encoding."""
        if self.position is not None:
            x = x + self.position(x)
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def build_adapter(config: SegmenterConfig) -> nn.Module:
    """The adapter of a configuration: ``adapter_depth`` attention blocks (SWDA or MHSA) on the deepest map, or none."""
    if config.adapter == "none":
        return nn.Identity()
    dim, heads = config.dim, config.adapter_heads
    blocks = []
    for _ in range(config.adapter_depth):
        if config.adapter == "swda":
            attention: nn.Module = SlidingDilatedAttention(dim, heads, config.adapter_kernel, config.dilation)
        else:
            attention = SelfAttention(dim, heads)
        blocks.append(AttentionBlock(attention, dim, config.position_encoding))
    return nn.Sequential(*blocks)
