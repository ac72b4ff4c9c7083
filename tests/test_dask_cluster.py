"""``--runner dask`` against a real Dask cluster: a scheduler and workers that are separate processes, one of them
SIGKILLed mid-run; and the idempotent shard write that makes a re-run shard leave every attempt exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows import generate_captions as flow_module
from flows.dask_runner import local_cluster_kwargs, task_runner
from flows.generate_captions import CaptionRunSettings, caption_shard, generate_captions
from flows.model_cache import ModelCache
from manifests.caption_store import ATTEMPT_KEY, KEY_COLUMNS, read_store
from manifests.errors import InputError
from tests.helpers import ChatHandler, ChatServer, demo_data_yaml, serving

ROOT = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).parent / "dask"
KEY_ENV = "MPERS_TEST_DASK_KEY"


class SlowHandler(ChatHandler):
    """The chat stand-in, slower (a shard task lasts long enough to be killed mid-way), counting requests per API key
    (each worker process reads its own key from its environment, so the count says which process asked)."""

    def do_POST(self) -> None:
        server: KeyedServer = self.server  # type: ignore[assignment]
        with server.lock:
            server.by_key[self.headers.get("Authorization", "")] += 1
        time.sleep(server.delay)
        if server.failing:
            self.rfile.read(int(self.headers["Content-Length"]))
            self._reply(400, {"error": "down for the night"})
            return
        super().do_POST()


class KeyedServer(ChatServer):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.RequestHandlerClass = SlowHandler
        self.delay = delay
        self.failing = False
        self.by_key: Counter[str] = Counter()


@dataclass
class Cluster:
    scheduler_file: Path
    address: str
    workers: list[subprocess.Popen]


def _manifest(folder: Path, small_index, clip_config, url: str) -> Path:
    path = folder / "run.yaml"
    path.write_text(
        f"""
name: dask-cluster-test
{demo_data_yaml(small_index)}
captions:
  store: {folder / "store"}
  tau: 0.6
  max_attempts: 2
  shard_size: 2
  clip: {{model: demo-tiny-clip, pretrained: null, config: {clip_config.config}, checkpoint: {clip_config.checkpoint},
          device: cpu}}
  experts:
    - {{name: gpt, backend: openai, model: gpt-4o, base_url: {url}, api_key_env: {KEY_ENV}, concurrency: 1}}
"""
    )
    return path


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def dask_cluster(tmp_path: Path, prefect_api: str) -> Iterator[Cluster]:
    """``dask scheduler`` and two ``dask worker`` processes (no nanny, one thread each) on 127.0.0.1, started from
    this venv with the environment a cluster's workers would have; each worker has its own API key."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_API_URL": prefect_api,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    scheduler_file = tmp_path / "scheduler.json"
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen] = []

    def start(name: str, command: list[str], extra: dict[str, str]) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - the process writes it until it stops
        processes.append(subprocess.Popen(command, cwd=tmp_path, env={**env, **extra}, stdout=log, stderr=log))
        log.close()
        return processes[-1]

    try:
        start("scheduler", [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                            "--scheduler-file", str(scheduler_file)], {})  # fmt: skip
        _wait(lambda: scheduler_file.is_file() and scheduler_file.stat().st_size > 0, 30, "the scheduler file")
        worker = [str(DASK), "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--host",
                  "127.0.0.1", "--no-nanny", "--no-dashboard"]  # fmt: skip
        workers = [start(f"worker{n}", [*worker, "--name", f"w{n}"], {KEY_ENV: f"key-w{n}"}) for n in range(2)]
        address = json.loads(scheduler_file.read_text())["address"]
        yield Cluster(scheduler_file, address, workers)
    finally:
        _stop(processes[::-1])
        for log in sorted(logs.glob("*.log")):  # shown by pytest only when the test failed
            print(f"== {log.name}\n{log.read_text(errors='replace')[-3000:]}")


def _wait(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(
    dask_cluster, prefect_api, small_index, clip_config, tmp_path, monkeypatch
):
    from distributed import Client

    monkeypatch.setenv(KEY_ENV, "key-flow")  # the flow process checks the key before it submits anything
    with serving(KeyedServer(delay=0.1)) as server, Client(scheduler_file=str(dask_cluster.scheduler_file)) as client:
        manifest = _manifest(tmp_path, small_index, clip_config, f"http://127.0.0.1:{server.server_port}/v1")
        client.wait_for_workers(2, timeout=60)
        victim_pid = dask_cluster.workers[0].pid
        victim = next(a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "w0")
        store = tmp_path / "store"
        before_compaction: list = []
        real_compact = flow_module.compact

        def checked_compact(path, **kwargs):  # what the fragments hold before compaction drops repeated attempts
            before_compaction.append(read_store(path))
            return real_compact(path, **kwargs)

        monkeypatch.setattr(flow_module, "compact", checked_compact)
        killed: list[int] = []

        def kill_mid_task() -> None:
            # Once one shard is in the store, and while the victim is asking the server (mid-task, models loaded).
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                asked = server.by_key["Bearer key-w0"]
                time.sleep(0.15)
                if list(store.glob("part-*.parquet")) and client.processing().get(victim) and \
                        server.by_key["Bearer key-w0"] > asked:  # fmt: skip
                    os.kill(victim_pid, signal.SIGKILL)
                    killed.append(server.by_key["Bearer key-w0"])
                    return

        killer = threading.Thread(target=kill_mid_task, daemon=True)
        killer.start()
        started = time.monotonic()
        run = CaptionRunSettings(manifest, store=store, runner="dask", address=dask_cluster.address)
        summary = generate_captions(run)
        seconds = time.monotonic() - started
        killer.join(timeout=5)

    assert killed, "the victim worker was never caught mid-task"
    assert dask_cluster.workers[0].wait(timeout=5) == -signal.SIGKILL
    assert dask_cluster.workers[1].poll() is None  # the survivor did the rest
    assert summary.tiles == 12 and summary.unavailable is None
    raw = before_compaction[0]
    assert not raw.duplicated(list(ATTEMPT_KEY)).any(), "an attempt was written twice"
    final = read_store(store)
    keys = final.groupby(list(KEY_COLUMNS))
    assert keys.ngroups == 12 * 3  # no key lost
    assert (keys["selected"].sum() == 1).all()
    assert len(final) == len(raw) and not final.duplicated(list(ATTEMPT_KEY)).any()
    # Attempt numbers run 0..n-1 per key: a redone shard re-asked from attempt 0, it did not add attempts.
    assert (keys["attempt"].max() + 1 == keys.size()).all()
    # The victim's answered requests that never reached the store were asked again by the survivor.
    assert sum(server.by_key.values()) > len(final)
    assert server.by_key["Bearer key-w1"] > 0 and server.by_key["Bearer key-flow"] == 0
    print(f"cluster run with a worker killed: {seconds:.1f} s")


@contextmanager
def one_shard(small_index, clip_config, tmp_path: Path, monkeypatch) -> Iterator[tuple[KeyedServer, tuple]]:
    """A keyed chat server, and the arguments of one shard task of two tiles writing to ``tmp_path / "store"``."""
    monkeypatch.setenv(KEY_ENV, "key")
    with serving(KeyedServer(delay=0.0)) as server, ModelCache.of_process().hold():
        manifest = _manifest(tmp_path, small_index, clip_config, f"http://127.0.0.1:{server.server_port}/v1")
        tiles = sorted(small_index.frame["tile_id"])[:2]
        yield server, (str(manifest), "gpt", tiles, str(tmp_path / "store"), "run1", "sha")


def test_a_shard_run_again_rewrites_its_own_fragment(small_index, clip_config, tmp_path, monkeypatch):
    """A second execution of one shard task (a rescheduled Dask task) that did not see the first one's fragment
    (a shared filesystem's stale listing, or a worker presumed dead that still ran) replaces it instead of adding a
    second copy; one that did see it asks nothing again and leaves it alone."""
    store = tmp_path / "store"
    with one_shard(small_index, clip_config, tmp_path, monkeypatch) as (server, args):
        first = caption_shard.fn(*args)
        fragments = sorted(store.glob("part-*.parquet"))
        rows = read_store(store)
        asked = sum(server.by_key.values())
        assert first.rows == len(rows) > 0 and len(fragments) == 1

        again = caption_shard.fn(*args)  # saw the first fragment: every key is done
        assert again.rows == 0 and sum(server.by_key.values()) == asked
        assert sorted(store.glob("part-*.parquet")) == fragments

        monkeypatch.setattr(flow_module, "attempt_counts", lambda *a, **k: (set(), {}))
        monkeypatch.setattr(flow_module, "read_store", lambda path: read_store(path).iloc[0:0])
        blind = caption_shard.fn(*args)  # did not see it: asks everything again
        assert blind.rows == first.rows
    assert sorted(store.glob("part-*.parquet")) == fragments
    after = read_store(store)
    assert len(after) == len(rows) and not after.duplicated(list(ATTEMPT_KEY)).any()


def test_a_shard_run_again_keeps_what_its_first_run_wrote(small_index, clip_config, tmp_path, monkeypatch):
    """A second execution that finds keys of its shard not done (every attempt failed: a server down) asks only
    those again, continuing their attempt numbers, and keeps the first execution's rows in the one fragment."""
    store = tmp_path / "store"
    with one_shard(small_index, clip_config, tmp_path, monkeypatch) as (server, args):
        server.failing = True
        caption_shard.fn(*args)
        first = read_store(store)
        server.failing = False
        again = caption_shard.fn(*args)
    assert first["error"].notna().all() and again.rows > 0
    after = read_store(store)
    assert len(list(store.glob("part-*.parquet"))) == 1
    assert len(after) == len(first) + again.rows
    merged = after.merge(first, on=list(ATTEMPT_KEY), suffixes=("", "_first"))
    assert len(merged) == len(first) and (merged["error"] == merged["error_first"]).all()
    assert not after.duplicated(list(ATTEMPT_KEY)).any()
    assert after[after["error"].isna()]["attempt"].min() == first["attempt"].max() + 1


def test_the_default_dask_runner_is_a_cluster_of_worker_processes():
    runner = task_runner("dask", None)
    kwargs = runner.cluster_kwargs
    assert kwargs == local_cluster_kwargs()
    assert kwargs["processes"] is True and kwargs["threads_per_worker"] == 1 and kwargs["host"] == "127.0.0.1"
    assert kwargs["n_workers"] == len(os.sched_getaffinity(0))
    assert task_runner("dask", "tcp://127.0.0.1:8786").address == "tcp://127.0.0.1:8786"
    with pytest.raises(InputError, match="--address: only --runner dask"):
        task_runner("threads", "tcp://127.0.0.1:8786")
