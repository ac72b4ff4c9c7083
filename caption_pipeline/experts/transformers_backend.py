"""A local ``AutoModelForImageTextToText`` (Qwen2-VL, Qwen2.5-VL, LLaVA, Idefics3, ...) from a hub id or folder."""

from __future__ import annotations

import threading
import time
from itertools import groupby
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from caption_pipeline.experts.base import CaptionRequest, CaptionResult, Expert, ExpertUnavailable, load_image
from manifests.devices import resolve_device
from manifests.errors import first_line
from manifests.run_manifest import TransformersExpertConfig


def local_folder(config: TransformersExpertConfig) -> Path | None:
    """The folder an expert's ``model`` names, or None for a hub id.

    Raises:
        ExpertUnavailable: a path (it cannot be a hub id) that is not an existing folder.
    """
    path = Path(config.model).expanduser()
    if path.is_dir():
        return path
    try:
        validate_repo_id(config.model)
    except HFValidationError:
        why = "is a file, not a folder" if path.exists() else "not found"
        raise ExpertUnavailable(
            f"expert {config.name}: model folder {path} {why} (a transformers expert's model is a folder saved with "
            "save_pretrained, or a hub id such as Qwen/Qwen2.5-VL-3B-Instruct)"
        ) from None
    return None


def missing_hub_model(config: TransformersExpertConfig, why: str) -> ExpertUnavailable:
    """One line: which weights were looked for, where, and how to provide them."""
    return ExpertUnavailable(
        f"expert {config.name}: model {config.model} not found: hub id {config.model} is not in the Hugging Face "
        f"cache {hub_constants.HF_HUB_CACHE} ({why}); on a connected machine run `hf download {config.model}` and "
        "copy the cache here (or point HF_HOME / HF_HUB_CACHE at a copy), or set the expert's model to a local "
        "folder saved with save_pretrained"
    )


def check_weights(config: TransformersExpertConfig) -> None:
    """Refuse, before anything loads, weights that cannot be found: a missing folder, or (offline) a hub id the
    cache lacks. Online, a hub id is left to ``from_pretrained``, which downloads it.

    Raises:
        ExpertUnavailable: see :func:`local_folder` and :func:`missing_hub_model`.
    """
    is_hub_id = local_folder(config) is None
    # The constant, read at call time: is_offline_mode() only exists from huggingface_hub 1.2.1, and the vLLM
    # environment may hold 0.x (transformers<5 needs huggingface_hub<1).
    if (
        is_hub_id
        and hub_constants.HF_HUB_OFFLINE
        and not isinstance(try_to_load_from_cache(config.model, "config.json"), str)
    ):
        raise missing_hub_model(config, "offline: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set")


class TransformersExpert(Expert):
    """Batched ``generate`` with the model's own chat template.

    Each request's temperature decides the decoding: 0 is greedy (``do_sample=False``, passed explicitly so a
    model's shipped ``generation_config`` cannot turn sampling on), above 0 is sampling with the expert's ``top_k``,
    ``top_p`` and ``min_p`` (off by default: plain temperature sampling, overriding shipped values such as Qwen's
    ``top_k=1`` that would make it greedy again) after ``torch.manual_seed(seed)``; the expert's
    ``repetition_penalty`` (1, off, by default, where Qwen ships 1.05) is passed to both. Requests are batched by
    (temperature, seed), keeping their order otherwise, so a re-run with the same requests in the same batches gives
    the same captions.
    """

    backend = "transformers"
    reprompts = True
    needs_class_mask = False
    pipeline_chunk = None

    @classmethod
    def holds_gpu(cls, config: TransformersExpertConfig) -> bool:
        """Whether the model runs on CUDA here (``device`` cuda, or ``auto`` on a machine with a GPU).

        Raises:
            InputError: a device this machine does not have.
        """
        return resolve_device(config.device, source=f"expert {config.name}: device").type == "cuda"

    @classmethod
    def preflight(cls, config: TransformersExpertConfig) -> None:
        """Refuse weights that cannot be found before anything loads (:func:`check_weights`).

        Raises:
            ExpertUnavailable: a missing folder, or (offline) a hub id the cache lacks.
        """
        check_weights(config)

    def __init__(self, config: TransformersExpertConfig) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.config = config
        self.name = config.name
        self.model = config.model
        self.device = resolve_device(config.device, source=f"expert {config.name}: device")
        dtype = getattr(torch, config.dtype) if config.dtype != "auto" else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32
        )  # fmt: skip
        check_weights(config)
        try:
            self.processor = AutoProcessor.from_pretrained(config.model)
            network = AutoModelForImageTextToText.from_pretrained(config.model, dtype=dtype)
        except (OSError, ValueError) as exc:  # transformers' EnvironmentError for missing files; unknown model types
            reason = first_line(exc, named=False)
            if local_folder(config) is None and isinstance(exc, OSError):
                raise missing_hub_model(config, f"download failed: {reason}") from None
            raise ExpertUnavailable(f"expert {config.name}: cannot load model {config.model}: {reason}") from None
        self.processor.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        self.network = network.to(self.device).eval()
        # torch's RNG is global: shard tasks share this expert across threads, so seeding and sampling happen
        # under one lock, or a concurrent sampled batch would draw from the same stream and break reproducibility.
        self._sampling_lock = threading.Lock()

    def _prompt(self, request: CaptionRequest) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.inference_mode()
    def _batch(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """One batch of requests that share their decoding (``generate`` groups them so)."""
        started = time.perf_counter()
        images = [load_image(request.image_path, self.config.max_side) for request in requests]
        inputs = self.processor(
            text=[self._prompt(request) for request in requests], images=images, padding=True, return_tensors="pt"
        ).to(self.device)
        sampling = requests[0].sampling(self.config)
        settings = {"max_new_tokens": self.config.max_new_tokens, "repetition_penalty": sampling.repetition_penalty}
        if sampling.temperature > 0:
            with self._sampling_lock:
                torch.manual_seed(0 if sampling.seed is None else sampling.seed)
                output = self.network.generate(
                    **inputs, **settings, do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,
                    top_p=sampling.top_p, min_p=sampling.min_p,
                )  # fmt: skip
        else:
            output = self.network.generate(**inputs, **settings, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        eos = self.network.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        pad = self.processor.tokenizer.pad_token_id
        latency = (time.perf_counter() - started) / len(requests)
        results = []
        for tokens, text in zip(new_tokens.tolist(), texts, strict=True):
            generated = [token for token in tokens if token != pad or token in eos_ids]
            stopped = any(token in eos_ids for token in tokens)
            results.append(CaptionResult(text.strip(), "stop" if stopped else "length", len(generated), latency))
        return results

    def generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """Captions for ``requests`` in order, generated in batches of ``batch_size`` per (temperature, seed)."""
        results: list[CaptionResult | None] = [None] * len(requests)
        size = self.config.batch_size

        def decoding(position: int) -> tuple[float, int | None]:
            return requests[position].decoding(self.config.temperature)

        # Sorting by decoding is stable, so each group keeps the callers' order and its batches are reproducible.
        order = sorted(
            range(len(requests)), key=lambda i: (decoding(i)[0], decoding(i)[1] is not None, decoding(i)[1] or 0)
        )
        for _, group in groupby(order, key=decoding):
            positions = list(group)
            for start in range(0, len(positions), size):
                chunk = positions[start : start + size]
                try:
                    batch = self._batch([requests[i] for i in chunk])
                except (RuntimeError, ValueError, OSError) as exc:  # one bad batch must not stop the run
                    batch = [CaptionResult(None, None, None, 0.0, error=f"{type(exc).__name__}: {exc}")] * len(chunk)
                for i, result in zip(chunk, batch, strict=True):
                    results[i] = result
        return results  # type: ignore[return-value]
