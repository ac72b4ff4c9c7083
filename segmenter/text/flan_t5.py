"""A frozen FLAN-T5 text encoder (standalone T5, or the FLAN-T5 inside a BLIP-2 checkpoint), mean-pooled.

T5 has no CLS token, so a caption's embedding is the mean of the encoder's last hidden state over its
non-padding tokens, L2-normalised. A caption longer than the context is cut into token chunks that are encoded
separately; their normalised embeddings are averaged and normalised again (the CLIP towers' rule, here with
T5's 512-token context).

From a BLIP-2 checkpoint only the FLAN-T5 encoder is read: ``language_model.shared.*`` and
``language_model.encoder.*`` are taken from the shards the index names for them (safetensors with
``safetensors.safe_open``; a PyTorch ``pytorch_model-*.bin`` checkpoint, where no safetensors one exists, with
``torch.load(weights_only=True, mmap=True)``, so only the encoder's tensors are read from the disk), and a hub id
is resolved file by file, so the vision tower, the Q-Former and the T5 decoder are never downloaded unless they
share a shard with the encoder, and are never loaded.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import safe_open
from torch import nn

from caption_pipeline.clip_models import pool_rows, pooled_chunks
from manifests.atomic import file_digest
from manifests.devices import resolve_device
from manifests.errors import InputError, first_line

MAX_CONTEXT = 512  # T5's training length; its relative positions would go further, its quality would not
BLIP2_TEXT_PREFIX = "language_model."
ENCODER_PREFIXES = ("shared.", "encoder.")
TIED_EMBEDDING = "encoder.embed_tokens.weight"  # the same tensor as shared.weight, usually not saved
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_FILE = "pytorch_model.bin"
LOOKED_FOR = [SAFETENSORS_INDEX, SAFETENSORS_FILE, TORCH_INDEX, TORCH_FILE]
# configs, tokenizer files and shard indexes: small, so a hub id fetches them whole before any weights
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
METADATA_PATTERNS = ["*.json", "*.model", "*.txt"]
HUB_ERRORS = (LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
TINY_CORPUS = (
    "An aerial image with buildings, trees, low vegetation, impervious surfaces, cars and clutter. "
    "Roads cross the scene from north to south; roofs in the north-west; trees in the east; 3 cars."
)


def _looks_local(source: str | Path) -> bool:
    """Whether ``source`` names a folder rather than a hub id (``name`` or ``org/name``)."""
    if isinstance(source, Path) or Path(source).exists():
        return True
    text = str(source)
    return text.startswith((".", "~", "/", "\\")) or text.count("/") > 1 or "\\" in text or ":" in text


def _hub_error(repo_id: str, what: str, exc: Exception) -> InputError:
    """The one-line error for hub files that are neither cached nor downloadable: where it looked, how to fix."""
    return InputError(
        f"text_checkpoint: {what} of hub id '{repo_id}' not found in the Hugging Face cache {constants.HF_HUB_CACHE} "
        f"and not downloadable here ({type(exc).__name__}); on a connected machine run `hf download {repo_id}` "
        f"(older huggingface_hub: `huggingface-cli download {repo_id}`) into this cache (or set HF_HOME / "
        "HF_HUB_CACHE to the cache that has it), or give a local folder with --text-checkpoint"
    )


class _Source:
    """A local folder or a hub snapshot, and how to get one of its files onto the disk."""

    def __init__(self, source: str | Path) -> None:
        self.repo_id: str | None = None
        self.revision: str | None = None
        if _looks_local(source):
            self.folder = Path(source).expanduser()
            if not self.folder.is_dir():
                raise InputError(
                    f"text_checkpoint: folder {self.folder} not found (expected a FLAN-T5 or BLIP-2 FLAN-T5 folder "
                    "written by save_pretrained, or a Hugging Face hub id such as Salesforce/blip2-flan-t5-xl)"
                )
            if not (self.folder / "config.json").is_file():
                raise InputError(
                    f"text_checkpoint: {self.folder} has no config.json (expected a save_pretrained folder)"
                )
            self.name = self.folder.name
            return
        self.repo_id = self.name = str(source)
        try:
            self.folder = Path(snapshot_download(self.repo_id, allow_patterns=METADATA_PATTERNS))
        except (*HUB_ERRORS, HFValidationError) as exc:
            raise _hub_error(self.repo_id, "config and tokenizer", exc) from None
        self.revision = self.folder.name  # snapshots/<commit>: the revision these files belong to
        if not (self.folder / "config.json").is_file():
            raise _hub_error(self.repo_id, "config.json", FileNotFoundError("config.json"))

    def file(self, name: str) -> Path | None:
        """The local path of ``name`` (downloaded for a hub id), or None where the source has no such file."""
        path = self.folder / name
        # configs and indexes came with the metadata snapshot: absent there means absent from the repository
        if path.is_file() or self.repo_id is None or name.endswith(".json"):
            return path if path.is_file() else None
        try:
            return Path(hf_hub_download(self.repo_id, name, revision=self.revision))
        except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as exc:
            # before EntryNotFoundError, its base class: not cached here is not the same as absent from the repo
            raise _hub_error(self.repo_id, name, exc) from None
        except EntryNotFoundError:
            return None  # the repository has no such file: the caller tries the next layout

    def missing_weights(self, looked_for: list[str]) -> InputError:
        """The one-line error for a source without weight files (``looked_for`` names the files tried)."""
        where = f"hub id '{self.repo_id}' (cache {constants.HF_HUB_CACHE})" if self.repo_id else f"folder {self.folder}"
        how = (
            f"on a connected machine run `hf download {self.repo_id}`, or give a local folder with --text-checkpoint"
            if self.repo_id
            else "save the model there with save_pretrained, or give a hub id"
        )
        return InputError(f"text_checkpoint: no weights ({', '.join(looked_for)}) in {where}; {how}")


def _shard_map(index: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from a ``*.index.json``."""
    try:
        return dict(json.loads(index.read_text())["weight_map"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(
            f"text_checkpoint: {index} is not a shard index with a weight_map ({first_line(exc)})"
        ) from None


def _is_encoder_key(key: str, prefix: str) -> bool:
    """Whether a checkpoint tensor belongs to the T5 encoder (its blocks or the shared token embedding)."""
    return key.startswith(prefix) and key[len(prefix) :].startswith(ENCODER_PREFIXES)


def _checkpoint_shards(where: _Source, wanted: Callable[[str], bool]) -> dict[Path, list[str] | None]:
    """The weight files of the source's checkpoint, each with the tensors to read from it.

    A shard index (safetensors, then PyTorch ``.bin``; both came with the metadata, so nothing is downloaded to
    find them) names the shards: only those holding a ``wanted`` tensor are fetched. Without an index, the single
    file (``model.safetensors``, then ``pytorch_model.bin``) is read, its keys filtered by ``wanted`` (``None``).

    Raises:
        InputError: no weight file, or a shard the index names that is missing.
    """
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index = where.file(index_name)
        if index is None:
            continue
        keys_by_file: dict[str, list[str]] = {}
        for key, shard in _shard_map(index).items():
            if wanted(key):
                keys_by_file.setdefault(shard, []).append(key)
        shards: dict[Path, list[str] | None] = {}
        for name, keys in sorted(keys_by_file.items()):
            path = where.file(name)
            if path is None:
                raise where.missing_weights([name])
            shards[path] = keys
        return shards
    for single in (SAFETENSORS_FILE, TORCH_FILE):
        path = where.file(single)
        if path is not None:
            return {path: None}
    raise where.missing_weights(LOOKED_FOR)


def _read_tensors(path: Path, keys: list[str] | None, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` (every ``wanted`` one where None) of one weight file, safetensors or PyTorch.

    A ``.bin`` is opened with ``weights_only=True`` (no code in the pickle runs) and memory-mapped, so the tensors not
    asked for are never read.

    Raises:
        InputError: a file that cannot be read so, or that lacks a tensor its index names.
    """
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in keys or [k for k in handle.keys() if wanted(k)]}  # noqa: SIM118
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise InputError(
            f"text_checkpoint: {path} cannot be read as PyTorch weights with weights_only=True ({first_line(exc)})"
        ) from None
    missing = [key for key in keys or [] if key not in state]
    if missing:
        raise InputError(f"text_checkpoint: {path} lacks {missing[:3]}, which its shard index names")
    return {key: state[key] for key in keys or [k for k in state if wanted(k)]}


def _weights_digest(files: list[Path]) -> str:
    """One short sha256 for the weight files read (the file's own digest when there is one)."""
    digests = [file_digest(path) for path in files]
    combined = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
    return combined[:12]


def _inference_dtype(device: torch.device) -> torch.dtype:
    # T5 overflows in fp16 (it was trained in bf16); the CPU gets fp32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class FlanT5TextEncoder(nn.Module):
    """A frozen FLAN-T5 encoder whose caption embeddings are token means, L2-normalised.

    Attributes:
        model: the ``transformers.T5EncoderModel`` (frozen, eval mode).
        tokenizer: the checkpoint's own tokenizer.
        dim: the encoder's ``d_model`` (2048 for flan-t5-xl).
        context_length: tokens per chunk including the end token (the tokenizer's max length, at most 512).
        weights_label: ``<hub id>@<commit>`` or ``<folder name>@<sha256 of the weight files>``; ``random``.
        device: where the encoder runs; ``encode`` returns CPU tensors whatever it is.
        batch_size: token rows per forward pass.
        loaded_keys: the checkpoint tensors read (BLIP-2 layout), so tests can see the vision tower stays out.
        calls: how often ``encode`` ran (tests of the feature cache count them).
    """

    def __init__(
        self,
        source: str | Path,
        device: str | torch.device = "cpu",
        random_weights: bool = False,
        pooling: str = "chunk_mean",
    ) -> None:
        """Load the tokenizer and the FLAN-T5 encoder of ``source``.

        Args:
            source: a hub id or a local folder of a T5 / FLAN-T5 model or of a BLIP-2 FLAN-T5 checkpoint.
            device: a torch device or its name (``auto`` as everywhere in this project).
            random_weights: build the network from the config only, with seeded random weights (benchmarks).
            pooling: how a caption over the context becomes one vector (``TEXT_POOLINGS``).

        Raises:
            InputError: a missing folder, a hub id that is neither cached nor downloadable, a folder or repository
                without weights, or a checkpoint that holds no T5 encoder.
        """
        super().__init__()
        self.device = device if isinstance(device, torch.device) else resolve_device(device, source="text device")
        self.dtype = _inference_dtype(self.device)
        where = _Source(source)
        self.tokenizer, text_config, blip2 = _read_config(where, source)
        self.loaded_keys: list[str] = []
        if random_weights:
            self.model = self._random(text_config)
            self.weights_label = "random"
        elif blip2:
            self.model, files = self._blip2_encoder(where, text_config)
            self.weights_label = self._label(where, files)
        else:
            self.model, files = self._t5_encoder(where)
            self.weights_label = self._label(where, files)
        self.model = self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.dim = int(text_config.d_model)
        max_length = getattr(self.tokenizer, "model_max_length", MAX_CONTEXT) or MAX_CONTEXT
        self.context_length = int(min(max_length, MAX_CONTEXT))
        self.batch_size = 32
        self.pooling = pooling
        self.calls = 0

    @property
    def encoder_id(self) -> str:
        """What a text-feature cache keys on: the weights, the pooling and the chunk length."""
        return f"flan-t5:{self.weights_label}:mean{self.context_length}:{self.pooling}"

    @staticmethod
    def _random(text_config: Any) -> nn.Module:
        from transformers import T5EncoderModel

        # seeded without touching the caller's generator, so 'random' names the same network in every process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return T5EncoderModel(text_config)

    @staticmethod
    def _label(where: _Source, files: list[Path]) -> str:
        if where.repo_id is not None:
            return f"{where.repo_id}@{where.revision[:12] if where.revision else 'unknown'}"
        return f"{where.name}@{_weights_digest(files)}"

    def _blip2_encoder(self, where: _Source, text_config: Any) -> tuple[nn.Module, list[Path]]:
        """A ``T5EncoderModel`` holding only the BLIP-2 checkpoint's FLAN-T5 encoder tensors."""
        from transformers import T5EncoderModel

        def wanted(key: str) -> bool:
            return _is_encoder_key(key, BLIP2_TEXT_PREFIX)

        shards = _checkpoint_shards(where, wanted)
        state: dict[str, torch.Tensor] = {}
        for path, keys in shards.items():
            for key, tensor in _read_tensors(path, keys, wanted).items():
                state[key[len(BLIP2_TEXT_PREFIX) :]] = tensor
                self.loaded_keys.append(key)
        files = list(shards)
        if "shared.weight" not in state:
            raise InputError(
                f"text_checkpoint: {where.name} has no {BLIP2_TEXT_PREFIX}shared.weight (expected the FLAN-T5 "
                "language model of a BLIP-2 checkpoint)"
            )
        state.setdefault(TIED_EMBEDDING, state["shared.weight"])
        # built on the meta device and filled by assignment: the random init of a 1.2B encoder is skipped
        with torch.device("meta"):
            model = T5EncoderModel(text_config)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise InputError(
                f"text_checkpoint: {where.name}: encoder tensors do not fit its text_config ({first_line(exc)})"
            ) from None
        model.encoder.embed_tokens = model.shared  # one embedding, as T5 ties them
        return model, files

    def _t5_encoder(self, where: _Source) -> tuple[nn.Module, list[Path]]:
        """The encoder of a standalone T5 / FLAN-T5 checkpoint, through ``from_pretrained``."""
        from transformers import T5EncoderModel

        # every shard (from_pretrained reads the folder), safetensors first: a .bin twin is never downloaded too
        files = list(_checkpoint_shards(where, lambda key: True))
        try:
            model = T5EncoderModel.from_pretrained(files[0].parent, dtype=torch.float32)
        except OSError as exc:
            raise where.missing_weights([*LOOKED_FOR, first_line(exc)]) from None
        return model, files

    def token_chunks(self, texts: list[str]) -> list[list[list[int]]]:
        """Each caption's token ids in chunks that fit the context with the end token (at least one, maybe empty)."""
        width = self.context_length - (self.tokenizer.eos_token_id is not None)
        if width < 1:
            raise InputError(f"text encoder: context_length {self.context_length} leaves no room for tokens")
        ids = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [[row[start : start + width] for start in range(0, len(row), width)] or [[]] for row in ids]

    @torch.no_grad()
    def embed_token_rows(self, rows: list[list[int]]) -> torch.Tensor:
        """``(R, dim)`` float32 CPU embeddings of token rows (end token appended), mean over tokens, normalised."""
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows = [[*row, eos] if eos is not None else row for row in rows]
        out = torch.empty(len(rows), self.dim)
        # sorted by length, so each batch pads little; the mask makes padding invisible either way
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(rows[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for j, i in enumerate(batch):
                ids[j, : len(rows[i])] = torch.tensor(rows[i])
                mask[j, : len(rows[i])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            weights = mask.unsqueeze(-1).float()
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            out[torch.tensor(batch)] = F.normalize(mean, dim=-1).cpu()
        return out

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``(N, dim)`` float32 CPU embeddings, normalised; a caption over the context is pooled from its chunks
        (``pooling``, :data:`caption_pipeline.clip_models.TEXT_POOLINGS`)."""
        self.calls += 1
        rows, owners, weights = [], [], []
        for index, chunks in enumerate(self.token_chunks(texts)):
            for chunk, weight in pooled_chunks(chunks, self.pooling):
                rows.append(chunk)
                owners.append(index)
                weights.append(weight)
        if not rows:
            return torch.zeros(0, self.dim)
        return pool_rows(self.embed_token_rows(rows), owners, weights, len(texts))


def _tiny_t5_tokenizer() -> Any:
    """A byte-level BPE trained offline, T5-style: ``<pad>`` 0, ``</s>`` 1 (appended to every text), ``<unk>`` 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "</s>", "<unk>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([TINY_CORPUS] * 4, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=MAX_CONTEXT
    )


def build_tiny_flan_t5(folder: Path, blip2: bool = False) -> Path:
    """Save a tiny random FLAN-T5 (or a tiny BLIP-2 around it) and its tokenizer with ``save_pretrained``.

    The T5 has d_model 32, 2 layers, 2 heads and a ~320-token vocabulary; the BLIP-2 adds a one-layer vision tower
    and Q-Former. Weights are seeded, so two builds are the same model.

    Args:
        folder: where to save (created).
        blip2: a ``Blip2ForConditionalGeneration`` instead of a ``T5ForConditionalGeneration``.

    Returns:
        ``folder``.
    """
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        T5Config,
        T5ForConditionalGeneration,
    )

    tokenizer = _tiny_t5_tokenizer()
    t5 = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if blip2:
            config = Blip2Config(
                vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=28, patch_size=14),
                qformer_config=Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, encoder_hidden_size=32, vocab_size=64),
                text_config=t5.to_dict(), num_query_tokens=4,
            )  # fmt: skip
            model = Blip2ForConditionalGeneration(config)
        else:
            model = T5ForConditionalGeneration(t5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def flan_t5_width(source: str | Path) -> int:
    """The ``d_model`` of a T5 / FLAN-T5 or BLIP-2 FLAN-T5 source, read from its config (no weights loaded).

    Raises:
        InputError: as :class:`FlanT5TextEncoder` for a source whose config cannot be found or read.
    """
    from transformers import AutoConfig

    where = _Source(source)
    try:
        config = AutoConfig.from_pretrained(where.folder)
    except (OSError, ValueError) as exc:
        raise InputError(f"text_checkpoint: cannot read the config in {where.folder} ({first_line(exc)})") from None
    return int((config.text_config if config.model_type == "blip-2" else config).d_model)


def _read_config(where: _Source, source: str | Path) -> tuple[Any, Any, bool]:
    """The tokenizer, the T5 text config and whether ``where`` holds a BLIP-2 checkpoint, checked.

    Raises:
        InputError: no tokenizer beside the model, an unreadable config or tokenizer, or a model without a T5 text
            model.
    """
    from transformers import AutoConfig, AutoTokenizer

    if not any((where.folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build a T5 tokenizer with an empty vocabulary: every word unknown, every caption
        # the same features up to its length
        raise InputError(
            f"text_checkpoint: {where.folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): save the "
            "tokenizer beside the model (tokenizer.save_pretrained), or use the folder of the original checkpoint"
        )
    try:
        config = AutoConfig.from_pretrained(where.folder)
        tokenizer = AutoTokenizer.from_pretrained(where.folder)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"text_checkpoint: cannot read the config or tokenizer in {where.folder} ({first_line(exc)})"
        ) from None
    blip2 = config.model_type == "blip-2"
    text_config = config.text_config if blip2 else config
    if text_config.model_type not in ("t5", "mt5", "umt5"):
        raise InputError(
            f"text_checkpoint: {source} is a '{config.model_type}' model with a '{text_config.model_type}' text "
            "model (expected T5 / FLAN-T5, or BLIP-2 with a FLAN-T5 language model)"
        )
    return tokenizer, text_config, blip2
