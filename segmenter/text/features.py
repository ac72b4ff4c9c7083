"""Per-tile, per-expert text features from a caption store: the segmenter's text input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from manifests.caption_store import selected_captions
from segmenter.text.cache import TextFeatureCache


@dataclass
class ExpertTextFeatures:
    """``features[tile_id]`` is ``(M, D)``; ``present[tile_id]`` ``(M,)`` marks the experts with captions."""

    experts: list[str]
    features: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]

    def lookup(self, tile_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a tile; a tile the store lacks has every expert masked."""
        if tile_id in self.features:
            return self.features[tile_id], self.present[tile_id]
        dim = next(iter(self.features.values())).shape[-1] if self.features else 1
        return torch.zeros(len(self.experts), dim), torch.zeros(len(self.experts), dtype=torch.bool)


def expert_text_features(
    store: str | Path, experts: list[str], cache: TextFeatureCache, passed_only: bool = True
) -> ExpertTextFeatures:
    """Pool each expert's selected captions of a tile (its prompts) into one normalised vector.

    With ``passed_only`` (the paper's filter) captions that failed the CLIP gate are left out; an expert with no
    caption left for a tile is masked for that tile.
    """
    frame = selected_captions(store)
    frame = frame[frame["expert"].isin(experts) & frame["caption"].fillna("").str.strip().ne("")]
    if passed_only:
        frame = frame[frame["passed"]]
    vectors = cache.embeddings(frame["caption"].tolist())
    dim = vectors.shape[-1] if len(frame) else cache.encoder.dim
    features: dict[str, torch.Tensor] = {}
    present: dict[str, torch.Tensor] = {}
    slot = {name: i for i, name in enumerate(experts)}
    rows = frame.reset_index(drop=True)
    for (tile_id, expert), group in rows.groupby(["tile_id", "expert"]):
        if tile_id not in features:
            features[tile_id] = torch.zeros(len(experts), dim)
            present[tile_id] = torch.zeros(len(experts), dtype=torch.bool)
        features[tile_id][slot[expert]] = F.normalize(vectors[group.index].mean(0), dim=-1)
        present[tile_id][slot[expert]] = True
    return ExpertTextFeatures(list(experts), features, present)
