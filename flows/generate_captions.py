"""``flows run generate-captions``: map caption tasks over shards of tiles, per expert, into the caption store.

Task inputs are ids, paths and hashes only. The store is the source of truth for resume: every shard task
first reads which (tile, expert, prompt) keys are already done and generates only the rest, so a run killed
at any point and started again ends with the same store as an uninterrupted one.
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pandas as pd
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed

from caption_pipeline.experts import expert_class, preflight
from caption_pipeline.experts.base import ExpertUnavailable
from caption_pipeline.experts.openai_backend import EndpointStats
from caption_pipeline.gate import (
    GateSettings,
    Resume,
    RunInfo,
    caption_tiles,
    class_sources,
    load_predictions,
    tile_tasks,
)
from caption_pipeline.policy import GatePolicy
from caption_pipeline.scoring import clip_weights
from flows import model_cache
from flows.dask_runner import release_in_workers, task_runner
from flows.gate_store import (
    check_gate,
    check_scorer,
    check_thresholds,
    derive_thresholds,
    run_policy,
)
from flows.prefect_api import process_api
from manifests.caption_store import (
    CAPTION_STORE_SCHEMA,
    KEY_COLUMNS,
    StoreMeta,
    attempt_counts,
    compact,
    read_store,
    write_fragment,
)
from manifests.errors import InputError
from manifests.run_manifest import CaptionsConfig, ExpertConfig, RunManifest, load_caption_manifest
from manifests.tile_index import read_tile_index

GPU_TAG = "gpu"
T = TypeVar("T")
ShardProgress = Callable[[int, int, str], None]


class ProgressListeners:
    """The progress callbacks of the caption runs of this process, by run id.

    A callable cannot be a flow parameter (parameters are data, sent to the Prefect API): :func:`generate_captions`
    registers its caller's ``on_shard`` under the run id it passes to the flow, and the flow tells whoever listens to
    its run id as each shard task finishes. A flow started another way has no listener.
    """

    def __init__(self) -> None:
        self._callbacks: dict[str, ShardProgress] = {}
        self._lock = threading.Lock()

    @contextmanager
    def listening(self, run_id: str, on_shard: ShardProgress | None) -> Iterator[None]:
        """Register ``on_shard`` (if any) for the run ``run_id`` while the block runs."""
        if on_shard is None:
            yield
            return
        with self._lock:
            self._callbacks[run_id] = on_shard
        try:
            yield
        finally:
            with self._lock:
                self._callbacks.pop(run_id, None)

    def tell(self, run_id: str, done: int, total: int, note: str) -> None:
        """Tell the listener of ``run_id`` (if any) that ``done`` of ``total`` shard tasks finished."""
        with self._lock:
            on_shard = self._callbacks.get(run_id)
        if on_shard is not None:
            on_shard(done, total, note)


PROGRESS = ProgressListeners()


def new_run_id() -> str:
    """A fresh run id (12 hex digits): it names the run's fragments and is recorded in every row it writes."""
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class ShardResult:
    """What one shard task did; ``unavailable`` is the one-line reason its expert cannot answer at all."""

    expert: str
    tiles: int
    rows: int
    skipped: int
    unavailable: str | None = None
    # (the expert instance, its endpoints' counts when the task started, and when it ended): see endpoint_counts
    endpoints: tuple[str, tuple[EndpointStats, ...], tuple[EndpointStats, ...]] | None = None


@task(name="caption-shard", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def caption_shard(
    manifest_path: str, expert_name: str, tile_ids: list[str], store: str, run_id: str, manifest_sha256: str
) -> ShardResult:
    """Caption one shard of tiles with one expert and write one atomic store fragment.

    A shard may run more than once: a Prefect retry, or Dask running it again on another worker when the one running
    it died (or was only presumed dead and still runs). Every execution writes the same fragment name
    (:func:`shard_fragment_name`), so the last rename replaces the earlier ones instead of adding a second copy of the
    shard's attempts, and what the fragment holds is always every attempt of the shard's keys in this run:
    the attempts an earlier execution already wrote there are carried into the new fragment, and only the keys still
    not done are asked again, their attempt numbers continuing where the store's stop.
    """
    manifest, captions = load_caption_manifest(manifest_path)
    index = read_tile_index(manifest.tiling.out)
    frame = index.frame[index.frame["tile_id"].isin(set(tile_ids))]
    policy = run_policy(captions, store)
    name = shard_fragment_name(run_id, expert_name, tile_ids)
    # The store first, then this shard's own fragment: a fragment seen by the first read is seen by the second (or a
    # later version of it, which covers at least the same keys), so nothing skipped below is left out of the rewrite.
    done, counts = attempt_counts(store, tile_ids, done=policy.done)
    own = _fragment_path(store, name)
    kept = read_store(own) if own.is_file() else None
    config = next(expert for expert in captions.experts if expert.name == expert_name)
    settings = GateSettings.for_expert(policy, captions, config)
    keys = {(tile_id, expert_name, pid) for tile_id in tile_ids for pid in settings.prompt_ids}
    resume = Resume(done & keys, counts)
    scorer = model_cache.scorer(manifest)
    expert = model_cache.expert(config)
    started = _endpoint_snapshot(expert)
    try:
        rows = caption_tiles(
            tile_tasks(index, frame, captions.prompts),
            expert,
            scorer,
            settings,
            RunInfo(run_id, manifest_sha256),
            resume,
        )
    except ExpertUnavailable as exc:  # a bad key, an unknown model, an engine that cannot start: stop, not retry
        endpoints = (_instance(expert), started, _endpoint_snapshot(expert))
        return ShardResult(expert_name, len(frame), 0, len(resume.done), unavailable=str(exc), endpoints=endpoints)
    if rows:  # nothing new: the fragment (if any) already holds every attempt of this shard
        content = rows if kept is None else pd.concat([kept, _rows_frame(rows)], ignore_index=True)
        write_fragment(store, content, StoreMeta(index.class_names, scorer.model_id, captions.tau), name=name)
    endpoints = (_instance(expert), started, _endpoint_snapshot(expert))
    return ShardResult(expert_name, len(frame), len(rows), len(resume.done), endpoints=endpoints)


def shard_fragment_name(run_id: str, expert_name: str, tile_ids: list[str]) -> str:
    """The fragment name of one shard task of one run: the same for every execution of that task."""
    digest = hashlib.sha256("\n".join([expert_name, *tile_ids]).encode()).hexdigest()[:20]
    return f"{run_id}-{digest}"


def _fragment_path(store: str, name: str) -> Path:
    # write_fragment's naming (the store contract's ``part-*.parquet``)
    return Path(store) / f"part-{name}.parquet"


def _rows_frame(rows: list[dict]) -> pd.DataFrame:
    """New attempt rows with the dtypes ``read_store`` gives, so they concatenate with rows read back."""
    return pa.Table.from_pylist(rows, schema=CAPTION_STORE_SCHEMA).to_pandas()


def shards(tile_ids: list[str], size: int, min_size: int = 1) -> list[list[str]]:
    """``tile_ids`` in shards of ``size``; a last shard smaller than ``min_size`` joins the one before it (a
    contrastive gate needs two tiles per shard)."""
    parts = [tile_ids[start : start + size] for start in range(0, len(tile_ids), size)]
    if len(parts) > 1 and len(parts[-1]) < min_size:
        parts[-2:] = [parts[-2] + parts[-1]]
    return parts


@dataclass(frozen=True)
class CaptionRunSummary:
    """What a caption run did, and what its prompts were allowed to say about the classes.

    Attributes:
        protocol: ``captions.prompts.protocol`` (oracle | predicted | blind | custom).
        class_sources: the class source of every split the run captioned (labels | predictions | none).
        unavailable: why an expert could not answer at all (the run stopped), or None.
        errors: per expert, the keys that got no caption and the error most of their attempts recorded.
        gate: one line, the gate mode and its threshold(s) (``GatePolicy.describe``).
        endpoints: per expert served over HTTP, what each of its endpoints did in this run (``endpoint_counts``).
    """

    store: Path
    tiles: int
    new_rows: int
    skipped_keys: int
    seconds: float
    table: pd.DataFrame
    protocol: str = "custom"
    class_sources: dict[str, str] = field(default_factory=dict)
    unavailable: str | None = None
    errors: dict[str, tuple[int, str]] = field(default_factory=dict)
    gate: str = ""
    endpoints: dict[str, list[EndpointStats]] = field(default_factory=dict)

    def class_information(self) -> str:
        """One line: the protocol and the class source per split."""
        splits = ", ".join(f"{split}: {source}" for split, source in self.class_sources.items()) or "no tiles"
        return f"class information in prompts: protocol {self.protocol} ({splits})"


def expert_rows(store: Path, experts: list[str]) -> pd.DataFrame:
    """Every attempt of ``experts`` in the store (none for a store not written yet)."""
    frame = read_store(store, missing_ok=True)
    return frame[frame["expert"].isin(experts)]


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per expert and prompt of these store rows: keys, pass rate, recovery by re-prompting, keys that never passed
    (``not_passed``) and, of those, keys whose every attempt was an error (``errored``: server down, unreadable
    tile)."""
    if frame.empty:
        return pd.DataFrame(
            columns=["expert", "prompt_id", "keys", "pass_rate", "first_try", "recovered", "not_passed", "errored"]
        )
    first = frame.groupby(["tile_id", "expert", "prompt_id"])["attempt"].transform("min") == frame["attempt"]
    frame = frame.assign(first_pass=frame["passed"] & first, errored=frame["error"].notna())
    per_key = frame.groupby(["expert", "prompt_id", "tile_id"]).agg(
        passed=("passed", "any"), first_pass=("first_pass", "any"), errored=("errored", "all")
    )
    table = per_key.groupby(["expert", "prompt_id"]).agg(
        keys=("passed", "size"), pass_rate=("passed", "mean"), first_try=("first_pass", "mean"),
        passed=("passed", "sum"), first_passed=("first_pass", "sum"), errored=("errored", "sum"),
    )  # fmt: skip
    table["recovered"] = table["passed"] - table["first_passed"]
    table["not_passed"] = table["keys"] - table["passed"]
    return table.reset_index()[["expert", "prompt_id", "keys", "pass_rate", "first_try", "recovered", "not_passed",
                                "errored"]]  # fmt: skip


def _endpoint_snapshot(expert: object) -> tuple[EndpointStats, ...]:
    """The counts of an expert's endpoints so far (none for an expert without endpoints)."""
    stats = getattr(expert, "endpoint_stats", None)
    return tuple(stats()) if stats is not None else ()


def _instance(expert: object) -> str:
    # One expert object per process and configuration (model_cache), in processes that may live on several machines.
    return f"{socket.gethostname()}:{os.getpid()}:{id(expert)}"


def endpoint_counts(results: list[ShardResult]) -> dict[str, list[EndpointStats]]:
    """Per expert with endpoints, what each endpoint did in this run: attempts, failed attempts, outages.

    An expert object counts from when it was built and serves every shard task of its process, whose tasks overlap;
    so what it did in this run is its count at the last task's end minus its count at the first task's start (the
    counts only grow), summed over the processes (Dask workers) that ran the expert's tasks.
    """
    spans: dict[tuple[str, str], tuple[list[EndpointStats], list[EndpointStats]]] = {}
    for result in results:
        if result.endpoints is None or not result.endpoints[2]:
            continue
        instance, started, ended = result.endpoints
        first, last = spans.get((result.expert, instance), (list(started), list(ended)))
        spans[(result.expert, instance)] = (
            [_bound(min, a, b) for a, b in zip(first, started, strict=True)],
            [_bound(max, a, b) for a, b in zip(last, ended, strict=True)],
        )
    totals: dict[str, list[EndpointStats]] = {}
    for (expert, _), (first, last) in spans.items():
        run = [end - start for start, end in zip(first, last, strict=True)]
        totals[expert] = [a + b for a, b in zip(totals[expert], run, strict=True)] if expert in totals else run
    return totals


def _bound(pick: Callable[[int, int], int], a: EndpointStats, b: EndpointStats) -> EndpointStats:
    return EndpointStats(
        a.url, pick(a.requests, b.requests), pick(a.failures, b.failures), pick(a.taken_out, b.taken_out)
    )


def common_errors(frame: pd.DataFrame) -> dict[str, tuple[int, str]]:
    """Per expert with keys that never got a caption (store rows): how many, and the error most of their attempts
    recorded (what a user must see when a run "succeeds" with nothing but failures)."""
    if frame.empty:
        return {}
    errored = frame.assign(failed=frame["error"].notna()).groupby(list(KEY_COLUMNS))["failed"].transform("all")
    frame = frame[errored]
    return {
        expert: (group.groupby(["tile_id", "prompt_id"]).ngroups, group["error"].value_counts().index[0])
        for expert, group in frame.groupby("expert")
    }


@dataclass(frozen=True)
class _Shards:
    """The shard tasks of one run: what every task gets, and how many there are in all (for the progress)."""

    manifest_path: str
    manifest_sha256: str
    store: str
    run_id: str
    tile_shards: list[list[str]]
    total: int

    def submit(self, config: ExpertConfig) -> list:
        """Submit the shard tasks of one expert (tagged for the GPU concurrency limit where it asks for it)."""
        shard_task = caption_shard.with_options(tags=[GPU_TAG] if config.gpu else [])
        return [shard_task.submit(self.manifest_path, config.name, shard, self.store, self.run_id,
                                  self.manifest_sha256) for shard in self.tile_shards]  # fmt: skip

    def collect(self, futures: list, done: list[ShardResult]) -> list[ShardResult]:
        """The results of ``futures`` as they finish, with progress. Once an expert is unavailable, the shard tasks
        not started yet are cancelled (the running ones finish and keep what they wrote)."""
        results: list[ShardResult] = []
        stopping = any(result.unavailable for result in done)
        if stopping:
            _cancel(futures)
        for future in as_completed(futures):
            if getattr(future, "wrapped_future", None) is not None and future.wrapped_future.cancelled():
                continue
            results.append(future.result())
            note = f"{results[-1].expert}: {results[-1].rows} attempts"
            PROGRESS.tell(self.run_id, len(done) + len(results), self.total, note)
            if results[-1].unavailable and not stopping:
                stopping = True
                _cancel(futures)
        return results


def _run_shards(shards_of_run: _Shards, configs: list[ExpertConfig]) -> list[ShardResult]:
    """Run every shard task of ``configs``. Experts that must run alone (in-process GPU engines) run one after
    another, each released before the next starts, so every engine can take most of the GPU; the others (HTTP
    servers, transformers) run alongside from the start. An unavailable expert stops the run."""
    alone = [config for config in configs if expert_class(config.backend).runs_alone]
    alongside = [future for config in configs if config not in alone for future in shards_of_run.submit(config)]
    results: list[ShardResult] = []
    runner = getattr(FlowRunContext.get(), "task_runner", None)
    for config in alone:
        try:
            results += shards_of_run.collect(shards_of_run.submit(config), results)
        finally:
            release_in_workers(config, runner)  # a Dask worker's engine lives in its process, not in this one
        if any(result.unavailable for result in results):
            break
    results += shards_of_run.collect(alongside, results)
    for config in configs:
        if any(result.unavailable for result in results if result.expert == config.name):
            # its refusal is remembered: a later run in this process starts afresh
            model_cache.release_expert(config)
    return results


@flow(name="generate-captions", log_prints=True)
def generate_captions_flow(
    manifest_path: str,
    store: str,
    experts: list[str],
    limit: int | None = None,
    shard_size: int | None = None,
    run_id: str | None = None,
) -> CaptionRunSummary:
    """Caption the first ``limit`` tiles (by id) with ``experts`` in shard tasks, then compact the store.

    Args:
        manifest_path: the run manifest.
        store: the caption store.
        experts: names of the manifest's experts.
        limit: caption only the first ``limit`` tiles by id (None: all).
        shard_size: tiles per task (None: the manifest's).
        run_id: the run's id (a new one where None); progress goes to the listener registered under it.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    manifest, captions = load_caption_manifest(manifest_path)
    index = read_tile_index(manifest.tiling.out)
    tile_ids = sorted(index.frame["tile_id"])[:limit]
    sources = class_sources(index.frame[index.frame["tile_id"].isin(set(tile_ids))], captions.prompts)
    run_id = run_id or new_run_id()
    # A gate whose thresholds are derived had them derived before the flow started (generate_captions): every shard
    # task gates with the same ones.
    policy = run_policy(captions, store)
    tile_shards = shards(tile_ids, shard_size or captions.shard_size, min_size=policy.gate_mode.min_shard_tiles)
    total = len(experts) * len(tile_shards)
    logger.info("%d tiles, %d experts, %d shard tasks (run %s)", len(tile_ids), len(experts), total, run_id)
    logger.info("protocol %s, class source per split: %s", captions.prompts.protocol, sources)
    logger.info("%s", policy.describe())
    configs = [config for config in captions.experts if config.name in experts]
    configs.sort(key=lambda config: experts.index(config.name))
    plan = _Shards(manifest_path, manifest.sha256, store, run_id, tile_shards, total)
    results = _run_shards(plan, configs)
    compact(store, select=policy.select)
    rows = expert_rows(Path(store), experts)
    endpoints = endpoint_counts(results)
    for name, counts in endpoints.items():
        logger.info("%s endpoints: %s", name, "; ".join(stats.describe() for stats in counts))
    return CaptionRunSummary(
        Path(store), len(tile_ids), sum(r.rows for r in results), sum(r.skipped for r in results),
        time.perf_counter() - started, summarize(rows), captions.prompts.protocol, sources,
        next((r.unavailable for r in results if r.unavailable), None), common_errors(rows), policy.describe(),
        endpoints,
    )  # fmt: skip


def _cancel(futures: list) -> None:
    for future in futures:
        wrapped = getattr(future, "wrapped_future", None)
        if wrapped is not None:
            wrapped.cancel()


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Exempt the objects alive when a run starts (imported libraries, loaded models) from garbage collection
    until it ends. A full collection walks every tracked object with all threads stopped, the experts' event loops
    included: with torch, transformers and Prefect loaded that is about 0.5 s in which no request goes out."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass(frozen=True)
class CaptionRunSettings:
    """What one caption run is asked to do: the options of ``flows run generate-captions``.

    Attributes:
        manifest: the run manifest (path or packaged name).
        store: the caption store (None: the manifest's).
        experts: names of the manifest's experts to run (None: all).
        limit: caption only the first ``limit`` tiles by id (None: all).
        runner: ``threads`` (of this process) or ``dask`` (worker processes; a cluster with ``address``).
        address: a Dask scheduler, ``tcp://host:8786``.
        shard_size: tiles per task (None: the manifest's).
    """

    manifest: str | Path
    store: str | Path | None = None
    experts: list[str] | None = None
    limit: int | None = None
    runner: str = "threads"
    address: str | None = None
    shard_size: int | None = None


@dataclass(frozen=True)
class _CheckedRun:
    """A caption run whose inputs passed every check that can be made before Prefect starts and any model loads."""

    manifest: RunManifest
    experts: list[str]
    tile_ids: list[str]
    store: str
    policy: GatePolicy


def _chosen_experts(captions: CaptionsConfig, names: list[str] | None) -> list[str]:
    """The experts a run asks for, all of the manifest's by default.

    Raises:
        InputError: a name the manifest does not have.
    """
    known = [expert.name for expert in captions.experts]
    unknown = [name for name in names or [] if name not in known]
    if unknown:
        raise InputError(f"--experts: unknown expert(s) {unknown} (the manifest has {known})")
    return names or known


def _check_inputs(settings: CaptionRunSettings) -> _CheckedRun:
    """Refuse, in one line each, what cannot succeed: a manifest without captions, an unknown expert, no tile index,
    class sources without their predictions, a store another scorer or gate wrote, a gate that cannot judge these
    tiles in these shards, an expert whose pre-flight fails (a key not set, weights not found).

    Raises:
        InputError: see :func:`generate_captions`.
    """
    manifest, captions = load_caption_manifest(settings.manifest)
    chosen = _chosen_experts(captions, settings.experts)
    index = read_tile_index(manifest.tiling.out)  # fail early with a clear message
    # Likewise the class sources and the predictions they need, before any shard task starts.
    tile_ids = sorted(index.frame["tile_id"])[: settings.limit]
    tiles = index.frame[index.frame["tile_id"].isin(tile_ids)]
    load_predictions(index, tiles, captions.prompts)
    store = str(settings.store or captions.store)
    weights = clip_weights(captions.clip)
    weights.check()
    check_scorer(store, weights.model_id)
    check_gate(store, captions, chosen)
    policy = GatePolicy.from_captions(captions)
    if policy.gate_mode.derives_thresholds:
        check_thresholds(store, captions, weights.model_id)
    policy.gate_mode.check_run(len(tiles), settings.shard_size or captions.shard_size)
    for config in captions.experts:
        if config.name in chosen:
            preflight(config)
    return _CheckedRun(manifest, chosen, sorted(tiles["tile_id"]), store, policy)


def generate_captions(
    run: CaptionRunSettings | str | Path,
    on_shard: ShardProgress | None = None,
    say: Callable[[str], None] | None = None,
) -> CaptionRunSummary:
    """Validate the inputs, then run the flow with the chosen task runner.

    The Prefect API (:mod:`flows.prefect_api`) is checked first; a local server is started in the background once the
    inputs pass (unless the caller started it earlier), while this process loads the CLIP scorer its shard tasks will
    share (threads runner).

    Args:
        run: what to run; a manifest alone (path or packaged name) runs all of it with the manifest's settings.
        on_shard: called in the calling thread as each shard task finishes, with ``(done, total, note)``: the shard
            tasks finished so far, all of them, and what the last one did (a progress bar's callback).
        say: told in one line each what the run is waiting for (the local Prefect server's start).

    Raises:
        InputError: a manifest without captions, an unknown expert name, no tile index yet, ground truth on an
            evaluation split without an opt-in, predicted tile classes missing for a split that reads them, a store
            gated in another mode or at another threshold, a contrastive gate with shards of one tile, a percentile
            gate that cannot derive a threshold from its calibration sample, or an expert whose pre-flight fails.
    """
    settings = run if isinstance(run, CaptionRunSettings) else CaptionRunSettings(run)
    api = process_api(say, local=False)  # a server PREFECT_API_URL names is checked first: the first thing to fix
    checked = _check_inputs(settings)
    configs = [config for config in checked.manifest.captions.experts if config.name in checked.experts]
    runner = task_runner(settings.runner, settings.address, configs, say)
    configured = generate_captions_flow.with_options(task_runner=runner)
    api.start()  # the inputs passed: a local server may start now
    run_id = new_run_id()
    manifest = checked.manifest
    with PROGRESS.listening(run_id, on_shard), frozen_heap(), model_cache.ModelCache.of_process().hold():
        if settings.runner == "threads":  # the shard tasks of this process share it: load it while the API comes up
            model_cache.scorer(manifest)
        api.wait()
        if checked.policy.gate_mode.derives_thresholds:  # before the flow: an unusable sample is one line
            derive_thresholds(manifest, checked.store, checked.experts, checked.tile_ids, run_id)
        summary = configured(
            str(manifest.source), checked.store, checked.experts, settings.limit, settings.shard_size, run_id
        )
    if summary.unavailable:
        raise ExpertUnavailable(f"{summary.unavailable} (run stopped; the attempts written so far are kept)")
    return summary
