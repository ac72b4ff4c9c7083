"""``segmenter train``: cross-entropy with the ignore index, AdamW, multi-step schedule, flips/rotations.

The sample order and the augmentation of every step are derived from (seed, step), so ``--resume`` from a
checkpoint continues exactly where the run stopped. The run folder, its checkpoints and its record are
:mod:`segmenter.engine.runs`'s. Under ``torchrun`` each process trains on its share of every global batch (DDP; gloo
on CPU, NCCL on GPU) and rank 0 writes.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from manifests.atomic import file_digest
from manifests.caption_store import selected_captions
from manifests.devices import resolve_device
from manifests.errors import InputError
from manifests.run_manifest import RunManifest, load_manifest
from manifests.tile_index import TileIndex, read_tile_index
from segmenter.data.samples import PlannedBatches, TileSamples, training_loader
from segmenter.engine.options import Augmentation, MissingCaptions, TrainSettings
from segmenter.engine.run_record import (
    RunRecord,
    check_resumed_run,
    prompt_class_sources,
    selected_captions_sha256,
)
from segmenter.engine.runs import (
    RunPaths,
    local_weights,
    open_for_training,
    restore_checkpoint,
    save_checkpoint,
    writing,
)
from segmenter.engine.text_input import load_text_features, text_cache_folder
from segmenter.model import MODEL_STRIDE, MPerSSegmenter, SegmenterConfig, SegmenterOutput, build_model, preset_config
from segmenter.text import ExpertTextFeatures
from segmenter.text.encoder import check_text_weights, text_feature_width
from segmenter.text.features import run_experts

StepProgress = Callable[[int | None, float | None, float | None], None]  # (step, loss, images/s); None ends it


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and batch."""


@dataclass(frozen=True)
class _Process:
    """This training process: its rank among ``world`` processes (DDP under ``torchrun``) and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def cuda(self) -> bool:
        """Whether it trains on a GPU (bf16 autocast, channels-last, pinned memory)."""
        return self.device.type == "cuda"


@dataclass
class _Job:
    """A training run as its loop reads it, built and checked before the first step."""

    settings: TrainSettings
    index: TileIndex
    paths: RunPaths
    process: _Process
    config: SegmenterConfig
    model: MPerSSegmenter
    samples: TileSamples
    text: ExpertTextFeatures | None
    augmentation: Augmentation
    selected: pd.DataFrame | None  # the caption store's selected rows (text-guided runs), read once
    masked: dict[str, int] = field(default_factory=dict)  # per expert, train tiles without a usable caption


def _process() -> _Process:
    """This process's rank, the number of processes and its device (:func:`resolve_device`'s ``auto``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return _Process(rank, world, resolve_device())


def print_masked(counts: dict[str, int], n_tiles: int, split: str) -> None:
    """Say, per expert, on how many tiles of a split it has no usable caption (masked there)."""
    masked = {name: n for name, n in counts.items() if n}
    if masked:
        shown = ", ".join(f"{name} on {n}" for name, n in masked.items())
        print(f"split {split}: of {n_tiles} tiles, experts masked for lack of a usable caption: {shown}")


def _model_config(
    settings: TrainSettings, num_classes: int, captions: str | Path | None, recorded: RunRecord | None
) -> tuple[SegmenterConfig, pd.DataFrame | None, str]:
    """The preset's configuration with the run's experts, the store's selected rows, and who chose the experts.

    Raises:
        InputError: a text-guided preset without a store, ``--experts`` for a text-free one, experts the store lacks.
    """
    overrides: dict[str, Any] = {**local_weights(settings.backbone_file, settings.text_checkpoint)}
    for name in ("lqga_heads", "text_pooling"):  # the preset's unless the command says otherwise
        if getattr(settings, name) is not None:
            overrides[name] = getattr(settings, name)
    config = preset_config(settings.preset, num_classes=num_classes, **overrides)
    if config.dim % config.lqga_heads:
        raise InputError(f"--lqga-heads: {config.lqga_heads} heads do not divide the {config.dim} channels of "
                         f"preset {settings.preset}")  # fmt: skip
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
        counts = index.frame["split"].value_counts().sort_index()
        found = ", ".join(f"'{split}' ({tiles} tiles)" for split, tiles in counts.items()) or "none: it is empty"
        raise InputError(
            f"tile index {index.root}: no tiles in split 'train'; its splits: {found} (training reads the split "
            "named train: prepare with --train ids, or name the training folder train)"
        )
    unlabelled = samples.frame["label_path"].isna()
    if unlabelled.any():
        sources = sorted(set(samples.frame["source_id"][unlabelled]))
        raise InputError(f"tile index {index.root}: tile {samples.frame['tile_id'][unlabelled].iloc[0]} (and "
                         f"{int(unlabelled.sum()) - 1} more) of split 'train' has no label (sources without a mask: "
                         f"{', '.join(sources)}); give them their masks, or prepare with --train listing the "
                         "labelled sources only")  # fmt: skip
    return samples


def _check_tile_sides(index: TileIndex) -> None:
    """Refuse train tiles the model cannot take, before the model is built and the captions are encoded.

    Raises:
        InputError: a side that is not a multiple of the model's stride, naming a ``--size`` that is.
    """
    tiles = index.split("train")
    sides = sorted(set(tiles["width"]) | set(tiles["height"]))
    if any(side % MODEL_STRIDE for side in sides):
        raise InputError(f"tile index {index.root}: tiles of {' / '.join(map(str, sides))} px; the model takes "
                         f"sides that are multiples of {MODEL_STRIDE} (its coarsest feature map is 1/{MODEL_STRIDE}): "
                         f"prepare with --size {max(MODEL_STRIDE, round(sides[0] / MODEL_STRIDE) * MODEL_STRIDE)} "
                         "(or another multiple)")  # fmt: skip


def _masked_train_tiles(job: _Job, captions: str | Path, chosen_by: str) -> dict[str, int]:
    """Per expert, the train tiles without a usable caption (masked there), said on rank 0.

    Raises:
        InputError: train tiles without any passed caption under ``missing_captions='error'``.
    """
    assert job.text is not None
    samples, text = job.samples, job.text
    uncaptioned = sum(1 for tile in samples.frame["tile_id"] if not text.lookup(tile)[1].any())
    if uncaptioned and job.settings.missing_captions == MissingCaptions.error:
        raise InputError(f"--captions: {uncaptioned} of {len(samples)} train tiles have no passed caption in "
                         f"{captions}; caption them or pass --missing-captions mask")  # fmt: skip
    masked = text.masked_counts(samples.frame["tile_id"].tolist())
    if job.process.rank == 0:
        print(f"experts (from {chosen_by}): {job.config.experts}")
        print_masked(masked, len(samples), "train")
    return masked


def _job(
    index: TileIndex,
    settings: TrainSettings,
    captions: str | Path | None,
    paths: RunPaths,
    recorded: RunRecord | None,
    process: _Process,
) -> _Job:
    """Model, text features and samples of a run, in the order that makes a seed give the same weights.

    Raises:
        InputError: see :func:`_model_config`, :func:`_train_samples` and :func:`_masked_train_tiles`.
    """
    # Seeded before the model is built, and the model built before the text encoder (which reseeds for its tiny
    # random test weights): that order is what makes a seed give the same initial weights in every run.
    torch.manual_seed(settings.seed)
    config, selected, chosen_by = _model_config(settings, len(index.class_names), captions, recorded)
    model = build_model(config).to(process.device)
    augmentation = settings.augmentation_for(config)
    text = None
    if config.uses_text:
        assert captions is not None and selected is not None
        cache = text_cache_folder(captions, settings.text_cache, paths.root)
        rewrite = augmentation == Augmentation.d4_rewrite
        text = load_text_features(config, selected, cache, settings.passed_only, process.device, rewrite)
        # checkpoints name the encoder and weights of their caption features: evaluation refuses others
        config = config.model_copy(update={"text_weights": text.weights_id})
        model.config = config
    samples = _train_samples(index, text, augmentation)
    job = _Job(settings, index, paths, process, config, model, samples, text, augmentation, selected)
    if text is not None:
        job.masked = _masked_train_tiles(job, captions, chosen_by)
    return job


def _optimizer(
    model: MPerSSegmenter, settings: TrainSettings
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
    """AdamW over the trainable parameters, with the multi-step schedule (milestones are fractions of the steps)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    milestones = [int(settings.steps * m) for m in settings.milestones]
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, settings.gamma)


def _run_record(job: _Job, manifest: str | Path, run: RunManifest, captions: str | Path | None) -> RunRecord:
    """The record of a run as it starts (see :class:`RunRecord` for each field)."""
    experts = list(job.config.experts)
    class_sources = {}
    if job.text is not None:
        class_sources["train"] = prompt_class_sources(job.text.rows, job.samples.frame["tile_id"].tolist(), experts)
    return RunRecord(
        manifest=str(Path(run.source).resolve()) if run.source else str(manifest),
        manifest_sha256=run.sha256,
        settings=job.settings,
        class_names=list(job.index.class_names),
        world_size=job.process.world,
        experts=experts,
        augmentation=job.augmentation,
        captions=str(Path(captions).resolve()) if captions else None,
        captions_sha256=selected_captions_sha256(job.selected) if job.selected is not None else None,
        labels=job.index.extra.get("labels", "full"),
        class_sources=class_sources,
        masked_experts={"train": job.masked},
    )


def _log_row(path: Path, row: dict) -> None:
    """Append a row to a CSV file, with a header when the file is new."""
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _log_step(
    job: _Job, writer: Any, row: dict[str, Any], output: SegmenterOutput, present: torch.Tensor | None
) -> None:
    """Append a step's row (plus the mean DMTE gate per expert over the tiles where it is present) to
    ``metrics.csv`` and TensorBoard."""
    if output.gates is not None and present is not None:
        present = present.to(output.gates.device).float()
        means = (output.gates.float() * present).sum(0) / present.sum(0).clamp(min=1)
        row.update({f"gate_{name}": round(v, 4) for name, v in zip(job.config.experts, means.tolist(), strict=True)})
    _log_row(job.paths.root / "metrics.csv", row)
    for key, value in row.items():
        if key != "step":
            writer.add_scalar(f"train/{key}", value, row["step"])


def _network(job: _Job) -> torch.nn.Module:
    """The model as the steps run it: channels-last on a GPU, wrapped in DDP across processes, in training mode."""
    model = job.model.to(memory_format=torch.channels_last) if job.process.cuda else job.model
    network = torch.nn.parallel.DistributedDataParallel(model) if job.process.world > 1 else model
    return network.train()


def _loader(job: _Job, start: int) -> torch.utils.data.DataLoader:
    """The batches of the steps from ``start`` on, decoded ahead by worker processes (pinned for an asynchronous copy
    on CUDA); the number of workers is said on rank 0."""
    settings, process = job.settings, job.process
    plan = PlannedBatches(start, settings.steps, settings.batch_size, len(job.samples), settings.seed, process.rank,
                          process.world)  # fmt: skip
    workers = settings.loader_workers(process.cuda, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if process.rank == 0:
        print(f"data loader: {workers} worker process(es) per training process, prefetch {settings.prefetch}")
    return training_loader(job.samples, plan, workers, settings.prefetch, pin_memory=process.cuda)


def _forward(job: _Job, network: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, SegmenterOutput]:
    """The loss and output of a batch (bf16 autocast on a GPU when ``amp``)."""
    device, cuda = job.process.device, job.process.cuda
    images = batch["image"].to(device, non_blocking=cuda)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = batch["label"].to(device, non_blocking=cuda)
    text = [batch[key].to(device, non_blocking=cuda) for key in ("text", "present")] if job.text is not None else []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.settings.amp and cuda):
        output = network(images, *text)
        loss = F.cross_entropy(output.logits.float(), labels, ignore_index=job.index.ignore_index)
    return loss, output


def _checkpoint(job: _Job, optimizer: torch.optim.Optimizer, scheduler: Any, step: int) -> Path | None:
    """Rank 0 writes the checkpoint of ``step`` (returned; None on the other ranks), the others wait for it."""
    folder = None
    if job.process.rank == 0:
        folder = save_checkpoint(job.paths, job.model, optimizer, scheduler, step, job.settings.keep_checkpoints)
    if job.process.world > 1:
        dist.barrier()
    return folder


def _train_steps(
    job: _Job, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, bar: StepProgress, writer: Any
) -> None:
    """Run the steps from ``step`` to the last, logging and checkpointing as the settings say.

    Raises:
        TrainingError: a non-finite loss, naming the step, the batch's tiles and the last good checkpoint.
    """
    settings, rank = job.settings, job.process.rank
    network = _network(job)
    batches = iter(_loader(job, step))
    started, seen, last_good = time.perf_counter(), 0, job.paths.latest
    try:
        while step < settings.steps:
            batch = next(batches)
            loss, output = _forward(job, network, batch)
            if not torch.isfinite(loss):
                raise TrainingError(f"step {step}: loss is {loss.item()} on batch {batch['tile_id']}; "
                                    f"last good checkpoint: {last_good or 'none'}")  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            seen += len(batch["tile_id"]) * job.process.world
            if rank == 0 and (step % settings.log_every == 0 or step == settings.steps):
                rate = seen / (time.perf_counter() - started)
                row = {"step": step, "loss": round(loss.item(), 6), "lr": scheduler.get_last_lr()[0],
                       "images_per_s": round(rate, 2)}  # fmt: skip
                _log_step(job, writer, row, output, batch.get("present"))
                bar(step, loss.item(), rate)
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                last_good = _checkpoint(job, optimizer, scheduler, step) or last_good
    finally:
        # Dropping the iterator stops its workers now, not when a traceback that holds this frame is freed.
        del batches


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
    there is one, else the CPU. The text-feature cache is ``settings.text_cache``, else beside the caption store,
    else in the run folder ``out``.

    Raises:
        InputError: no tile index, captions missing where the preset needs them, tiles without captions
            with ``missing_captions='error'``, a run folder that exists without ``resume``, a run record of
            another version on ``resume``.
        TrainingError: a non-finite loss (the last good checkpoint is kept).
        FolderBusy: another training writes the run folder (one line naming its process).
    """
    process = _process()
    with writing(out, process.rank):  # one training per run folder: refused at once while another writes
        run = load_manifest(manifest)
        index = read_tile_index(run.tiling.out)
        _check_tile_sides(index)
        paths, recorded = open_for_training(out, resume)
        if recorded is not None:
            check_resumed_run(recorded, settings, run.sha256, list(index.class_names))
        job = _job(index, settings, captions, paths, recorded, process)
        optimizer, scheduler = _optimizer(job.model, settings)
        step = 0
        if resume and paths.latest:
            step = restore_checkpoint(paths.latest, job.model, optimizer, scheduler, process.device)
        if process.rank == 0:
            if step:
                print(f"resuming at step {step} of {settings.steps} from {paths.latest}")
            if index.extra.get("labels") == "eroded":  # said, and recorded in run.json: not the usual ground truth
                print("labels: eroded (the tile index was prepared with labels: eroded; boundaries are ignored)")
            _run_record(job, manifest, run, captions).write(paths.root)
        writer = None
        if process.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(paths.root / "tensorboard"), purge_step=step)
        bar = _progress(progress and process.rank == 0, settings.steps, step)
        try:
            _train_steps(job, optimizer, scheduler, step, bar, writer)
        finally:
            bar(None, None, None)
            if writer is not None:
                writer.close()
        return paths.latest or paths.root


def _progress(enabled: bool, total: int, start: int) -> StepProgress:
    """A rich progress bar with loss and throughput; a no-op when disabled."""
    if not enabled:
        return lambda *args: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("loss {task.fields[loss]} | {task.fields[rate]} img/s"))  # fmt: skip
    bar.start()
    task = bar.add_task("train", total=total, completed=start, loss="-", rate="-")

    def update(step: int | None, loss: float | None, rate: float | None) -> None:
        if step is None:
            bar.stop()
            return
        bar.update(task, completed=step, loss=f"{loss:.4f}" if not math.isnan(loss) else "nan", rate=f"{rate:.1f}")

    return update
