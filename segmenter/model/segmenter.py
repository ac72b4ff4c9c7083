"""The MPerS segmenter: frozen DINOv3 + LDPE -> adapter -> DMTE/LQGA text guidance -> decoder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from manifests.atomic import atomic_path, atomic_write_text, sha256_file
from manifests.errors import InputError
from segmenter.model.adapter import build_adapter
from segmenter.model.backbone import DinoV3Backbone
from segmenter.model.config import SegmenterConfig
from segmenter.model.decoders import DECODERS
from segmenter.model.dmte import DynamicTextExperts
from segmenter.model.ldpe import DetailPrior
from segmenter.model.lqga import ChainedLanguageQueryGates

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKSUMS_FILE = "checksums.json"


def read_checksums(folder: Path) -> dict[str, str]:
    """The SHA-256 per file name that a checkpoint folder recorded ({} when it has no record).

    Raises:
        InputError: a record that is not a JSON object of file names to digests (damaged or truncated).
    """
    record = folder / CHECKSUMS_FILE
    if not record.is_file():
        return {}
    try:
        digests = json.loads(record.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{record}: not valid JSON ({exc}); the checkpoint is damaged: train again") from None
    if not isinstance(digests, dict) or not all(isinstance(value, str) for value in digests.values()):
        raise InputError(f"{record}: expected a JSON object of file name -> SHA-256; the checkpoint is damaged")
    return digests


def record_checksums(folder: Path, names: list[str]) -> None:
    """Add the SHA-256 of ``names`` (files in ``folder``) to its ``checksums.json``, written atomically."""
    digests = {**read_checksums(folder), **{name: sha256_file(folder / name) for name in names}}
    atomic_write_text(folder / CHECKSUMS_FILE, json.dumps(digests, indent=2))


def verify_checksum(path: Path, required: bool = True) -> None:
    """Check a checkpoint file against the SHA-256 its checkpoint recorded when it was saved.

    Args:
        path: the file.
        required: False accepts a file without a recorded digest (files that older checkpoints did not record).

    Raises:
        InputError: the file is missing; no record (a checkpoint of an older version, or one copied without it)
            where one is required; another digest.
    """
    record = path.parent / CHECKSUMS_FILE
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if not record.is_file() and required:
        raise InputError(f"{path}: no {CHECKSUMS_FILE} beside it, so its integrity cannot be checked (a checkpoint "
                         "of an older version, or copied without it): train again")  # fmt: skip
    expected = read_checksums(path.parent).get(path.name)
    if expected is None:
        if required:
            raise InputError(
                f"{path}: no SHA-256 recorded for it in {CHECKSUMS_FILE}, so its integrity cannot be checked "
                "(a checkpoint of an older version, or a replaced record): train again"
            )
        return
    found = sha256_file(path)
    if found != expected:
        raise InputError(f"{path}: SHA-256 {found[:12]}... differs from the {expected[:12]}... recorded "
                         "when it was saved: the file is corrupted or was replaced")  # fmt: skip


@dataclass
class SegmenterOutput:
    """What the model returns: ``(B, K, H, W)`` class logits and, for a text-guided model, the ``(B, M)`` DMTE gates."""

    logits: torch.Tensor
    gates: torch.Tensor | None = None


class MPerSSegmenter(nn.Module):
    """``forward(images, text, present)``: images in [0, 1] ``(B, 3, H, W)`` with H, W multiples of 32; text
    ``(B, M, D)`` pooled caption embeddings per expert and ``present`` ``(B, M)`` marking the experts a tile has."""

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = DinoV3Backbone(config)
        self.ldpe = DetailPrior(config.ldpe_width, config.dim) if config.ldpe else None
        self.adapter = build_adapter(config)
        if config.uses_text:
            if not config.experts:
                raise ValueError(
                    f"model {config.name} reads captions but names no experts: they come from the caption store at "
                    "training (`segmenter train --captions STORE [--experts a,b,c]`) or as `experts=[...]`"
                )
            width = config.text_input_dim
            # FLAN-T5 and dino.txt features are wider than the guidance: a learned map brings them to text_dim
            self.text_projection = nn.Linear(width, config.text_dim) if width and width != config.text_dim else None
            self.dmte = DynamicTextExperts(config.text_dim, len(config.experts), config.dmte_heads)
            self.lqga = ChainedLanguageQueryGates(config.lqga_stages, config.dim, config.text_dim, config.lqga_heads)
        else:
            self.dmte, self.lqga, self.text_projection = None, None, None
        self.decoder = DECODERS[config.decoder](config.dim, config.num_classes)

    def forward(
        self, images: torch.Tensor, text: torch.Tensor | None = None, present: torch.Tensor | None = None
    ) -> SegmenterOutput:
        """Class logits of ``images``, guided by the experts' caption features where the model reads text."""
        pyramid = self.backbone(images)
        if self.ldpe is not None:
            details = self.ldpe(images)
            details.append(F.max_pool2d(details[2], 2))  # the adapter works on the fused deepest level too
            pyramid = [feature + detail for feature, detail in zip(pyramid, details, strict=True)]
        pyramid[3] = self.adapter(pyramid[3])
        gates = None
        if self.dmte is not None:
            if text is None:
                raise ValueError(f"model {self.config.name} reads captions: pass text and present")
            if present is None:
                present = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            if self.text_projection is not None:
                text = self.text_projection(text)
            fused, gates = self.dmte(text, present)
            pyramid = self.lqga(pyramid, fused)
        return SegmenterOutput(self.decoder(pyramid, images.shape[-2:]), gates)

    @property
    def backbone_is_reloadable(self) -> bool:
        """Whether the frozen ViT's weights come back from its hub id or file, so checkpoints leave them out."""
        return self.config.backbone_pretrained or self.config.backbone_file is not None

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights to checkpoint: all but the frozen ViT when its hub id or file gives it back on load."""
        state = self.state_dict()
        if self.backbone_is_reloadable:
            state = {k: v for k, v in state.items() if not k.startswith("backbone.vit.")}
        return state

    def save(self, folder: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` (no pickle) + ``checksums.json`` (the weights' SHA-256), each
        written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp))
            digest = sha256_file(tmp)
        atomic_write_text(folder / CHECKSUMS_FILE, json.dumps({WEIGHTS_FILE: digest}, indent=2))
        atomic_write_text(folder / CONFIG_FILE, self.config.model_dump_json(indent=2))
        return folder

    def load_weights(self, folder: str | Path) -> None:
        """Load the weights of a checkpoint folder into this model (the ViT from its own source if reloadable).

        Raises:
            InputError: weights whose SHA-256 differs from the one recorded when they were saved (a corrupted or
                replaced file), a checkpoint without the record, or weights with NaN or infinite values.
        """
        path = Path(folder) / WEIGHTS_FILE
        verify_checksum(path)
        try:
            state = load_file(str(path), device=str(next(self.parameters()).device))
        except SafetensorError as exc:  # a file that matches its digest yet is no safetensors file
            raise InputError(f"{path}: not a readable safetensors file ({exc})") from None
        broken = [
            key for key, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()
        ]
        if broken:
            raise InputError(f"{path}: non-finite weights (NaN or inf) in {len(broken)} tensor(s), e.g. {broken[0]}")
        missing, unexpected = self.load_state_dict(state, strict=False)
        if self.backbone_is_reloadable:
            missing = [key for key in missing if not key.startswith("backbone.vit.")]
        if missing or unexpected:
            raise ValueError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")

    @classmethod
    def load(cls, folder: str | Path, **moved: str | None) -> MPerSSegmenter:
        """A model rebuilt from a checkpoint folder's ``config.json`` with its ``model.safetensors``.

        ``moved`` gives new places of its local weights (``backbone_file``, ``text_checkpoint``) on another machine;
        the backbone file is checked against the SHA-256 recorded at training, the text weights by the id of the
        caption features (:func:`segmenter.engine.train.load_text_features`).
        """
        folder = Path(folder)
        config = read_config(folder)
        model = cls(config.model_copy(update={key: value for key, value in moved.items() if value is not None}))
        model.load_weights(folder)
        return model


def read_config(folder: Path) -> SegmenterConfig:
    """The model configuration a checkpoint folder saved.

    Raises:
        InputError: no ``config.json``, or one that is not valid JSON or not a configuration of this version.
    """
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{path}: file not found (a checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        return SegmenterConfig.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); the checkpoint is damaged") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "<top level>"
        raise InputError(f"{path}: not a model configuration of this version ({where}: {first['msg']})") from None
