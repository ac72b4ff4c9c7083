"""Which captions each sliding window reads, and the one missing-expert rule of ``evaluate`` and ``predict``.

A window reads the captions of one captioned tile: the tile it is, or the tile it overlaps most. An expert without a
usable caption of that tile is masked on the window. :func:`check_masked_experts` is the rule both commands apply to
the windows they planned, before any window runs: an expert masked on every window that reads captions is as good as
absent, so the command stops naming it, unless ``--missing-captions mask`` says to go on; every expert masked
somewhere is said (``expert X masked on N of M windows of ...``) and recorded per window (``masked_experts``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from manifests.errors import InputError
from segmenter.engine.inference import Window
from segmenter.engine.options import MissingCaptions
from segmenter.text.features import ExpertTextFeatures


@dataclass
class CaptionWindows:
    """Text for each window from the captioned tiles of one source, remembering which tile's caption it used.

    A window that is exactly a captioned tile reads that tile's caption; any other window (another size or
    overlap) reads the caption of the tile it overlaps most, and is recorded as off the captioned grid. Windows are
    planned (:meth:`plan`) before inference, so the missing-expert rule sees them all; a window not planned is
    planned when it is first read.

    Attributes:
        source_id: the source (or image) the windows cover, for the record.
        tiles: its captioned tiles (``tile_id``, ``y``, ``x``, ``height``, ``width``).
        text: the caption features of the run's experts.
        used: one record per window, in order: its place, the tile whose caption it reads, whether it is that
            tile, and the experts masked on it (``;``-separated).
    """

    source_id: str
    tiles: pd.DataFrame
    text: ExpertTextFeatures
    used: list[dict] = field(default_factory=list)
    masked: list[list[str]] = field(default_factory=list, init=False)  # per window of ``used``: the masked experts
    _read: dict[Window, str | None] = field(default_factory=dict, init=False, repr=False)

    def _caption_tile(self, y: int, x: int, h: int, w: int) -> tuple[str | None, bool]:
        """The tile whose caption a window reads, and whether the window is that tile."""
        best, best_area = None, 0
        for row in self.tiles.itertuples(index=False):
            if (row.y, row.x, row.height, row.width) == (y, x, h, w):
                return row.tile_id, True
            area = max(0, min(x + w, row.x + row.width) - max(x, row.x)) * max(
                0, min(y + h, row.y + row.height) - max(y, row.y)
            )
            if area > best_area:
                best, best_area = row.tile_id, area
        return best, False

    def plan(self, windows: list[Window]) -> CaptionWindows:
        """Decide which caption each of ``windows`` reads and which experts are masked there; returns itself."""
        for window in windows:
            tile, exact = self._caption_tile(*window)
            present = self.text.lookup(tile)[1].tolist() if tile is not None else [False] * len(self.text.experts)
            masked = [name for name, flag in zip(self.text.experts, present, strict=True) if not flag]
            self._read[window] = tile
            self.masked.append(masked)
            y, x, h, w = window
            self.used.append({"source_id": self.source_id, "y": y, "x": x, "height": h, "width": w,
                              "caption_tile_id": tile, "on_captioned_grid": exact,
                              "masked_experts": ";".join(masked)})  # fmt: skip
        return self

    def __call__(self, y: int, x: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The text features and present flags of a window (None: it reads no caption, every expert masked)."""
        if (y, x, h, w) not in self._read:
            self.plan([(y, x, h, w)])
        tile = self._read[(y, x, h, w)]
        return None if tile is None else self.text.lookup(tile)


def check_masked_experts(
    plans: list[CaptionWindows], experts: list[str], store: Path, missing: MissingCaptions, where: str
) -> dict[str, int]:
    """The missing-expert rule over the planned windows of a split (``evaluate``) or an image (``predict``).

    Returns, per expert, on how many of the windows it is masked, after saying so for each expert masked somewhere.

    Raises:
        InputError: with ``missing='error'``, one line naming the experts without a usable caption on any of the
            tiles the windows read (windows that read no tile at all are not counted against an expert).
    """
    used = [row for plan in plans for row in plan.used]
    masked_on = [names for plan in plans for names in plan.masked]
    reading = [names for row, names in zip(used, masked_on, strict=True) if row["caption_tile_id"] is not None]
    empty = [name for name in experts if reading and all(name in names for names in reading)]
    if empty and missing == MissingCaptions.error:
        tiles = len({row["caption_tile_id"] for row in used if row["caption_tile_id"] is not None})
        raise InputError(
            f"--captions: caption store {store} has no usable caption (passed the gate, not empty) of expert(s) "
            f"{empty} on any of the {tiles} tiles that the {len(reading)} windows of {where} read; caption them or "
            "pass --missing-captions mask"
        )
    counts = {name: sum(name in names for names in masked_on) for name in experts}
    for name, count in counts.items():
        if count:
            print(f"expert {name} masked on {count} of {len(used)} windows of {where}")
    return counts
