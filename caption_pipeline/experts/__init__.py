"""Expert backends behind one protocol, built from an expert entry of the manifest."""

from __future__ import annotations

from importlib import import_module

from caption_pipeline.experts.base import CaptionRequest, CaptionResult, Expert
from manifests.errors import InputError
from manifests.run_manifest import ExpertConfig

# backend -> "module:class"; heavy backends (torch models, vLLM, aiohttp) are imported only when an expert uses them.
BACKENDS: dict[str, str] = {
    "annotation": "caption_pipeline.experts.annotation:AnnotationExpert",
    "openai": "caption_pipeline.experts.openai_backend:OpenAIExpert",
    "vllm": "caption_pipeline.experts.vllm_backend:VLLMExpert",
    "transformers": "caption_pipeline.experts.transformers_backend:TransformersExpert",
}


def build_expert(config: ExpertConfig) -> Expert:
    """The expert of a manifest entry.

    Raises:
        InputError: a backend no module implements.
    """
    if config.backend not in BACKENDS:
        raise InputError(f"expert {config.name}: unknown backend '{config.backend}' (expected one of {list(BACKENDS)})")
    module, name = BACKENDS[config.backend].split(":")
    return getattr(import_module(module), name)(config)


__all__ = ["BACKENDS", "CaptionRequest", "CaptionResult", "Expert", "build_expert"]
