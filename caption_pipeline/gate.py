"""The tau gate: generate, score, re-prompt the failures with the refined prompt, keep every attempt."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from caption_pipeline.experts.base import CaptionRequest, CaptionResult, Expert, load_image
from caption_pipeline.prompts import TileClasses, build_prompt, class_source_for
from caption_pipeline.scoring import ClipScorer
from manifests.caption_store import mark_selected
from manifests.run_manifest import PromptConfig
from manifests.tile_index import TileIndex

Key = tuple[str, str, str]


@dataclass(frozen=True)
class TileTask:
    """A tile as the caption stage sees it."""

    tile_id: str
    split: str
    image_path: Path
    label_path: Path | None
    image_sha256: str
    classes: TileClasses
    class_names: tuple[str, ...] = ()
    ignore_index: int = 255


@dataclass(frozen=True)
class GateSettings:
    tau: float = 0.55
    max_attempts: int = 3
    prompt_ids: tuple[str, ...] = ("p1", "p2", "p3")
    overrides: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    manifest_sha256: str | None = None


def tile_tasks(index: TileIndex, frame: pd.DataFrame, prompts: PromptConfig) -> list[TileTask]:
    """Caption-stage view of index rows; the class source of each split decides what prompts may state."""
    tasks = []
    sources = {split: class_source_for(split, prompts) for split in frame["split"].unique()}
    for row in frame.itertuples(index=False):
        source = sources[row.split]
        fractions = row.class_fractions if source == "labels" and row.class_fractions is not None else None
        shares = dict(zip(index.class_names, fractions, strict=True)) if fractions is not None else {}
        tasks.append(
            TileTask(
                tile_id=row.tile_id,
                split=row.split,
                image_path=index.path(row.image_path),
                label_path=index.path(row.label_path) if source == "labels" else None,
                image_sha256=row.image_sha256,
                classes=TileClasses(source if shares else "none", shares),
                class_names=tuple(index.class_names),
                ignore_index=index.ignore_index,
            )
        )
    return tasks


class ImageCheck:
    """Why a tile's image cannot be read, or None, decoded once per tile: a corrupt tile is recorded as a failed
    attempt and never sent to the expert. Checked chunk by chunk inside the pipeline, so the first requests go
    out without waiting for every tile of the shard to be decoded."""

    def __init__(self) -> None:
        self.errors: dict[str, str | None] = {}

    def __call__(self, tile: TileTask) -> str | None:
        if tile.tile_id not in self.errors:
            try:
                load_image(tile.image_path)
                self.errors[tile.tile_id] = None
            except (OSError, ValueError) as exc:
                self.errors[tile.tile_id] = f"unreadable image {tile.image_path}: {type(exc).__name__}: {exc}"
        return self.errors[tile.tile_id]

    def unreadable(self, tile: TileTask) -> bool:
        return self.errors.get(tile.tile_id) is not None


def _row(tile, pid, attempt, expert, scorer, settings, run, prompt_text, result: CaptionResult, score) -> dict:
    """One caption-store row."""
    return {
        "tile_id": tile.tile_id, "expert": expert.name, "model": expert.model, "backend": expert.backend,
        "prompt_id": pid, "attempt": attempt, "prompt_text": prompt_text, "caption": result.caption,
        "n_tokens": score.n_tokens if score else None, "n_chunks": score.n_chunks if score else None,
        "clip_model": scorer.model_id, "raw_cosine": score.raw_cosine if score else None,
        "similarity": score.similarity if score else None, "tau": settings.tau,
        "passed": score is not None and score.similarity >= settings.tau, "selected": False,
        "finish_reason": result.finish_reason, "latency_s": result.latency_s, "created_at": datetime.now(UTC),
        "run_id": run.run_id, "manifest_sha256": run.manifest_sha256, "image_sha256": tile.image_sha256,
        "class_source": tile.classes.source,
        "error": result.error if result.error else (None if score else "empty caption"),
    }  # fmt: skip


def _is_usable(result: CaptionResult) -> bool:
    return result.error is None and result.caption is not None and result.caption.strip() != ""


def _generate_and_score(
    expert: Expert, scorer: ClipScorer, pending, requests, check: ImageCheck
) -> tuple[list[CaptionResult], dict]:
    """Captions and their scores. Experts that serve concurrent batches (``pipeline_chunk``, the HTTP backend)
    get the requests in chunks, two in flight, so CLIP scores one chunk while the next is being generated."""
    chunk = getattr(expert, "pipeline_chunk", None) or len(requests)
    spans = [(start, min(start + chunk, len(requests))) for start in range(0, len(requests), chunk)]
    results: list[CaptionResult] = [None] * len(requests)  # type: ignore[list-item]
    scores: dict = {}

    def generate(start: int, end: int) -> list[CaptionResult]:
        errors = [check(pending[i][0]) for i in range(start, end)]
        readable = [i for i, error in zip(range(start, end), errors, strict=True) if error is None]
        generated = iter(expert.generate([requests[i] for i in readable]) if readable else [])
        return [
            next(generated) if error is None else CaptionResult(None, None, None, 0.0, error=error) for error in errors
        ]

    def score(start: int, end: int, part: list[CaptionResult]) -> None:
        results[start:end] = part
        usable = [i for i in range(start, end) if _is_usable(results[i])]
        scored = scorer.score(
            [pending[i][0].image_sha256 for i in usable],
            [pending[i][0].image_path for i in usable],
            [results[i].caption for i in usable],
        )
        scores.update(zip(usable, scored, strict=True))

    if len(spans) == 1:
        score(0, len(requests), generate(0, len(requests)))
        return results, scores
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [(start, end, pool.submit(generate, start, end)) for start, end in spans]
        for start, end, future in futures:
            score(start, end, future.result())
    return results, scores


def caption_tiles(
    tiles: list[TileTask],
    expert: Expert,
    scorer: ClipScorer,
    settings: GateSettings,
    run: RunInfo,
    skip: set[Key] | frozenset[Key] = frozenset(),
    previous_attempts: dict[Key, int] | None = None,
) -> list[dict]:
    """Every attempt of ``expert`` on the (tile, prompt) pairs not in ``skip``, as caption-store rows.

    A caption passes when its similarity reaches tau; an empty caption or a failed request never passes.
    Failures are re-generated with the refined prompt until ``max_attempts``; the best attempt per key is
    marked ``selected`` whether it passed or not. ``previous_attempts`` continues the attempt numbers of
    keys that an earlier run tried without success. A tile whose image cannot be read gets one failed
    attempt per prompt, is never re-prompted, and the others go on.
    """
    previous = previous_attempts or {}
    if expert.backend == "annotation":  # it reads the label: nothing to do where labels are not allowed
        tiles = [tile for tile in tiles if tile.label_path is not None]
    pending = [
        (tile, pid) for tile in tiles for pid in settings.prompt_ids if (tile.tile_id, expert.name, pid) not in skip
    ]
    check = ImageCheck()
    rows: list[dict] = []
    for round_ in range(settings.max_attempts):
        if not pending:
            break
        requests = [
            CaptionRequest(
                tile_id=tile.tile_id,
                image_path=tile.image_path,
                prompt=build_prompt(pid, tile.classes, attempt=round_, override=settings.overrides.get(pid)),
                prompt_id=pid,
                label_path=tile.label_path,
                class_names=tile.class_names,
                ignore_index=tile.ignore_index,
            )
            for tile, pid in pending
        ]
        results, scores = _generate_and_score(expert, scorer, pending, requests, check)
        still_failing = []
        for i, ((tile, pid), request, result) in enumerate(zip(pending, requests, results, strict=True)):
            attempt = previous.get((tile.tile_id, expert.name, pid), 0) + round_
            row = _row(tile, pid, attempt, expert, scorer, settings, run, request.prompt, result, scores.get(i))
            rows.append(row)
            if not row["passed"] and not check.unreadable(tile):
                still_failing.append((tile, pid))
        pending = still_failing
    if rows:
        columns = ["tile_id", "expert", "prompt_id", "attempt", "caption", "similarity", "error"]
        flags = mark_selected(pd.DataFrame(rows, columns=columns))["selected"].tolist()
        for row, flag in zip(rows, flags, strict=True):
            row["selected"] = flag
    return rows
