"""A local ``AutoModelForImageTextToText`` (Qwen2-VL, Qwen2.5-VL, LLaVA, Idefics3, ...) from a hub id or folder."""

from __future__ import annotations

import time

import torch

from caption_pipeline.experts.base import CaptionRequest, CaptionResult, load_image
from manifests.run_manifest import ExpertConfig


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TransformersExpert:
    """Batched ``generate`` with the model's own chat template; greedy unless a temperature is set."""

    backend = "transformers"

    def __init__(self, config: ExpertConfig) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.config = config
        self.name = config.name
        self.model = config.model
        self.device = pick_device(config.device)
        dtype = getattr(torch, config.dtype) if config.dtype != "auto" else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32
        )  # fmt: skip
        self.processor = AutoProcessor.from_pretrained(config.model)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        self.network = AutoModelForImageTextToText.from_pretrained(config.model, dtype=dtype).to(self.device).eval()

    def _prompt(self, request: CaptionRequest) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.inference_mode()
    def _batch(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        started = time.perf_counter()
        images = [load_image(request.image_path, self.config.max_side) for request in requests]
        inputs = self.processor(
            text=[self._prompt(request) for request in requests], images=images, padding=True, return_tensors="pt"
        ).to(self.device)
        sampling = {"do_sample": True, "temperature": self.config.temperature} if self.config.temperature else {}
        output = self.network.generate(**inputs, max_new_tokens=self.config.max_new_tokens, **sampling)
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
        results: list[CaptionResult] = []
        size = self.config.batch_size
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]
            try:
                results += self._batch(chunk)
            except (RuntimeError, ValueError, OSError) as exc:  # one bad batch must not stop the run
                results += [CaptionResult(None, None, None, 0.0, error=f"{type(exc).__name__}: {exc}")] * len(chunk)
        return results
