"""The task runner of a caption run: threads of this process, or Dask (a local cluster, or a running scheduler).

A local cluster's workers are processes, and each builds the experts of the shard tasks it runs. An expert that
keeps a model on a GPU of its process (an in-process vLLM engine, a transformers model on CUDA) would then be built
once per CPU, each at its whole ``gpu_memory_utilization``, and the second would not fit. With such experts the
local cluster gets one worker per GPU instead, each seeing only its own GPU (``CUDA_VISIBLE_DEVICES``, set by its
nanny before the worker starts), with as many threads as the threads runner. An expert that must run alone is
released in every worker of the cluster (:func:`release_in_workers`) before the next one starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from caption_pipeline.experts import expert_class
from flows import model_cache
from manifests.devices import usable_cpus
from manifests.errors import InputError
from manifests.run_manifest import ExpertConfig

LOOPBACK = "127.0.0.1"
# Shard tasks in flight in one process: the threads runner's, and each GPU worker's.
THREADS = 4


def task_runner(
    runner: str, address: str | None, configs: Sequence[ExpertConfig] = (), say: Callable[[str], None] | None = None
) -> Any:
    """The Prefect task runner of ``--runner`` for a run of ``configs``.

    ``threads`` runs the shard tasks in threads of this process; ``dask`` with an address connects to that scheduler,
    whose workers may live on other machines (the README's "Captioning on a Dask cluster"); ``dask`` without one starts
    a local cluster (:func:`local_cluster_kwargs`, or one worker per GPU where an expert holds a GPU, said with
    ``say``).

    Raises:
        InputError: an unknown runner, ``address`` without ``dask``, the dask extra missing, or experts that hold a
            GPU on a machine where none is visible.
    """
    if runner not in ("threads", "dask"):
        raise InputError(f"--runner: unknown runner '{runner}' (expected threads or dask)")
    if address and runner != "dask":
        raise InputError(f"--address: only --runner dask connects to a scheduler (got --runner {runner})")
    if runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=THREADS)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise InputError("--runner dask needs the dask extra: pip install 'mpers-toolkit[dask]'") from None
    if address:
        return DaskTaskRunner(address=address)
    holders = gpu_experts(configs)
    if not holders:
        return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs())
    gpus = visible_gpus()
    if not gpus:
        raise InputError(
            f"--runner dask: expert(s) {', '.join(holders)} keep a model on a GPU of the process that runs them, and "
            "this machine shows no CUDA device; run them where one is, or pass --address of a cluster whose workers "
            "have GPUs"
        )
    if say is not None:
        say(f"local Dask cluster: one worker per GPU ({', '.join(gpus)}), as {', '.join(holders)} hold a GPU")
    return DaskTaskRunner(cluster_class=f"{__name__}.gpu_cluster", cluster_kwargs={"gpus": gpus})


def local_cluster_kwargs() -> dict[str, Any]:
    """The LocalCluster of ``--runner dask`` without ``--address`` and without GPU experts: worker processes, as on a
    cluster, so a shard task meets the same pickling and per-process model loading locally as it will there; one
    thread per worker (an expert runs its own concurrency), one worker per CPU this process may use, listening on
    loopback only."""
    return {"n_workers": max(1, usable_cpus()), "threads_per_worker": 1, "processes": True, "host": LOOPBACK}


def gpu_experts(configs: Sequence[ExpertConfig]) -> list[str]:
    """The names of the experts that keep a model on a GPU of the process that runs them (their class says so)."""
    return [config.name for config in configs if expert_class(config.backend).holds_gpu(config)]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indexes where it is unset)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(index) for index in range(count)]
    return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]


def gpu_cluster(gpus: Sequence[str], threads: int = THREADS) -> Any:
    """A cluster of one worker process per GPU, each seeing only its own (``CUDA_VISIBLE_DEVICES``), on loopback.

    Args:
        gpus: the devices, as ``CUDA_VISIBLE_DEVICES`` names them (indexes or UUIDs).
        threads: shard tasks each worker runs at once.

    Returns:
        A started ``distributed.SpecCluster`` (a context manager that stops it).
    """
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        f"gpu-{gpu}": {
            "cls": Nanny,
            "options": {"nthreads": threads, "host": LOOPBACK, "env": {"CUDA_VISIBLE_DEVICES": gpu}},
        }
        for gpu in gpus
    }
    scheduler = {"cls": Scheduler, "options": {"host": LOOPBACK, "port": 0, "dashboard": False}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="mpers-gpu")


def release_in_workers(config: ExpertConfig, runner: Any) -> None:
    """Release an expert in this process and, where ``runner`` is a Dask task runner, in every worker of its cluster
    (what a worker's shard tasks built lives in that worker's process, not in this one)."""
    model_cache.release_expert(config)
    client = _dask_client(runner)
    if client is not None:
        client.run(model_cache.release_key, model_cache.expert_key(config))


def _dask_client(runner: Any) -> Any:
    """The Dask client of a prefect-dask task runner that has started one; None for any other runner."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        return None
    return runner.client if isinstance(runner, DaskTaskRunner) else None
