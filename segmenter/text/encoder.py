"""Frozen open_clip text towers that see whole captions (``caption_pipeline.clip_models`` does the encoding)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from caption_pipeline.clip_models import (
    TINY_CLIP_CONFIG,
    ChunkedTextEncoder,
    ClipWeights,
    create_clip,
    register_tiny_config,
)
from manifests.errors import InputError

TINY_ENCODER = "test-tiny-clip"
# encoder id -> (open_clip model name, where its weights come from). The origin decides the activation: the
# OpenAI weights and RemoteCLIP (fine-tuned from them) need QuickGELU; RemoteCLIP ships open_clip checkpoints.
TEXT_ENCODERS: dict[str, tuple[str, str | None]] = {
    "clip-vit-b16": ("ViT-B-16", "openai"),
    "clip-vit-l14": ("ViT-L-14", "openai"),
    "remoteclip-vit-b32": ("ViT-B-32", "remoteclip"),
    TINY_ENCODER: ("segmenter-test-tiny-clip", None),
}
NEEDS_CHECKPOINT = {"remoteclip-vit-b32": "the RemoteCLIP-ViT-B-32.pt file"}


def text_encoder_weights(encoder: str, checkpoint: str | Path | None = None) -> ClipWeights:
    """The network and weights of a text encoder id (its activation is known without loading anything).

    Raises:
        InputError: an unknown encoder id.
    """
    if encoder not in TEXT_ENCODERS:
        raise InputError(f"text encoder '{encoder}' unknown (expected one of {sorted(TEXT_ENCODERS)})")
    name, origin = TEXT_ENCODERS[encoder]
    return ClipWeights(name, origin, Path(checkpoint) if checkpoint else None)


class TextEncoder(nn.Module):
    """A frozen CLIP text tower; ``encode`` counts its calls so tests can see the cache at work."""

    def __init__(
        self,
        encoder: str,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        random_weights: bool = False,
    ) -> None:
        super().__init__()
        weights = text_encoder_weights(encoder, checkpoint)
        if encoder == TINY_ENCODER:
            register_tiny_config(weights.model)
        seeded = encoder == TINY_ENCODER and not checkpoint  # random but reproducible: same features in every process
        if seeded:
            torch.manual_seed(0)
        if encoder in NEEDS_CHECKPOINT and not checkpoint and not random_weights:
            raise InputError(f"text_checkpoint: {encoder} needs {NEEDS_CHECKPOINT[encoder]}")
        if checkpoint and not Path(checkpoint).is_file():
            raise InputError(f"text_checkpoint: {checkpoint} not found")
        # random weights (benchmarks): the same network, nothing downloaded
        loaded = not (random_weights or seeded)
        model, _ = create_clip(weights, device, load_weights=loaded, transforms=False)
        self.model = model.requires_grad_(False)
        self.chunked = ChunkedTextEncoder(self.model, weights.model)
        label = weights.weights_label if loaded else "seed0" if seeded else "random"
        # the activation is part of the id, so features of a network built with the other one are never reused
        self.encoder_id = f"{encoder}:{label}:{weights.activation}"
        projection = getattr(model, "text_projection", None)
        self.dim = int(projection.shape[-1]) if projection is not None else TINY_CLIP_CONFIG["embed_dim"]
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return self.chunked.device

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``(N, D)`` normalised embeddings on the CPU; a caption over 77 tokens is the mean of its chunks."""
        self.calls += 1
        return self.chunked.encode(texts)[0].cpu()
