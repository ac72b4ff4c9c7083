"""The caption features a run reads: where their cache lives, and their loading for the model's text encoder.

The cache folder is resolved once per command (:func:`text_cache_folder`, called by ``train``, ``evaluate`` and
``predict`` where they first need captions) and passed down as an argument.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import torch

from manifests.errors import InputError
from segmenter.model import SegmenterConfig
from segmenter.text import ExpertTextFeatures, TextEncoder, TextFeatureCache, expert_text_features


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder``, or in its nearest existing parent where it does not exist yet."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK | os.X_OK)


def text_cache_folder(captions: str | Path, given: str | Path | None, run_folder: str | Path | None) -> Path:
    """The text-feature cache of a caption store, and a line saying where it is and why.

    ``given`` (``--text-cache``) when set; else ``text_cache/`` beside the store when that can be written (a shared,
    read-only store cannot); else ``text_cache/`` in ``run_folder``.

    Raises:
        InputError: ``--text-cache`` is a file or cannot be written; the store's folder is read-only and neither
            ``--text-cache`` nor a run folder was given.
    """
    beside = Path(captions).parent / "text_cache"
    if given is not None:
        given = Path(given)
        if given.exists() and not given.is_dir():
            raise InputError(f"--text-cache: {given} is a file (expected a folder for the text-feature cache)")
        if not _writable(given):
            raise InputError(f"--text-cache: {given} is not writable (expected a folder the cache can be written in)")
        folder, why = given, "--text-cache"
    elif _writable(beside):
        folder, why = beside, "beside the caption store"
    elif run_folder is not None:
        folder, why = Path(run_folder) / "text_cache", f"in the run folder: {beside.parent} is not writable"
    else:
        raise InputError(
            f"--captions: {beside.parent} is not writable for the text-feature cache; pass --text-cache DIR"
        )
    print(f"text-feature cache: {folder} ({why})")
    return folder


def _weights_identity(encoder_id: str) -> str:
    """An encoder id without the names of its weight files (``name@digest`` -> ``@digest``): the same weights copied
    under another name or path give the same features."""
    return re.sub(r"[^:@]+@", "@", encoder_id)


def load_text_features(
    config: SegmenterConfig,
    selected: pd.DataFrame,
    cache_folder: Path,
    passed_only: bool,
    device: str | torch.device,
    direction_variants: bool = False,
) -> ExpertTextFeatures:
    """The text features of ``config.experts`` from a caption store's selected rows (read once by the caller),
    through the on-disk cache in ``cache_folder`` (:func:`text_cache_folder`).

    Raises:
        InputError: the encoder gives features of another width than the model was built for, or other weights than
            those it was trained with (``config.text_weights``).
    """
    encoder = TextEncoder(config.text_encoder, config.text_checkpoint, device=device, pooling=config.text_pooling)
    if encoder.dim != config.text_feature_dim:
        raise InputError(f"text_checkpoint: {encoder.encoder_id} gives {encoder.dim}-d features but model "
                         f"{config.name} was built for {config.text_feature_dim}-d ones")  # fmt: skip
    if config.text_weights and _weights_identity(encoder.weights_id) != _weights_identity(config.text_weights):
        raise InputError(f"--text-checkpoint: model {config.name} was trained on caption features of "
                         f"{config.text_weights}, not of {encoder.weights_id}: give the weights it was trained "
                         "with")  # fmt: skip
    cache = TextFeatureCache(cache_folder, encoder)
    return expert_text_features(selected, list(config.experts), cache, passed_only, direction_variants)
