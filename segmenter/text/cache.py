"""The text-feature cache: per (text encoder id, caption sha256) the pooled embedding, on disk.

Training then never runs the text encoder. Entries are appended as atomic Parquet fragments under
``<folder>/<encoder id>/``; an edited caption has a new hash, so exactly that entry is computed again.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from manifests.atomic import atomic_path
from segmenter.text.encoder import TextEncoder


def caption_sha256(caption: str) -> str:
    """The cache key of a caption: the SHA-256 of its UTF-8 text."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


class TextFeatureCache:
    """Per caption (by SHA-256) the embedding one text encoder gave, kept on disk in ``<folder>/<encoder id>/``."""

    def __init__(self, folder: str | Path, encoder: TextEncoder, batch_size: int = 256) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self.folder = Path(folder) / re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.encoder_id)
        self._entries: dict[str, np.ndarray] = {}
        for path in sorted(self.folder.glob("part-*.parquet")):
            table = pq.read_table(path)
            for key, vector in zip(table["caption_sha256"].to_pylist(), table["embedding"].to_numpy(), strict=True):
                self._entries[key] = np.asarray(vector, dtype=np.float32)

    def __len__(self) -> int:
        return len(self._entries)

    def embeddings(self, captions: list[str]) -> torch.Tensor:
        """``(N, D)`` embeddings of ``captions``, running the encoder only on captions never seen before."""
        keys = [caption_sha256(caption) for caption in captions]
        missing = {key: caption for key, caption in zip(keys, captions, strict=True) if key not in self._entries}
        if missing:
            new_keys, texts = list(missing), list(missing.values())
            vectors = torch.cat(
                [self.encoder.encode(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
            ).numpy()
            table = pa.table({"caption_sha256": new_keys, "embedding": list(vectors)})
            with atomic_path(self.folder / f"part-{uuid.uuid4().hex}.parquet") as tmp:
                pq.write_table(table, tmp)
            self._entries.update(zip(new_keys, vectors, strict=True))
        dim = self.encoder.dim
        if not keys:
            return torch.zeros(0, dim)
        return torch.from_numpy(np.stack([self._entries[key] for key in keys]))
