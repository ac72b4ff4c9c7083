"""Expert backends behind one protocol, built from an expert entry of the manifest.

Which backends exist, their settings and the class that serves each are declared once, in
``manifests.run_manifest.EXPERT_BACKENDS``; this package imports a backend's module only when an expert uses it.
"""

from __future__ import annotations

from importlib import import_module

from caption_pipeline.experts.base import CaptionRequest, CaptionResult, Expert
from manifests.errors import InputError
from manifests.run_manifest import EXPERT_BACKENDS, ExpertConfig


def expert_class(backend: str) -> type[Expert]:
    """The expert class that serves ``backend`` (its module imported now).

    Raises:
        InputError: a backend no registration declares.
    """
    if backend not in EXPERT_BACKENDS:
        raise InputError(f"unknown expert backend '{backend}' (expected one of {list(EXPERT_BACKENDS)})")
    module, name = EXPERT_BACKENDS[backend].expert.split(":")
    return getattr(import_module(module), name)


def build_expert(config: ExpertConfig) -> Expert:
    """The expert of a manifest entry.

    Raises:
        InputError: a backend no registration declares.
    """
    return expert_class(config.backend)(config)


def preflight(config: ExpertConfig) -> None:
    """Refuse, before a run starts and any model loads, an expert that cannot work: its backend's
    :meth:`Expert.preflight` (an API key not set, weights not found).

    Raises:
        InputError: one line naming the expert and what to do.
    """
    expert_class(config.backend).preflight(config)


__all__ = ["CaptionRequest", "CaptionResult", "Expert", "build_expert", "expert_class", "preflight"]
