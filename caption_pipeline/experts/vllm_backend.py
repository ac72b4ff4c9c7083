"""In-process ``vllm.LLM`` engine (the ``vllm`` extra, CUDA only). vLLM is imported on first use only.

One engine per expert object, shared by every shard thread of the process: it is built once, its ``chat`` calls are
serialised (``vllm.LLM`` is not thread-safe) and every output is matched back to its request by request id. The engine
is started with one image per prompt and a pixel cap, so a 7B VLM does not run out of memory at start-up, and the
images are shrunk to ``max_side`` before they are sent.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from caption_pipeline.experts.base import (
    CaptionRequest,
    CaptionResult,
    Expert,
    ExpertUnavailable,
    chat_messages,
    image_data_url,
)
from manifests.errors import first_line
from manifests.run_manifest import VLLMExpertConfig

logger = logging.getLogger(__name__)

# Qwen2/2.5-VL resize every image to a multiple of 28 px (14 px patches merged 2 x 2): one merged patch is the least.
QWEN_MIN_PIXELS = 28 * 28


class Completion(Protocol):
    """What the adapter reads of a ``vllm.CompletionOutput``."""

    text: str
    finish_reason: str | None
    token_ids: Sequence[int]


class RequestOutput(Protocol):
    """What the adapter reads of a ``vllm.RequestOutput``."""

    request_id: str
    outputs: Sequence[Completion]


class Engine(Protocol):
    """The part of ``vllm.LLM`` the adapter uses; tests pass a scripted stand-in."""

    def chat(
        self, messages: list[list[dict]], sampling_params: list[Any], use_tqdm: bool = True
    ) -> Sequence[RequestOutput]:
        """Generate one answer per conversation."""
        ...


EngineFactory = Callable[[dict[str, Any]], Engine]
SamplingFactory = Callable[[dict[str, Any]], Any]


def is_qwen(config: VLLMExpertConfig) -> bool:
    """Whether the model is a Qwen VLM, whose processor sizes its visual tokens from a pixel budget."""
    return "qwen" in config.model.lower()


def engine_args(config: VLLMExpertConfig) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for an expert (``engine_kwargs`` of the manifest win).

    ``max_num_seqs`` is left to vLLM unless the manifest sets it. For Qwen the pixel cap ``max_side**2`` is given as
    ``min_pixels`` / ``max_pixels`` (:func:`qwen_pixel_cap`). Videos are switched off for Qwen, so vLLM reserves no
    video tokens.
    """
    qwen = is_qwen(config)
    args: dict[str, Any] = {
        "model": config.model,
        "seed": 0,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "limit_mm_per_prompt": {"image": 1, "video": 0} if qwen else {"image": 1},
    }
    if config.max_num_seqs is not None:
        args["max_num_seqs"] = config.max_num_seqs
    if config.dtype != "auto":
        args["dtype"] = config.dtype
    if qwen:
        args["mm_processor_kwargs"] = qwen_pixel_cap(config.max_side)
    return {**args, **config.engine_kwargs}


def qwen_pixel_cap(max_side: int) -> dict[str, int]:
    """Qwen2/2.5-VL's processor arguments that cap an image at ``max_side**2`` pixels.

    Given as ``min_pixels`` / ``max_pixels``, not as ``size``: ``Qwen2VLImageProcessor.__init__`` (transformers 4.56
    to 5.25) lets the ``min_pixels`` / ``max_pixels`` of the model's ``preprocessor_config.json`` (Qwen2.5-VL: 3136
    and 12845056) override a ``size`` passed at construction, and vLLM sizes its start-up memory profile from the
    processor it constructs (the image with the most tokens it allows); a per-request ``size`` is honoured, so the
    images were capped either way, but the profile was sized for 12.8 MP images. The same dictionary is what
    ``vllm serve --mm-processor-kwargs`` takes (README).
    """
    return {"min_pixels": QWEN_MIN_PIXELS, "max_pixels": max_side * max_side}


def sampling_args(config: VLLMExpertConfig, request: CaptionRequest) -> dict[str, Any]:
    """Keyword arguments of one request's ``vllm.SamplingParams``: every sampling field the expert means (the
    fields ``vllm serve`` gets in the request body, so both give the same captions) and a seed (a per-request seed
    makes a sampled re-prompt reproducible whatever else is in the batch)."""
    return {"max_tokens": config.max_new_tokens, "seed": 0, **request.sampling(config).vllm_fields()}


def build_conversations(requests: list[CaptionRequest], config: VLLMExpertConfig) -> list[list[dict]]:
    """One OpenAI-style conversation per request, its image resized to ``max_side`` and inlined as a data URL."""
    return [chat_messages(request, image_data_url(request.image_path, config.max_side)) for request in requests]


# A request id is vLLM's counter, possibly after a prefix: the counter is the trailing run of digits.
_REQUEST_ID = re.compile(r"(?:.*\D)?(\d+)")


def outputs_in_request_order(outputs: Sequence[RequestOutput], count: int) -> list[RequestOutput] | str:
    """The outputs of one ``chat`` call put back in the order of its requests, or why that cannot be done.

    What this relies on, read in vLLM's source (``vllm/entrypoints/llm.py``): ``LLM._validate_and_add_requests``
    adds the prompts in list order and ``LLM._add_request`` gives each ``request_id = str(next(self.request_counter))``,
    so the ids of one call are distinct and increase with the request position. ``LLM._run_engine`` then steps the
    engine until it has no unfinished request and keeps every finished output, this call's or not, before it sorts
    them with ``int(request_id)``. vLLM v1 adds a random suffix to the internal id
    (``InputProcessor.assign_request_id`` in ``vllm/v1/engine/input_processor.py``), but ``RequestOutput.request_id``
    is the external one (``external_req_id`` in ``vllm/v1/engine/output_processor.py``). Hence: sort by the parsed
    counter, never trust list order, and refuse a call whose outputs are not exactly one per request (an extra output
    is a request of another call), rather than attach a caption to the wrong tile.

    Args:
        outputs: what ``chat`` returned.
        count: how many conversations the call sent.

    Returns:
        The outputs in request order, or a one-line reason for failing every request of the call.
    """
    if len(outputs) != count:
        return f"vLLM returned {len(outputs)} outputs for {count} requests; none can be matched to its tile"
    counters = []
    for output in outputs:
        request_id = str(getattr(output, "request_id", ""))
        match = _REQUEST_ID.fullmatch(request_id)
        if match is None:
            return f"vLLM returned an output with request id {request_id!r}, which has no request counter"
        counters.append(int(match.group(1)))
    repeated = sorted(counter for counter, times in Counter(counters).items() if times > 1)
    if repeated:
        return f"vLLM returned request ids {repeated} more than once; none can be matched to its tile"
    return [output for _, output in sorted(zip(counters, outputs, strict=True), key=lambda pair: pair[0])]


def _failed(error: str, latency_s: float = 0.0) -> CaptionResult:
    return CaptionResult(None, None, None, latency_s, error=error)


def _one_line(exc: BaseException) -> str:
    """The exception's type and its whole message on one line, as a caption-store error."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _result(output: RequestOutput, latency_s: float) -> CaptionResult:
    completions = getattr(output, "outputs", None) or []
    if not completions:
        return _failed(f"vLLM returned no completion for request id {getattr(output, 'request_id', None)!r}", latency_s)
    completion = completions[0]
    return CaptionResult(completion.text.strip(), completion.finish_reason, len(completion.token_ids), latency_s)


def shutdown_engine(llm: Any) -> None:
    """Stop an engine's background engine-core process, so its GPU memory is freed before the next engine starts.

    vLLM's ``LLM`` has no public teardown in the releases read (``vllm/entrypoints/llm.py``); its engine
    (``vllm/v1/engine/llm_engine.py``) keeps an ``EngineCoreClient`` as ``llm_engine.engine_core``, whose
    ``shutdown()`` (``vllm/v1/engine/core_client.py``) stops the in-process core or the background process. A newer
    ``LLM.shutdown()`` (proposed upstream) is preferred when it exists. Every step is optional, so a stand-in or
    another vLLM version without them is only dropped; a failing shutdown is logged, never raised.
    """
    steps = [getattr(llm, "shutdown", None)]
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    steps.append(getattr(core, "shutdown", None))
    for step in steps:
        if callable(step):
            try:
                step()
            except Exception as exc:  # the engine is being dropped anyway; the next one must still be able to start
                logger.warning("vLLM engine shutdown failed: %s", first_line(exc))
            return


class VLLMExpert(Expert):
    """An expert run by an in-process vLLM engine, created on the first batch and shared by the shard threads.

    Args:
        config: the expert's manifest entry.
        engine_factory: builds the engine from ``engine_args(config)``; ``vllm.LLM`` by default.
        sampling_factory: builds one request's sampling parameters from ``sampling_args``; ``vllm.SamplingParams``
            by default.
    """

    backend = "vllm"
    reprompts = True
    needs_class_mask = False
    pipeline_chunk = None  # the engine batches the whole request list itself
    runs_alone = True  # each engine takes most of the GPU (gpu_memory_utilization)

    @classmethod
    def holds_gpu(cls, config: VLLMExpertConfig) -> bool:
        """Always: the engine lives on a GPU of the process that builds it."""
        return True

    def __init__(
        self,
        config: VLLMExpertConfig,
        engine_factory: EngineFactory | None = None,
        sampling_factory: SamplingFactory | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.model = config.model
        self._engine_factory = engine_factory or self._vllm_engine
        self._sampling_factory = sampling_factory or self._vllm_sampling_params
        # One lock for building, calling and closing the engine: vllm.LLM is not thread-safe (a chat() collects every
        # finished request of the engine, its own or a concurrent caller's), and shard threads share this object.
        self._lock = threading.Lock()
        self._llm: Engine | None = None
        self._build_error: ExpertUnavailable | None = None

    def _vllm(self) -> Any:
        try:
            import vllm
        except ImportError as exc:
            if exc.name != "vllm":  # vLLM is there but broken: the engine build names the cause
                raise
            raise ExpertUnavailable(
                f"expert {self.name}: backend 'vllm' runs in the vLLM environment (`make vllm-env`, then "
                "`.venv-vllm/bin/flows ...` on a CUDA machine), or serve the model with `vllm serve` and use "
                "backend 'openai'"
            ) from None
        return vllm

    def _vllm_engine(self, args: dict[str, Any]) -> Engine:
        return self._vllm().LLM(**args)

    def _vllm_sampling_params(self, args: dict[str, Any]) -> Any:
        return self._vllm().SamplingParams(**args)

    def _engine(self) -> Engine:
        """The engine, built on first use; the caller holds ``self._lock``.

        Raises:
            ExpertUnavailable: vLLM is missing, or the engine cannot start (out of memory, unknown model). The
                failure is kept, so the other shard threads get the same error instead of loading the model again.
        """
        if self._build_error is not None:
            raise ExpertUnavailable(str(self._build_error)) from self._build_error.__cause__
        if self._llm is None:
            try:
                self._llm = self._engine_factory(engine_args(self.config))
            except ExpertUnavailable as exc:
                self._build_error = exc
                raise
            except Exception as exc:
                self._build_error = ExpertUnavailable(
                    f"expert {self.name}: vLLM could not start model {self.model}: {first_line(exc)}"
                )
                raise self._build_error from exc
        return self._llm

    def generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """Captions for ``requests``, in order; a request vLLM fails on gives a failed result, never an exception.

        Raises:
            ExpertUnavailable: the engine cannot be built (see ``_engine``): no caption can be made without it.
        """
        if not requests:
            return []
        with self._lock:
            self._engine()  # a missing vLLM or a model that cannot start fails before any image is encoded
        # Images are encoded outside the lock, so one shard prepares its batch while another one's is generated.
        results: dict[int, CaptionResult] = {}
        conversations, params, positions = [], [], []
        for position, request in enumerate(requests):
            try:
                conversation = chat_messages(request, image_data_url(request.image_path, self.config.max_side))
            except (OSError, ValueError) as exc:
                results[position] = _failed(f"unreadable image {request.image_path}: {first_line(exc)}")
                continue
            conversations.append(conversation)
            # One SamplingParams per conversation: the attempts of a batch differ in temperature and seed.
            params.append(self._sampling_factory(sampling_args(self.config, request)))
            positions.append(position)
        if positions:
            results.update(zip(positions, self._chat(conversations, params), strict=True))
        return [results[position] for position in range(len(requests))]

    def _chat(self, conversations: list[list[dict]], params: list[Any]) -> list[CaptionResult]:
        """One serialised ``chat`` call; its failures become failed results (recorded, retried on resume)."""
        with self._lock:
            llm = self._engine()  # a close() since the first check builds a fresh engine
            started = time.perf_counter()
            try:
                outputs = llm.chat(conversations, params, use_tqdm=False)
            except Exception as exc:  # any engine failure of this batch must not end the run
                if type(exc).__name__ == "EngineDeadError":  # every later call would fail too: stop the run
                    self._llm = None
                    raise ExpertUnavailable(f"expert {self.name}: the vLLM engine died: {_one_line(exc)}") from exc
                error: str | None = f"vLLM chat failed: {_one_line(exc)}"
                outputs = []
            else:
                error = None
            latency = (time.perf_counter() - started) / len(conversations)
        if error is None:
            ordered = outputs_in_request_order(list(outputs), len(conversations))
            if isinstance(ordered, list):
                return [_result(output, latency) for output in ordered]
            error = ordered
        logger.warning("expert %s: %d requests failed: %s", self.name, len(conversations), error)
        return [_failed(error, latency) for _ in conversations]

    def close(self) -> None:
        """Release the engine so that the next vLLM expert can start in this process; idempotent.

        Waits for a running ``chat``, shuts the engine down, drops it and empties the CUDA cache. A later
        ``generate`` builds a new engine.
        """
        with self._lock:
            llm, self._llm = self._llm, None
            self._build_error = None
        if llm is None:
            return
        shutdown_engine(llm)
        del llm
        gc.collect()  # the engine's tensors are only freed once the cycles that reference them are collected
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
