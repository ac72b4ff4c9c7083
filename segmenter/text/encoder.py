"""Frozen text encoders that see whole captions: CLIP towers (open_clip), the FLAN-T5 encoder of BLIP-2
(transformers) and the dino.txt text tower of DINOv3. Each turns captions into one normalised vector per caption,
long captions chunked to the encoder's own context length."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import nn

from caption_pipeline.clip_models import (
    TEXT_POOLINGS,
    TINY_CLIP_CONFIG,
    ChunkedTextEncoder,
    ClipWeights,
    create_clip,
    register_tiny_config,
)
from manifests.errors import InputError

TINY_ENCODER = "test-tiny-clip"
TINY_DINOTXT = "test-tiny-dinotxt"
Family = Literal["clip", "flan-t5", "dinotxt"]


@dataclass(frozen=True)
class TextEncoderSpec:
    """Where an encoder id's network and weights come from.

    Attributes:
        family: the library that builds it.
        source: the open_clip model name (CLIP) or the hub id (FLAN-T5); ``text_checkpoint`` replaces a hub id.
        origin: the open_clip weights tag; it decides the activation (OpenAI weights and RemoteCLIP need QuickGELU).
        needs_checkpoint: what ``text_checkpoint`` must name when the weights are not on a hub.
    """

    family: Family
    source: str | None = None
    origin: str | None = None
    needs_checkpoint: str | None = None


TEXT_ENCODERS: dict[str, TextEncoderSpec] = {
    "clip-vit-b16": TextEncoderSpec("clip", "ViT-B-16", "openai"),
    "clip-vit-l14": TextEncoderSpec("clip", "ViT-L-14", "openai"),
    "remoteclip-vit-b32": TextEncoderSpec("clip", "ViT-B-32", "remoteclip", "the RemoteCLIP-ViT-B-32.pt file"),
    "blip2-flan-t5-xl": TextEncoderSpec("flan-t5", "Salesforce/blip2-flan-t5-xl"),
    "dinotxt-vitl16": TextEncoderSpec(
        "dinotxt",
        needs_checkpoint="the dino.txt file of the DINOv3 release (dinov3_vitl16_dinotxt_vision_head_and_text_encoder"
        "-*.pth; gated: request it on Meta's DINOv3 download page, https://ai.meta.com/resources/models-and-libraries/"
        "dinov3-downloads/)",
    ),
    TINY_ENCODER: TextEncoderSpec("clip", "segmenter-test-tiny-clip"),
    TINY_DINOTXT: TextEncoderSpec("dinotxt"),
}


def text_encoder_spec(encoder: str) -> TextEncoderSpec:
    """The spec of an encoder id.

    Raises:
        InputError: an unknown encoder id.
    """
    if encoder not in TEXT_ENCODERS:
        raise InputError(f"text encoder '{encoder}' unknown (expected one of {sorted(TEXT_ENCODERS)})")
    return TEXT_ENCODERS[encoder]


def text_encoder_weights(encoder: str, checkpoint: str | Path | None = None) -> ClipWeights:
    """The network and weights of a CLIP text encoder id (its activation is known without loading anything).

    Raises:
        InputError: an unknown encoder id, or one that is not a CLIP tower.
    """
    spec = text_encoder_spec(encoder)
    if spec.family != "clip" or spec.source is None:
        raise InputError(f"text encoder '{encoder}' is a {spec.family} encoder, not a CLIP tower")
    return ClipWeights(spec.source, spec.origin, Path(checkpoint) if checkpoint else None)


def check_text_weights(encoder: str, checkpoint: str | Path | None, random_weights: bool = False) -> TextEncoderSpec:
    """The spec of an encoder id whose local weights are given where it needs them (before anything is built).

    Raises:
        InputError: an unknown id, a checkpoint that does not exist, or none where the weights are on no hub.
    """
    spec = text_encoder_spec(encoder)
    if spec.needs_checkpoint and not checkpoint and not random_weights:
        raise InputError(f"--text-checkpoint: text encoder {encoder} needs {spec.needs_checkpoint}")
    if checkpoint and not Path(checkpoint).exists():
        raise InputError(f"--text-checkpoint: {checkpoint} not found")
    return spec


def text_feature_width(encoder: str, checkpoint: str | Path | None = None) -> int | None:
    """The width of an encoder's features, read from its configuration (no weights are loaded); None for CLIP
    towers, whose presets set ``text_dim`` to the tower's width.

    Raises:
        InputError: an unknown encoder id, or a FLAN-T5 source whose configuration cannot be found.
    """
    spec = text_encoder_spec(encoder)
    if spec.family == "flan-t5":
        from segmenter.text.flan_t5 import flan_t5_width

        return flan_t5_width(str(checkpoint) if checkpoint else str(spec.source))
    if spec.family == "dinotxt":
        from segmenter.text.dinotxt import DINOTXT_TINY, DINOTXT_VITL16

        return (DINOTXT_TINY if encoder == TINY_DINOTXT else DINOTXT_VITL16).output_dim
    return None


class _Backend(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor: ...


class _ClipBackend:
    """A frozen open_clip text tower; a caption over 77 tokens is the mean of its chunks."""

    def __init__(
        self, encoder: str, checkpoint: str | None, device: str | torch.device, random_weights: bool, pooling: str
    ) -> None:
        weights = text_encoder_weights(encoder, checkpoint)
        if encoder == TINY_ENCODER:
            register_tiny_config(weights.model)
        seeded = encoder == TINY_ENCODER and not checkpoint  # random but reproducible: same features in every process
        if seeded:
            torch.manual_seed(0)
        # random weights (benchmarks): the same network, nothing downloaded
        loaded = not (random_weights or seeded)
        model, _ = create_clip(weights, device, load_weights=loaded, transforms=False)
        self.model = model.requires_grad_(False)
        self.chunked = ChunkedTextEncoder(self.model, weights.model, pooling)
        label = weights.weights_label if loaded else "seed0" if seeded else "random"
        # the activation is part of the id, so features of a network built with the other one are never reused
        self.label = f"{label}:{weights.activation}"
        projection = getattr(model, "text_projection", None)
        self.dim = int(projection.shape[-1]) if projection is not None else TINY_CLIP_CONFIG["embed_dim"]
        self.device = self.chunked.device

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.chunked.encode(texts)[0]


def _flan_t5_backend(
    spec: TextEncoderSpec, checkpoint: str | None, device: str | torch.device, random_weights: bool, pooling: str
) -> tuple[_Backend, str]:
    from segmenter.text.flan_t5 import FlanT5TextEncoder

    source = checkpoint or str(spec.source)
    backend = FlanT5TextEncoder(source, device=device, random_weights=random_weights, pooling=pooling)
    return backend, backend.weights_label


def _dinotxt_backend(
    encoder: str, checkpoint: str | None, device: str | torch.device, random_weights: bool, pooling: str
) -> tuple[_Backend, str]:
    from segmenter.text.dinotxt import DINOTXT_TINY, DINOTXT_VITL16, DinoTxtTextEncoder

    config = DINOTXT_TINY if encoder == TINY_DINOTXT else DINOTXT_VITL16
    seeded = encoder == TINY_DINOTXT and not checkpoint
    if seeded:
        torch.manual_seed(0)
    random = random_weights or seeded
    backend = DinoTxtTextEncoder(checkpoint, config, device=device, random_weights=random, pooling=pooling)
    return backend, "seed0" if seeded else backend.weights_label


class TextEncoder(nn.Module):
    """A frozen text encoder of any family; ``encode`` counts its calls so tests can see the cache at work.

    ``weights_id`` names the network and its weights (and, for CLIP, the activation): a run records it and
    evaluation refuses other weights. ``encoder_id``, the text-feature id, adds the ``pooling`` of captions longer than
    the context (``TEXT_POOLINGS``): the text-feature cache keys on it, so features of two encoders, of two
    checkpoints of one, or of two poolings never mix (a cache written before the pooling was part of the id is not
    read: its features are computed again).
    """

    def __init__(
        self,
        encoder: str,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        random_weights: bool = False,
        pooling: str = "chunk_mean",
    ) -> None:
        super().__init__()
        if pooling not in TEXT_POOLINGS:
            raise InputError(f"text pooling '{pooling}' unknown (expected one of {', '.join(TEXT_POOLINGS)})")
        spec = check_text_weights(encoder, checkpoint, random_weights)
        path = str(checkpoint) if checkpoint else None
        if spec.family == "clip":
            clip = _ClipBackend(encoder, path, device, random_weights, pooling)
            backend, label = clip, clip.label
        elif spec.family == "flan-t5":
            backend, label = _flan_t5_backend(spec, path, device, random_weights, pooling)
        else:
            backend, label = _dinotxt_backend(encoder, path, device, random_weights, pooling)
        self.backend = backend
        self.family = spec.family
        self.pooling = pooling
        self.weights_id = f"{encoder}:{label}"
        self.encoder_id = f"{self.weights_id}:{pooling}"
        self.dim = int(backend.dim)
        self.calls = 0

    @property
    def device(self) -> torch.device:
        """The device the encoder runs on."""
        return torch.device(self.backend.device)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``(N, D)`` normalised embeddings on the CPU; a caption over the encoder's context is the mean of its
        chunks."""
        self.calls += 1
        return self.backend.encode(texts).float().cpu()
