"""Expert backends behind one protocol, built from an expert entry of the manifest."""

from __future__ import annotations

from caption_pipeline.experts.annotation import AnnotationExpert
from caption_pipeline.experts.base import CaptionRequest, CaptionResult, Expert
from manifests.run_manifest import ExpertConfig


def build_expert(config: ExpertConfig) -> Expert:
    """The expert of a manifest entry; heavy backends are imported only when used."""
    if config.backend == "annotation":
        return AnnotationExpert(config.name)
    if config.backend == "openai":
        from caption_pipeline.experts.openai_backend import OpenAIExpert

        return OpenAIExpert(config)
    if config.backend == "vllm":
        from caption_pipeline.experts.vllm_backend import VLLMExpert

        return VLLMExpert(config)
    from caption_pipeline.experts.transformers_backend import TransformersExpert

    return TransformersExpert(config)


__all__ = ["AnnotationExpert", "CaptionRequest", "CaptionResult", "Expert", "build_expert"]
