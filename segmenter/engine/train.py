"""``segmenter train``: cross-entropy with the ignore index, AdamW, multi-step schedule, flips/rotations.

The sample order and the augmentation of every step are derived from (seed, step), so ``--resume`` from a
checkpoint continues exactly where the run stopped. Checkpoints are folders ``checkpoints/step_NNNNNN`` with
``config.json`` + ``model.safetensors`` + ``checksums.json`` (SHA-256 of the weights, the optimizer and the state,
checked on load and on ``--resume``) + ``optimizer.pt``
(loaded with ``weights_only=True``) + ``state.json``;
``checkpoints/latest`` names the newest complete one; ``run.json`` is the run record
(:class:`segmenter.engine.run_record.RunRecord`). Under ``torchrun`` each process trains on its share of every global
batch (DDP; gloo on CPU, NCCL on GPU) and rank 0 writes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from manifests.atomic import atomic_path, atomic_write_text, file_digest
from manifests.caption_store import selected_captions
from manifests.devices import resolve_device
from manifests.errors import InputError, first_line
from manifests.run_manifest import RunManifest, load_manifest
from manifests.tile_index import TileIndex, read_tile_index
from segmenter.data.samples import PlannedBatches, TileSamples, training_loader
from segmenter.data.samples import sample_plan as sample_plan  # re-exported for callers
from segmenter.engine.options import TEXT_GUIDED_AUGMENTATION as TEXT_GUIDED_AUGMENTATION  # re-exported for callers
from segmenter.engine.options import Augmentation, MissingCaptions, TrainSettings
from segmenter.engine.run_record import RUN_RECORD_FILE, RunRecord, prompt_class_sources, selected_captions_sha256
from segmenter.model import MPerSSegmenter, SegmenterConfig, SegmenterOutput, build_model, preset_config
from segmenter.model.segmenter import record_checksums, verify_checksum
from segmenter.text import ExpertTextFeatures, TextEncoder, TextFeatureCache, expert_text_features
from segmenter.text.encoder import check_text_weights, text_feature_width
from segmenter.text.features import run_experts


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and batch."""


# A checkpoint is complete when its folder exists under its final name with every one of these files: it is written
# in a hidden temporary folder and renamed only then (see _save_checkpoint).
CHECKPOINT_FILES = ("config.json", "model.safetensors", "checksums.json", "optimizer.pt", "state.json")


def is_complete(folder: Path) -> bool:
    """Whether a checkpoint folder holds every file a checkpoint has."""
    return folder.is_dir() and all((folder / name).is_file() for name in CHECKPOINT_FILES)


@dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
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


@dataclass
class _Setup:
    """What the training loop reads, built and checked before its first step."""

    config: SegmenterConfig
    model: MPerSSegmenter
    samples: TileSamples
    text: ExpertTextFeatures | None
    augmentation: Augmentation
    selected: pd.DataFrame | None  # the caption store's selected rows (text-guided runs), read once
    masked: dict[str, int]  # per expert, train tiles without a usable caption


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


# Where the text-feature cache goes: (``--text-cache`` or None, the run folder or None), set by the command.
_TEXT_CACHE_PLACE: ContextVar[tuple[Path | None, Path | None]] = ContextVar("text_cache_place", default=(None, None))
_TEXT_CACHE_SHOWN: set[Path] = set()


@contextmanager
def text_cache_place(given: str | Path | None = None, run_folder: str | Path | None = None) -> Iterator[None]:
    """Within the block, :func:`text_cache_folder` uses ``given`` (``--text-cache``) and falls back to
    ``run_folder``; a None keeps what an outer block set."""
    outer_given, outer_run = _TEXT_CACHE_PLACE.get()
    token = _TEXT_CACHE_PLACE.set((
        Path(given) if given is not None else outer_given, Path(run_folder) if run_folder is not None else outer_run
    ))  # fmt: skip
    try:
        yield
    finally:
        _TEXT_CACHE_PLACE.reset(token)


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder``, or in its nearest existing parent where it does not exist yet."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK | os.X_OK)


def text_cache_folder(captions: str | Path) -> Path:
    """The text-feature cache of a caption store: ``--text-cache`` when given, else ``text_cache/`` beside the store
    when that can be written (a shared, read-only store cannot), else ``text_cache/`` in the run folder. The place
    is printed once per process.

    Raises:
        InputError: ``--text-cache`` is a file or cannot be written; the store's folder is read-only and neither
            ``--text-cache`` nor a run folder was set.
    """
    given, run_folder = _TEXT_CACHE_PLACE.get()
    beside = Path(captions).parent / "text_cache"
    if given is not None:
        if given.exists() and not given.is_dir():
            raise InputError(f"--text-cache: {given} is a file (expected a folder for the text-feature cache)")
        if not _writable(given):
            raise InputError(f"--text-cache: {given} is not writable (expected a folder the cache can be written in)")
        folder, why = given, "--text-cache"
    elif _writable(beside):
        folder, why = beside, "beside the caption store"
    elif run_folder is not None:
        folder, why = run_folder / "text_cache", f"in the run folder: {beside.parent} is not writable"
    else:
        raise InputError(
            f"--captions: {beside.parent} is not writable for the text-feature cache; pass --text-cache DIR"
        )
    if folder not in _TEXT_CACHE_SHOWN:
        _TEXT_CACHE_SHOWN.add(folder)
        print(f"text-feature cache: {folder} ({why})")
    return folder


def _weights_identity(encoder_id: str) -> str:
    """An encoder id without the names of its weight files (``name@digest`` -> ``@digest``): the same weights copied
    under another name or path give the same features."""
    return re.sub(r"[^:@]+@", "@", encoder_id)


def load_text_features(
    config: SegmenterConfig,
    captions: Path,
    selected: pd.DataFrame,
    passed_only: bool,
    device: str | torch.device,
    direction_variants: bool = False,
) -> ExpertTextFeatures:
    """The text features of ``config.experts`` from a caption store's selected rows (read once by the caller),
    through the on-disk cache (:func:`text_cache_folder`)."""
    encoder = TextEncoder(config.text_encoder, config.text_checkpoint, device=device)
    if encoder.dim != config.text_feature_dim:
        raise InputError(f"text_checkpoint: {encoder.encoder_id} gives {encoder.dim}-d features but model "
                         f"{config.name} was built for {config.text_feature_dim}-d ones")  # fmt: skip
    if config.text_weights and _weights_identity(encoder.encoder_id) != _weights_identity(config.text_weights):
        raise InputError(f"--text-checkpoint: model {config.name} was trained on caption features of "
                         f"{config.text_weights}, not of {encoder.encoder_id}: give the weights it was trained "
                         "with")  # fmt: skip
    cache = TextFeatureCache(text_cache_folder(captions), encoder)
    return expert_text_features(selected, list(config.experts), cache, passed_only, direction_variants)


def print_masked(counts: dict[str, int], n_tiles: int, split: str) -> None:
    """Say, per expert, on how many tiles of a split it has no usable caption (masked there)."""
    masked = {name: n for name, n in counts.items() if n}
    if masked:
        shown = ", ".join(f"{name} on {n}" for name, n in masked.items())
        print(f"split {split}: of {n_tiles} tiles, experts masked for lack of a usable caption: {shown}")


def _run_folder(out: str | Path, resume: bool) -> tuple[RunPaths, RunRecord | None]:
    """The run folder, and its record when resuming.

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


def _model_config(
    settings: TrainSettings, num_classes: int, captions: str | Path | None, recorded: RunRecord | None
) -> tuple[SegmenterConfig, pd.DataFrame | None, str]:
    """The preset's configuration with the run's experts, the store's selected rows, and who chose the experts.

    Raises:
        InputError: a text-guided preset without a store, ``--experts`` for a text-free one, experts the store lacks.
    """
    local = local_weights(settings.backbone_file, settings.text_checkpoint)
    config = preset_config(settings.preset, num_classes=num_classes, **local)
    if config.backbone_file:  # the frozen ViT is not in the checkpoints: its file is checked on every load
        config = config.model_copy(update={"backbone_sha256": file_digest(Path(config.backbone_file))})
    if not config.uses_text:
        if settings.experts or settings.text_checkpoint:
            option = "--experts" if settings.experts else "--text-checkpoint"
            raise InputError(f"{option}: preset {config.name} reads no captions")
        return config, None, ""
    if captions is None:
        raise InputError(f"--captions: preset {config.name} reads captions; give a caption store")
    selected = selected_captions(captions)
    # A resumed run keeps the experts its weights were made for.
    kept = recorded.experts if recorded is not None else None
    experts = run_experts(captions, selected, kept or settings.experts)
    chosen_by = "the run record" if kept else "--experts" if settings.experts else "the caption store"
    update: dict[str, Any] = {"experts": experts}
    check_text_weights(config.text_encoder, config.text_checkpoint)  # before the backbone loads: a quick refusal
    width = text_feature_width(config.text_encoder, config.text_checkpoint)
    if width is not None and width != config.text_dim:
        update["text_input_dim"] = width  # a learned map takes the encoder's features to text_dim
    return config.model_copy(update=update), selected, chosen_by


def _train_samples(index: TileIndex, text: ExpertTextFeatures | None, augmentation: Augmentation) -> TileSamples:
    """The train split's samples.

    Raises:
        InputError: the split is empty, or has tiles without labels.
    """
    samples = TileSamples(index, "train", text, augmentation=augmentation)
    if len(samples) == 0:
        raise InputError(f"tile index {index.root}: no tiles in split 'train'")
    unlabelled = samples.frame["label_path"].isna()
    if unlabelled.any():
        raise InputError(f"tile index {index.root}: tile {samples.frame['tile_id'][unlabelled].iloc[0]} (and "
                         f"{int(unlabelled.sum()) - 1} more) of split 'train' has no label; this index is for "
                         "captioning/prediction only")  # fmt: skip
    return samples


def _setup(
    index: TileIndex,
    settings: TrainSettings,
    captions: str | Path | None,
    recorded: RunRecord | None,
    device: torch.device,
    rank: int,
) -> _Setup:
    """Model, text features and samples of a run, in the order that makes a seed give the same weights.

    Raises:
        InputError: see :func:`_model_config` and :func:`_train_samples`; train tiles without a passed caption
            under ``missing_captions='error'``.
    """
    # Seeded before the model is built, and the model built before the text encoder (which reseeds for its tiny
    # random test weights): that order is what makes a seed give the same initial weights in every run.
    torch.manual_seed(settings.seed)
    config, selected, chosen_by = _model_config(settings, len(index.class_names), captions, recorded)
    model = build_model(config).to(device)
    augmentation = settings.augmentation_for(config)
    text = None
    if config.uses_text:
        assert captions is not None and selected is not None
        rewrite = augmentation == Augmentation.d4_rewrite
        text = load_text_features(config, Path(captions), selected, settings.passed_only, device, rewrite)
        # checkpoints name the encoder and weights of their caption features: evaluation refuses others
        config = config.model_copy(update={"text_weights": text.encoder_id})
        model.config = config
    samples = _train_samples(index, text, augmentation)
    masked: dict[str, int] = {}
    if text is not None:
        uncaptioned = sum(1 for tile in samples.frame["tile_id"] if not text.lookup(tile)[1].any())
        if uncaptioned and settings.missing_captions == MissingCaptions.error:
            raise InputError(f"--captions: {uncaptioned} of {len(samples)} train tiles have no passed caption in "
                             f"{captions}; caption them or pass --missing-captions mask")  # fmt: skip
        masked = text.masked_counts(samples.frame["tile_id"].tolist())
        if rank == 0:
            print(f"experts (from {chosen_by}): {config.experts}")
            print_masked(masked, len(samples), "train")
    return _Setup(config, model, samples, text, augmentation, selected, masked)


def _optimizer(
    model: MPerSSegmenter, settings: TrainSettings
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
    """AdamW over the trainable parameters, with the multi-step schedule (milestones are fractions of the steps)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    milestones = [int(settings.steps * m) for m in settings.milestones]
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, settings.gamma)


def _restore(
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


def _run_record(
    manifest: str | Path,
    run: RunManifest,
    index: TileIndex,
    setup: _Setup,
    settings: TrainSettings,
    captions: str | Path | None,
    world: int,
) -> RunRecord:
    """The record of a run as it starts (see :class:`RunRecord` for each field)."""
    experts = list(setup.config.experts)
    class_sources = {}
    if setup.text is not None:
        class_sources["train"] = prompt_class_sources(setup.text.rows, setup.samples.frame["tile_id"].tolist(), experts)
    return RunRecord(
        manifest=str(Path(run.source).resolve()) if run.source else str(manifest),
        manifest_sha256=run.sha256,
        settings=settings,
        class_names=list(index.class_names),
        world_size=world,
        experts=experts,
        augmentation=setup.augmentation,
        captions=str(Path(captions).resolve()) if captions else None,
        captions_sha256=selected_captions_sha256(setup.selected) if setup.selected is not None else None,
        class_sources=class_sources,
        masked_experts={"train": setup.masked},
    )


def _save_checkpoint(paths: RunPaths, model: MPerSSegmenter, optimizer, scheduler, step: int, keep: int) -> Path:
    """Write a checkpoint into a hidden folder, rename it to ``step_NNNNNN`` when complete, then point ``latest``
    at it: a run killed at any moment leaves complete checkpoints only under their final names."""
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


def _log_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _log_step(
    paths: RunPaths,
    writer: Any,
    row: dict[str, Any],
    output: SegmenterOutput,
    present: torch.Tensor | None,
    experts: list[str],
) -> None:
    """Append a step's row (plus the mean DMTE gate per expert over the tiles where it is present) to
    ``metrics.csv`` and TensorBoard."""
    if output.gates is not None and present is not None:
        present = present.to(output.gates.device).float()
        means = (output.gates.float() * present).sum(0) / present.sum(0).clamp(min=1)
        row.update({f"gate_{name}": round(v, 4) for name, v in zip(experts, means.tolist(), strict=True)})
    _log_row(paths.root / "metrics.csv", row)
    for key, value in row.items():
        if key != "step":
            writer.add_scalar(f"train/{key}", value, row["step"])


def train(
    manifest: str | Path,
    out: str | Path,
    settings: TrainSettings,
    captions: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> Path:
    """Train a preset on the train split of the manifest's tile index; returns the newest checkpoint folder.

    The device is :func:`resolve_device`'s ``auto``: this process's GPU under ``torchrun``, else the GPU when
    there is one, else the CPU.

    Raises:
        InputError: no tile index, captions missing where the preset needs them, tiles without captions
            with ``missing_captions='error'``, a run folder that exists without ``resume``, a run record of
            another version on ``resume``.
        TrainingError: a non-finite loss (the last good checkpoint is kept).
    """
    rank, world = _distributed()
    device = resolve_device()
    run = load_manifest(manifest)
    index = read_tile_index(run.tiling.out)
    paths, recorded = _run_folder(out, resume)
    with text_cache_place(run_folder=paths.root):
        setup = _setup(index, settings, captions, recorded, device, rank)
    model, samples, guided = setup.model, setup.samples, setup.text is not None
    optimizer, scheduler = _optimizer(model, settings)
    step = _restore(paths.latest, model, optimizer, scheduler, device) if resume and paths.latest else 0
    if step and rank == 0:
        print(f"resuming at step {step} of {settings.steps} from {paths.latest}")
    if rank == 0:
        _run_record(manifest, run, index, setup, settings, captions, world).write(paths.root)
    cuda = device.type == "cuda"
    use_amp = settings.amp and cuda
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    network = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    network.train()
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(paths.root / "tensorboard"), purge_step=step)
    bar = _progress(progress and rank == 0, settings.steps, step)
    last_good = paths.latest
    # The batches of the remaining steps, decoded ahead by worker processes, pinned for an asynchronous copy on CUDA.
    plan = PlannedBatches(step, settings.steps, settings.batch_size, len(samples), settings.seed, rank, world)
    workers = settings.loader_workers(cuda, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if rank == 0:
        print(f"data loader: {workers} worker process(es) per training process, prefetch {settings.prefetch}")
    batches = iter(training_loader(samples, plan, workers, settings.prefetch, pin_memory=cuda))
    started, seen = time.perf_counter(), 0
    try:
        while step < settings.steps:
            batch = next(batches)
            images = batch["image"].to(device, non_blocking=cuda)
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = batch["label"].to(device, non_blocking=cuda)
            text = [batch[key].to(device, non_blocking=cuda) for key in ("text", "present")] if guided else []
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                output = network(images, *text)
                loss = F.cross_entropy(output.logits.float(), labels, ignore_index=index.ignore_index)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"step {step}: loss is {loss.item()} on batch {batch['tile_id']}; "
                    f"last good checkpoint: {last_good or 'none'}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            seen += len(batch["tile_id"]) * world
            if rank == 0 and (step % settings.log_every == 0 or step == settings.steps):
                rate = seen / (time.perf_counter() - started)
                row = {"step": step, "loss": round(loss.item(), 6), "lr": scheduler.get_last_lr()[0],
                       "images_per_s": round(rate, 2)}  # fmt: skip
                _log_step(paths, writer, row, output, batch.get("present"), setup.config.experts)
                bar(step, loss.item(), rate)
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                if rank == 0:
                    last_good = _save_checkpoint(paths, model, optimizer, scheduler, step, settings.keep_checkpoints)
                if world > 1:
                    dist.barrier()
    finally:
        # Dropping the iterator stops its workers now, not when a traceback that holds this frame is freed.
        del batches
        bar(None, None, None)
        if writer is not None:
            writer.close()
    return paths.latest or paths.root


def _progress(enabled: bool, total: int, start: int) -> Callable[[int | None, float | None, float | None], None]:
    """A rich progress bar with loss and throughput; a no-op when disabled."""
    if not enabled:
        return lambda *args: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("loss {task.fields[loss]} | {task.fields[rate]} img/s"))  # fmt: skip
    bar.start()
    task = bar.add_task("train", total=total, completed=start, loss="-", rate="-")

    def update(step, loss, rate):
        if step is None:
            bar.stop()
            return
        bar.update(task, completed=step, loss=f"{loss:.4f}" if not math.isnan(loss) else "nan", rate=f"{rate:.1f}")

    return update
