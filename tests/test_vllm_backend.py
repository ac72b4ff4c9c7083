"""The in-process vLLM adapter, run against a scripted engine: no vllm, no GPU."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from caption_pipeline.experts import build_expert
from caption_pipeline.experts.base import CaptionRequest, ExpertUnavailable, image_data_url
from caption_pipeline.experts.vllm_backend import VLLMExpert, build_conversations, engine_args, sampling_args
from manifests.errors import InputError
from manifests.run_manifest import VLLMExpertConfig

QWEN = "Qwen/Qwen2.5-VL-3B-Instruct"
LLAVA = "llava-hf/llava-1.5-7b-hf"

# Keyword arguments vllm.LLM accepts, read in vLLM's source: the named parameters of LLM.__init__
# (vllm/entrypoints/llm.py) and the EngineArgs fields it forwards its **kwargs to (vllm/engine/arg_utils.py).
VLLM_LLM_ARGUMENTS = {
    "model", "tokenizer", "tokenizer_mode", "trust_remote_code", "dtype", "quantization", "revision", "seed",
    "gpu_memory_utilization", "swap_space", "cpu_offload_gb", "enforce_eager", "hf_overrides", "mm_processor_kwargs",
    "limit_mm_per_prompt", "max_num_seqs", "max_model_len", "max_num_batched_tokens", "tensor_parallel_size",
    "kv_cache_dtype", "download_dir", "enable_prefix_caching",
}  # fmt: skip
# Fields of vllm.SamplingParams (vllm/sampling_params.py) that the adapter sets.
VLLM_SAMPLING_ARGUMENTS = {"max_tokens", "seed", "temperature", "top_p", "top_k", "min_p", "repetition_penalty"}
# What Qwen2.5-VL-3B-Instruct's preprocessor_config.json says about image sizes (the hub file's keys).
QWEN_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
    "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}  # fmt: skip


def config(model: str = QWEN, **settings: Any) -> VLLMExpertConfig:
    return VLLMExpertConfig(name="vlm", backend="vllm", model=model, **settings)


def caption_for(conversation: list[dict]) -> str:
    """The scripted engine's answer: derived from the prompt and the image it was sent with."""
    image, text = conversation[0]["content"]
    return f"{text['text']} on {hashlib.sha1(image['image_url']['url'].encode()).hexdigest()[:10]}"


class ScriptedEngine:
    """Stands in for ``vllm.LLM``: numbers requests from its own counter, as ``LLM._add_request`` does, and returns
    the outputs in reverse (requests finish out of order). It records a second caller entering ``chat`` while one is
    inside, and can drop an output, repeat an id or raise."""

    def __init__(self, args: dict[str, Any], fault: str | None = None, id_prefix: str = "") -> None:
        self.args, self.fault, self.id_prefix = args, fault, id_prefix
        self.counter = count()
        self.inside = 0
        self.overlaps = 0
        self.calls: list[list[Any]] = []
        self.shutdowns = 0
        self._guard = threading.Lock()
        # Where current vLLM keeps the engine-core client whose shutdown() stops the engine.
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))

    def _shutdown(self) -> None:
        self.shutdowns += 1

    def chat(self, messages: list[list[dict]], sampling_params: list[Any], use_tqdm: bool = True) -> list[Any]:
        with self._guard:
            self.inside += 1
            overlapping = self.inside > 1
            self.overlaps += overlapping
        try:
            if overlapping:
                raise RuntimeError("chat() entered by two threads at once")
            time.sleep(0.02)  # long enough for an unserialised caller to walk in
            assert len(sampling_params) == len(messages)
            self.calls.append(sampling_params)
            if self.fault == "raise":
                raise RuntimeError(
                    "CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA"
                )
            outputs = []
            for conversation in messages:
                done = SimpleNamespace(text=f" {caption_for(conversation)} ", finish_reason="stop", token_ids=[1, 2, 3])
                outputs.append(SimpleNamespace(request_id=f"{self.id_prefix}{next(self.counter)}", outputs=[done]))
            if self.fault == "drop":
                outputs.pop()
            if self.fault == "duplicate" and len(outputs) > 1:
                outputs[1].request_id = outputs[0].request_id
            if self.fault == "no id":
                outputs[0].request_id = "request"
            return outputs[::-1]
        finally:
            with self._guard:
                self.inside -= 1


class Factory:
    """Counts the engines built; each is a ``ScriptedEngine``."""

    def __init__(self, **engine: Any) -> None:
        self.engine = engine
        self.built: list[ScriptedEngine] = []

    def __call__(self, args: dict[str, Any]) -> ScriptedEngine:
        time.sleep(0.05)  # building takes a while: a racing thread would build its own
        self.built.append(ScriptedEngine(args, **self.engine))
        return self.built[-1]


@pytest.fixture
def tiles(tmp_path: Path) -> list[Path]:
    """Eight small tiles, each a different colour (so each has its own data URL)."""
    paths = []
    for i in range(8):
        path = tmp_path / f"tile{i}.png"
        Image.new("RGB", (24, 16), (30 * i, 255 - 30 * i, 7 * i)).save(path)
        paths.append(path)
    return paths


def expected(request: CaptionRequest, max_side: int = 512) -> str:
    url = image_data_url(request.image_path, max_side)
    return f"{request.prompt} on {hashlib.sha1(url.encode()).hexdigest()[:10]}"


def test_shard_threads_share_one_engine_serialise_chat_and_get_their_own_captions(tiles):
    factory = Factory()
    expert = VLLMExpert(config(), engine_factory=factory, sampling_factory=dict)
    start = threading.Barrier(4)

    def shard(worker: int) -> list[tuple[CaptionRequest, Any]]:
        pairs = []
        start.wait()  # four shard tasks call generate() at the same moment
        for batch in range(2):
            requests = [
                CaptionRequest(f"w{worker}b{batch}r{r}", tiles[(worker + r) % len(tiles)], f"w{worker} b{batch} r{r}")
                for r in range(3)  # 3 per call: some calls get ids 9, 10, 11, where a text sort would misplace them
            ]
            pairs.extend(zip(requests, expert.generate(requests), strict=True))
        return pairs

    with ThreadPoolExecutor(max_workers=4) as pool:
        pairs = [pair for result in pool.map(shard, range(4)) for pair in result]

    assert len(factory.built) == 1
    engine = factory.built[0]
    assert engine.overlaps == 0 and len(engine.calls) == 8
    assert len(pairs) == 24 and all(result.error is None for _, result in pairs)
    assert all(result.caption == expected(request) for request, result in pairs)
    assert all(result.finish_reason == "stop" and result.n_generated == 3 for _, result in pairs)


def test_prefixed_request_ids_are_matched_by_their_counter(tiles):
    factory = Factory(id_prefix="chat-")
    expert = VLLMExpert(config(), engine_factory=factory, sampling_factory=dict)
    requests = [CaptionRequest(f"t{i}", tile, f"prompt {i}") for i, tile in enumerate(tiles * 2)]  # ids 0 to 15
    assert [result.caption for result in expert.generate(requests)] == [expected(request) for request in requests]


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("drop", "returned 3 outputs for 4 requests"),
        ("duplicate", "request ids [0] more than once"),
        ("no id", "'request'"),
    ],
)
def test_outputs_that_cannot_be_matched_fail_every_request_of_the_call(tiles, fault, message):
    expert = VLLMExpert(config(), engine_factory=Factory(fault=fault), sampling_factory=dict)
    results = expert.generate([CaptionRequest(f"t{i}", tiles[i], f"p{i}") for i in range(4)])
    assert len(results) == 4
    assert all(result.caption is None and message in result.error for result in results)


def test_a_failing_chat_gives_failed_results_and_the_next_batch_still_runs(tiles):
    factory = Factory(fault="raise")
    expert = VLLMExpert(config(), engine_factory=factory, sampling_factory=dict)
    results = expert.generate([CaptionRequest("a", tiles[0], "x"), CaptionRequest("b", tiles[1], "y")])
    error = (
        "vLLM chat failed: RuntimeError: CUDA error: an illegal memory access was encountered "
        "Compile with TORCH_USE_CUDA_DSA"
    )
    assert [(result.caption, result.error) for result in results] == [(None, error)] * 2
    factory.built[0].fault = None
    request = CaptionRequest("a", tiles[0], "x")
    assert expert.generate([request])[0].caption == expected(request)
    assert len(factory.built) == 1


def test_a_dead_engine_stops_the_run_instead_of_failing_every_later_tile(tiles):
    class EngineDeadError(RuntimeError):  # vllm.v1.engine.exceptions.EngineDeadError, by name
        pass

    factory = Factory()
    expert = VLLMExpert(config(), engine_factory=factory, sampling_factory=dict)
    expert.generate([CaptionRequest("a", tiles[0], "x")])

    def dead(*args: Any, **kwargs: Any) -> None:
        raise EngineDeadError("EngineCore encountered an issue. See stack trace for the root cause.")

    factory.built[0].chat = dead
    with pytest.raises(ExpertUnavailable, match=r"^expert vlm: the vLLM engine died: EngineDeadError: EngineCore"):
        expert.generate([CaptionRequest("b", tiles[1], "y")])


def test_an_unreadable_tile_fails_alone(tiles, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    expert = VLLMExpert(config(), engine_factory=Factory(), sampling_factory=dict)
    requests = [
        CaptionRequest("a", tiles[0], "x"),
        CaptionRequest("b", broken, "y"),
        CaptionRequest("c", tiles[2], "z"),
    ]
    first, second, third = expert.generate(requests)
    assert first.caption == expected(requests[0]) and third.caption == expected(requests[2])
    assert second.caption is None and second.error.startswith(f"unreadable image {broken}")


def test_an_engine_that_cannot_start_stops_the_run_with_one_line(tiles):
    built = []

    def out_of_memory(args: dict[str, Any]) -> ScriptedEngine:
        built.append(args)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nGPU 0 has a total capacity of 23.6 GiB")

    expert = VLLMExpert(config(), engine_factory=out_of_memory, sampling_factory=dict)
    for _ in range(2):  # a second shard thread gets the same error without loading the model again
        with pytest.raises(ExpertUnavailable) as raised:  # the flow stops on it instead of retrying
            expert.generate([CaptionRequest("a", tiles[0], "x")])
        cause = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
        assert str(raised.value) == f"expert vlm: vLLM could not start model {QWEN}: {cause}"
    assert len(built) == 1


def test_close_shuts_the_engine_down_and_a_later_batch_starts_a_new_one(tiles):
    factory = Factory()
    expert = VLLMExpert(config(), engine_factory=factory, sampling_factory=dict)
    expert.close()  # nothing to release yet
    request = CaptionRequest("a", tiles[0], "x")
    expert.generate([request])
    expert.close()
    expert.close()
    assert [engine.shutdowns for engine in factory.built] == [1]
    assert expert.generate([request])[0].caption == expected(request)
    assert len(factory.built) == 2 and factory.built[1].shutdowns == 0


def test_engine_arguments_of_qwen_and_llava():
    qwen = engine_args(config(max_side=448))
    assert qwen == {
        "model": QWEN, "seed": 0, "gpu_memory_utilization": 0.8, "limit_mm_per_prompt": {"image": 1, "video": 0},
        "mm_processor_kwargs": {"min_pixels": 28 * 28, "max_pixels": 448 * 448},
    }  # fmt: skip
    assert engine_args(config(LLAVA)) == {
        "model": LLAVA, "seed": 0, "gpu_memory_utilization": 0.8, "limit_mm_per_prompt": {"image": 1},
    }  # fmt: skip
    tuned = engine_args(config(LLAVA, max_num_seqs=4, dtype="bfloat16", gpu_memory_utilization=0.5))
    assert (tuned["max_num_seqs"], tuned["dtype"], tuned["gpu_memory_utilization"]) == (4, "bfloat16", 0.5)
    manifest_wins = engine_args(config(engine_kwargs={"max_model_len": 8192, "limit_mm_per_prompt": {"image": 2}}))
    assert manifest_wins["max_model_len"] == 8192 and manifest_wins["limit_mm_per_prompt"] == {"image": 2}


@pytest.mark.parametrize("model", [QWEN, LLAVA])
def test_engine_arguments_are_named_as_vllm_names_them(model):
    args = engine_args(config(model, max_num_seqs=4, dtype="float16", engine_kwargs={"max_model_len": 4096}))
    assert set(args) <= VLLM_LLM_ARGUMENTS


def test_vllm_requests_are_built_without_vllm(tiles):
    assert "vllm" not in sys.modules
    qwen = config(max_side=448)
    assert sampling_args(qwen, CaptionRequest("t", tiles[0], "x"))["max_tokens"] == qwen.max_new_tokens
    [conversation] = build_conversations([CaptionRequest("t", tiles[0], "Describe.")], qwen)
    parts = conversation[0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,") and parts[1]["text"] == "Describe."
    with pytest.raises(InputError, match=r"runs in the vLLM environment \(`make vllm-env`"):
        build_expert(qwen).generate([CaptionRequest("t", tiles[0], "x")])


def test_vllm_gets_one_sampling_params_per_request(tiles):
    factory = Factory()
    expert = VLLMExpert(config(temperature=0.1), engine_factory=factory, sampling_factory=dict)
    requests = [
        CaptionRequest("a", tiles[0], "x", temperature=0.0, seed=0),
        CaptionRequest("a", tiles[0], "y", temperature=0.7, seed=2),
        CaptionRequest("b", tiles[1], "z"),
    ]
    assert [result.caption for result in expert.generate(requests)] == [expected(request) for request in requests]
    [params] = factory.built[0].calls
    assert [(p["temperature"], p["seed"], p["max_tokens"]) for p in params] == [
        (0.0, 0, 160),
        (0.7, 2, 160),
        (0.1, 0, 160),
    ]
    # every sampling field explicit, off where the manifest says nothing (top-k off is -1 for vLLM)
    assert all((p["top_p"], p["top_k"], p["min_p"], p["repetition_penalty"]) == (1.0, -1, 0.0, 1.0) for p in params)
    assert all(set(p) == VLLM_SAMPLING_ARGUMENTS for p in params)


def test_the_manifest_sampling_settings_reach_every_request(tiles):
    factory = Factory()
    tuned = config(top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1)
    VLLMExpert(tuned, engine_factory=factory, sampling_factory=dict).generate([CaptionRequest("a", tiles[0], "x")])
    [[params]] = factory.built[0].calls
    assert (params["top_p"], params["top_k"], params["min_p"], params["repetition_penalty"]) == (0.9, 40, 0.05, 1.1)


def test_the_qwen_pixel_cap_reaches_the_processor_vllm_constructs(tmp_path):
    """vLLM builds the processor with the engine's mm_processor_kwargs over the model's preprocessor_config.json and
    sizes its memory profile from it: the cap must survive construction (a `size` does not: Qwen's min_pixels and
    max_pixels override it), and it caps the tokens of a large image too."""
    import json

    import numpy as np
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN_PREPROCESSOR))
    kwargs = engine_args(config(max_side=448))["mm_processor_kwargs"]
    processor = AutoImageProcessor.from_pretrained(tmp_path, **kwargs)
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (28 * 28, 448 * 448)
    by_size = AutoImageProcessor.from_pretrained(tmp_path, size={"shortest_edge": 784, "longest_edge": 448 * 448})
    assert by_size.size["longest_edge"] == 12845056  # the form used before: overridden at construction
    grid = processor(images=[Image.fromarray(np.zeros((1000, 1400, 3), np.uint8))], return_tensors="pt")
    patches = int(grid["image_grid_thw"].prod())
    assert patches * 14 * 14 <= 448 * 448 and patches // 4 <= 256  # 14 px patches, merged 2 x 2 into tokens


def test_the_vllm_path_uses_no_transformers_api_of_its_own():
    """vLLM brings its own transformers (< 5): code the in-process path imports must not depend on our version."""
    import ast
    import subprocess

    probe = (
        "import sys, flows.generate_captions, caption_pipeline.experts.vllm_backend\n"
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] in "
        "('flows', 'caption_pipeline', 'manifests') and getattr(m, '__file__', None)))"
    )
    files = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert any(path.endswith("vllm_backend.py") for path in files)
    for path in files:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(name.split(".")[0] == "transformers" for name in names), path
