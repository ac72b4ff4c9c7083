"""The experts and CLIP scorers of a caption run, built once per process and configuration, closed when dropped."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar, TypeVar

from caption_pipeline.experts import Expert, build_expert
from caption_pipeline.scoring import ClipScorer
from manifests.run_manifest import ExpertConfig, RunManifest

T = TypeVar("T")


class ModelCache:
    """Experts and CLIP scorers built once per configuration and shared by the shard tasks of one process.

    Loading a captioning model or a CLIP network takes seconds to minutes, so the shard tasks that run in a process
    share one instance of each: :meth:`get` builds on first use, under a lock, and later calls return the same object.
    What the cache drops it closes first (a vLLM engine frees its GPU memory, an HTTP expert its session).

    Lifetime. Prefect runs tasks in threads of the flow's process (``ThreadPoolTaskRunner``, a local Dask cluster
    without processes) or in Dask worker processes, and a task can reach no object of the caller but through its
    process: so there is one cache per process, :meth:`of_process`, created on first use. In the process that calls
    :func:`generate_captions`, each run holds the cache (:meth:`hold`) and the last holder to leave empties it, so
    no model outlives the run that loaded it, and a later run starts afresh (an expert that refused a key is built
    again). A caller that wants the models kept across several runs (a benchmark timing warm runs) holds the cache
    around them. In a remote Dask worker no run holds the cache: its models live as long as the worker process.
    """

    _process: ClassVar[ModelCache | None] = None
    _process_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._items: dict[str, object] = {}
        self._lock = threading.Lock()
        self._holders = 0

    @classmethod
    def of_process(cls) -> ModelCache:
        """This process's cache, created on first use."""
        with cls._process_lock:
            if cls._process is None:
                cls._process = cls()
            return cls._process

    def get(self, key: str, build: Callable[[], T]) -> T:
        """The object cached under ``key``, built by ``build()`` the first time (one build however many callers)."""
        with self._lock:
            if key not in self._items:
                self._items[key] = build()
            return self._items[key]  # type: ignore[return-value]

    def release(self, key: str) -> None:
        """Drop the object under ``key`` (if any), closing it."""
        with self._lock:
            item = self._items.pop(key, None)
        _close(item)

    def clear(self) -> None:
        """Drop and close every cached object."""
        with self._lock:
            items, self._items = list(self._items.values()), {}
        for item in items:
            _close(item)

    def keys(self) -> list[str]:
        """The keys cached now."""
        with self._lock:
            return list(self._items)

    @contextmanager
    def hold(self) -> Iterator[ModelCache]:
        """Keep the cached objects while the block runs; the last holder to leave clears the cache."""
        with self._lock:
            self._holders += 1
        try:
            yield self
        finally:
            with self._lock:
                self._holders -= 1
                last = self._holders == 0
            if last:
                self.clear()


def _close(item: object) -> None:
    close = getattr(item, "close", None)
    if close is not None:
        close()


def expert_key(config: ExpertConfig) -> str:
    """The cache key of an expert: its whole configuration."""
    return f"expert:{config.model_dump_json()}"


def expert(config: ExpertConfig) -> Expert:
    """This process's instance of an expert, built on first use."""
    return ModelCache.of_process().get(expert_key(config), lambda: build_expert(config))


def release_expert(config: ExpertConfig) -> None:
    """Drop this process's instance of an expert, closing it first (a vLLM engine frees its GPU memory)."""
    release_key(expert_key(config))


def release_key(key: str) -> None:
    """Drop this process's object under ``key`` (an :func:`expert_key`), closing it: what a Dask worker runs when the
    flow releases an expert in every worker."""
    ModelCache.of_process().release(key)


def scorer(manifest: RunManifest) -> ClipScorer:
    """This process's CLIP scorer of a manifest's ``captions.clip``, built on first use."""
    config = manifest.captions.clip
    return ModelCache.of_process().get(f"clip:{config.model_dump_json()}", lambda: ClipScorer(config))
