"""DMTE: dynamic mixture of text experts, fusing M expert caption embeddings into one text token.

One linguistic-attention layer over the expert tokens, then ``G = sigmoid(g(mean_m Phi_m))`` and
``T = sum_m W_m G_m Phi_m`` with learnable ``W``; masked (missing) experts take no part anywhere.
"""

from __future__ import annotations

import torch
from torch import nn


class DynamicTextExperts(nn.Module):
    """DMTE: a linguistic-attention layer over the M expert tokens, a gate per expert and their weighted sum."""

    def __init__(self, dim: int, n_experts: int, heads: int = 8) -> None:
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, n_experts)
        self.weights = nn.Parameter(torch.full((n_experts,), 1.0 / n_experts))

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse ``tokens`` ``(B, M, D)`` where ``present`` ``(B, M)`` is True; returns ``T (B, D)`` and ``G (B, M)``.

        A sample with no expert at all gets ``T = 0`` and zero gates.
        """
        present = present.bool()
        any_present = present.any(1, keepdim=True)
        keys_missing = ~present & any_present  # a row with no expert attends freely (no NaN) and is zeroed below
        attended, _ = self.attention(tokens, tokens, tokens, key_padding_mask=keys_missing, need_weights=False)
        tokens = self.norm(tokens + attended)
        weight = present.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * weight).sum(1) / weight.sum(1).clamp(min=1)
        gates = torch.sigmoid(self.gate(mean)) * present.to(tokens.dtype)
        fused = ((self.weights * gates).unsqueeze(-1) * tokens * weight).sum(1)
        return fused, gates
