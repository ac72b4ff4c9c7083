"""The caption gate: generate, score, re-prompt the failures with an attempt-dependent prompt and sampling, keep every
attempt. What passes is the run's ``GatePolicy`` (absolute tau, a percentile threshold per expert and prompt, or a
contrastive margin against the other tiles of the shard)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from caption_pipeline.experts.base import CaptionRequest, CaptionResult, Expert, load_image
from caption_pipeline.policy import GatePolicy
from caption_pipeline.prompts import TileClasses, build_prompt
from caption_pipeline.scoring import ClipScorer, Score
from manifests.caption_store import CUT_FINISH_REASON, KEY_COLUMNS
from manifests.class_predictions import ClassPredictions, read_class_predictions
from manifests.errors import InputError
from manifests.redaction import redact
from manifests.run_manifest import MAX_CAPTION_CHARS, CaptionsConfig, ExpertConfig, PromptConfig
from manifests.tile_index import TileIndex

Key = tuple[str, str, str]


@dataclass(frozen=True)
class TileTask:
    """A tile as the caption stage sees it.

    ``class_source`` is what the protocol allows for the tile's split; ``classes.source`` is what its prompts
    actually state (``none`` where the source has no fractions for the tile). ``label_path`` is the class-index
    mask of that source (the label, or the predicted mask), for the ``annotation`` expert.
    """

    tile_id: str
    split: str
    image_path: Path
    label_path: Path | None
    image_sha256: str
    classes: TileClasses
    class_source: str
    protocol: str = "custom"
    class_names: tuple[str, ...] = ()
    plurals: dict[str, str] = field(default_factory=dict)
    ignore_index: int = 255


@dataclass(frozen=True)
class GateSettings:
    """The gate of one expert: the run's policy (tau, attempts), prompts, template overrides, the decoding of each
    attempt and the longest caption kept (``max_caption_chars``: longer ones are cut, ``finish_reason`` 'cut')."""

    policy: GatePolicy = field(default_factory=GatePolicy)
    prompt_ids: tuple[str, ...] = ("p1", "p2", "p3")
    overrides: dict[str, str] = field(default_factory=dict)
    temperature: float = 0.0
    reprompt_temperature: float = 0.7
    max_caption_chars: int = MAX_CAPTION_CHARS

    @classmethod
    def for_expert(cls, policy: GatePolicy, captions: CaptionsConfig, config: ExpertConfig) -> GateSettings:
        """The gate of one expert of a manifest: the run's policy and prompts, the expert's overrides and decoding."""
        return cls(
            policy, tuple(captions.prompts.ids), dict(config.prompts),
            temperature=config.temperature, reprompt_temperature=config.reprompt_temperature,
            max_caption_chars=captions.max_caption_chars,
        )  # fmt: skip

    def decoding(self, attempt: int) -> tuple[float, int]:
        """(temperature, seed) of an attempt: the expert's temperature first, then sampling with seed = attempt, so
        a re-prompt can give another answer and a re-run gives the same one."""
        return (self.temperature if attempt == 0 else self.reprompt_temperature), attempt


@dataclass(frozen=True)
class RunInfo:
    """The run an attempt belongs to: its id and the SHA-256 of its manifest (recorded in every row), and the list its
    rows are appended to as each round ends (``received``, when given), selected among themselves: a caller whose shard
    fails in a later round (an exception from the expert or the scorer) still has, and writes, every answer received
    before it."""

    run_id: str
    manifest_sha256: str | None = None
    received: list[dict] | None = field(default=None, compare=False, repr=False)


def class_sources(frame: pd.DataFrame, prompts: PromptConfig) -> dict[str, str]:
    """The class source of every split in ``frame`` (what the run summary and the report state).

    Raises:
        InputError: ground truth asked for on an evaluation split without an opt-in.
    """
    return {split: prompts.source_for(split) for split in sorted(frame["split"].unique())}


def load_predictions(
    index: TileIndex, frame: pd.DataFrame, prompts: PromptConfig, predictions: ClassPredictions | None = None
) -> ClassPredictions | None:
    """The predicted tile classes the tiles of ``frame`` need (None where no split reads them), checked to cover
    every tile of a split whose class source is ``predictions``.

    Raises:
        InputError: no path in the manifest, an unreadable or mismatched file, or tiles missing from it.
    """
    sources = class_sources(frame, prompts)
    splits = [split for split, source in sources.items() if source == "predictions"]
    if not splits:
        return None
    if predictions is None:
        if prompts.predictions is None:
            raise InputError(f"captions.prompts.predictions: needed by the class source of split(s) {splits}")
        predictions = read_class_predictions(prompts.predictions, index.class_names)
    known = set(predictions.frame.index)
    missing = []
    for split in splits:
        tiles = frame.loc[frame["split"] == split, "tile_id"]
        absent = int((~tiles.isin(known)).sum())
        if absent:
            missing.append(f"{absent} of {len(tiles)} tiles of split '{split}'")
    if missing:
        raise InputError(
            f"class predictions {predictions.path}: {'; '.join(missing)} missing (class source 'predictions'); "
            f"write them with `segmenter predict --run RUN --index TILES --predictions {predictions.path}`"
        )
    return predictions


def tile_tasks(
    index: TileIndex, frame: pd.DataFrame, prompts: PromptConfig, predictions: ClassPredictions | None = None
) -> list[TileTask]:
    """Caption-stage view of index rows; the class source of each split decides what prompts may state.

    Args:
        index: the tile index the rows come from.
        frame: the rows to caption.
        prompts: the manifest's prompt settings (protocol, class sources, predictions file).
        predictions: already loaded predicted tile classes; read from ``prompts.predictions`` when needed and None.

    Raises:
        InputError: see ``class_sources`` and ``load_predictions``.
    """
    sources = class_sources(frame, prompts)
    predicted = load_predictions(index, frame, prompts, predictions)
    tasks = []
    for row in frame.itertuples(index=False):
        source = sources[row.split]
        fractions, mask, ignore = None, None, index.ignore_index
        if source == "labels":
            fractions, mask = row.class_fractions, index.path(row.label_path)
        elif source == "predictions":
            assert predicted is not None  # load_predictions checked every tile of the split is there
            fractions, mask, ignore = (
                predicted.fractions(row.tile_id),
                predicted.mask_path(row.tile_id),
                predicted.ignore_index,
            )
        shares = dict(zip(index.class_names, fractions, strict=True)) if fractions is not None else {}
        tasks.append(
            TileTask(
                tile_id=row.tile_id,
                split=row.split,
                image_path=index.path(row.image_path),
                label_path=mask,
                image_sha256=row.image_sha256,
                classes=TileClasses(source if shares else "none", shares),
                class_source=source,
                protocol=prompts.protocol,
                class_names=tuple(index.class_names),
                plurals=index.vocabulary.plurals,
                ignore_index=ignore,
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
        """Why the tile cannot be captioned, or None (its image decoded on the first call)."""
        if tile.tile_id not in self.errors:
            try:
                load_image(tile.image_path)
                self.errors[tile.tile_id] = None
            except (OSError, ValueError) as exc:
                self.errors[tile.tile_id] = f"unreadable image {tile.image_path}: {type(exc).__name__}: {exc}"
        return self.errors[tile.tile_id]

    def refuse(self, tile: TileTask, reason: str) -> None:
        """Record a tile that no attempt can caption: one failed attempt per prompt, never re-prompted."""
        self.errors[tile.tile_id] = reason

    def unreadable(self, tile: TileTask) -> bool:
        """Whether the tile was found unreadable (or refused) so far."""
        return self.errors.get(tile.tile_id) is not None


@dataclass(frozen=True)
class Resume:
    """What earlier runs left in the store for the keys of a shard.

    Attributes:
        done: the keys done (the policy's ``done``), which this run skips.
        attempts: attempts so far per key: a key tried without success continues its attempt numbers (and so its
            wordings and seeds).
    """

    done: frozenset[Key] | set[Key] = frozenset()
    attempts: Mapping[Key, int] = field(default_factory=dict)


Pending = list[tuple[TileTask, str]]


@dataclass
class _ShardGate:
    """One expert's gate over one shard: builds each round's requests, generates and scores them, and turns the
    answers into store rows (``caption_tiles`` runs the rounds)."""

    expert: Expert
    scorer: ClipScorer
    settings: GateSettings
    run: RunInfo
    shard: list[TileTask]
    check: ImageCheck = field(default_factory=ImageCheck)

    @property
    def policy(self) -> GatePolicy:
        return self.settings.policy

    def request(self, tile: TileTask, pid: str, attempt: int) -> CaptionRequest:
        """The request of one attempt: its prompt wording and decoding change with the attempt."""
        temperature, seed = self.settings.decoding(attempt)
        return CaptionRequest(
            tile_id=tile.tile_id, image_path=tile.image_path,
            prompt=build_prompt(pid, tile.classes, attempt=attempt, override=self.settings.overrides.get(pid)),
            prompt_id=pid, label_path=tile.label_path, class_names=tile.class_names, plurals=tile.plurals,
            ignore_index=tile.ignore_index, temperature=temperature, seed=seed,
        )  # fmt: skip

    def round(self, pending: Pending, attempts: list[int]) -> tuple[list[dict], Pending]:
        """One attempt at every pending key: its rows (``passed`` set) and the keys to ask again."""
        requests = [self.request(tile, pid, attempt) for (tile, pid), attempt in zip(pending, attempts, strict=True)]
        results, scores = self._generate_and_score(pending, requests)
        rows = [
            self._row(tile, pid, attempt, request, result, scores.get(i))
            for i, ((tile, pid), attempt, request, result) in enumerate(
                zip(pending, attempts, requests, results, strict=True)
            )
        ]
        passed = self.policy.passes(
            [row["gate_score"] for row in rows],
            [row["usable"] for row in rows],
            [row["gate_threshold"] for row in rows],
        )
        again = []
        for (tile, pid), row, flag in zip(pending, rows, passed.tolist(), strict=True):
            row["passed"] = flag
            if self.policy.reprompt(flag, readable=not self.check.unreadable(tile)):
                again.append((tile, pid))
        return rows, again

    def _row(
        self,
        tile: TileTask,
        pid: str,
        attempt: int,
        request: CaptionRequest,
        result: CaptionResult,
        score: Score | None,
    ) -> dict:
        """One caption-store row: the request as sent (prompt, temperature, seed), its result and its score.

        ``usable`` is the policy's verdict on the answer (only usable answers are scored); ``passed`` and ``selected``
        are set by the caller, which decides them for all attempts of a round, and of the run, at once.
        """
        expert, policy = self.expert, self.policy
        usable = policy.usable(result.caption, result.error)  # exactly the answers that were scored
        return {
            "tile_id": tile.tile_id, "expert": expert.name, "model": expert.model, "backend": expert.backend,
            "prompt_id": pid, "attempt": attempt, "prompt_text": request.prompt,
            "temperature": request.temperature, "seed": request.seed, "caption": result.caption,
            "n_tokens": score.n_tokens if score else None, "n_chunks": score.n_chunks if score else None,
            "clip_model": self.scorer.model_id, "raw_cosine": score.raw_cosine if score else None,
            "similarity": score.similarity if score else None, "tau": policy.tau,
            "gate_mode": policy.mode, "gate_threshold": policy.threshold(expert.name, pid),
            "gate_score": policy.gate_score(score.similarity, score.others) if score else None,
            "usable": usable, "passed": False, "selected": False,
            "finish_reason": result.finish_reason, "latency_s": result.latency_s, "created_at": datetime.now(UTC),
            "run_id": self.run.run_id, "manifest_sha256": self.run.manifest_sha256, "image_sha256": tile.image_sha256,
            # An expert that reads the class mask describes the mask of the split's source; a prompt states what its
            # classes hold.
            "split": tile.split, "protocol": tile.protocol,
            "class_source": tile.class_source if expert.needs_class_mask else tile.classes.source,
            # A server's text may echo credentials (an Authorization header, a URL's userinfo): masked before storing.
            "error": redact(result.error) if result.error else (None if usable else "empty caption"),
        }  # fmt: skip

    def _generate(self, pending: Pending, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """The expert's answers; a tile whose image (or mask) cannot be read gets a failed result, never a request."""
        errors = [self.check(tile) for tile, _ in pending]
        readable = [request for request, error in zip(requests, errors, strict=True) if error is None]
        generated = iter([self._cut(result) for result in self.expert.generate(readable)] if readable else [])
        return [next(generated) if error is None else CaptionResult(None, None, None, 0.0, error=error)
                for error in errors]  # fmt: skip

    def _cut(self, result: CaptionResult) -> CaptionResult:
        """``result`` with its caption cut at ``max_caption_chars`` (recorded as ``finish_reason`` 'cut'), before it is
        scored or stored."""
        limit = self.settings.max_caption_chars
        if result.caption is None or len(result.caption) <= limit:
            return result
        return replace(result, caption=result.caption[:limit], finish_reason=CUT_FINISH_REASON)

    def _score(self, pending: Pending, results: list[CaptionResult]) -> dict[int, Score]:
        """The scores of the usable answers, by position. A contrastive gate scores them against the readable tiles
        of the shard too (their image embeddings are cached by the scorer: one matrix product per chunk)."""
        usable = [i for i, result in enumerate(results) if self.policy.usable(result.caption, result.error)]
        args = (
            [pending[i][0].image_sha256 for i in usable],
            [pending[i][0].image_path for i in usable],
            [results[i].caption for i in usable],
        )
        if self.policy.contrastive and usable:
            readable = [tile for tile in self.shard if self.check(tile) is None]
            scored = self.scorer.score(
                *args, pool=([t.image_sha256 for t in readable], [t.image_path for t in readable])
            )
        else:
            scored = self.scorer.score(*args)
        return dict(zip(usable, scored, strict=True))

    def _generate_and_score(
        self, pending: Pending, requests: list[CaptionRequest]
    ) -> tuple[list[CaptionResult], dict[int, Score]]:
        """Captions and the scores of the usable ones. Experts that serve concurrent batches (``pipeline_chunk``, the
        HTTP backend) get the requests in chunks, two in flight, so CLIP scores one chunk while the next is
        generated; the others get them at once."""
        chunk = self.expert.pipeline_chunk or len(requests)
        spans = [(start, min(start + chunk, len(requests))) for start in range(0, len(requests), chunk)]
        results: list[CaptionResult] = []
        scores: dict[int, Score] = {}

        def collect(start: int, part: list[CaptionResult]) -> None:
            results.extend(part)
            scores.update({start + i: score for i, score in self._score(pending[start:], part).items()})

        if len(spans) == 1:
            collect(0, self._generate(pending, requests))
            return results, scores
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [(start, pool.submit(self._generate, pending[start:end], requests[start:end]))
                       for start, end in spans]  # fmt: skip
            for start, future in futures:
                collect(start, future.result())
        return results, scores

    def describable(self, tiles: list[TileTask]) -> list[TileTask]:
        """The tiles this expert can caption: an expert that describes the class mask (``needs_class_mask``) skips
        splits whose class source is none, and a tile of another split without a mask is refused (a failed
        attempt, like an unreadable image)."""
        if not self.expert.needs_class_mask:
            return tiles
        tiles = [tile for tile in tiles if tile.class_source != "none"]
        for tile in tiles:
            if tile.label_path is None:
                self.check.refuse(tile, f"no class mask for this tile (class source '{tile.class_source}')")
        return tiles

    def check_ready(self, pending: Pending) -> None:
        """Refuse, before the first request, a shard the gate cannot judge or a (expert, prompt) without a threshold.

        Raises:
            InputError: see :meth:`GateModeRule.check_shard` and :meth:`GatePolicy.threshold`.
        """
        if not pending:
            return
        self.policy.gate_mode.check_shard(len(self.shard), len({tile.image_sha256 for tile in self.shard}))
        for pid in self.settings.prompt_ids:
            self.policy.threshold(self.expert.name, pid)

    def select(self, rows: list[dict]) -> None:
        """Mark the selected attempt of every key among ``rows`` (this run's; compaction selects again over the
        attempts of every run of a key)."""
        if rows:
            columns = [*KEY_COLUMNS, "attempt", "gate_score", "usable"]
            for row, flag in zip(rows, self.policy.select(pd.DataFrame(rows, columns=columns)).tolist(), strict=True):
                row["selected"] = flag


def caption_tiles(
    tiles: list[TileTask],
    expert: Expert,
    scorer: ClipScorer,
    settings: GateSettings,
    run: RunInfo,
    resume: Resume = Resume(),
) -> list[dict]:
    """Every attempt of ``expert`` on the (tile, prompt) pairs not done in ``resume``, as caption-store rows (also
    appended to ``run.received`` round by round, when given: see :class:`RunInfo`).

    What is usable, what passes, which attempt is ``selected`` and when a key is asked again is the run's
    ``GatePolicy``: a usable caption passes when its gate score reaches its threshold, an empty caption or a failed
    request never does. Failures are re-generated until ``max_attempts``, each attempt with its own prompt wording
    and decoding (``GateSettings.decoding``: sampling with seed = attempt after the first), so no two attempts of a
    key send the same request; the best attempt per key is marked ``selected`` whether it passed or not.
    ``resume.attempts`` continues the attempt numbers (and so the wordings and seeds) of keys that an earlier run
    tried without success. A tile whose image cannot be read gets one failed attempt per prompt, is never
    re-prompted, and the others go on. An expert whose answer a re-prompt cannot change (``reprompts`` False) gets
    one attempt per key. An expert that describes the class mask of the split's class source (``needs_class_mask``,
    the annotation expert) skips splits whose source is ``none``; a tile of another split without a mask is a failed
    attempt like an unreadable image.

    A contrastive gate contrasts every caption with the other readable tiles of ``tiles`` (the shard), so it needs
    two tiles at least; where every other tile of the shard is unreadable an attempt has no ``gate_score`` (null in
    the row) and does not pass.

    Raises:
        InputError: a contrastive gate asked to caption a single tile; a percentile gate without the threshold of
            one of its (expert, prompt) pairs.
    """
    gate = _ShardGate(expert, scorer, settings, run, list(tiles))
    pending = [(tile, pid) for tile in gate.describable(list(tiles)) for pid in settings.prompt_ids
               if (tile.tile_id, expert.name, pid) not in resume.done]  # fmt: skip
    gate.check_ready(pending)
    rows: list[dict] = [] if run.received is None else run.received
    try:
        for round_ in range(settings.policy.rounds(expert.reprompts)):
            if not pending:
                break
            attempts = [resume.attempts.get((tile.tile_id, expert.name, pid), 0) + round_ for tile, pid in pending]
            round_rows, pending = gate.round(pending, attempts)
            rows += round_rows
    finally:
        gate.select(rows)
    return rows


def calibration_ids(tile_ids: Sequence[str], size: int) -> list[str]:
    """A percentile gate's calibration sample: ``size`` of ``tile_ids`` evenly spaced over their sorted order (all of
    them where there are no more), so the sample spans the run's scenes and splits rather than its first tiles, and
    the same ids give the same sample.

    Args:
        tile_ids: the tiles the expert can caption in the run.
        size: ``captions.gate.calibration_tiles``.
    """
    ordered = sorted(tile_ids)
    if len(ordered) <= size:
        return ordered
    positions = np.linspace(0, len(ordered) - 1, size).round().astype(int)
    return [ordered[position] for position in dict.fromkeys(positions.tolist())]


def calibrate_thresholds(
    tiles: list[TileTask], expert: Expert, scorer: ClipScorer, settings: GateSettings, run: RunInfo
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], int]]:
    """A percentile gate's thresholds for one expert: attempt 0 of every prompt on the calibration sample ``tiles``
    (the same requests as a run's attempt 0), scored, and per prompt the policy's ``percentile_threshold`` of the
    similarities of the usable captions. The captions are not kept: the run asks for them again under the gate.

    Returns:
        The threshold and the number of usable captions it was derived from, per (expert, prompt id).

    Raises:
        InputError: a prompt without a usable caption in the sample (nothing to derive its threshold from).
    """
    sampling = replace(settings, policy=settings.policy.calibration_sampling())
    rows = caption_tiles(tiles, expert, scorer, sampling, run)
    thresholds: dict[tuple[str, str], float] = {}
    sizes: dict[tuple[str, str], int] = {}
    for pid in settings.prompt_ids:
        values = [row["similarity"] for row in rows if row["prompt_id"] == pid and row["usable"]]
        if not values:
            raise InputError(
                f"percentile gate: expert '{expert.name}' gave no usable caption for prompt {pid} on the "
                f"{len(tiles)} calibration tile(s), nothing to derive its threshold from: raise "
                "captions.gate.calibration_tiles, or leave the expert out (--experts) if it cannot caption these "
                "tiles' splits"
            )
        thresholds[(expert.name, pid)] = settings.policy.percentile_threshold(values)
        sizes[(expert.name, pid)] = len(values)
    return thresholds, sizes
