"""The run record (``<run>/run.json``): what a training run was made from, typed and versioned.

``segmenter train`` writes it when a run starts (and again on ``--resume``); ``evaluate``, ``predict`` and
``--resume`` read it. A record of another schema version is refused with one line saying what to do, never
read by guesswork.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from manifests.atomic import atomic_write_text
from manifests.errors import InputError
from segmenter.engine.options import Augmentation, TrainSettings

RUN_RECORD_SCHEMA_VERSION = 1
RUN_RECORD_FILE = "run.json"
# The columns of a store's selected rows that decide what a run reads: which attempt, whether it passed, its text.
_CAPTION_COLUMNS = ["tile_id", "expert", "prompt_id", "attempt", "passed", "caption"]
# What a resumed run may change: how long it runs and how it saves, logs and loads; nothing the weights depend on.
# Weight files may move: they are checked by their digests on every load.
RESUMABLE_SETTINGS = frozenset(
    {"steps", "checkpoint_every", "log_every", "keep_checkpoints", "workers", "prefetch", "text_cache",
     "backbone_file", "text_checkpoint"}
)  # fmt: skip


class RunRecord(BaseModel):
    """Everything a training run was made from, beside its checkpoints.

    Attributes:
        schema_version: the layout of this record; another one is refused on reading.
        manifest: the run manifest's file (resolved), or the packaged manifest's name.
        manifest_sha256: SHA-256 of the manifest's text when the run started.
        settings: the training settings (preset, steps, seed, ...), as given.
        class_names: the classes of the tile index, in its order.
        world_size: processes of the run (DDP under ``torchrun``).
        experts: the experts a text-guided model reads, in order (empty for a text-free one).
        augmentation: the geometric augmentation used (``auto`` already resolved).
        captions: the caption store (resolved path), or None for a text-free model.
        captions_sha256: SHA-256 of the store's selected captions (see :func:`selected_captions_sha256`).
        class_sources: per split, per expert, the class sources of the prompts behind the captions read.
        masked_experts: per split, per expert, on how many tiles it had no usable caption (masked there).
        labels: the ground truth the label crops of the tile index are: ``full``, or ``eroded`` (an ISPRS dataset
            prepared with ``labels: eroded``, trained on as mmsegmentation does when only the eroded archive is at
            hand); records older than this field trained on full labels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = RUN_RECORD_SCHEMA_VERSION
    manifest: str
    manifest_sha256: str
    settings: TrainSettings
    class_names: list[str]
    world_size: int = Field(ge=1)
    experts: list[str]
    augmentation: Augmentation
    captions: str | None
    captions_sha256: str | None
    class_sources: dict[str, dict[str, list[str]]]
    masked_experts: dict[str, dict[str, int]]
    labels: Literal["full", "eroded"] = "full"

    @property
    def preset(self) -> str:
        """The model preset the run trained."""
        return self.settings.preset

    def write(self, folder: str | Path) -> Path:
        """Write ``<folder>/run.json`` atomically; returns its path."""
        path = Path(folder) / RUN_RECORD_FILE
        atomic_write_text(path, self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> RunRecord:
        """The record of the run in ``folder``.

        Raises:
            InputError: one line naming the file: it is missing, not JSON, of another schema version (an older
                version of the toolkit wrote it), or lacks or mistypes a field.
        """
        path = Path(folder) / RUN_RECORD_FILE
        if not path.is_file():
            raise InputError(f"run record {path}: not found; the run folder holds no finished training run")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"run record {path}: not valid JSON") from None
        if not isinstance(data, dict):
            raise InputError(f"run record {path}: expected a JSON object")
        found = data.get("schema_version")
        if found != RUN_RECORD_SCHEMA_VERSION:
            made_by = "an unversioned record" if found is None else f"schema_version {found!r}"
            raise InputError(
                f"run record {path}: {made_by}, this toolkit reads schema_version {RUN_RECORD_SCHEMA_VERSION}; the "
                "run was made by another version of the toolkit: train it again in a new folder (or use the version "
                "that made it)"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"]) or "(top level)"
            raise InputError(
                f"run record {path}: key '{key}': {error['msg'].lower()}; the record is damaged or was edited: "
                "train the run again"
            ) from None


def check_resumed_run(
    recorded: RunRecord, settings: TrainSettings, manifest_sha256: str, class_names: list[str]
) -> None:
    """Refuse a ``--resume`` whose settings, manifest or classes differ from those the run was made with: the run
    would go on as another one while its record named only the last command's settings.

    Raises:
        InputError: one line naming every difference and what may change.
    """
    given, kept = settings.model_dump(), recorded.settings.model_dump()
    changed = [
        f"--{name.replace('_', '-')} {given[name]!r} (the run's: {kept[name]!r})"
        for name in kept
        if name not in RESUMABLE_SETTINGS and given.get(name) != kept[name]
    ]
    if manifest_sha256 != recorded.manifest_sha256:
        changed.append(f"--manifest (its text differs from {recorded.manifest}'s when the run started)")
    if list(class_names) != recorded.class_names:
        changed.append(f"the tile index's classes {list(class_names)} (the run's: {recorded.class_names})")
    if changed:
        raise InputError(
            f"--resume: {'; '.join(changed)}; a resumed run keeps what it was started with (only "
            f"{', '.join('--' + name.replace('_', '-') for name in sorted(RESUMABLE_SETTINGS))} may change): give "
            "the run's settings, or train into a new --out"
        )


def selected_captions_sha256(selected: pd.DataFrame) -> str:
    """SHA-256 of what a run reads of a caption store: its selected rows' keys, attempts, gate results and texts.

    It depends on the captions, not on how the store is laid out in files (compacting a store keeps it), so
    evaluation can say when the store changed since the run was trained.
    """
    rows = selected[_CAPTION_COLUMNS].sort_values(_CAPTION_COLUMNS[:3], kind="stable")
    return hashlib.sha256(rows.to_csv(index=False).encode("utf-8")).hexdigest()


def prompt_class_sources(rows: pd.DataFrame, tile_ids: list[str], experts: list[str]) -> dict[str, list[str]]:
    """Per expert, the class sources (``labels``, ``predictions``, ``none``) of the prompts behind its captions
    of ``tile_ids``: whether any caption of those tiles was made from ground truth.

    Args:
        rows: selected caption rows with ``tile_id``, ``expert`` and ``class_source`` columns.
        tile_ids: the tiles of one split.
        experts: the run's experts, in order (an expert without rows gets an empty list).
    """
    chosen = rows[rows["tile_id"].isin(set(tile_ids))]
    kinds = chosen.groupby("expert")["class_source"].agg(lambda values: sorted(set(values))).to_dict()
    return {name: kinds.get(name, []) for name in experts}
