"""Training step time of the text-guided preset against the no-text preset and against a variant that runs the
frozen text encoder inside every step (the cost the text-feature cache removes). Printed as ratios from one run.
Target: text-guided / no-text <= 1.15 with cached text features.

On a GPU the paper's preset (``mpers_vitl16``: DINOv3 ViT-L/16, CLIP ViT-B/16 text) runs at 512 px, batch 8,
bf16 autocast, random weights (timing only); on a CPU ``test_tiny`` runs at 256 px.

``--end-to-end`` times the training input pipeline instead: images/s of the same model fed by the real loader of
``segmenter train`` (PNG crops of a tile index, decoded and flipped/rotated by DataLoader workers, pinned, copied)
over images/s fed by synthetic tensors already on the device. Target: >= 0.9 on a GPU. Without ``--index`` it
cuts demo scenes into tiles first (512 px crops on a GPU, 128 px on a CPU).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

CAPTION = ("An aerial image with 12 buildings mostly in the north-west; impervious surfaces (31%) across the image; "
           "trees (14%) in the east; 4 cars on the roads in the south.")  # fmt: skip


def timed_steps(model, batch: dict, encoder, steps: int, device: str) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    use_amp = device == "cuda"
    times = []
    for index in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        text = batch.get("text")
        if encoder is not None:  # encode 3 experts x 3 prompts per tile, as an uncached run would
            captions = [CAPTION] * (batch["image"].shape[0] * 9)
            text = encoder.encode(captions).view(batch["image"].shape[0], 3, 3, -1).mean(2).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_amp):
            output = model(batch["image"], text, batch["present"]) if model.config.uses_text else model(batch["image"])
            loss = F.cross_entropy(output.logits.float(), batch["label"], ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if index >= 2:  # two warm-up steps
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def images_per_s(model, batches: Iterator[dict], steps: int, warmup: int, device: str) -> float:
    """Images/s of ``steps`` training steps after ``warmup`` ones, each step as ``segmenter train`` runs it: the
    batch copied to the device (pinned memory: asynchronously), forward under autocast, the finite-loss check
    (which waits for the GPU, as in training), backward, AdamW."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    cuda = device == "cuda"
    seen, started = 0, 0.0
    for index in range(warmup + steps):
        if index == warmup:
            if cuda:
                torch.cuda.synchronize()
            seen, started = 0, time.perf_counter()
        batch = next(batches)
        images = batch["image"].to(device, non_blocking=cuda)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["label"].to(device, non_blocking=cuda)
        text = [batch[key].to(device, non_blocking=cuda) for key in ("text", "present")]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(images, *text).logits.float(), labels, ignore_index=255)
        if not torch.isfinite(loss):
            raise RuntimeError(f"step {index}: loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += images.shape[0]
    if cuda:
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def demo_index(folder: Path, crop: int, areas: int) -> Path:
    """A tile index of ``areas`` demo scenes of ``2 * crop`` px cut into ``crop`` px tiles, all in split train."""
    from manifests.run_manifest import TilingConfig, dataset_config
    from segmenter.data.demo_scenes import demo_area_ids, write_demo_dataset
    from segmenter.data.prepare import prepare_tiles

    write_demo_dataset(folder / "raw", n_areas=areas, size=2 * crop)
    dataset = dataset_config(name="vaihingen", id="demo", root=folder / "raw", split="custom",
                             custom_splits={"train": demo_area_ids(areas)})  # fmt: skip
    return prepare_tiles(dataset, TilingConfig(size=crop, out=folder / "tiles")).index_path


def end_to_end(args: argparse.Namespace) -> None:
    """Print images/s fed by the training loader over images/s fed by tensors on the device, same model."""
    from manifests.tile_index import read_tile_index
    from segmenter.data.samples import PlannedBatches, TileSamples, collate, training_loader
    from segmenter.engine.options import TrainSettings
    from segmenter.model import build_model
    from segmenter.text.features import ExpertTextFeatures

    gpu = args.device == "cuda"
    preset, batch_size = ("mpers_vitl16", 8) if gpu else ("test_tiny", 8)
    steps = args.steps or (50 if gpu else 10)
    with tempfile.TemporaryDirectory() as scratch:
        index = read_tile_index(args.index or demo_index(Path(scratch), 512 if gpu else 128, 4 if gpu else 2))
        torch.manual_seed(0)
        overrides = {"backbone_pretrained": False} if gpu else {}
        model = build_model(preset, experts=["llava", "gpt4o", "qwen"], **overrides).to(args.device)
        if gpu:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        experts, dim = model.config.experts, model.config.text_feature_dim
        tiles = index.split("train")["tile_id"].tolist()
        # Cached text features are a lookup in the loader: random ones time it as well as real ones would.
        text = ExpertTextFeatures(list(experts), {t: torch.randn(1, len(experts), dim) for t in tiles},
                                  {t: torch.ones(len(experts), dtype=torch.bool) for t in tiles}, dim)  # fmt: skip
        samples = TileSamples(index, "train", text, augmentation="d4")
        if len(samples) == 0:
            raise SystemExit(f"{index.root}: no tiles in split train")
        size = samples.sample(0)["image"].shape[-1]
        settings = TrainSettings(workers=args.workers)
        workers = settings.loader_workers(gpu)
        # The batches that workers * prefetch let the loader decode ahead during warm-up are drawn before the clock
        # starts, so a loader slower than the model cannot hide behind them.
        warmup = 2 + workers * settings.prefetch
        plan = PlannedBatches(0, warmup + steps, batch_size, len(samples), seed=0)
        started = time.perf_counter()
        for keys in itertools.islice(iter(plan), 4):
            collate([samples[key] for key in keys])
        decode_rate = 4 * batch_size / (time.perf_counter() - started)
        synthetic = {
            "image": torch.rand(batch_size, 3, size, size, device=args.device),
            "label": torch.randint(0, 6, (batch_size, size, size), device=args.device),
            "text": torch.randn(batch_size, len(experts), dim, device=args.device),
            "present": torch.ones(batch_size, len(experts), dtype=torch.bool, device=args.device),
        }
        # Model only is timed before and after the loader and averaged, so that a machine whose load drifts (a shared
        # CPU) biases the ratio less.
        before = images_per_s(model, itertools.repeat(synthetic), steps, warmup, args.device)
        loader = training_loader(samples, plan, workers, settings.prefetch, pin_memory=gpu)
        fed = images_per_s(model, iter(loader), steps, warmup, args.device)
        after = images_per_s(model, itertools.repeat(synthetic), steps, warmup, args.device)
        model_only = (before + after) / 2
    print(f"{preset} at {size} px, batch {batch_size}, {args.device}; {len(samples)} tiles of "
          f"{args.index or 'demo scenes'}; {steps} steps after {warmup} warm-up")  # fmt: skip
    print(f"decode + augment, one process   : {decode_rate:8.1f} images/s")
    print(f"model only (tensors on device)  : {model_only:8.1f} images/s  (before {before:.1f}, after {after:.1f})")
    print(f"end to end, loader workers: {workers:<4d}: {fed:8.1f} images/s  ({fed / model_only:.3f} of model only; "
          "target >= 0.9 on a GPU)")  # fmt: skip


def main() -> None:
    from segmenter.model import build_model
    from segmenter.text import TextEncoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5; end to end 50 GPU, 10 CPU)")
    parser.add_argument("--end-to-end", action="store_true", help="time the training loader against model only")
    parser.add_argument("--index", type=Path, help="tile index (index.parquet or its folder) for --end-to-end")
    parser.add_argument("--workers", type=int, help="loader workers for --end-to-end (default: segmenter train's)")
    args = parser.parse_args()
    if args.end_to_end:
        end_to_end(args)
        return
    args.steps = args.steps or 5
    gpu = args.device == "cuda"
    preset, size, batch_size = ("mpers_vitl16", 512, 8) if gpu else ("test_tiny", 256, 8)
    overrides = {"backbone_pretrained": False} if gpu else {}
    encoder_id = "clip-vit-b16" if gpu else "test-tiny-clip"
    torch.manual_seed(0)
    guided = build_model(preset, experts=["llava", "gpt4o", "qwen"], **overrides).to(args.device)  # the paper's M = 3
    plain = build_model(f"{preset}_notext", **overrides).to(args.device)
    if gpu:
        guided, plain = (m.to(memory_format=torch.channels_last) for m in (guided, plain))
    experts, dim = len(guided.config.experts), guided.config.text_feature_dim
    batch = {
        "image": torch.rand(batch_size, 3, size, size, device=args.device),
        "label": torch.randint(0, 6, (batch_size, size, size), device=args.device),
        "text": torch.randn(batch_size, experts, dim, device=args.device),
        "present": torch.ones(batch_size, experts, dtype=torch.bool, device=args.device),
    }
    encoder = TextEncoder(encoder_id, device=args.device, random_weights=gpu)
    t_plain = timed_steps(plain, batch, None, args.steps, args.device)
    t_guided = timed_steps(guided, batch, None, args.steps, args.device)
    t_uncached = timed_steps(guided, batch, encoder, args.steps, args.device)
    print(f"{preset} at {size} px, batch {batch_size}, {args.device}; median of {args.steps} steps")
    print(f"no text            : {t_plain * 1e3:8.1f} ms/step")
    print(f"text, cached       : {t_guided * 1e3:8.1f} ms/step  ({t_guided / t_plain:.3f} of no text)")
    print(f"text, encoder/step : {t_uncached * 1e3:8.1f} ms/step  ({t_uncached / t_plain:.3f} of no text, "
          f"{t_uncached / t_guided:.3f} of cached)")  # fmt: skip


if __name__ == "__main__":
    main()
