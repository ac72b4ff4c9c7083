"""The choices and defaults of training and evaluation: one definition that the library and the CLI both read.

The ``segmenter`` command builds its options from these (typer lists an enum's values in ``--help`` and refuses
anything else), so a default or a choice is never written twice. This module imports neither torch nor the model,
so the CLI stays quick to start.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from manifests.devices import usable_cpus
from manifests.errors import InputError

if TYPE_CHECKING:
    from segmenter.model import SegmenterConfig

Choice = TypeVar("Choice", bound=StrEnum)


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
    # Data loader worker processes per training process (None: see loader_workers) and batches each keeps ready.
    # Neither changes a result: every sample is fixed by (seed, step), whoever decodes it.
    workers: int | None = Field(default=None, ge=0)
    prefetch: int = Field(default=2, ge=1)
    # Local weights instead of the preset's hub ids (an offline machine, a gated release such as dino.txt).
    backbone_file: str | None = None
    text_checkpoint: str | None = None

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


def parse_choice(kind: type[Choice], value: str, option: str) -> Choice:
    """``value`` as a member of ``kind``, for library callers that pass plain strings (the CLI gets enums).

    Raises:
        InputError: one line naming the option, the choices and the value given.
    """
    try:
        return kind(value)
    except ValueError:
        raise InputError(f"{option}: expected one of {', '.join(kind)}, got '{value}'") from None
