"""Per-tile, per-expert text features from a caption store: the segmenter's text input.

The experts a model reads are a property of its run: taken from the caption store (or named with
``--experts``) at training, saved in the checkpoint's config and checked against the store at evaluation and
prediction, so a store whose experts are named otherwise never trains or feeds a model that silently sees
no text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from manifests.caption_store import selected_captions
from manifests.errors import InputError
from segmenter.text.cache import TextFeatureCache
from segmenter.text.directions import N_VARIANTS, rewrite_directions


@dataclass
class ExpertTextFeatures:
    """``features[tile_id]`` is ``(V, M, D)`` for V direction variants (1, or 8 with rewritten direction words);
    ``present[tile_id]`` ``(M,)`` marks the experts with captions."""

    experts: list[str]
    features: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    dim: int
    n_variants: int = 1
    # The store's selected rows of these experts (passed or not), for reports that need more than the features.
    rows: pd.DataFrame = field(default_factory=pd.DataFrame)
    # The text encoder, weights and pooling that made the features (``TextEncoder.encoder_id``), and the encoder and
    # weights alone (``TextEncoder.weights_id``: what a run records).
    encoder_id: str = ""
    weights_id: str = ""

    def lookup(self, tile_id: str, variant: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a tile (under a direction variant); a tile the store lacks has every expert masked."""
        if tile_id in self.features:
            return self.features[tile_id][variant if self.n_variants > 1 else 0], self.present[tile_id]
        return torch.zeros(len(self.experts), self.dim), torch.zeros(len(self.experts), dtype=torch.bool)

    def masked_counts(self, tile_ids: list[str]) -> dict[str, int]:
        """Per expert, how many of ``tile_ids`` have no caption of it (masked for those tiles)."""
        counts = dict.fromkeys(self.experts, 0)
        for tile_id in tile_ids:
            present = self.lookup(tile_id)[1]
            for name, flag in zip(self.experts, present.tolist(), strict=True):
                counts[name] += not flag
        return counts


def _read_rows(selected: pd.DataFrame, passed_only: bool) -> pd.DataFrame:
    """The selected rows whose captions the segmenter reads, as the gate recorded them: those that passed (the
    paper's filter; a passed caption is usable), else every usable one."""
    return selected[selected["passed" if passed_only else "usable"]]


def store_experts(selected: pd.DataFrame) -> list[str]:
    """The experts that have selected captions (rows of ``selected_captions``), sorted by name."""
    return sorted(selected["expert"].unique())


def run_experts(store: str | Path, selected: pd.DataFrame, requested: list[str] | None = None) -> list[str]:
    """The experts a new run reads: ``requested`` in that order, else every expert of the store (sorted).

    Args:
        store: the caption store, for messages.
        selected: its selected rows (``selected_captions(store)``, read once by the caller).
        requested: the experts asked for (``--experts``, or a resumed run's record).

    Raises:
        InputError: a requested expert has no caption in the store, or the store has no captions at all.
    """
    available = store_experts(selected)
    if not available:
        raise InputError(f"--captions: caption store {store} holds no selected captions")
    if not requested:
        return available
    missing = [name for name in requested if name not in available]
    if missing:
        raise InputError(f"--experts: caption store {store} has no captions of {missing}; it has {available}")
    return list(requested)


def check_store_experts(store: str | Path, selected: pd.DataFrame, experts: list[str], missing: str) -> list[str]:
    """The run's experts that the store lacks; refuses a store that differs from the run unless ``missing='mask'``.

    Raises:
        InputError: with ``missing='error'``, one line naming the experts the store lacks and those the run does
            not know.
    """
    available = store_experts(selected)
    lacking = [name for name in experts if name not in available]
    unknown = [name for name in available if name not in experts]
    if (lacking or unknown) and missing == "error":
        parts = [f"lacks the run's expert(s) {lacking}"] if lacking else []
        parts += [f"has expert(s) {unknown} the run was not trained with"] if unknown else []
        raise InputError(
            f"--captions: caption store {store} {' and '.join(parts)} (run experts: {experts}); caption with the "
            "run's experts or pass --missing-captions mask"
        )
    return lacking


def expert_text_features(
    store: str | Path | pd.DataFrame,
    experts: list[str],
    cache: TextFeatureCache,
    passed_only: bool = True,
    direction_variants: bool = False,
) -> ExpertTextFeatures:
    """Pool each expert's selected captions of a tile (its prompts) into one normalised vector.

    With ``passed_only`` (the paper's filter) captions that failed the CLIP gate are left out; an expert with no
    caption left for a tile is masked for that tile. With ``direction_variants`` each caption is also encoded
    with its direction words moved by each flip/rotation (for geometric augmentation that keeps captions true).
    ``store`` is a store path or its already read ``selected_captions`` rows.
    """
    selected = store if isinstance(store, pd.DataFrame) else selected_captions(store)
    rows = selected[selected["expert"].isin(experts)].reset_index(drop=True)
    frame = _read_rows(rows, passed_only).reset_index(drop=True)
    n_variants = N_VARIANTS if direction_variants else 1
    captions = frame["caption"].tolist()
    texts = [rewrite_directions(caption, variant) for variant in range(n_variants) for caption in captions]
    vectors = cache.embeddings(texts).reshape(n_variants, len(captions), -1) if captions else None
    dim = vectors.shape[-1] if vectors is not None else cache.encoder.dim
    features: dict[str, torch.Tensor] = {}
    present: dict[str, torch.Tensor] = {}
    slot = {name: i for i, name in enumerate(experts)}
    for (tile_id, expert), group in frame.groupby(["tile_id", "expert"]):
        if tile_id not in features:
            features[tile_id] = torch.zeros(n_variants, len(experts), dim)
            present[tile_id] = torch.zeros(len(experts), dtype=torch.bool)
        assert vectors is not None
        features[tile_id][:, slot[expert]] = F.normalize(vectors[:, group.index].mean(1), dim=-1)
        present[tile_id][slot[expert]] = True
    encoder = cache.encoder
    return ExpertTextFeatures(
        list(experts), features, present, dim, n_variants, rows, encoder.encoder_id, encoder.weights_id
    )
