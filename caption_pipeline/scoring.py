"""CLIP agreement between a tile and a caption: ``similarity = cos / 2 + 1 / 2`` (eq. 2 of the supplement).

Each tile image is encoded once per scorer however many captions it gets. Captions are encoded whole
(``clip_models.ChunkedTextEncoder``); the network's activation follows its weights (``clip_models.ClipWeights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from caption_pipeline.clip_models import ChunkedTextEncoder, ClipWeights, create_clip, register_config
from caption_pipeline.experts.base import load_image
from manifests.devices import resolve_device
from manifests.run_manifest import ClipConfig


@dataclass(frozen=True)
class Score:
    raw_cosine: float
    similarity: float
    n_tokens: int
    n_chunks: int


def clip_weights(config: ClipConfig) -> ClipWeights:
    """The network and weights a manifest's ``captions.clip`` names (its ``model_id`` is known before loading)."""
    return ClipWeights(config.model, config.pretrained, config.checkpoint, config.quick_gelu)


def normalized_similarity(cosine: torch.Tensor | float):
    """Eq. 2: maps a cosine in [-1, 1] to [0, 1]."""
    return cosine / 2 + 0.5


class ClipScorer:
    """Scores captions against tile images, caching each image embedding by the tile's pixel hash."""

    def __init__(self, config: ClipConfig) -> None:
        self.config = config
        weights = clip_weights(config)
        self.model_id = weights.model_id
        self.device = resolve_device(config.device, source="captions.clip.device")
        if config.config is not None:
            register_config(config.config)
        self.model, self.preprocess = create_clip(weights, self.device)
        self.text_encoder = ChunkedTextEncoder(self.model, config.model)
        self.image_encodes = 0
        self._images: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def image_embeddings(self, keys: list[str], paths: list[Path]) -> torch.Tensor:
        """Normalised embeddings of the images; only images not seen before are encoded."""
        todo = {key: path for key, path in zip(keys, paths, strict=True) if key not in self._images}
        items = list(todo.items())
        for start in range(0, len(items), self.config.batch_size):
            batch = items[start : start + self.config.batch_size]
            pixels = torch.stack([self.preprocess(load_image(path)) for _, path in batch]).to(self.device)
            features = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
            self.image_encodes += len(batch)
            for (key, _), feature in zip(batch, features, strict=True):
                self._images[key] = feature
        return torch.stack([self._images[key] for key in keys])

    def score(self, keys: list[str], paths: list[Path], captions: list[str]) -> list[Score]:
        """Eq. 2 similarity of each caption to its image (keys identify images, e.g. their sha256)."""
        if not captions:
            return []
        images = self.image_embeddings(keys, paths)
        texts, n_tokens, n_chunks = self.text_encoder.encode(captions)
        cosines = (images * texts).sum(-1).clamp(-1, 1).tolist()
        return [
            Score(cosine, normalized_similarity(cosine), tokens, chunks)
            for cosine, tokens, chunks in zip(cosines, n_tokens, n_chunks, strict=True)
        ]
