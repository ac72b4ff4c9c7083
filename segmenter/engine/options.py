"""The settings of training, evaluation and prediction: one definition that the library and the CLI both read.

Each ``segmenter`` command builds one settings object from its options (typer lists an enum's values in ``--help``
and refuses anything else) and passes it down, so a default, a choice or a check is never written twice. This module
imports neither torch nor the model, so the CLI stays quick to start.
"""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from manifests.devices import usable_cpus
from manifests.errors import InputError
from manifests.run_manifest import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from segmenter.model import SegmenterConfig

Settings = TypeVar("Settings", bound=BaseModel)


class Augmentation(StrEnum):
    """Geometric augmentation at training: ``d4`` flips and rotates (captions unchanged), ``d4_rewrite`` also moves
    the captions' direction words, ``none`` leaves tiles as they are, ``auto`` picks per preset."""

    auto = "auto"
    d4 = "d4"
    d4_rewrite = "d4_rewrite"
    none = "none"


class MissingCaptions(StrEnum):
    """What to do where captions are missing: ``mask`` the experts concerned (printed), or stop with an ``error``."""

    mask = "mask"
    error = "error"


class Scale(StrEnum):
    """How ``predict`` brings an image that is not 8-bit to the 0-255 the model was trained on: ``none`` refuses it
    (the default: ``prepare`` refuses such sources too), ``minmax`` stretches each band's range, ``percentile`` each
    band's 2nd to 98th percentile (clipped)."""

    none = "none"
    minmax = "minmax"
    percentile = "percentile"


class GroundTruth(StrEnum):
    """Which labels evaluation compares with: ``eroded`` (the ISPRS protocol, boundaries ignored) or ``full``."""

    eroded = "eroded"
    full = "full"


class F1WithoutTruePositive(StrEnum):
    """What the F1 of a class without a true positive is: ``undefined`` (left out of mF1, as mmsegmentation and
    GeoSeg compute it) or ``zero`` (counted as 0); see ``segmenter.engine.metrics``."""

    undefined = "undefined"
    zero = "zero"


# What `auto` picks for text-guided presets (see TrainSettings.augmentation_for): of d4, d4_rewrite and none, none
# scored best on the demo over 3 seeds (bench/caption_effect.py --augmentation-study; README "Caption effect").
TEXT_GUIDED_AUGMENTATION = Augmentation.none

# The most loader workers `auto` starts per training process. One worker decodes (PIL) and augments a 512 px PNG tile
# and its label in about 12 ms on the 2-core dev machine, some 85 images/s, while the paper's ViT-L step eats 8 crops
# in ~52 ms (~150/s on an H200): 4 workers leave about 2x headroom without crowding the CPUs of a multi-GPU node.
AUTO_WORKERS = 4


class TrainSettings(BaseModel):
    """How a run trains; recorded whole in its run record. Its defaults are the CLI's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "mpers_vitl16"
    steps: int = Field(default=20000, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=1e-2, ge=0, allow_inf_nan=False)
    milestones: list[Annotated[float, Field(gt=0, lt=1)]] = [0.7, 0.9]
    gamma: float = Field(default=0.1, gt=0, allow_inf_nan=False)
    seed: int = Field(default=0, ge=0)
    checkpoint_every: int = Field(default=1000, ge=1)
    log_every: int = Field(default=10, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    missing_captions: MissingCaptions = MissingCaptions.mask
    passed_only: bool = True
    amp: bool = True
    experts: list[str] | None = None
    augmentation: Augmentation = Augmentation.auto
    # Heads of LQGA's text query instead of the preset's (the paper presets: 1, the method's equation).
    lqga_heads: int | None = Field(default=None, ge=1)
    # How captions over the text encoder's context are pooled, instead of the preset's (chunk_mean).
    text_pooling: str | None = None
    # Data loader worker processes per training process (None: see loader_workers) and batches each keeps ready.
    # Neither changes a result: every sample is fixed by (seed, step), whoever decodes it.
    workers: int | None = Field(default=None, ge=0)
    prefetch: int = Field(default=2, ge=1)
    # Local weights instead of the preset's hub ids (an offline machine, a gated release such as dino.txt).
    backbone_file: str | None = None
    text_checkpoint: str | None = None
    # Where the caption features are cached (``--text-cache``); None: beside the store, else in the run folder.
    text_cache: str | None = None

    @field_validator("text_pooling")
    @classmethod
    def _known_pooling(cls, value: str | None) -> str | None:
        if value is None:
            return value
        # the model's names, imported only when the option is given (this module stays free of the model)
        from segmenter.model.config import TextPooling

        if value not in get_args(TextPooling):
            raise ValueError(f"expected one of {', '.join(get_args(TextPooling))}")
        return value

    def loader_workers(self, cuda: bool, processes: int = 1) -> int:
        """The data loader workers of each of ``processes`` training processes on this machine.

        ``workers`` when given. Else, training on a GPU, one CPU fewer than each process's share of this machine's
        CPUs (one is left to the process itself, which drives the GPU), at most :data:`AUTO_WORKERS`: 4 on a node
        with 16 CPUs per GPU. Training on the CPU, 0: the model's threads use every core, and a worker only takes
        cycles from them (on the 2-core dev machine 1 worker gave 0.80-0.83 of model-only images/s, none 0.87).
        """
        if self.workers is not None:
            return self.workers
        if not cuda:
            return 0
        cpus = usable_cpus()
        return max(0, min(AUTO_WORKERS, cpus // max(processes, 1) - 1))

    def augmentation_for(self, config: SegmenterConfig) -> Augmentation:
        """The augmentation a run of ``config`` uses.

        ``auto``: flips and rotations for a text-free model; for a text-guided one the choice that keeps its
        captions true and measured best on the demo (README, "Geometric augmentation and captions").
        """
        if self.augmentation != Augmentation.auto:
            return self.augmentation
        return TEXT_GUIDED_AUGMENTATION if config.uses_text else Augmentation.d4


def check_batch_size(batch_size: int | None) -> int | None:
    """A batch size of one window per forward or more (None: the device's default).

    Raises:
        InputError: naming ``--batch-size``.
    """
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size: expected 1 or more windows per forward, got {batch_size}")
    return batch_size


def check_window(window: int | None) -> int | None:
    """A sliding window of 16 px or more (None: the tile size the model was trained on).

    Raises:
        InputError: naming ``--window``.
    """
    if window is not None and window < 16:
        raise InputError(f"--window: expected a window of 16 px or more, got {window}")
    return window


def check_overlap(overlap: float | None) -> float | None:
    """A window overlap in [0, 1) (None: the default of the model, see ``TrainedRun.sliding``).

    Raises:
        InputError: naming ``--overlap``; NaN is refused too.
    """
    if overlap is not None and not (math.isfinite(overlap) and 0 <= overlap < 1):
        raise InputError(f"--overlap: expected a value in [0, 1), got {overlap}")
    return overlap


class InferenceSettings(BaseModel):
    """How a trained run is opened and run: the device, windows per forward, and where its local weights are now.

    ``segmenter predict --index`` reads these alone; evaluation and prediction over whole images add their own.
    ``backbone_file`` and ``text_checkpoint`` name the run's local weights when they moved since training (another
    machine); None keeps the places recorded at training, and either is checked to be the weights trained with.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = "auto"
    batch_size: int | None = None
    backbone_file: Path | None = None
    text_checkpoint: Path | None = None

    _batch_size = field_validator("batch_size")(check_batch_size)


class WindowSettings(InferenceSettings):
    """Sliding windows over whole images, and the captions a text-guided model reads in them.

    ``window`` and ``overlap``: None keeps the captioned tile grid for a text-guided model (tile-size windows with
    25% overlap for a text-free one). ``captions``: the caption store (evaluation defaults to the run's own).
    ``missing_captions``: an expert the store lacks, or without a usable caption on any window read, stops the
    command (``error``, the default) or is masked there and said (``mask``). ``text_cache``: the caption features'
    cache folder (None: beside the store when writable, else in the run folder).
    """

    window: int | None = None
    overlap: float | None = None
    captions: Path | None = None
    missing_captions: MissingCaptions = MissingCaptions.error
    text_cache: Path | None = None

    _window = field_validator("window")(check_window)
    _overlap = field_validator("overlap")(check_overlap)


class EvaluateSettings(WindowSettings):
    """What ``segmenter evaluate`` measures: the ``split`` of the run's tile index, against the ``eroded`` (ISPRS) or
    ``full`` ground truth; ``f1_without_tp``: the F1 of a class without a true positive, ``undefined`` (left out of
    mF1, as mmsegmentation and GeoSeg) or ``zero``."""

    split: str = "test"
    gt: GroundTruth = GroundTruth.eroded
    f1_without_tp: F1WithoutTruePositive = F1WithoutTruePositive.undefined


class PredictSettings(WindowSettings):
    """How ``segmenter predict`` reads new images: ``scale`` says how to stretch an image that is not 8-bit, and
    ``max_pixels`` is the pixel budget of one image (``prepare``'s, whose default it shares)."""

    scale: Scale = Scale.none
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0)


def option_error(exc: ValidationError) -> InputError:
    """The first invalid value of settings built from options, as one line naming its option.

    A check that already names its option (:func:`check_window`, ...) is passed on as it is.
    """
    error = exc.errors()[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, InputError):
        return cause
    option = "--" + str(error["loc"][0]).replace("_", "-")
    return InputError(f"{option}: {error['msg'].lower()} (got {error['input']!r})")


def build_settings(kind: type[Settings], **values: Any) -> Settings:
    """Settings of ``kind`` from option values, for the CLI and for library callers that pass keywords.

    Raises:
        InputError: the first invalid value, naming its option (:func:`option_error`).
    """
    try:
        return kind(**values)
    except ValidationError as exc:
        raise option_error(exc) from None


def settings_or_options(kind: type[Settings], settings: Settings | None, options: dict[str, Any]) -> Settings:
    """``settings`` as given, or built from the keywords of a library call (``evaluate(run, split="test")``).

    Raises:
        TypeError: both given.
        InputError: an invalid keyword value (:func:`build_settings`).
    """
    if settings is not None and options:
        raise TypeError(f"pass {kind.__name__} or its fields as keywords, not both (got {sorted(options)})")
    return settings if settings is not None else build_settings(kind, **options)
