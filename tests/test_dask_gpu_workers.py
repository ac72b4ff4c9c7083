"""``--runner dask`` without ``--address`` for experts that hold a GPU: one worker process per GPU, each seeing only
its own, and an engine released in every worker before the next one starts (no GPU needed: the workers are real
processes, the GPUs are names in CUDA_VISIBLE_DEVICES and the engine a stand-in)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from prefect_dask import DaskTaskRunner

from flows import dask_runner
from flows.dask_runner import gpu_cluster, local_cluster_kwargs, release_in_workers, task_runner, visible_gpus
from flows.model_cache import ModelCache, expert_key
from manifests.errors import InputError
from manifests.run_manifest import OpenAIExpertConfig, TransformersExpertConfig, VLLMExpertConfig

VLLM = VLLMExpertConfig(name="qwen", backend="vllm", model="Qwen/Qwen2.5-VL-3B-Instruct")
HTTP = OpenAIExpertConfig(name="gpt", backend="openai", model="gpt-4o", base_url="http://127.0.0.1:9/v1")
ON_CPU = TransformersExpertConfig(name="local", backend="transformers", model="some/model", device="cpu")


class StandInEngine:
    """Writes a file named after its worker's GPU when closed, so the test process sees which workers released it."""

    def __init__(self, folder: str) -> None:
        self.marker = Path(folder) / f"closed-on-gpu-{os.environ['CUDA_VISIBLE_DEVICES']}"

    def close(self) -> None:
        self.marker.write_text("closed")


def worker_gpu() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def cached_keys() -> list[str]:
    return ModelCache.of_process().keys()


def build_stand_in(key: str, folder: str) -> str:
    return type(ModelCache.of_process().get(key, lambda: StandInEngine(folder))).__name__


def test_gpu_experts_get_one_worker_per_gpu(monkeypatch):
    monkeypatch.setattr(dask_runner, "visible_gpus", lambda: ["0", "1"])
    said: list[str] = []
    runner = task_runner("dask", None, [VLLM, HTTP], said.append)
    assert runner.cluster_class == "flows.dask_runner.gpu_cluster" and runner.cluster_kwargs == {"gpus": ["0", "1"]}
    assert said == ["local Dask cluster: one worker per GPU (0, 1), as qwen hold a GPU"]
    # without an expert that holds a GPU: one single-threaded worker per CPU, as before
    assert task_runner("dask", None, [HTTP, ON_CPU]).cluster_kwargs == local_cluster_kwargs()


def test_gpu_experts_without_a_gpu_are_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(dask_runner, "visible_gpus", lambda: [])
    with pytest.raises(
        InputError, match=r"--runner dask: expert\(s\) qwen keep a model on a GPU .* no CUDA device"
    ) as error:
        task_runner("dask", None, [VLLM, HTTP])
    assert "\n" not in str(error.value) and "--address" in str(error.value)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5,7")
    assert visible_gpus() == ["3", "5"]  # what CUDA shows of the list
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


@pytest.mark.slow
def test_each_worker_sees_its_gpu_and_an_engine_is_released_in_every_worker(tmp_path):
    key = expert_key(VLLM)
    with gpu_cluster(["3", "5"], threads=1) as cluster:
        runner = DaskTaskRunner(address=cluster.scheduler_address)
        with runner:
            client = runner.client
            seen = client.run(worker_gpu)
            assert sorted(seen.values()) == ["3", "5"]
            assert all(address.startswith("tcp://127.0.0.1:") for address in seen)
            assert set(client.run(build_stand_in, key, str(tmp_path)).values()) == {"StandInEngine"}
            release_in_workers(VLLM, runner)
            assert sorted(path.name for path in tmp_path.iterdir()) == ["closed-on-gpu-3", "closed-on-gpu-5"]
            assert list(client.run(cached_keys).values()) == [[], []]
