"""The MPerS segmenter: frozen DINOv3 + LDPE -> adapter -> DMTE/LQGA text guidance -> decoder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
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
from segmenter.model.lqga import LanguageQueryGate

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKSUMS_FILE = "checksums.json"


def verify_checksum(path: Path) -> None:
    """Check a weights file against the SHA-256 its checkpoint recorded when it was saved.

    Raises:
        InputError: no record (a checkpoint of an older version, or one copied without it), or another digest.
    """
    record = path.parent / CHECKSUMS_FILE
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    if not record.is_file():
        raise InputError(f"{path}: no {CHECKSUMS_FILE} beside it, so its integrity cannot be checked (a checkpoint "
                         "of an older version, or copied without it): train again")  # fmt: skip
    expected = json.loads(record.read_text()).get(path.name)
    found = sha256_file(path)
    if found != expected:
        raise InputError(f"{path}: SHA-256 {found[:12]}... differs from the {expected and expected[:12]}... recorded "
                         "when it was saved: the file is corrupted or was replaced")  # fmt: skip


@dataclass
class SegmenterOutput:
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
        self.adapter = build_adapter(config.adapter, config.dim, config.adapter_depth, config.adapter_heads,
                                     config.adapter_kernel, config.dilation, config.position_encoding)  # fmt: skip
        if config.uses_text:
            if not config.experts:
                raise ValueError(
                    f"model {config.name} reads captions but names no experts: they come from the caption store at "
                    "training (`segmenter train --captions STORE [--experts a,b,c]`) or as `experts=[...]`"
                )
            self.dmte = DynamicTextExperts(config.text_dim, len(config.experts), config.dmte_heads)
            self.lqga = nn.ModuleDict(
                {
                    str(stage): LanguageQueryGate(config.dim, config.text_dim, config.lqga_heads)
                    for stage in config.lqga_stages
                }
            )
        else:
            self.dmte, self.lqga = None, None
        self.decoder = DECODERS[config.decoder](config.dim, config.num_classes)

    def forward(
        self, images: torch.Tensor, text: torch.Tensor | None = None, present: torch.Tensor | None = None
    ) -> SegmenterOutput:
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
            fused, gates = self.dmte(text, present)
            for stage, gate in self.lqga.items():
                level = int(stage) - 1
                pyramid[level] = gate(pyramid[level], fused)
        return SegmenterOutput(self.decoder(pyramid, images.shape[-2:]), gates)

    @property
    def backbone_is_reloadable(self) -> bool:
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
        state = load_file(str(path), device=str(next(self.parameters()).device))
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
    def load(cls, folder: str | Path) -> MPerSSegmenter:
        """A model rebuilt from a checkpoint folder's ``config.json`` with its ``model.safetensors``."""
        folder = Path(folder)
        model = cls(SegmenterConfig.model_validate(json.loads((folder / CONFIG_FILE).read_text())))
        model.load_weights(folder)
        return model
