"""In-process ``vllm.LLM`` engine (the ``vllm`` extra, CUDA only). vLLM is imported on first use only.

The engine is started with one image per prompt and a pixel cap, so a 7B VLM does not run out of memory at
start-up, and the images are shrunk to ``max_side`` before they are sent.
"""

from __future__ import annotations

import time
from typing import Any

from caption_pipeline.experts.base import CaptionRequest, CaptionResult, chat_messages, image_data_url
from manifests.errors import InputError
from manifests.run_manifest import ExpertConfig


def engine_args(config: ExpertConfig) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for an expert (``engine_kwargs`` of the manifest win)."""
    args: dict[str, Any] = {
        "model": config.model,
        "limit_mm_per_prompt": {"image": 1},
        "max_num_seqs": max(config.batch_size, 8),
        "seed": 0,
    }
    if "qwen" in (config.model or "").lower():
        # Qwen2/2.5-VL size their visual token budget from the pixel count.
        args["mm_processor_kwargs"] = {"max_pixels": config.max_side * config.max_side, "min_pixels": 28 * 28}
    if config.dtype != "auto":
        args["dtype"] = config.dtype
    return {**args, **config.engine_kwargs}


def sampling_args(config: ExpertConfig, request: CaptionRequest | None = None) -> dict[str, Any]:
    """Keyword arguments of one request's ``vllm.SamplingParams``: its temperature and seed (a per-request seed
    makes a sampled re-prompt reproducible whatever else is in the batch)."""
    temperature, seed = request.decoding(config.temperature) if request else (config.temperature, None)
    return {"max_tokens": config.max_new_tokens, "temperature": temperature, "seed": 0 if seed is None else seed}


def build_conversations(requests: list[CaptionRequest], config: ExpertConfig) -> list[list[dict]]:
    return [chat_messages(request, image_data_url(request.image_path, config.max_side)) for request in requests]


class VLLMExpert:
    """An expert run by an in-process vLLM engine, created on the first batch."""

    backend = "vllm"
    reprompts = True

    def __init__(self, config: ExpertConfig) -> None:
        self.config = config
        self.name = config.name
        self.model = config.model
        self._llm = None

    def _engine(self):
        if self._llm is None:
            try:
                import vllm
            except ImportError:
                raise InputError(
                    f"expert {self.name}: backend 'vllm' needs the vllm extra (pip install 'mpers-toolkit[vllm]' on a "
                    "CUDA machine), or serve the model with `vllm serve` and use backend 'openai'"
                ) from None
            self._vllm = vllm
            self._llm = vllm.LLM(**engine_args(self.config))
        return self._llm

    def generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        llm = self._engine()
        started = time.perf_counter()
        # One SamplingParams per conversation: the attempts of a batch differ in temperature and seed.
        params = [self._vllm.SamplingParams(**sampling_args(self.config, request)) for request in requests]
        outputs = llm.chat(build_conversations(requests, self.config), params)
        latency = (time.perf_counter() - started) / max(len(requests), 1)
        results = []
        for output in outputs:
            completion = output.outputs[0]
            results.append(
                CaptionResult(completion.text.strip(), completion.finish_reason, len(completion.token_ids), latency)
            )
        return results
