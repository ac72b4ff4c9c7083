"""CLIP agreement between a tile and a caption: ``similarity = cos / 2 + 1 / 2`` (eq. 2 of the supplement).

Each tile image is encoded once per scorer however many captions it gets. Captions longer than CLIP's context
are split into chunks of ``context - 2`` BPE tokens whose normalised embeddings are averaged (``n_chunks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from caption_pipeline.experts.base import load_image
from manifests.errors import InputError
from manifests.run_manifest import ClipConfig


@dataclass(frozen=True)
class Score:
    raw_cosine: float
    similarity: float
    n_tokens: int
    n_chunks: int


def normalized_similarity(cosine: torch.Tensor | float):
    """Eq. 2: maps a cosine in [-1, 1] to [0, 1]."""
    return cosine / 2 + 0.5


def load_open_clip(config: ClipConfig, device: torch.device):
    """An open_clip model, its image transform and tokenizer, from a name + tag, a local checkpoint or config.

    Raises:
        InputError: a configured local config or checkpoint is missing.
    """
    if config.config is not None:
        if not config.config.exists():
            raise InputError(f"captions.clip.config: {config.config} not found (an open_clip JSON config)")
        open_clip.add_model_config(config.config)
    if config.checkpoint is not None and not config.checkpoint.is_file():
        raise InputError(f"captions.clip.checkpoint: {config.checkpoint} not found")
    pretrained = str(config.checkpoint) if config.checkpoint else config.pretrained
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(config.model, pretrained=pretrained, device=device)
    except RuntimeError as exc:
        raise InputError(f"captions.clip: cannot load {config.model} ({pretrained}): {exc}".splitlines()[0]) from None
    return model.eval(), preprocess, open_clip.get_tokenizer(config.model)


class ChunkedTextEncoder:
    """CLIP text embeddings that see the whole caption, not only its first 77 tokens."""

    def __init__(self, model, tokenizer, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.context = getattr(tokenizer, "context_length", 77)

    def token_chunks(self, text: str) -> list[list[int]]:
        tokens = self.tokenizer.encode(text)
        width = self.context - 2
        return [tokens[start : start + width] for start in range(0, len(tokens), width)] or [[]]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, list[int], list[int]]:
        """Normalised embeddings of ``texts``, their BPE token counts and chunk counts."""
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        rows, owners, n_tokens, n_chunks = [], [], [], []
        for index, text in enumerate(texts):
            chunks = self.token_chunks(text)
            n_tokens.append(sum(len(chunk) for chunk in chunks))
            n_chunks.append(len(chunks))
            for chunk in chunks:
                row = torch.zeros(self.context, dtype=torch.long)
                ids = [sot, *chunk, eot]
                row[: len(ids)] = torch.tensor(ids)
                rows.append(row)
                owners.append(index)
        features = F.normalize(self.model.encode_text(torch.stack(rows).to(self.device)).float(), dim=-1)
        pooled = torch.zeros(len(texts), features.shape[-1], device=features.device)
        pooled.index_add_(0, torch.tensor(owners, device=features.device), features)
        return F.normalize(pooled, dim=-1), n_tokens, n_chunks


class ClipScorer:
    """Scores captions against tile images, caching each image embedding by the tile's pixel hash."""

    def __init__(self, config: ClipConfig) -> None:
        self.config = config
        self.model_id = config.model_id
        requested = config.device
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
        )
        self.model, self.preprocess, tokenizer = load_open_clip(config, self.device)
        self.text_encoder = ChunkedTextEncoder(self.model, tokenizer, self.device)
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
