"""The run folder: where a training run keeps its checkpoints and record, and how a finished run is opened.

``<run>/`` holds ``run.json`` (the run record, :class:`segmenter.engine.run_record.RunRecord`),
``checkpoints/step_NNNNNN/`` with ``config.json`` + ``model.safetensors`` + ``checksums.json`` (SHA-256 of the
weights, the optimizer and the state, checked on load and on ``--resume``) + ``optimizer.pt`` (loaded with
``weights_only=True``) + ``state.json``, ``checkpoints/latest`` naming the newest complete one, ``metrics.csv``,
``tensorboard/`` and the evaluation reports. ``train``, ``evaluate`` and ``predict`` read and write the folder
through this module and never import each other.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from manifests.atomic import atomic_path, atomic_write_text
from manifests.caption_store import selected_captions
from manifests.devices import resolve_device
from manifests.errors import InputError, first_line
from manifests.locks import one_writer, remove_partial_files
from manifests.run_manifest import RunManifest, load_manifest
from manifests.tile_index import TileIndex, read_tile_index
from segmenter.engine.inference import SlidingWindows
from segmenter.engine.options import InferenceSettings, WindowSettings
from segmenter.engine.run_record import RUN_RECORD_FILE, RunRecord, selected_captions_sha256
from segmenter.engine.text_input import load_text_features, text_cache_folder
from segmenter.model import MPerSSegmenter
from segmenter.model.segmenter import record_checksums, verify_checksum
from segmenter.text.features import ExpertTextFeatures, check_store_experts

# A checkpoint is complete when its folder exists under its final name with every one of these files: it is written
# in a hidden temporary folder and renamed only then (see save_checkpoint).
CHECKPOINT_FILES = ("config.json", "model.safetensors", "checksums.json", "optimizer.pt", "state.json")


def is_complete(folder: Path) -> bool:
    """Whether a checkpoint folder holds every file a checkpoint has."""
    return folder.is_dir() and all((folder / name).is_file() for name in CHECKPOINT_FILES)


@dataclass
class RunPaths:
    """The places of a run folder, and the discovery of its newest complete checkpoint."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        """The folder of the ``step_*`` checkpoints and the ``latest`` pointer."""
        return self.root / "checkpoints"

    @property
    def named(self) -> Path | None:
        """The checkpoint ``checkpoints/latest`` names (None when it names none), complete or not."""
        pointer = self.checkpoints / "latest"
        name = pointer.read_text().strip() if pointer.is_file() else ""
        return self.checkpoints / name if name else None

    @property
    def latest(self) -> Path | None:
        """The newest complete checkpoint: the one ``latest`` names, or where that one is incomplete (a copy cut
        short, a file lost) the newest complete ``step_*`` folder."""
        named = self.named
        if named is not None and is_complete(named):
            return named
        complete = [folder for folder in sorted(self.checkpoints.glob("step_*")) if is_complete(folder)]
        return complete[-1] if complete else None

    def set_aside_incomplete(self) -> list[str]:
        """Move incomplete ``step_*`` folders into ``checkpoints/incomplete/`` (kept, never deleted) and point
        ``latest`` at the newest complete checkpoint; returns one line per folder moved, for the user."""
        notes = []
        for folder in sorted(self.checkpoints.glob("step_*")):
            if not is_complete(folder):
                aside = self.checkpoints / "incomplete" / folder.name
                aside.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(aside, ignore_errors=True)
                folder.rename(aside)
                missing = [name for name in CHECKPOINT_FILES if not (aside / name).is_file()]
                notes.append(f"checkpoint {folder.name} is incomplete (no {', '.join(missing)}): moved to {aside}")
        latest = self.latest
        if notes and latest is not None:
            atomic_write_text(self.checkpoints / "latest", latest.name)
        return notes

    def why_unfinished(self) -> str:
        """What the newest checkpoint folder of a run without a complete one lacks (for the refusal)."""
        folders = sorted(self.checkpoints.glob("step_*"))
        if not folders:
            return f" ({self.checkpoints} has no step_* folder)"
        missing = [name for name in CHECKPOINT_FILES if not (folders[-1] / name).is_file()]
        older = " (written by an older version: train again)" if missing == ["checksums.json"] else ""
        return f": {folders[-1]} lacks {', '.join(missing)}{older}"


@contextlib.contextmanager
def writing(out: str | Path, rank: int = 0) -> Iterator[None]:
    """Hold the run folder's lock while a training writes it, after removing (and naming) the partial files a run
    that was killed left in it (``.*.tmp``: a checkpoint's staging folder, a half-written record).

    Only rank 0 writes the folder, so only rank 0 of a DDP run takes the lock.

    Raises:
        FolderBusy: another training writes the folder (one line naming its process).
    """
    if rank != 0:
        yield
        return
    root = Path(out)
    with one_writer(root, "run folder"):
        for folder in (root, RunPaths(root).checkpoints):
            for path in remove_partial_files(folder, every=True):
                print(f"removed {path}: a partial file of a run that was stopped")
        yield


def open_for_training(out: str | Path, resume: bool) -> tuple[RunPaths, RunRecord | None]:
    """The run folder a training writes, and its record when resuming (incomplete checkpoints set aside, said).

    Raises:
        InputError: the folder holds a run and ``resume`` is off; its record is of another version or damaged.
    """
    paths = RunPaths(Path(out))
    if paths.latest is not None and not resume:
        raise InputError(f"--out: {paths.root} already holds a run; pass --resume to continue it or pick a new folder")
    if resume:
        for note in paths.set_aside_incomplete():
            print(f"{note}; resuming from {paths.latest.name if paths.latest else 'the start'}")
    recorded = RunRecord.read(paths.root) if resume and (paths.root / RUN_RECORD_FILE).is_file() else None
    return paths, recorded


def save_checkpoint(
    paths: RunPaths,
    model: MPerSSegmenter,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.MultiStepLR,
    step: int,
    keep: int,
) -> Path:
    """Write a checkpoint into a hidden folder, rename it to ``step_NNNNNN`` when complete, then point ``latest``
    at it and keep the newest ``keep``: a run killed at any moment leaves complete checkpoints only under their
    final names."""
    folder = paths.checkpoints / f"step_{step:06d}"
    staging = paths.checkpoints / f".{folder.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save(staging)
    with atomic_path(staging / "optimizer.pt") as tmp:
        torch.save(optimizer.state_dict(), tmp)
    schedule = scheduler.state_dict()
    schedule["milestones"] = sorted(schedule["milestones"].items())  # a Counter of int keys: JSON would make them str
    atomic_write_text(staging / "state.json", json.dumps({"step": step, "scheduler": schedule}))
    record_checksums(staging, ["optimizer.pt", "state.json"])  # checked on --resume, like the weights
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    atomic_write_text(paths.checkpoints / "latest", folder.name)
    for old in sorted(paths.checkpoints.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def restore_checkpoint(
    checkpoint: Path,
    model: MPerSSegmenter,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.MultiStepLR,
    device: torch.device,
) -> int:
    """Load a checkpoint's weights, optimizer and schedule; returns the step it was written at.

    Raises:
        InputError: a file that differs from the SHA-256 recorded when it was saved, or that cannot be read
            (truncated, damaged, of another model), named in one line.
    """
    model.load_weights(checkpoint)
    hint = "move the checkpoint out of checkpoints/ to resume from the one before, or train again"
    for name in ("optimizer.pt", "state.json"):
        verify_checksum(checkpoint / name, required=False)  # checkpoints of earlier versions recorded the weights only
    try:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location=device))
    except (RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        raise InputError(f"{checkpoint / 'optimizer.pt'}: cannot resume from it ({first_line(exc)}); {hint}") from None
    try:
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        state["scheduler"]["milestones"] = Counter({int(k): v for k, v in state["scheduler"]["milestones"]})
        scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{checkpoint / 'state.json'}: cannot resume from it ({first_line(exc)}); {hint}") from None


def local_weights(backbone_file: str | Path | None, text_checkpoint: str | Path | None) -> dict[str, str]:
    """The local weight files given in place of a preset's hub ids (``--backbone-file``, ``--text-checkpoint``), as
    absolute paths by configuration field; those not given are left out.

    Raises:
        InputError: a given path that does not exist, naming its option.
    """
    given = {"backbone_file": backbone_file, "text_checkpoint": text_checkpoint}
    for field, path in given.items():
        if path is not None and not Path(path).exists():
            raise InputError(f"--{field.replace('_', '-')}: {path} not found")
    return {field: str(Path(path).resolve()) for field, path in given.items() if path is not None}


@dataclass
class TrainedRun:
    """What evaluation and prediction need of a training run: its newest model, record, manifest and tile index."""

    paths: RunPaths
    model: MPerSSegmenter
    record: RunRecord
    manifest: RunManifest
    index: TileIndex
    device: torch.device

    @property
    def tile_size(self) -> int:
        """The side of the tiles the model was trained on (the tile index's)."""
        return int(self.index.extra.get("tile_size", 512))

    @property
    def tile_stride(self) -> int:
        """The stride of the tile grid the captions were made on."""
        return int(self.index.extra.get("stride", self.tile_size))

    def sliding(self, settings: WindowSettings) -> SlidingWindows:
        """The sliding windows of ``settings`` for this model.

        The window defaults to the tile size the model was trained on. A text-guided model's stride defaults to the
        captioned tile grid (each window is a captioned tile, so its caption describes exactly the pixels it sees);
        a text-free one's to 25% overlap.
        """
        window = settings.window or self.tile_size
        if settings.overlap is None and self.model.config.uses_text and window == self.tile_size:
            stride = self.tile_stride
        else:
            stride = max(1, round(window * (1 - (0.25 if settings.overlap is None else settings.overlap))))
        return SlidingWindows(window, stride=stride, batch_size=settings.batch_size)

    def text_features(self, captions: Path, settings: WindowSettings) -> ExpertTextFeatures:
        """Per-expert caption features from a store, as in training, for the run's experts; the text-feature cache
        is resolved here, once (``settings.text_cache``, else beside the store, else in the run folder).

        Raises:
            InputError: the store lacks some of the run's experts or has others (unless ``missing_captions`` is
                ``mask``, which masks the lacking ones on every tile and says so).
        """
        experts = list(self.model.config.experts)
        selected = selected_captions(captions)
        lacking = check_store_experts(captions, selected, experts, settings.missing_captions)
        for name in lacking:
            print(f"expert {name}: not in caption store {captions}; masked on every tile (--missing-captions mask)")
        same_store = self.record.captions is not None and str(Path(captions).resolve()) == self.record.captions
        if same_store and selected_captions_sha256(selected) != self.record.captions_sha256:
            # Not an error (re-captioning a store in place is how it grows), but never silent.
            print(f"note: the selected captions of {captions} changed since this run was trained (record's hash)")
        cache = text_cache_folder(captions, settings.text_cache, self.paths.root)
        return load_text_features(self.model.config, selected, cache, self.record.settings.passed_only, self.device)


def open_run(run: str | Path, settings: InferenceSettings | None = None) -> TrainedRun:
    """The newest checkpoint of a training run, with its record and the manifest and tile index it was trained on.

    Args:
        run: the run folder written by ``segmenter train``.
        settings: the device (``auto``: the GPU when there is one, see :func:`resolve_device`) and where the run's
            local weights are now, when they moved since training (another machine).

    Raises:
        InputError: no finished checkpoint, a run record of another version or with a missing field, a device this
            machine lacks, a checkpoint whose experts differ from the record's.
    """
    settings = settings or InferenceSettings()
    device = resolve_device(settings.device)  # first: a bad --device fails before anything is read
    paths = RunPaths(Path(run))
    if paths.latest is None:
        raise InputError(f"--run: {run} holds no finished checkpoint{paths.why_unfinished()}")
    if paths.named != paths.latest:
        print(f"note: checkpoint {paths.named} is incomplete; using {paths.latest.name}, the newest complete one")
    record = RunRecord.read(paths.root)
    manifest = load_manifest(record.manifest)
    if manifest.sha256 != record.manifest_sha256:
        print(f"note: manifest {record.manifest} changed since run {run} was trained")
    moved = local_weights(settings.backbone_file, settings.text_checkpoint)
    model = MPerSSegmenter.load(paths.latest, **moved).to(device).eval()
    # convolutions run faster on NHWC tensors, on a GPU and on the CPU (oneDNN) alike; the windows are sent so too
    model = model.to(memory_format=torch.channels_last)
    if model.config.uses_text and record.experts != list(model.config.experts):
        raise InputError(
            f"--run: {run} records experts {record.experts} but its checkpoint reads {model.config.experts}"
        )
    return TrainedRun(paths, model, record, manifest, read_tile_index(manifest.tiling.out), device)
