"""CLIP agreement between a tile and a caption: ``similarity = cos / 2 + 1 / 2`` (eq. 2 of the supplement).

Each tile image is encoded once per scorer however many captions it gets. A contrastive gate also asks how well each
caption fits the other tiles of its shard (``ClipScorer.score(..., pool=...)``): the shard's image embeddings are
cached like any other, so that costs one matrix product per call. Captions are encoded whole
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
    """A caption's agreement with its tile.

    Attributes:
        raw_cosine: the cosine of the caption's and the tile's embeddings.
        similarity: eq. 2 of that cosine.
        n_tokens: the caption's tokens.
        n_chunks: the 75-token chunks it was encoded in.
        others: the mean eq. 2 similarity of the caption to the other tiles of the pool it was scored against; None
            when it was scored without a pool, or the pool holds no other tile.
    """

    raw_cosine: float
    similarity: float
    n_tokens: int
    n_chunks: int
    others: float | None = None


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

    def score(
        self, keys: list[str], paths: list[Path], captions: list[str], pool: tuple[list[str], list[Path]] | None = None
    ) -> list[Score]:
        """Eq. 2 similarity of each caption to its image (keys identify images, e.g. their sha256).

        Args:
            keys: the key of each caption's image.
            paths: the path of each caption's image.
            captions: the captions.
            pool: (keys, paths) of the images to contrast with (a shard's tiles): each caption's ``others`` is its
                mean eq. 2 similarity to the pool's images whose key is not its own; None leaves ``others`` None.
        """
        if not captions:
            return []
        images = self.image_embeddings(keys, paths)
        texts, n_tokens, n_chunks = self.text_encoder.encode(captions)
        cosines = (images * texts).sum(-1).clamp(-1, 1).tolist()
        others: list[float | None] = [None] * len(captions)
        if pool is not None:
            pool_keys = list(dict.fromkeys(pool[0]))  # each image once
            paths_by_key = dict(zip(pool[0], pool[1], strict=True))
            shard = self.image_embeddings(pool_keys, [paths_by_key[key] for key in pool_keys])
            similarity = normalized_similarity((texts @ shard.T).clamp(-1, 1))  # captions x pool images
            other = torch.tensor(
                [[key != own for key in pool_keys] for own in keys], dtype=torch.bool, device=similarity.device
            )
            counts = other.sum(-1)
            means = (similarity * other).sum(-1) / counts.clamp(min=1)
            others = [
                float(mean) if count else None for mean, count in zip(means.tolist(), counts.tolist(), strict=True)
            ]
        return [
            Score(cosine, normalized_similarity(cosine), tokens, chunks, other)
            for cosine, tokens, chunks, other in zip(cosines, n_tokens, n_chunks, others, strict=True)
        ]
