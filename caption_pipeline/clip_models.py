"""open_clip loading and whole-caption text encoding, shared by the caption gate and the segmenter's text towers.

This is the one module of ``caption_pipeline`` that ``segmenter`` may import, so it imports nothing else of
the project but ``manifests.errors``.

Two rules live here and nowhere else:

- **Activation follows the weights.** open_clip 3.x builds ``ViT-B-32`` with ``nn.GELU``, but the OpenAI weights
  were trained with QuickGELU (open_clip only warns). A network is built with QuickGELU exactly when its weights
  need it: an explicit ``quick_gelu``, a ``-quickgelu`` model name, or the pretrained tag's own ``quick_gelu``
  flag. The activation is part of the model id, so stores and text caches computed with the other activation
  are never silently reused, and open_clip's mismatch warning is an error here.
- **Whole captions.** CLIP's context is 77 tokens; a longer caption is split into chunks of ``context - 2`` BPE
  tokens (room for start and end) whose normalised embeddings are pooled into one (:data:`TEXT_POOLINGS`): averaged
  with equal weights (``chunk_mean``, the caption gate's rule), averaged with weights by their token counts
  (``token_weighted``), or only the first chunk is read (``truncate``, what CLIP's own tokenizers do).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from safetensors import SafetensorError
from torch import nn

from manifests.errors import InputError, first_line

QUICKGELU_SUFFIX = "-quickgelu"
# Weights fine-tuned from the OpenAI checkpoints with open_clip's OpenAI loader, which built QuickGELU networks
# whatever the model name said (open_clip issue #771): RemoteCLIP was trained from `ViT-B-32` + `openai` that way.
FINE_TUNED_FROM_OPENAI = frozenset({"remoteclip"})
# The tiny CLIP of the tests and the demo. Its image tower is a small ResNet at 64 px: a 32-px ViT could not learn
# the demo's class shares from 192 tiles (own vs shuffled AUC on the test tiles 0.5 after training); this one reaches
# 0.83-0.84 on the demo's test captions (caption_pipeline.clip_training). A 96-px tower learnt faster per step but,
# at the same CPU time, no better (0.72 against 0.76, on the first recipe). On the 16-view recipe at 400 steps
# (0.82 and 0.77 at seeds 0 and 2) a second text layer gave 0.77 and 0.81 and an image tower twice as wide 0.78 and
# 0.81 at twice the time: no better on the mean of the two seeds.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# How a caption longer than a text encoder's context becomes one vector (the segmenter's `text_pooling`).
TEXT_POOLINGS = ("truncate", "chunk_mean", "token_weighted")


def pooled_chunks(chunks: list[list[int]], pooling: str) -> list[tuple[list[int], float]]:
    """The token chunks a caption is encoded from under ``pooling``, each with its weight in the caption's mean.

    Raises:
        ValueError: a pooling not in :data:`TEXT_POOLINGS`.
    """
    if pooling == "truncate":
        return [(chunks[0], 1.0)]
    if pooling == "chunk_mean":
        return [(chunk, 1.0) for chunk in chunks]
    if pooling == "token_weighted":
        return [(chunk, float(max(len(chunk), 1))) for chunk in chunks]
    raise ValueError(f"text pooling '{pooling}' unknown (expected one of {TEXT_POOLINGS})")


def pool_rows(features: torch.Tensor, owners: list[int], weights: list[float], count: int) -> torch.Tensor:
    """``(count, D)``: per caption the normalised weighted mean of its rows' normalised ``features``."""
    weighted = F.normalize(features.float(), dim=-1) * torch.tensor(weights, device=features.device)[:, None]
    pooled = torch.zeros(count, features.shape[-1], device=features.device)
    pooled.index_add_(0, torch.tensor(owners, device=features.device), weighted)
    return F.normalize(pooled, dim=-1)


@dataclass(frozen=True)
class ClipWeights:
    """Which network to build and which weights to put in it.

    Attributes:
        model: open_clip model name (``ViT-B-32``, ``ViT-L-14-quickgelu``, a registered local config's name).
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``). With a ``checkpoint`` it
            names where the file's weights come from (``openai``, ``remoteclip``), which decides the activation.
        checkpoint: a local weights file, loaded instead of the tag's download.
        quick_gelu: force the activation; None follows the weights.
    """

    model: str
    pretrained: str | None = None
    checkpoint: Path | None = None
    quick_gelu: bool | None = None

    @property
    def tag_config(self) -> dict[str, Any]:
        """open_clip's pretrained config of ``pretrained`` for this model ({} when it is not an open_clip tag)."""
        return open_clip.get_pretrained_cfg(self.model, self.pretrained) if self.pretrained else {}

    @property
    def hub_files(self) -> tuple[str, list[str]] | None:
        """The hub repo of the tag's weights and the files open_clip would read from it (a safetensors one first),
        or None for a local checkpoint or a tag without a hub entry."""
        entry = self.tag_config.get("hf_hub") if self.checkpoint is None else None
        if not entry:
            return None
        repo, filename = os.path.split(entry)
        filename = filename or HF_WEIGHTS_NAME
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else filename.rsplit(".", 1)[0] + ".safetensors"
        return repo, list(dict.fromkeys([safe, filename]))

    def missing_weights(self, why: str) -> InputError:
        """One line: which weights were looked for, where, and how to provide them."""
        repo = self.hub_files[0] if self.hub_files else self.tag_config.get("url", "?")
        return InputError(
            f"CLIP {self.model} (pretrained {self.pretrained}): weights not found: hub id {repo} is not in the Hugging "
            f"Face cache {hub_constants.HF_HUB_CACHE} ({why}); on a connected machine run `hf download {repo}` and "
            "copy the cache here (or point HF_HOME / HF_HUB_CACHE at a copy), or give a local weights file "
            "(captions.clip.checkpoint in a manifest, --text-checkpoint for a segmenter text encoder)"
        )

    def require_cached(self) -> None:
        """Offline, refuse a tag whose weights the Hugging Face cache lacks (online, they are downloaded).

        Raises:
            InputError: see :meth:`missing_weights`.
        """
        hub = self.hub_files
        # The constant, read at call time: is_offline_mode() only exists from huggingface_hub 1.2.1.
        if hub is None or not hub_constants.HF_HUB_OFFLINE:
            return
        repo, files = hub
        if not any(isinstance(try_to_load_from_cache(repo, file), str) for file in files):
            raise self.missing_weights("offline: HF_HUB_OFFLINE is set")

    @property
    def uses_quick_gelu(self) -> bool:
        """Whether these weights were trained with QuickGELU (see the module docstring for the rule)."""
        if self.quick_gelu is not None:
            return self.quick_gelu
        if self.model.endswith(QUICKGELU_SUFFIX) or self.pretrained in FINE_TUNED_FROM_OPENAI:
            return True
        return bool(self.tag_config.get("quick_gelu", False))

    @property
    def activation(self) -> str:
        """``quickgelu`` or ``gelu``: the activation these weights are run with."""
        return "quickgelu" if self.uses_quick_gelu else "gelu"

    @property
    def weights_label(self) -> str:
        """The weights, so that two different files never share a label: a checkpoint by name and content."""
        if self.checkpoint is None:
            return self.pretrained or "random"
        origin = f"{self.pretrained}=" if self.pretrained else ""
        digest = file_digest(self.checkpoint)[:12] if self.checkpoint.is_file() else "missing"
        return f"{origin}{self.checkpoint.name}@{digest}"

    @property
    def model_id(self) -> str:
        """``model:weights:activation``: what a store or a text cache records, so a change of any is visible."""
        return f"{self.model}:{self.weights_label}:{self.activation}"

    def check(self) -> None:
        """Refuse, before anything is downloaded or built, weights that cannot be what the user meant.

        Raises:
            InputError: a tag open_clip does not know for this model, an origin such as ``remoteclip`` without its
                checkpoint, no weights at all, a missing checkpoint, ``quick_gelu`` against the tag's activation, or
                (offline) a tag whose weights are not in the Hugging Face cache.
        """
        if self.checkpoint is not None:
            if not self.checkpoint.is_file():
                raise InputError(f"CLIP checkpoint {self.checkpoint} not found")
        elif self.pretrained in FINE_TUNED_FROM_OPENAI:
            raise InputError(
                f"CLIP {self.model}: pretrained '{self.pretrained}' names where a checkpoint's weights come from; "
                "give the checkpoint file too"
            )
        elif not self.pretrained:
            raise InputError(f"CLIP {self.model}: no weights (give a pretrained tag or a checkpoint file)")
        elif not self.tag_config:
            known = ", ".join(open_clip.list_pretrained_tags_by_model(self.model)) or "none"
            raise InputError(f"CLIP {self.model}: unknown pretrained tag '{self.pretrained}' (known: {known})")
        tagged = self.tag_config.get("quick_gelu")
        if self.quick_gelu is not None and tagged is not None and self.quick_gelu != tagged:
            raise InputError(
                f"CLIP {self.model}: quick_gelu {str(self.quick_gelu).lower()} contradicts the weights of tag "
                f"'{self.pretrained}', trained with {'QuickGELU' if tagged else 'GELU'}"
            )
        if not self.uses_quick_gelu and self.model.endswith(QUICKGELU_SUFFIX):
            raise InputError(f"CLIP {self.model}: quick_gelu false contradicts the '{QUICKGELU_SUFFIX}' model name")
        self.require_cached()


@functools.lru_cache(maxsize=64)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a weights file, computed once per (path, mtime, size) in a process. The twin of
    ``manifests.atomic.file_digest``, kept because this leaf imports nothing of the project but its errors."""
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def register_config(path: Path) -> None:
    """Make a local open_clip JSON config (a file or a folder of them) known by its name.

    Raises:
        InputError: the path does not exist.
    """
    if not path.exists():
        raise InputError(f"{path}: open_clip config not found (a JSON file or a folder of them)")
    open_clip.add_model_config(path)


@functools.cache
def _private_config_folder() -> Path:
    # one folder per process, owned by its user: a shared fixed path is another user's file, or a race
    folder = Path(tempfile.mkdtemp(prefix="mpers-open-clip-configs-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def register_tiny_config(name: str, folder: Path | None = None) -> Path:
    """Write the tiny test config as ``<name>.json`` and register it; returns the file."""
    folder = folder or _private_config_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return path


def create_clip(
    weights: ClipWeights, device: torch.device | str = "cpu", load_weights: bool = True, transforms: bool = True
) -> tuple[nn.Module, Any]:
    """The CLIP network with the activation its weights need, and its eval image transform (or None).

    Args:
        weights: the network and its weights.
        device: where to build it (``meta`` builds the architecture without memory).
        load_weights: False builds the same architecture with random weights (benchmarks, offline checks).
        transforms: also return the eval image transform.

    Raises:
        InputError: see ``ClipWeights.check``; weights that cannot be loaded; open_clip's QuickGELU mismatch
            warning, should it still come.
    """
    if load_weights:
        weights.check()
        pretrained = str(weights.checkpoint) if weights.checkpoint else weights.pretrained
        if weights.checkpoint is None:
            try:  # fetched (or found in the cache) here, where a failure can say what to do
                open_clip.download_pretrained(weights.tag_config)
            except OSError as exc:  # open_clip turns every hub failure into FileNotFoundError; a URL's is URLError
                raise weights.missing_weights(f"download failed: {first_line(exc, named=False)}") from None
    else:
        pretrained = None
    quick = weights.uses_quick_gelu
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="QuickGELU mismatch")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                weights.model, pretrained=pretrained, device=device, force_quick_gelu=quick
            )
        except UserWarning as exc:
            raise InputError(f"CLIP {weights.model} ({weights.pretrained}): {exc}") from None
        except (RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:  # a truncated or foreign file
            reason = first_line(exc, named=False)
            raise InputError(f"CLIP {weights.model} ({pretrained}): cannot load: {reason}") from None
    return model.eval(), (preprocess if transforms else None)


def network_activation(model: nn.Module) -> str:
    """``quickgelu`` or ``gelu``: the activation the built network actually uses."""
    kinds = {type(module).__name__ for module in model.modules()}
    return "quickgelu" if "QuickGELU" in kinds else "gelu"


class ChunkedTextEncoder:
    """CLIP text embeddings that see the whole caption, not only its first 77 tokens (unless ``pooling`` is
    ``truncate``)."""

    def __init__(
        self, model: nn.Module, model_name: str, pooling: str = "chunk_mean", memoize_tokens: bool = False
    ) -> None:
        """Encode with ``model`` and the tokenizer of ``model_name``; with ``memoize_tokens`` every distinct text is
        tokenised once (training, where the same captions come back every epoch)."""
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.context = getattr(self.tokenizer, "context_length", 77)
        self.pooling = pooling
        if memoize_tokens:
            self._tokens = functools.cache(self._tokens)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    def token_chunks(self, text: str) -> list[list[int]]:
        """The caption's BPE tokens in chunks that fit the context with start and end tokens."""
        tokens = self._tokens(text)
        width = self.context - 2
        return [list(tokens[start : start + width]) for start in range(0, len(tokens), width)] or [[]]

    def _tokens(self, text: str) -> tuple[int, ...]:
        """The caption's BPE tokens (no start or end token)."""
        return tuple(self.tokenizer.encode(text))

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, list[int], list[int]]:
        """Normalised embeddings of ``texts`` (on the model's device), their BPE token counts and chunk counts."""
        return self.embed(texts)

    def embed(self, texts: list[str]) -> tuple[torch.Tensor, list[int], list[int]]:
        """What :meth:`encode` returns, with autograd as the caller has it (training a CLIP on whole captions)."""
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        rows, owners, weights, n_tokens, n_chunks = [], [], [], [], []
        for index, text in enumerate(texts):
            chunks = self.token_chunks(text)
            n_tokens.append(sum(len(chunk) for chunk in chunks))
            n_chunks.append(len(chunks))
            for chunk, weight in pooled_chunks(chunks, self.pooling):
                ids = [sot, *chunk, eot]
                rows.append(ids + [0] * (self.context - len(ids)))
                owners.append(index)
                weights.append(weight)
        tokens = torch.tensor(rows, dtype=torch.long, device=self.device)
        return pool_rows(self.model.encode_text(tokens), owners, weights, len(texts)), n_tokens, n_chunks
