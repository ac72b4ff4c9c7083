"""The configuration of an MPerS segmenter: every part is swappable, so the paper's ablations are presets."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# The side of a model input must be a multiple of the coarsest feature map's stride (the pyramid's 1/32): the
# decoder upsamples each level onto the next one.
MODEL_STRIDE = 32

TextEncoderId = Literal[
    "clip-vit-b16",
    "clip-vit-l14",
    "remoteclip-vit-b32",
    "blip2-flan-t5-xl",
    "dinotxt-vitl16",
    "test-tiny-clip",
    "test-tiny-dinotxt",
    "none",
]


# How a caption longer than the text encoder's context becomes one vector: caption_pipeline.clip_models.TEXT_POOLINGS
# (the same names; tests/test_text_encoders.py holds them together).
TextPooling = Literal["truncate", "chunk_mean", "token_weighted"]


class SegmenterConfig(BaseModel):
    """Everything needed to rebuild a model; saved as JSON beside the safetensors weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    num_classes: int = 6
    backbone: str = "vit_large_patch16_dinov3.lvd1689m"
    backbone_pretrained: bool = True
    backbone_file: str | None = Field(default=None, description="local weights for the backbone (timm overlay)")
    backbone_sha256: str | None = Field(
        default=None, description="SHA-256 of backbone_file at training: the frozen ViT is checked against it on load"
    )
    dim: int = Field(default=256, ge=8, description="channels of the pyramid, adapter, LQGA and decoder")
    ldpe: bool = True
    ldpe_width: int = 32
    adapter: Literal["swda", "mhsa", "none"] = "swda"
    dilation: int = Field(default=1, ge=1, le=3)
    adapter_kernel: int = 3
    adapter_depth: int = 2
    adapter_heads: int = 8
    position_encoding: bool = True
    text_encoder: TextEncoderId = "clip-vit-b16"
    text_checkpoint: str | None = None
    text_weights: str | None = Field(
        default=None, description="id of the text encoder and weights the run's caption features came from"
    )
    text_pooling: TextPooling = Field(
        default="chunk_mean",
        description="a caption over the encoder's context: its first chunk (truncate, as CLIP's tokenizers), the mean "
        "of its chunks (chunk_mean), or that mean weighted by the chunks' tokens (token_weighted)",
    )
    text_dim: int = 512
    text_input_dim: int | None = Field(
        default=None,
        ge=1,
        description="width of the encoder's features when it differs from text_dim (a learned linear map projects "
        "them to text_dim); set at training from the encoder",
    )
    experts: list[str] = Field(
        default_factory=list, description="the experts a text-guided model reads, in order: set from the caption store"
    )
    dmte_heads: int = 8
    lqga_stages: list[Annotated[int, Field(ge=1, le=4)]] = Field(
        default_factory=lambda: [4],
        min_length=1,
        description="stages (1-4) gated by LQGA; several are chained, deepest first",
    )
    lqga_heads: int = Field(default=1, ge=1, description="heads of LQGA's text query (the method's equation: one)")
    decoder: Literal["unet", "fpn", "pixelup"] = "unet"

    @property
    def uses_text(self) -> bool:
        """Whether the model reads captions (a text encoder other than ``none``)."""
        return self.text_encoder != "none"

    @property
    def text_feature_dim(self) -> int:
        """The width of the caption features the model takes (its text encoder's)."""
        return self.text_input_dim or self.text_dim
