"""The dino.txt (DINOv3-Text) text tower, rebuilt from the architecture of the official DINOv3 release.

No package ships the text tower of ``dinov3_vitl16_dinotxt_tet1280d20h24l``, so this module rebuilds it with the
released checkpoint's parameter names (read from facebookresearch/dinov3, ``dinov3/hub/dinotxt.py`` and
``dinov3/eval/text/{text_transformer,text_tower,dinotxt_model}.py``):

- a pre-norm causal transformer: token + learned positional embedding, ``depth`` blocks
  (LayerNorm -> causal MHSA with a bias-free fused qkv -> residual; LayerNorm -> GELU MLP x4 -> residual), a final
  LayerNorm;
- the feature at the end-of-text token (the token with the highest id, found by argmax) projected by a bias-free
  linear layer to the joint embedding (2048 for ViT-L/16; its first 1024 values align with the image's class
  token, the last 1024 with its mean patch token, as the official notebook slices them).

The released file (``dinov3_vitl16_dinotxt_vision_head_and_text_encoder-<hash>.pth``) holds the state dict of the
whole ``DINOTxt`` model minus the vision backbone: the text tower under ``text_model.``, the vision head under
``visual_model.head.`` and ``logit_scale``. Only the ``text_model.`` keys are read here. The tokenizer is
OpenAI CLIP's BPE (``bpe_simple_vocab_16e6``) with a 77-token context, which open_clip ships.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from caption_pipeline.clip_models import ChunkedTextEncoder
from manifests.atomic import atomic_path, file_digest
from manifests.errors import InputError, first_line

# The text tower's keys in the released file; the rest of the file (vision head, logit scale) is not ours.
TEXT_PREFIX = "text_model."
RELEASED_FILE = "dinov3_vitl16_dinotxt_vision_head_and_text_encoder-a442d8f5.pth"
WHERE_TO_GET = (
    "request access at https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ "
    "(facebookresearch/dinov3 README, 'Zero-shot tasks with dino.txt') and download it with wget"
)


@dataclass(frozen=True)
class DinoTxtConfig:
    """Shape of a dino.txt text tower.

    Attributes:
        name: short id of the architecture (part of nothing on disk; for messages and logs).
        width: transformer width (token feature size).
        depth: number of transformer blocks.
        heads: attention heads per block.
        vocab_size: BPE vocabulary size, start/end tokens included.
        context_length: tokens per sequence, start and end tokens included.
        output_dim: size of the projected text embedding (the joint image-text space).
        ffn_ratio: MLP hidden size as a multiple of ``width``.
    """

    name: str
    width: int
    depth: int
    heads: int
    vocab_size: int = 49408
    context_length: int = 77
    output_dim: int = 2048
    ffn_ratio: float = 4.0

    @property
    def ffn_width(self) -> int:
        """The width of the transformer's feed-forward layers."""
        return int(self.width * self.ffn_ratio)


# "tet1280d20h24l": text encoder transformer, 1280 wide, 20 heads, 24 layers (text_backbone.yaml of the release).
DINOTXT_VITL16 = DinoTxtConfig(name="dinotxt-vitl16-tet1280d20h24l", width=1280, depth=24, heads=20)
# Same key layout, a few MB: tests and the demo. The vocabulary stays whole so the real tokenizer works with it.
DINOTXT_TINY = DinoTxtConfig(name="dinotxt-tiny", width=32, depth=2, heads=2, output_dim=48)


class _CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with the release's fused ``qkv`` (no bias) and ``proj`` (bias)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise InputError(f"dino.txt config: width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        # the fused output is laid out (3, heads, head_dim): the checkpoint's qkv rows are ordered that way
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class _Block(nn.Module):
    """Pre-norm transformer block; attribute names are the checkpoint's."""

    def __init__(self, config: DinoTxtConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.width)
        self.attention = _CausalSelfAttention(config.width, config.heads)
        self.ffn_norm = nn.LayerNorm(config.width)
        self.feed_forward = Mlp(config.width, config.ffn_width, act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class _Backbone(nn.Module):
    """Token and position embeddings, the blocks and the final norm (``text_model.backbone.*``)."""

    def __init__(self, config: DinoTxtConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.zeros(config.context_length, config.width))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.depth))
        self.ln_final = nn.LayerNorm(config.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)


class _Head(nn.Module):
    """The released head has no blocks, only the projection (``text_model.head.linear_projection.weight``)."""

    def __init__(self, config: DinoTxtConfig) -> None:
        super().__init__()
        self.linear_projection = nn.Linear(config.width, config.output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_projection(x)


class DinoTxtTextTower(nn.Module):
    """The text tower; its ``state_dict()`` keys are the release's ``text_model.*`` keys without the prefix."""

    def __init__(self, config: DinoTxtConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = _Backbone(config)
        self.head = _Head(config)

    def reset_parameters(self, seed: int = 0) -> None:
        """Random weights with the release's initial scales (so random towers give usable, distinct features)."""
        generator = torch.Generator().manual_seed(seed)
        width, depth = self.config.width, self.config.depth
        attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
        proj_std = attn_std * (2 * depth) ** -0.5
        with torch.no_grad():
            nn.init.normal_(self.backbone.token_embedding.weight, std=0.02, generator=generator)
            nn.init.normal_(self.backbone.positional_embedding, std=0.01, generator=generator)
            for block in self.backbone.blocks:
                nn.init.normal_(block.attention.qkv.weight, std=attn_std, generator=generator)
                nn.init.normal_(block.attention.proj.weight, std=proj_std, generator=generator)
                nn.init.normal_(block.feed_forward.fc1.weight, std=fc_std, generator=generator)
                nn.init.normal_(block.feed_forward.fc2.weight, std=proj_std, generator=generator)
                for bias in (block.attention.proj.bias, block.feed_forward.fc1.bias, block.feed_forward.fc2.bias):
                    bias.zero_()
                block.attention_norm.reset_parameters()
                block.ffn_norm.reset_parameters()
            self.backbone.ln_final.reset_parameters()
            nn.init.normal_(self.head.linear_projection.weight, std=width**-0.5, generator=generator)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Un-normalised ``(N, output_dim)`` embeddings of ``(N, L)`` token ids, read at the end-of-text token."""
        features = self.backbone(tokens)
        # the end token has the largest id, and padding is 0: argmax finds it as the release does (the release
        # projects every token first; the projection is linear, so projecting the pooled one is the same)
        pooled = features[torch.arange(tokens.shape[0], device=tokens.device), tokens.argmax(dim=-1)]
        return self.head(pooled)

    encode_text = forward


@functools.lru_cache(maxsize=4)
def dinotxt_tokenizer(context_length: int = 77) -> open_clip.tokenizer.SimpleTokenizer:
    """The release's tokenizer: CLIP's BPE (``bpe_simple_vocab_16e6``, shipped in the open_clip wheel)."""
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def expected_text_shapes(config: DinoTxtConfig) -> dict[str, tuple[int, ...]]:
    """Every text-tower key (without ``text_model.``) and its shape, as a tower of ``config`` has them."""
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        tower = DinoTxtTextTower(config)
    return {key: tuple(value.shape) for key, value in tower.state_dict().items()}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.pth`` (weights only, no pickle code) or ``.safetensors`` file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a truncated or foreign file
        message = first_line(exc, named=False)
        raise InputError(f"text_checkpoint: {path} cannot be read as a state dict ({message})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise InputError(f"text_checkpoint: {path} is not a flat state dict of tensors")
    return state


def _text_state_dict(path: Path, state: dict[str, torch.Tensor], config: DinoTxtConfig) -> dict[str, torch.Tensor]:
    """The text tower's tensors of a checkpoint, checked against ``config``.

    The file as released (``text_model.`` keys beside the vision head's) and a file holding only the tower's keys
    without the prefix are both accepted.
    """
    if any(key.startswith(TEXT_PREFIX) for key in state):
        text = {key.removeprefix(TEXT_PREFIX): value for key, value in state.items() if key.startswith(TEXT_PREFIX)}
    else:
        text = state
    expected = expected_text_shapes(config)
    missing = sorted(expected.keys() - text.keys())
    unexpected = sorted(text.keys() - expected.keys())
    if missing or unexpected:
        raise InputError(
            f"text_checkpoint: {path} is not a {config.name} text tower: {len(missing)} missing "
            f"{TEXT_PREFIX}* keys (first: {missing[:2]}), {len(unexpected)} unexpected (first: {unexpected[:2]})"
        )
    for key, shape in expected.items():
        if tuple(text[key].shape) != shape:
            raise InputError(
                f"text_checkpoint: {path}: {TEXT_PREFIX}{key} has shape {tuple(text[key].shape)}, "
                f"expected {shape} for {config.name}"
            )
        if not text[key].is_floating_point() or not torch.isfinite(text[key]).all():
            raise InputError(f"text_checkpoint: {path}: {TEXT_PREFIX}{key} has non-finite or non-float values")
    return text


def load_text_tower(path: Path, config: DinoTxtConfig) -> DinoTxtTextTower:
    """A float32 CPU tower with the text weights of ``path``.

    Raises:
        InputError: the file is missing, unreadable, lacks or adds text keys, has wrong shapes or non-finite values.
    """
    if not path.is_file():
        raise InputError(
            f"text_checkpoint: {path} not found; expected the dino.txt weights file ({RELEASED_FILE}), "
            f"which cannot be downloaded automatically here: {WHERE_TO_GET}"
        )
    text = _text_state_dict(path, _read_state_dict(path), config)
    # built on meta and assigned, so the 0.5 B-parameter tower is never held twice in memory
    with torch.device("meta"):
        tower = DinoTxtTextTower(config)
    tower.load_state_dict(text, strict=True, assign=True)
    return tower.float()


class _DinoTxtChunks(ChunkedTextEncoder):
    """``ChunkedTextEncoder``'s whole-caption chunking over the dino.txt tower and its tokenizer."""

    def __init__(self, model: DinoTxtTextTower, pooling: str) -> None:  # the parent looks the tokenizer up by name
        self.model = model
        self.tokenizer = dinotxt_tokenizer(model.config.context_length)
        self.context = model.config.context_length
        self.pooling = pooling


class DinoTxtTextEncoder(nn.Module):
    """A frozen dino.txt text tower that embeds whole captions.

    Attributes:
        dim: size of the embeddings ``encode`` returns.
        context_length: tokens per chunk, start and end included.
        weights_label: ``<file name>@<first 12 hex of its sha256>``, or ``random``.
        calls: how many times ``encode`` ran (tests watch the feature cache with it).
    """

    def __init__(
        self,
        checkpoint: str | Path | None,
        config: DinoTxtConfig = DINOTXT_VITL16,
        device: str | torch.device = "cpu",
        random_weights: bool = False,
        pooling: str = "chunk_mean",
    ) -> None:
        """Load the tower.

        Args:
            checkpoint: the released ``.pth`` (or a ``.safetensors`` with the same keys); ignored with
                ``random_weights``.
            config: the architecture the file must match.
            device: where the tower runs.
            random_weights: build the same network with seeded random weights (benchmarks, offline checks).
            pooling: how a caption over the context becomes one vector (``TEXT_POOLINGS``).

        Raises:
            InputError: no checkpoint without ``random_weights``, or a file ``load_text_tower`` refuses.
        """
        super().__init__()
        if random_weights:
            tower = DinoTxtTextTower(config)
            tower.reset_parameters(seed=0)
            self.weights_label = "random"
        elif checkpoint is None:
            raise InputError(
                f"text_checkpoint: {config.name} needs the dino.txt weights file ({RELEASED_FILE}), "
                f"which cannot be downloaded automatically here: {WHERE_TO_GET}"
            )
        else:
            path = Path(checkpoint)
            tower = load_text_tower(path, config)
            self.weights_label = f"{path.name}@{file_digest(path)[:12]}"
        self.model = tower.to(device).eval().requires_grad_(False)
        self.config = config
        self.dim = config.output_dim
        self.context_length = config.context_length
        self.chunked = _DinoTxtChunks(self.model, pooling)
        self.calls = 0

    @property
    def device(self) -> torch.device:
        """The device the text tower runs on."""
        return self.chunked.device

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``(N, dim)`` L2-normalised float32 embeddings on the CPU; a long caption is the mean of its chunks."""
        self.calls += 1
        return self.chunked.encode(texts)[0].float().cpu()


def write_tiny_dinotxt_checkpoint(path: Path, config: DinoTxtConfig = DINOTXT_TINY, seed: int = 0) -> Path:
    """Save random weights of ``config`` with the released file's layout, a few vision-head keys included.

    ``.safetensors`` paths get a safetensors file, any other a ``torch.save`` one. Returns ``path``.
    """
    tower = DinoTxtTextTower(config)
    tower.reset_parameters(seed)
    state = {f"{TEXT_PREFIX}{key}": value.contiguous() for key, value in tower.state_dict().items()}
    # stand-ins for the vision head that shares the released file; the loader must pass over them
    generator = torch.Generator().manual_seed(seed + 1)
    state["logit_scale"] = torch.tensor([4.6052])
    state["visual_model.head.blocks.0.norm1.weight"] = torch.ones(config.width)
    state["visual_model.head.blocks.0.attn.qkv.weight"] = torch.randn(
        3 * config.width, config.width, generator=generator
    )
    state["visual_model.head.ln_final.weight"] = torch.ones(config.width)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)
    return path
