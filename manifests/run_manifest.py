"""Run manifests: YAML files that describe one run end to end, parsed into strict pydantic models.

A manifest is named either by a path to a YAML file or by the name of a packaged one
(``demo``, ``vaihingen``, ``potsdam``, ``syndrone``). Relative paths inside a manifest are resolved
against the working directory, so the packaged manifests expect their data under ``./data``.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import os
import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from manifests.errors import InputError

ClassSource = Literal["labels", "predictions", "none"]
ClassProtocol = Literal["oracle", "predicted", "blind", "custom"]
PromptId = Literal["p1", "p2", "p3"]
GateMode = Literal["absolute", "percentile", "contrastive"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Channel = Annotated[int, Field(ge=0, le=255)]


class ClassSpec(_Strict):
    """One class of a generic folder dataset: its name, the RGB colour that codes it in the masks, and how
    captions and metrics treat it."""

    name: str
    color: tuple[Channel, Channel, Channel]
    words: list[str] = Field(default_factory=list, description="more words a caption names this class by")
    plural: str | None = Field(default=None, description="plural noun: the class is counted as objects")
    in_mean: bool = Field(default=True, description="whether the headline mIoU/mF1 average over this class")


class _DatasetSettings(_Strict):
    """What every dataset has: where it is, the prefix of its tile ids and how it is split."""

    name: str
    root: Path
    id: str | None = Field(default=None, description="prefix of tile ids; defaults to the dataset name")
    split: str = "mpers"
    custom_splits: dict[str, list[str | int]] | None = Field(
        default=None, description="split -> source ids as the dataset numbers them (Vaihingen: 1, 3; Potsdam: 2_10)"
    )
    ignore_index: int = Field(default=255, ge=0, le=255)

    @model_validator(mode="after")
    def _custom_split_has_lists(self) -> _DatasetSettings:
        if self.split == "custom" and not self.custom_splits:
            raise ValueError("split 'custom' needs custom_splits: {train: [...], test: [...]}")
        return self

    @property
    def tile_prefix(self) -> str:
        return self.id or self.name


class VaihingenConfig(_DatasetSettings):
    """ISPRS Vaihingen: IRRG true orthophotos, the official archives or their extracted folders."""

    name: Literal["vaihingen"]


class PotsdamConfig(_DatasetSettings):
    """ISPRS Potsdam, in one of its three orthophoto modalities."""

    name: Literal["potsdam"]
    modality: Literal["irrg", "rgb", "rgbir"] = "rgb"


class SynDroneConfig(_DatasetSettings):
    """SynDrone (CARLA) frames, in the 7 coarse classes or the 28 fine ones."""

    name: Literal["syndrone"]
    coarse: bool = True
    splits: Path | None = Field(
        default=None, description="folder or splits.zip with train.txt/test.txt (default: root, then its parent)"
    )
    towns: list[str | int] | None = Field(default=None, description="a subset of towns (01 ... 07, 10HD); default all")
    heights: list[str | int] | None = Field(default=None, description="a subset of heights (20, 50, 80); default all")


class FolderConfig(_DatasetSettings):
    """A folder of images and RGB-coded masks, with the classes and their colours given here."""

    name: Literal["folder"]
    classes: list[ClassSpec] = Field(min_length=1, description="[{name, color}, ...]: the colours of the masks")
    images_dir: str = "images"
    masks_dir: str = "masks"

    @model_validator(mode="after")
    def _classes_are_distinct(self) -> FolderConfig:
        names, colors = [spec.name for spec in self.classes], [spec.color for spec in self.classes]
        for what, values in (("name", names), ("color", colors)):
            repeated = sorted({str(value) for value in values if values.count(value) > 1})
            if repeated:
                raise ValueError(f"classes: {what} {', '.join(repeated)} given to more than one class")
        return self


DatasetConfig = Annotated[VaihingenConfig | PotsdamConfig | SynDroneConfig | FolderConfig, Field(discriminator="name")]
DATASET_SETTINGS: dict[str, type[_DatasetSettings]] = {
    "vaihingen": VaihingenConfig,
    "potsdam": PotsdamConfig,
    "syndrone": SynDroneConfig,
    "folder": FolderConfig,
}
_DATASET_ADAPTER: TypeAdapter[DatasetConfig] = TypeAdapter(DatasetConfig)


def dataset_config(**fields: Any) -> DatasetConfig:
    """The settings of the dataset ``fields["name"]`` names (a manifest's ``dataset`` section as keywords).

    Raises:
        pydantic.ValidationError: an unknown dataset, or a setting this dataset does not have.
    """
    return _DATASET_ADAPTER.validate_python(fields)


class TilingConfig(_Strict):
    """How sources are cut into crops and where the crops and ``index.parquet`` go."""

    size: int = Field(default=512, ge=16)
    stride: int | None = Field(default=None, ge=1)
    out: Path

    @property
    def effective_stride(self) -> int:
        """The stride, the crop size where none is set (crops side by side)."""
        return self.stride or self.size


class ClipConfig(_Strict):
    """The open_clip scorer: a model name with a pretrained tag, a local checkpoint or a local JSON config.

    With a ``checkpoint``, ``pretrained`` names where the file's weights come from (``openai``, ``remoteclip``):
    it decides the activation (QuickGELU for OpenAI-trained weights) unless ``quick_gelu`` says otherwise.
    """

    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    config: Path | None = Field(default=None, description="directory or file with an open_clip JSON config")
    checkpoint: Path | None = None
    quick_gelu: bool | None = Field(default=None, description="force the activation; unset: follow the weights")
    device: str = "auto"
    batch_size: int = Field(default=64, ge=1)


class _ExpertSettings(_Strict):
    """What every expert has, whatever serves it: its name and its backend."""

    name: str


@dataclass(frozen=True)
class ExpertBackend:
    """One expert backend, declared once: the name a manifest gives as ``backend``, its settings class and the expert
    class that serves it.

    Attributes:
        name: the value of ``backend`` in a manifest's expert entry (the ``Literal`` of the settings class).
        settings: the pydantic model of its manifest entry.
        expert: ``"module:Class"`` of the expert class in ``caption_pipeline.experts``; a path, not an import, because
            ``manifests`` imports nothing else of the project and heavy backends (torch models, vLLM) load only when
            an expert uses them. The class builds the expert from its settings and carries its pre-flight check.
    """

    name: str
    settings: type[_ExpertSettings]
    expert: str


# Every expert backend, in the order they were declared. The manifest's ``backend`` union, its error messages and
# ``caption_pipeline.experts.build_expert`` are derived from it: a backend is added by one settings class below,
# decorated with ``expert_backend``, and its expert class in ``caption_pipeline/experts/``.
EXPERT_BACKENDS: dict[str, ExpertBackend] = {}
# The manifest's union of the backends' settings (ExpertConfig) is built once, below the last declaration: a backend
# declared after it would be missing from every manifest, so its declaration is refused instead.
_BACKENDS_OPEN = {"open": True}
_Settings = TypeVar("_Settings", bound=type[_ExpertSettings])
# What the caption flow reads of every expert's settings, whatever its backend: a field, or a ClassVar where the
# backend has no such setting (the annotation expert has no model and no decoding).
EXPERT_READS = ("name", "model", "temperature", "reprompt_temperature", "gpu", "prompts")


def expert_backend(expert: str) -> Callable[[_Settings], _Settings]:
    """Register the decorated settings class as the backend its ``backend`` literal names, served by ``expert``
    (``"module:Class"``).

    Raises:
        ValueError: a class without a one-value ``backend`` literal, or a backend name declared twice.
    """

    def register(settings: _Settings) -> _Settings:
        names = get_args(settings.model_fields["backend"].annotation) if "backend" in settings.model_fields else ()
        if len(names) != 1:
            raise ValueError(f"{settings.__name__}: an expert backend's settings need backend: Literal['<name>']")
        missing = [name for name in EXPERT_READS if name not in settings.model_fields and not hasattr(settings, name)]
        if missing:
            raise ValueError(f"{settings.__name__}: the flow reads {missing} of every expert (a field or a ClassVar)")
        if names[0] in EXPERT_BACKENDS:
            raise ValueError(f"expert backend {names[0]!r} is declared twice")
        if not _BACKENDS_OPEN["open"]:
            raise ValueError(f"expert backend {names[0]!r} is declared after ExpertConfig: declare it above")
        EXPERT_BACKENDS[names[0]] = ExpertBackend(names[0], settings, expert)
        return settings

    return register


class _ModelExpertSettings(_ExpertSettings):
    """What every expert that runs a model has: the image size it sees, its decoding and its prompt overrides."""

    max_side: int = Field(default=512, ge=16, description="images are resized to this longest side first")
    max_new_tokens: int = Field(default=160, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, description="temperature of attempt 0 (0 = greedy)")
    reprompt_temperature: float = Field(
        default=0.7,
        ge=0.0,
        description="sampling temperature of the re-prompts (attempts >= 1, seed = attempt), so a re-prompt can "
        "change its answer instead of repeating the greedy one",
    )
    gpu: bool = Field(default=False, description="tag its tasks for the GPU concurrency limit")
    prompts: dict[PromptId, str] = Field(default_factory=dict, description="per-expert template overrides")


@expert_backend("caption_pipeline.experts.annotation:AnnotationExpert")
class AnnotationExpertConfig(_ExpertSettings):
    """The label-grounded expert: captions written from class masks, no model, no decoding, no GPU."""

    backend: Literal["annotation"]

    # Read by the flow for every expert; the annotation expert is deterministic and writes its own text.
    model: ClassVar[None] = None
    temperature: ClassVar[float] = 0.0
    reprompt_temperature: ClassVar[float] = 0.0
    gpu: ClassVar[bool] = False
    prompts: ClassVar[dict[str, str]] = {}


@expert_backend("caption_pipeline.experts.synthetic:SyntheticExpert")
class SyntheticExpertConfig(_ExpertSettings):
    """A study tool, not a captioner: the annotation expert's caption of the class mask, corrupted at declared rates
    (each kind drawn independently per key and attempt), every corruption recorded in the row's ``finish_reason``."""

    backend: Literal["synthetic"]
    drop: float = Field(default=0.0, ge=0.0, le=1.0, description="rate of dropping a present class from the caption")
    insert: float = Field(default=0.0, ge=0.0, le=1.0, description="rate of inserting a class absent from the tile")
    proportions: float = Field(
        default=0.0, ge=0.0, le=1.0, description="rate of perturbing the proportions (a class grown over the tile)"
    )
    seed: int = Field(default=0, description="with the key and the attempt, seeds every draw")

    # Read by the flow for every expert; a re-prompt draws the corruptions anew (seed = attempt).
    model: ClassVar[None] = None
    temperature: ClassVar[float] = 0.0
    reprompt_temperature: ClassVar[float] = 0.0
    gpu: ClassVar[bool] = False
    prompts: ClassVar[dict[str, str]] = {}


@expert_backend("caption_pipeline.experts.openai_backend:OpenAIExpert")
class OpenAIExpertConfig(_ModelExpertSettings):
    """A model behind an OpenAI-compatible chat-completions server (`vllm serve`, SGLang, the OpenAI API)."""

    backend: Literal["openai"]
    model: str
    base_url: str | list[str] = Field(
        description="server URL, or a list of URLs serving the same model: each request goes to the one with the "
        "fewest in flight, and `concurrency` is per URL"
    )
    api_key_env: str | None = Field(default=None, description="name of the env var that holds the API key")
    concurrency: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    token_limit_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        default="max_tokens",
        description="request field that carries max_new_tokens: o-series and newer GPT models reject max_tokens",
    )

    @field_validator("base_url", mode="before")
    @classmethod
    def _http_urls(cls, value: Any) -> Any:
        # Before pydantic's own check, so that a wrong value gives one sentence, not one per member of the union.
        urls = [value] if isinstance(value, str) else value
        if not isinstance(urls, list) or not urls or not all(isinstance(url, str) for url in urls):
            raise ValueError("expected a URL or a non-empty list of URLs (http://host:port/v1)")
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{url[:SHOWN_CHARS]!r} is not an http(s) URL (expected http://host:port/v1)")
        if len(set(urls)) < len(urls):
            raise ValueError("a URL is given twice")
        return value

    @property
    def endpoints(self) -> list[str]:
        """The server URLs, one or several."""
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)


@expert_backend("caption_pipeline.experts.vllm_backend:VLLMExpert")
class VLLMExpertConfig(_ModelExpertSettings):
    """A model run by an in-process ``vllm.LLM`` engine (the ``vllm`` extra, CUDA only)."""

    backend: Literal["vllm"]
    model: str
    dtype: str = "auto"
    gpu_memory_utilization: float = Field(
        default=0.8,
        gt=0.0,
        le=1.0,
        description="share of GPU memory the engine takes; the flow runs vLLM experts one after another and "
        "releases each engine before the next starts, so the default leaves room for CLIP only",
    )
    max_num_seqs: int | None = Field(default=None, ge=1, description="vLLM's default unless set")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="more vllm.LLM arguments; they win")


@expert_backend("caption_pipeline.experts.transformers_backend:TransformersExpert")
class TransformersExpertConfig(_ModelExpertSettings):
    """A local ``AutoModelForImageTextToText`` from a hub id or a folder."""

    backend: Literal["transformers"]
    model: str
    batch_size: int = Field(default=8, ge=1)
    device: str = "auto"
    dtype: str = "auto"


# The manifest's expert entry: the settings of one of the registered backends, told apart by ``backend``.
ExpertConfig = Annotated[
    functools.reduce(operator.or_, (backend.settings for backend in EXPERT_BACKENDS.values())),
    Field(discriminator="backend"),
]
_BACKENDS_OPEN["open"] = False
EXPERT_SETTINGS: dict[str, type[_ExpertSettings]] = {
    name: backend.settings for name, backend in EXPERT_BACKENDS.items()
}


class PromptConfig(_Strict):
    """Which templates run and what their prompts may say about a tile's classes.

    The class information of each split comes from a named ``protocol``:

    - ``oracle``: labels on every split; ground truth reaches the prompts of evaluation splits (what the paper most
      likely did), so it is an explicit opt-in and implies ``allow_labels_on_eval``.
    - ``predicted``: labels on ``train``, the fractions a text-free segmenter predicted (``predictions``) on every
      other split, evaluation splits and new imagery included: what a user can deploy.
    - ``blind``: no class information in any prompt.
    - ``custom`` (default): the explicit ``class_source`` map; labels on an evaluation split still need
      ``allow_labels_on_eval``.

    ``source_for`` is the one place that turns (protocol, class_source, split) into a class source.
    """

    ids: list[PromptId] = Field(default_factory=lambda: ["p1", "p2", "p3"])
    protocol: ClassProtocol = Field(default="custom", description="oracle | predicted | blind | custom")
    class_source: dict[str, ClassSource] = Field(
        default_factory=lambda: {"train": "labels", "test": "none"},
        description="per split: labels | predictions | none (protocol custom only; unnamed splits: none)",
    )
    predictions: Path | None = Field(
        default=None, description="predicted tile classes (`segmenter predict --index`), for the source predictions"
    )
    allow_labels_on_eval: bool = Field(
        default=False, description="opt in to ground-truth classes in prompts of evaluation splits (protocol custom)"
    )
    eval_splits: list[str] = Field(default_factory=lambda: ["test", "val"])

    @model_validator(mode="after")
    def _protocol_is_consistent(self) -> PromptConfig:
        # An explicit class_source next to a named protocol would be silently overridden by one of them.
        if self.protocol != "custom" and "class_source" in self.model_fields_set:
            raise ValueError(
                f"captions.prompts.protocol '{self.protocol}' and captions.prompts.class_source both set the class "
                "sources; give one of them (protocol custom uses class_source)"
            )
        if self.protocol in ("predicted", "blind") and self.allow_labels_on_eval:
            raise ValueError(
                f"captions.prompts.allow_labels_on_eval has no effect with protocol '{self.protocol}'; use protocol "
                "oracle for labels on every split"
            )
        if self.uses_predictions and self.predictions is None:
            named = "protocol 'predicted'" if self.protocol == "predicted" else "class_source 'predictions'"
            raise ValueError(
                f"{named} needs captions.prompts.predictions: the predicted tile classes file that segmenter "
                "predict --index writes"
            )
        return self

    @property
    def uses_predictions(self) -> bool:
        """Whether some split reads the predicted tile classes."""
        return self.protocol == "predicted" or (
            self.protocol == "custom" and "predictions" in self.class_source.values()
        )

    def source_for(self, split: str) -> ClassSource:
        """The class source of ``split`` under this protocol, refusing ground truth on evaluation splits unless
        opted in (protocol oracle, or ``allow_labels_on_eval`` with protocol custom).

        Raises:
            InputError: labels on an evaluation split of protocol custom without ``allow_labels_on_eval``.
        """
        if self.protocol == "oracle":
            return "labels"
        if self.protocol == "blind":
            return "none"
        if self.protocol == "predicted":
            return "labels" if split == "train" else "predictions"
        source = self.class_source.get(split, "none")
        if source == "labels" and split in self.eval_splits and not self.allow_labels_on_eval:
            raise InputError(
                f"captions.prompts.class_source: '{split}' is an evaluation split; prompts built from its labels leak "
                "the ground truth (use protocol predicted, or set allow_labels_on_eval: true to opt in)"
            )
        return source


class GateConfig(_Strict):
    """How the caption gate decides a pass (``caption_pipeline.policy.GatePolicy``).

    ``absolute`` (the paper): similarity >= ``captions.tau``. ``percentile``: similarity >= the ``1 - keep_top``
    quantile of the attempt-0 similarities of a calibration sample (``calibration_tiles`` tiles evenly spaced over
    the run's tile ids, of those the expert can caption), per (expert, prompt). ``contrastive``: similarity to the own
    tile minus the mean similarity to the other tiles of the shard >= ``margin``. A setting of another mode than
    ``mode`` is refused (it would be ignored).
    """

    mode: GateMode = "absolute"
    keep_top: float = Field(default=0.3, gt=0.0, le=1.0, description="percentile: share of captions that pass")
    calibration_tiles: int = Field(default=64, ge=1, description="percentile: tiles of the calibration sample")
    margin: float = Field(default=0.02, ge=-1.0, le=1.0, description="contrastive: the score a caption must reach")

    # The mode each setting belongs to: a setting of another mode would be ignored, so it is refused.
    _SETTING_MODES: ClassVar[dict[str, str]] = {
        "keep_top": "percentile", "calibration_tiles": "percentile", "margin": "contrastive"
    }  # fmt: skip

    @model_validator(mode="after")
    def _settings_of_the_mode(self) -> GateConfig:
        for name in sorted(self.model_fields_set):
            owner = self._SETTING_MODES.get(name)
            if owner is not None and owner != self.mode:
                raise ValueError(
                    f"{name} is a setting of mode {owner}, not {self.mode} (remove it, or set mode {owner})"
                )
        return self


class CaptionsConfig(_Strict):
    """Stage 1: experts, prompts, the CLIP gate and the caption store."""

    store: Path
    tau: float = Field(default=0.55, ge=0.0, le=1.0)
    max_attempts: int = Field(default=3, ge=1)
    gate: GateConfig = Field(default_factory=GateConfig)
    shard_size: int = Field(default=256, ge=1)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    experts: list[ExpertConfig]

    @model_validator(mode="after")
    def _unique_expert_names(self) -> CaptionsConfig:
        names = [expert.name for expert in self.experts]
        if len(names) != len(set(names)):
            raise ValueError(f"expert names must be unique, got {names}")
        return self


class RunManifest(_Strict):
    """A whole run: dataset, tiling, captions (and, once trained, the segmenter)."""

    name: str
    dataset: DatasetConfig
    tiling: TilingConfig
    captions: CaptionsConfig | None = None
    segmenter: dict[str, Any] | None = None

    source: Path | None = Field(default=None, exclude=True)
    sha256: str = Field(default="", exclude=True)


def packaged_manifests() -> dict[str, Path]:
    """The manifests shipped with the package, by name."""
    folder = resources.files("manifests")
    return {
        entry.name.removesuffix(".yaml"): Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")
    }


# A tagged union of the manifest: the key that holds it, the field that names the variant, and the variants.
_UNIONS = {"experts": ("backend", EXPERT_SETTINGS), "dataset": ("dataset", DATASET_SETTINGS)}


def _union_of(loc: tuple) -> tuple[str, dict[str, type[BaseModel]], str | None]:
    """The tagged union a validation error lies in: its word (``backend``, ``dataset``), its variants and the
    variant's tag in ``loc`` (None where there is none); ``("", {}, None)`` outside a union."""
    holder = next((part for part in loc if part in _UNIONS), None)
    if holder is None:
        return "", {}, None
    word, variants = _UNIONS[holder]
    return word, variants, next((str(part) for part in loc[loc.index(holder) + 1 :] if str(part) in variants), None)


def _describe_error(error: dict[str, Any]) -> str:
    """One problem of a validation error in words, naming its key (a union's tag said in words, not in the key)."""
    loc, kind = error["loc"], error["type"]
    key = ".".join(str(part) for part in loc) or "<top level>"
    word, variants, tag = _union_of(loc)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        field = error["ctx"]["discriminator"].strip("'")
        expected = ", ".join(variants)
        if kind == "union_tag_not_found":
            return f"missing key '{key}.{field}' (expected one of {expected})"
        return f"key '{key}.{field}': unknown {word} {error['ctx']['tag']!r} (expected one of {expected})"
    if tag is not None:  # a tagged union puts the tag into the location: say it in words instead
        key = ".".join(str(part) for part in loc if str(part) != tag)
        if kind == "extra_forbidden":
            allowed = ", ".join(sorted(variants[tag].model_fields))
            return f"key '{key}' is not a setting of {word} '{tag}' (its settings: {allowed})"
        if kind == "missing":
            return f"missing key '{key}' ({word} '{tag}' needs it)"
    return _describe_plain(error, key)


def _describe_plain(error: dict[str, Any], key: str) -> str:
    """A problem outside a union's own words: an unknown or missing key, a validator's sentence, a rejected value."""
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}'"
    if kind == "missing":
        return f"missing key '{key}'"
    if kind == "value_error":  # a validator's own sentence says what is wrong
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    given = error.get("input")
    shown = repr(given) if not isinstance(given, dict) else "a mapping"
    if len(shown) > SHOWN_CHARS:  # a rejected value is named, never printed whole
        shown = f"{shown[:SHOWN_CHARS]}... ({len(shown)} characters)"
    return f"key '{key}': {error['msg'].lower()} (got {shown})"


def _printable(text: str) -> str:
    """``text`` with every non-printable character (a newline in a key) escaped as Python writes it."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def resolve_manifest_path(name_or_path: str | Path) -> Path:
    """A manifest file from a path or a packaged manifest name.

    A value ending in ``.yaml``/``.yml`` or holding a path separator (and any :class:`~pathlib.Path` object) is a
    path; anything else is the name of a packaged manifest, even when the working directory holds a file or folder
    of that name (``make demo`` beside a ``demo/`` folder), which is then named in one line on stderr.

    Raises:
        InputError: the file does not exist, or no packaged manifest has that name.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text:
        candidate = Path(name_or_path)
        if not candidate.is_file():
            raise InputError(f"manifest {candidate}: file not found")
        return candidate
    packaged = packaged_manifests()
    if text not in packaged:
        local = f" (to read ./{text} in the working directory, pass ./{text})" if Path(text).exists() else ""
        raise InputError(
            f"manifest {text}: no packaged manifest of that name ({', '.join(sorted(packaged))}); a manifest file is "
            f"a path ending in .yaml or .yml{local}"
        )
    if Path(text).exists():
        _note_shadowed_name(text, packaged[text])
    return packaged[text]


@functools.cache
def _note_shadowed_name(name: str, packaged: Path) -> None:
    # once per process: a run reads its manifest again in every shard task
    print(
        f"note: --manifest {name} is the packaged manifest {packaged}, not ./{name} of the working directory "
        f"(pass ./{name} for that)",
        file=sys.stderr,
    )


MAX_MANIFEST_BYTES = 1 << 20
MAX_ALIASES = 64  # enough to share settings between entries; an alias bomb needs more
MAX_DEPTH = 32
SHOWN_CHARS = 200


class _ManifestLoader(yaml.SafeLoader):
    """Safe YAML with budgets: aliases and nesting depth are counted (an alias bomb expands to gigabytes in the
    validator), and a key given twice in one mapping is an error instead of the last one silently winning."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.events.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_ALIASES} aliases", mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # a list or mapping as a key: SafeLoader's own error says so below
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(path: Path) -> tuple[str, Any]:
    """The text of a manifest file and its YAML document, parsed within the loader's budgets.

    Raises:
        InputError: a file too large, not UTF-8, not valid YAML, or over a budget (one line, with the line number).
    """
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise InputError(f"manifest {path}: over {MAX_MANIFEST_BYTES >> 20} MiB; a manifest is a short YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"manifest {path}: not UTF-8 text (byte {exc.start})") from None
    try:
        return text, yaml.load(text, Loader=_ManifestLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        reason = f": {problem}" if problem and ("alias" in problem or "nested" in problem or "twice" in problem) else ""
        raise InputError(f"manifest {path}: not valid YAML{where}{reason}") from None


def load_manifest(name_or_path: str | Path) -> RunManifest:
    """Parse and validate a run manifest.

    Raises:
        InputError: one line naming the file and the offending key and what was expected.
    """
    path = resolve_manifest_path(name_or_path)
    text, data = _parse_yaml(path)
    if not isinstance(data, dict):
        raise InputError(f"manifest {path}: expected a mapping of keys at the top level")
    try:
        manifest = RunManifest.model_validate(data)
    except ValidationError as exc:
        # a key may hold a newline or a control character: escaped, so the message stays one line
        problems = list(dict.fromkeys(_printable(_describe_error(error)) for error in exc.errors()))
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(f"manifest {path}: {'; '.join(problems[:3])}{more}") from None
    return manifest.model_copy(update={"source": path, "sha256": hashlib.sha256(text.encode()).hexdigest()})
