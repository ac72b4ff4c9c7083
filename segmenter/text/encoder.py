"""Frozen open_clip text towers that see whole captions (75-token chunks, averaged normalised embeddings)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from manifests.errors import InputError

# encoder id -> (open_clip model name, pretrained tag); RemoteCLIP ships open_clip-format checkpoints.
TEXT_ENCODERS: dict[str, tuple[str, str | None]] = {
    "clip-vit-b16": ("ViT-B-16", "openai"),
    "clip-vit-l14": ("ViT-L-14", "openai"),
    "remoteclip-vit-b32": ("ViT-B-32", None),
    "test-tiny-clip": ("segmenter-test-tiny-clip", None),
}
TINY_TEXT_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _register_tiny_config() -> None:
    folder = Path(tempfile.gettempdir()) / "segmenter-open-clip-configs"
    folder.mkdir(exist_ok=True)
    path = folder / "segmenter-test-tiny-clip.json"
    path.write_text(json.dumps(TINY_TEXT_CONFIG))
    open_clip.add_model_config(path)


class TextEncoder(nn.Module):
    """A frozen CLIP text tower; ``encode`` counts its calls so tests can see the cache at work."""

    def __init__(
        self, encoder: str, checkpoint: str | None = None, device: str = "cpu", random_weights: bool = False
    ) -> None:
        super().__init__()
        if encoder not in TEXT_ENCODERS:
            raise InputError(f"text encoder '{encoder}' unknown (expected one of {sorted(TEXT_ENCODERS)})")
        name, tag = TEXT_ENCODERS[encoder]
        if encoder == "test-tiny-clip":
            _register_tiny_config()
            torch.manual_seed(0)  # random but reproducible: the same features in every process
        if encoder == "remoteclip-vit-b32" and not checkpoint:
            raise InputError("text_checkpoint: remoteclip-vit-b32 needs the RemoteCLIP-ViT-B-32.pt file")
        if checkpoint and not Path(checkpoint).is_file():
            raise InputError(f"text_checkpoint: {checkpoint} not found")
        pretrained = None if random_weights else checkpoint or tag  # random: benchmarks, no download
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        weights = "random" if random_weights else Path(checkpoint).name if checkpoint else tag or "seed0"
        self.encoder_id = f"{encoder}:{weights}"
        self.dim = (
            int(model.text_projection.shape[-1]) if model.text_projection is not None else TINY_TEXT_CONFIG["embed_dim"]
        )
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _chunks(self, text: str) -> list[list[int]]:
        tokens = self.tokenizer.encode(text)
        width = self.tokenizer.context_length - 2
        return [tokens[start : start + width] for start in range(0, len(tokens), width)] or [[]]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``(N, D)`` normalised embeddings; a caption over 77 tokens is the mean of its chunk embeddings."""
        self.calls += 1
        context = self.tokenizer.context_length
        rows, owners = [], []
        for index, text in enumerate(texts):
            for chunk in self._chunks(text):
                ids = [self.tokenizer.sot_token_id, *chunk, self.tokenizer.eot_token_id]
                rows.append(ids + [0] * (context - len(ids)))
                owners.append(index)
        features = F.normalize(self.model.encode_text(torch.tensor(rows, device=self.device)).float(), dim=-1)
        pooled = torch.zeros(len(texts), features.shape[-1], device=features.device)
        pooled.index_add_(0, torch.tensor(owners, device=features.device), features)
        return F.normalize(pooled, dim=-1).cpu()
