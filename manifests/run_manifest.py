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
from manifests.names import Name
from manifests.redaction import has_credentials, redact, strip_query

ClassSource = Literal["labels", "predictions", "none"]
ClassProtocol = Literal["oracle", "predicted", "blind", "custom"]
PromptId = Literal["p1", "p2", "p3"]
GateMode = Literal["absolute", "percentile", "contrastive"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        # The OS refuses a path with a NUL in it with a traceback wherever it is first used: one line here instead.
        where = _nul_key(data)
        if where is not None:
            raise ValueError(f"key '{_printable(where)}' holds a NUL character (no path or name can)")
        return data


def _nul_key(value: Any, key: str = "", seen: set[int] | None = None) -> str | None:
    """The key (dotted, with list positions) of the first string or path in ``value`` that holds a NUL, or None.
    A container met again (a YAML alias that holds itself, ``a: &x [*x]``) is read once."""
    if isinstance(value, str | Path):
        return (key or "<top level>") if "\0" in str(value) else None
    seen = set() if seen is None else seen
    if id(value) in seen:
        return None
    seen.add(id(value))
    items: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        items = [(name, item) for name, item in value.items()] + [(name, name) for name in value]
    elif isinstance(value, list | tuple):
        items = list(enumerate(value))
    for name, item in items:
        found = _nul_key(item, f"{key}.{name}" if key else str(name), seen)
        if found is not None:
            return found
    return None


Channel = Annotated[int, Field(ge=0, le=255)]
Colour = tuple[Channel, Channel, Channel]


class YamlInt(int):
    """An integer the manifest's YAML wrote in another form than its digits (``2_10``, ``007``, ``0x1F``), with that
    text: YAML 1.1 reads Potsdam's ``2_10`` as 210, and a check that sees the text can name the quoted form to use."""

    text: str

    def __new__(cls, value: int, text: str) -> YamlInt:
        """The integer ``value`` that YAML read from ``text``."""
        number = super().__new__(cls, value)
        number.text = text
        return number


def source_id_text(value: Any, key: str) -> str:
    """A source id as the string the dataset numbers it by: a string as it is, an integer by its digits.

    Raises:
        ValueError: an integer that YAML read from another text (``2_10`` is 210: the message gives the quoted form),
            a boolean, a float or anything else that is not a string.
    """
    if isinstance(value, YamlInt):
        raise ValueError(
            f"{key}: {value.text} is read by YAML as the integer {int(value)}; source ids are strings: write "
            f"'{value.text}' (in quotes)"
        )
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{key}: {value!r} is not a source id (expected a string such as '2_10', or a whole number)")


class ClassSpec(_Strict):
    """One class of a generic folder dataset: its name, what codes it in the masks (an RGB ``color`` in colour-coded
    masks, its ``ids`` in id-coded ones), and how captions and metrics treat it."""

    name: str
    color: Colour | None = Field(default=None, description="rgb masks: the colour of the class (index: display only)")
    ids: list[int] | None = Field(
        default=None, description="index masks: the mask values of this class (default: its position in the list)"
    )
    words: list[str] = Field(default_factory=list, description="more words a caption names this class by")
    plural: str | None = Field(default=None, description="plural noun: the class is counted as objects")
    in_mean: bool = Field(default=True, description="whether the headline mIoU/mF1 average over this class")


class _DatasetSettings(_Strict):
    """What every dataset has: where it is, the prefix of its tile ids and how it is split."""

    name: str
    root: Path
    id: Name | None = Field(default=None, description="prefix of tile ids; defaults to the dataset name")
    split: str = "mpers"
    custom_splits: dict[Name, list[Name]] | None = Field(
        default=None,
        description="split -> source ids (strings) as the dataset numbers them (Vaihingen: '1', '3'; Potsdam: '2_10')",
    )
    ignore_index: int = Field(default=255, ge=0, le=255)

    @field_validator("custom_splits", mode="before")
    @classmethod
    def _source_ids_are_strings(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {
            split: [source_id_text(item, f"split '{split}'") for item in ids] if isinstance(ids, list) else ids
            for split, ids in value.items()
        }

    @model_validator(mode="after")
    def _custom_split_has_lists(self) -> _DatasetSettings:
        if self.split == "custom" and not self.custom_splits:
            raise ValueError("split 'custom' needs custom_splits: {train: [...], test: [...]}")
        if self.split != "custom" and self.custom_splits:
            raise ValueError(f"custom_splits are read with split 'custom' only (got split '{self.split}')")
        return self

    @property
    def tile_prefix(self) -> str:
        return self.id or self.name


class _ISPRSSettings(_DatasetSettings):
    """The ISPRS 2D labelling datasets: which of their two ground truths training reads."""

    labels: Literal["full", "eroded"] = Field(
        default="full",
        description="labels to train on: full (the COMPLETE ground truth) or eroded (boundaries ignored, as "
        "mmsegmentation's recipe trains when only the eroded archive was downloaded)",
    )


class VaihingenConfig(_ISPRSSettings):
    """ISPRS Vaihingen: IRRG true orthophotos, the official archives or their extracted folders."""

    name: Literal["vaihingen"]


class PotsdamConfig(_ISPRSSettings):
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


class LoveDAConfig(_DatasetSettings):
    """LoveDA: urban and rural Google Earth scenes (0.3 m) in 7 classes, the official Train/Val/Test release."""

    name: Literal["loveda"]
    split: str = "official"
    scenes: list[Literal["urban", "rural"]] | None = Field(
        default=None, min_length=1, description="a subset of the scenes (urban, rural); default both"
    )


class FolderConfig(_DatasetSettings):
    """A folder of images and masks: colour-coded (``mask_format: rgb``, a colour per class) or id-coded
    (``mask_format: index``, class ids per class), with the classes given here."""

    name: Literal["folder"]
    split: str = "folders"
    classes: list[ClassSpec] = Field(min_length=1, description="[{name, color} or {name, ids}, ...]")
    mask_format: Literal["rgb", "index"] = Field(default="rgb", description="rgb (colours) or index (class ids)")
    ignore: list[int | Colour] = Field(
        default_factory=list, description="mask values that are no-data: ids (index) or colours (rgb); ignored"
    )
    images_dir: str = "images"
    masks_dir: str = "masks"

    @model_validator(mode="after")
    def _classes_are_distinct(self) -> FolderConfig:
        names = [spec.name for spec in self.classes]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"classes: name {', '.join(repeated)} given to more than one class")
        _check_mask_values(self)
        return self

    def class_ids(self) -> list[list[int]]:
        """The mask ids of each class (index masks): its ``ids``, or its position in the list."""
        return [spec.ids if spec.ids is not None else [position] for position, spec in enumerate(self.classes)]


def _check_mask_values(config: FolderConfig) -> None:
    """Each class coded by its own colours or ids, the no-data values of the mask format and coding no class.

    Raises:
        ValueError: a class without a colour in rgb masks, a colour or id given to two classes or also to ``ignore``,
            an ``ignore`` value of the other format, ``ids`` in rgb masks.
    """
    rgb = config.mask_format == "rgb"
    wrong = [spec.name for spec in config.classes if rgb and (spec.color is None or spec.ids)]
    if wrong:
        raise ValueError(
            f"classes: {', '.join(wrong)}: mask_format rgb codes each class by a color, not by ids (for id-coded "
            "masks set mask_format index)"
        )
    codes = [tuple(spec.color) for spec in config.classes] if rgb else [i for ids in config.class_ids() for i in ids]
    repeated = sorted({str(code) for code in codes if codes.count(code) > 1})
    if repeated:
        raise ValueError(f"classes: {'color' if rgb else 'id'} {', '.join(repeated)} given to more than one class")
    kind = tuple if rgb else int
    foreign = [str(value) for value in config.ignore if not isinstance(value, kind)]
    if foreign:
        expected = "colours [r, g, b]" if rgb else "ids"
        raise ValueError(f"ignore: {', '.join(foreign)}: mask_format {config.mask_format} ignores {expected}")
    owners = {
        code: spec.name
        for spec, ids in zip(config.classes, config.class_ids(), strict=True)
        for code in ([tuple(spec.color)] if rgb else ids)
    }
    both = sorted({f"{value} (class {owners[key]})" for value in config.ignore
                   if (key := tuple(value) if rgb else value) in owners})  # fmt: skip
    if both:
        raise ValueError(f"ignore: {', '.join(both)} also codes a class")


DatasetConfig = Annotated[
    VaihingenConfig | PotsdamConfig | SynDroneConfig | LoveDAConfig | FolderConfig, Field(discriminator="name")
]
DATASET_SETTINGS: dict[str, type[_DatasetSettings]] = {
    "vaihingen": VaihingenConfig,
    "potsdam": PotsdamConfig,
    "syndrone": SynDroneConfig,
    "loveda": LoveDAConfig,
    "folder": FolderConfig,
}
_DATASET_ADAPTER: TypeAdapter[DatasetConfig] = TypeAdapter(DatasetConfig)


def dataset_config(**fields: Any) -> DatasetConfig:
    """The settings of the dataset ``fields["name"]`` names (a manifest's ``dataset`` section as keywords).

    Raises:
        pydantic.ValidationError: an unknown dataset, or a setting this dataset does not have.
    """
    return _DATASET_ADAPTER.validate_python(fields)


# 500 million pixels: a 22360 px square, room for any orthophoto tile of the public datasets (Potsdam: 6000 x 6000) and
# for large drone mosaics, while a compressed file that claims more (a decompression bomb) is refused unread.
DEFAULT_MAX_PIXELS = 500_000_000


class TilingConfig(_Strict):
    """How sources are cut into crops and where the crops and ``index.parquet`` go."""

    size: int = Field(default=512, ge=16)
    stride: int | None = Field(default=None, ge=1)
    out: Path
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        ge=1,
        description="the pixel budget of one source (height x width); a larger source is refused before it is read",
    )

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

    name: Name


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
    # Sent with every request, so that nothing the request leaves unset is filled in by the server from the model's
    # generation_config.json (vLLM does so; Qwen2.5-VL's would make every re-prompt greedy with top_k 1).
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus share of sampled attempts (1: off)")
    top_k: int = Field(default=0, ge=0, description="top-k cut of sampled attempts (0: off)")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="min-p cut of sampled attempts (0: off)")
    repetition_penalty: float = Field(default=1.0, gt=0.0, description="on every attempt, greedy ones too (1: off)")
    gpu: bool = Field(default=False, description="tag its tasks for the GPU concurrency limit")
    prompts: dict[PromptId, str] = Field(default_factory=dict, description="per-expert template overrides")


class _ModelFreeExpertSettings(_ExpertSettings):
    """An expert that writes its captions from a class mask: no model, no decoding, no GPU, no prompt templates.

    The flow reads these fields of every expert; here they are fixed. Its captions are a function of the key and the
    attempt (the annotation expert's deterministic text; the synthetic expert's draws, seeded by the attempt).
    """

    model: ClassVar[None] = None
    temperature: ClassVar[float] = 0.0
    reprompt_temperature: ClassVar[float] = 0.0
    gpu: ClassVar[bool] = False
    prompts: ClassVar[dict[str, str]] = {}


@expert_backend("caption_pipeline.experts.annotation:AnnotationExpert")
class AnnotationExpertConfig(_ModelFreeExpertSettings):
    """The label-grounded expert: captions written from class masks, no model, no decoding, no GPU."""

    backend: Literal["annotation"]


@expert_backend("caption_pipeline.experts.synthetic:SyntheticExpert")
class SyntheticExpertConfig(_ModelFreeExpertSettings):
    """A study tool, not a captioner: the annotation expert's caption of the class mask, corrupted at declared rates
    (each kind drawn independently per key and attempt), every corruption recorded in the row's ``finish_reason``."""

    backend: Literal["synthetic"]
    drop: float = Field(default=0.0, ge=0.0, le=1.0, description="rate of dropping a present class from the caption")
    insert: float = Field(default=0.0, ge=0.0, le=1.0, description="rate of inserting a class absent from the tile")
    proportions: float = Field(
        default=0.0, ge=0.0, le=1.0, description="rate of perturbing the proportions (a class grown over the tile)"
    )
    seed: int = Field(default=0, description="with the key and the attempt, seeds every draw")


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
    sampling_fields: Literal["extended", "standard"] = Field(
        default="extended",
        description="extended: temperature, seed, top_p, top_k, min_p, repetition_penalty (vllm serve, SGLang); "
        "standard: temperature, seed, top_p only (the OpenAI API, which refuses the others)",
    )

    @model_validator(mode="after")
    def _standard_fields_carry_the_settings(self) -> OpenAIExpertConfig:
        # Under `standard` top_k, min_p and repetition_penalty are not sent: a setting other than off would be dropped.
        if self.sampling_fields == "standard":
            neutral = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
            unsent = [f"{name}: {getattr(self, name)}" for name, off in neutral.items() if getattr(self, name) != off]
            if unsent:
                raise ValueError(
                    f"expert {self.name}: sampling_fields standard sends no {', '.join(unsent)}; leave them at "
                    "their defaults or use sampling_fields extended with a server that reads them"
                )
        return self

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
                raise ValueError(f"{redact(url)[:SHOWN_CHARS]!r} is not an http(s) URL (expected http://host:port/v1)")
            if parts.query or parts.fragment:
                # the request path is appended to the URL, and a key in a query string would be shown and logged
                raise ValueError(
                    f"{strip_query(redact(url))[:SHOWN_CHARS]!r}: a base_url takes no query string or fragment "
                    "(expected http://host:port/v1); give a key through api_key_env"
                )
        if len(set(urls)) < len(urls):
            raise ValueError("a URL is given twice")
        return value

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> OpenAIExpertConfig:
        # aiohttp sends a URL's user:password as a Basic header and refuses a second one (the key's) with a traceback.
        if self.api_key_env and any(has_credentials(url) for url in self.endpoints):
            raise ValueError(
                "base_url carries credentials (user:password@) and api_key_env names a key: a request can send only "
                "one Authorization header; give one of them"
            )
        return self

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


# The longest caption kept (characters) unless the manifest says otherwise: a paragraph of P3 is some 1,000; a server
# that ignores max_tokens could send megabytes, which would be stored whole and CLIP-tokenised chunk by chunk.
MAX_CAPTION_CHARS = 4000


class CaptionsConfig(_Strict):
    """Stage 1: experts, prompts, the CLIP gate and the caption store."""

    store: Path
    tau: float = Field(default=0.55, ge=0.0, le=1.0)
    max_caption_chars: int = Field(
        default=MAX_CAPTION_CHARS, ge=1, description="longer captions are cut here (finish_reason 'cut' in the store)"
    )
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

    def construct_yaml_int(self, node):  # type: ignore[no-untyped-def]
        # YAML 1.1 reads 2_10 as 210 and 010 as 8: keep the text wherever it is not the integer's own digits.
        value = super().construct_yaml_int(node)
        return YamlInt(value, node.value) if node.value.strip() != str(value) else value

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


_ManifestLoader.add_constructor("tag:yaml.org,2002:int", _ManifestLoader.construct_yaml_int)


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
        problems = list(dict.fromkeys(_printable(redact(_describe_error(error))) for error in exc.errors()))
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(f"manifest {path}: {'; '.join(problems[:3])}{more}") from None
    return manifest.model_copy(update={"source": path, "sha256": hashlib.sha256(text.encode()).hexdigest()})


def load_caption_manifest(name_or_path: str | Path) -> tuple[RunManifest, CaptionsConfig]:
    """A run manifest that has a captions section (what the caption flows read), and that section.

    Raises:
        InputError: see :func:`load_manifest`; or no captions section (a manifest ``segmenter prepare`` wrote holds
            the dataset and tiling only), with where to copy one from.
    """
    manifest = load_manifest(name_or_path)
    if manifest.captions is None:
        raise InputError(
            f"manifest {manifest.source}: has no captions section (the experts, prompts, CLIP scorer and store of "
            "the caption stage); add one, e.g. copied from the packaged manifests/demo.yaml (README: Run manifests)"
        )
    return manifest, manifest.captions
