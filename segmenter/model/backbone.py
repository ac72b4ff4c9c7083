"""Frozen timm DINOv3 ViT: features of 4 evenly spaced blocks turned into a pyramid at strides 4/8/16/32."""

from __future__ import annotations

import pickle
from pathlib import Path

import timm
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from torch import nn

from manifests.atomic import file_digest
from manifests.errors import InputError, first_line
from segmenter.model.config import SegmenterConfig

# The files timm reads from a hub repo when its pretrained config names none (safetensors first).
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# What a Meta DINOv3 release file is called, for the hint: timm converts those checkpoints on load.
META_FILE_HINT = "/path/to/dinov3_vitl16_pretrain_lvd1689m-*.pth"


def _hub_id(name: str) -> tuple[str | None, str | None]:
    """The hub repo and weights file (None: timm's default names) of a timm model name.

    Raises:
        InputError: a model timm does not know, or a pretrained tag it has no weights for.
    """
    if not timm.is_model(name):
        known = ", ".join(timm.list_models("*dinov3*"))
        raise InputError(f"backbone: unknown timm model '{name}' (DINOv3 models: {known})")
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # timm's "Invalid pretrained tag"
        arch = name.split(".")[0]
        known = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise InputError(f"backbone: timm model '{name}' has no such pretrained tag (known: {known})") from None
    return (cfg.hf_hub_id or None, cfg.hf_hub_filename or None) if cfg is not None else (None, None)


def _missing_hub_weights(name: str, hub_id: str, why: str) -> InputError:
    """One line: which weights, where they were looked for, and the three ways to provide them."""
    return InputError(
        f"backbone {name}: weights not found: hub id {hub_id} is not in the Hugging Face cache "
        f"{hub_constants.HF_HUB_CACHE} ({why}); on a connected machine run `hf download {hub_id}` and copy the "
        f"cache here (or point HF_HOME / HF_HUB_CACHE at a copy), or pass --backbone-file {META_FILE_HINT}"
    )


def _check_cached(name: str, hub_id: str, filename: str | None) -> None:
    """Offline, refuse weights the cache lacks before the network is built (seconds for a ViT-L)."""
    # The constant, read at call time: is_offline_mode() only exists from huggingface_hub 1.2.1.
    if not hub_constants.HF_HUB_OFFLINE:
        return  # timm downloads them; a failure is caught around create_model
    names = (filename,) if filename else HUB_WEIGHT_FILES
    if not any(isinstance(try_to_load_from_cache(hub_id, file), str) for file in names):
        raise _missing_hub_weights(name, hub_id, "offline: HF_HUB_OFFLINE is set")


def create_dinov3(config: SegmenterConfig) -> nn.Module:
    """The timm model from a hub id (``arch.tag``), with weights from the hub or a local file.

    Raises:
        InputError: an unknown model or tag; weights that cannot be found (a missing ``backbone_file``, a hub id
            neither cached nor downloadable), naming where they were looked for and how to provide them; a
            ``backbone_file`` that cannot be loaded into the model.
    """
    pretrained = config.backbone_pretrained or bool(config.backbone_file)
    kwargs = {"pretrained": pretrained, "num_classes": 0}
    hub_id, filename = _hub_id(config.backbone)
    if config.backbone_file:
        if not Path(config.backbone_file).is_file():
            raise InputError(
                f"backbone_file: {config.backbone_file} not found (local weights for {config.backbone}; give an "
                f"existing file, or leave backbone_file unset to load hub id {hub_id} from the Hugging Face cache)"
            )
        if config.backbone_sha256 and file_digest(Path(config.backbone_file)) != config.backbone_sha256:
            raise InputError(
                f"backbone_file: {config.backbone_file} is not the file this model was trained with (SHA-256 differs "
                f"from {config.backbone_sha256[:12]}...): its frozen features would differ; give the original with "
                "--backbone-file"
            )
        kwargs["pretrained_cfg_overlay"] = {"file": config.backbone_file}
    elif pretrained and hub_id:
        _check_cached(config.backbone, hub_id, filename)
    if not pretrained:  # nothing is read: any error is a bug to see whole
        return timm.create_model(config.backbone, dynamic_img_size=True, **kwargs)
    try:
        return timm.create_model(config.backbone, dynamic_img_size=True, **kwargs)
    except LocalEntryNotFoundError as exc:  # not cached, and the hub could not be reached
        raise _missing_hub_weights(
            config.backbone, str(hub_id), f"download failed: {first_line(exc, named=False)}"
        ) from None
    except HfHubHTTPError as exc:  # a gated or removed repo, a bad token
        raise _missing_hub_weights(
            config.backbone, str(hub_id), f"the hub refused: {first_line(exc, named=False)}"
        ) from None
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        # torch.load / safetensors on a truncated or foreign file, or a state dict of another architecture
        source = f"backbone_file {config.backbone_file}" if config.backbone_file else f"hub id {hub_id}"
        raise InputError(
            f"{source}: cannot load weights into {config.backbone}: {first_line(exc, named=False)}"
        ) from None


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-16 map to strides 4 (2 deconvs), 8, 16 and 32 (pool)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()

        def project(*layers: nn.Module) -> nn.Sequential:
            return nn.Sequential(*layers, nn.Conv2d(in_dim, dim, 1), nn.GroupNorm(1, dim))

        self.levels = nn.ModuleList(
            [
                project(nn.ConvTranspose2d(in_dim, in_dim, 2, 2), nn.GELU(), nn.ConvTranspose2d(in_dim, in_dim, 2, 2)),
                project(nn.ConvTranspose2d(in_dim, in_dim, 2, 2)),
                project(),
                project(nn.MaxPool2d(2)),
            ]
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The four ViT maps as a pyramid at strides 4, 8, 16 and 32."""
        return [level(feature) for level, feature in zip(self.levels, features, strict=True)]


class DinoV3Backbone(nn.Module):
    """Frozen DINOv3 (always in eval mode, never trained) plus a trainable simple pyramid."""

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.vit = create_dinov3(config)
        self.vit.requires_grad_(False)
        depth = len(self.vit.blocks)
        self.indices = [depth * (i + 1) // 4 - 1 for i in range(4)]
        cfg = self.vit.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.pyramid = SimplePyramid(self.vit.embed_dim, config.dim)

    def train(self, mode: bool = True) -> DinoV3Backbone:
        """Set the trainable parts' mode; the frozen ViT stays in eval mode."""
        super().train(mode)
        self.vit.eval()
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to the backbone's pretrained normalisation."""
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid of the frozen ViT's intermediate maps at 4 evenly spaced blocks (no gradient through the ViT)."""
        with torch.no_grad():
            blocks = self.vit.forward_intermediates(
                self.normalize(images), indices=self.indices, intermediates_only=True
            )
        return self.pyramid([block.detach() for block in blocks])
