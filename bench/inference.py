"""Sliding-window inference: windows/s of batched forwards against the one-window loop on the same model and scene,
and the peak memory of a large GeoTIFF read by windows against reading it whole. Printed from one run.

Speed: ``sliding_window_logits`` over a random scene on its window grid (no overlap), for each ``--batch-sizes``
entry, median of ``--repeats`` passes after a warm-up pass; ms per tile and the windows/s of each batch size over
the first one's. CPU default: ``test_tiny`` on a 2048 x 2048 scene, 512 px windows, batch 1 against 4 (target:
>= 1.5x). GPU (the paper's model, random weights, no download): ``--preset mpers_vitl16 --random-weights --size 512
--batch-sizes 1,8 --device cuda --dtype bf16`` (target: <= 15 ms per tile at batch 8; the paper reports 55.52 ms per
image on an A800).

Memory: a ``--memory-scene`` square 4-band uint8 GeoTIFF (default 6000 px, Potsdam's size), tiled; each mode runs in
a fresh Python process and reports its peak resident set (``ru_maxrss``) and the part of it above the process's
size once the model is built. ``whole``: the file read whole and the ``K x H x W`` logits summed in memory, then
argmax (``sliding_window_logits``); ``windowed``: rasterio window reads and logits summed in a band one window high
(``sliding_window_classes``, what ``evaluate`` and ``predict`` do).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPERTS = ["llava", "gpt4o", "qwen"]  # the paper's M = 3


def build(preset: str, random_weights: bool, device: torch.device) -> torch.nn.Module:
    """The preset with the paper's three experts when it reads text; ``random_weights`` skips the backbone download."""
    from segmenter.model import build_model, preset_config

    overrides = {"backbone_pretrained": False} if random_weights else {}
    if preset_config(preset).uses_text:
        overrides["experts"] = EXPERTS
    torch.manual_seed(0)
    # as open_run builds it: channels-last, which oneDNN's and cuDNN's convolutions prefer
    return build_model(preset, **overrides).to(device).eval().to(memory_format=torch.channels_last)


def random_text(model: torch.nn.Module):
    """Per-window text features (random, every expert present), as a caption lookup gives them; None without text."""
    if not model.config.uses_text:
        return None
    features = torch.randn(len(model.config.experts), model.config.text_feature_dim)
    present = torch.ones(len(model.config.experts), dtype=torch.bool)
    return lambda y, x, h, w: (features, present)


def speed(args: argparse.Namespace, device: torch.device) -> None:
    from segmenter.data.tiling import tile_grid
    from segmenter.engine.inference import SlidingWindows, sliding_window_logits

    model = build(args.preset, args.random_weights, device)
    image = np.random.default_rng(0).integers(0, 256, size=(args.scene, args.scene, 3), dtype=np.uint8)
    windows = len(tile_grid(args.scene, args.scene, args.size, args.size))
    text = random_text(model)
    sizes = [int(item) for item in args.batch_sizes.split(",")]
    print(f"{args.preset} ({'random weights' if args.random_weights else 'as built'}), {args.size} px windows on a "
          f"{args.scene} x {args.scene} scene ({windows} windows), {device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} passes")  # fmt: skip
    # Passes alternate between batch sizes so that a change of machine load hits all of them alike.
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for repeat in range(args.repeats + 1):
        for size in sizes:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            spec = SlidingWindows(args.size, 0.0, batch_size=size, dtype=DTYPES[args.dtype])
            sliding_window_logits(model, image, spec, text, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:  # the first pass of each size warms up (allocator, kernels, caches)
                times[size].append(time.perf_counter() - started)
    first = statistics.median(times[sizes[0]])
    for size in sizes:
        elapsed = statistics.median(times[size])
        print(f"batch {size:3d}: {elapsed / windows * 1e3:8.1f} ms per tile, {windows / elapsed:7.2f} windows/s "
              f"({first / elapsed:.2f}x batch {sizes[0]})")  # fmt: skip


def write_scene(path: Path, side: int) -> None:
    """A tiled 4-band uint8 GeoTIFF of random pixels, written a block row at a time (never whole in memory)."""
    import rasterio
    from rasterio.windows import Window

    generator = np.random.default_rng(0)
    with rasterio.open(path, "w", driver="GTiff", height=side, width=side, count=4, dtype="uint8", tiled=True,
                       blockxsize=512, blockysize=512) as sink:  # fmt: skip
        for top in range(0, side, 512):
            rows = min(512, side - top)
            sink.write(
                generator.integers(0, 256, size=(4, rows, side), dtype=np.uint8), window=Window(0, top, side, rows)
            )


def memory_child(args: argparse.Namespace) -> None:
    """One memory mode in this (fresh) process; prints a JSON line with its peak RSS in MiB."""
    import rasterio

    from segmenter.data.datasets.files import SourceFile
    from segmenter.data.windowed_read import open_windows
    from segmenter.engine.inference import SlidingWindows, sliding_window_classes, sliding_window_logits

    device = torch.device("cpu")
    model = build(args.preset, args.random_weights, device)
    text = random_text(model)
    spec = SlidingWindows(args.size, 0.0, batch_size=args.memory_batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if args.memory_mode == "whole":
        with rasterio.open(args.memory_file) as source:
            image = np.moveaxis(source.read(), 0, -1)
        classes = sliding_window_logits(model, image, spec, text, device)
        classes = classes.argmax(0).numpy().astype(np.uint8)
    else:
        with open_windows(SourceFile(Path(args.memory_file))) as reader:
            classes = sliding_window_classes(model, reader, spec, text, device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"mode": args.memory_mode, "model_mib": before, "peak_mib": peak, "shape": list(classes.shape),
              "checksum": int(classes.astype(np.int64).sum()), "seconds": time.perf_counter() - started}  # fmt: skip
    print(json.dumps(result))


def memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        scene = Path(folder) / "scene.tif"
        write_scene(scene, args.memory_scene)
        results = {}
        for mode in ("whole", "windowed"):
            command = [sys.executable, __file__, "--memory-mode", mode, "--memory-file", str(scene), "--preset",
                       args.preset, "--size", str(args.size), "--memory-batch", str(args.memory_batch),
                       "--threads", str(torch.get_num_threads())]  # fmt: skip
            if args.random_weights:
                command.append("--random-weights")
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(output.strip().splitlines()[-1])
    whole, windowed = results["whole"], results["windowed"]
    side = args.memory_scene
    print(f"{side} x {side} x 4 uint8 GeoTIFF ({side * side * 4 / 2**20:.0f} MiB of pixels), {args.preset}, "
          f"{args.size} px windows, batch {args.memory_batch}, CPU; peak RSS of a fresh process per mode")  # fmt: skip
    for name, result in results.items():
        print(f"{name:9s}: peak {result['peak_mib']:7.0f} MiB, {result['peak_mib'] - result['model_mib']:7.0f} MiB "
              f"above the built model ({result['seconds']:.0f} s)")  # fmt: skip
    extra = (windowed["peak_mib"] - windowed["model_mib"]) / (whole["peak_mib"] - whole["model_mib"])
    same = "same" if whole["checksum"] == windowed["checksum"] else "DIFFERENT"
    print(f"windowed / whole: peak {windowed['peak_mib'] / whole['peak_mib']:.3f}, above the model {extra:.3f}; "
          f"class maps: {same} (checksum)")  # fmt: skip


def main() -> None:
    from manifests.devices import resolve_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="test_tiny")
    parser.add_argument("--random-weights", action="store_true", help="build the backbone without its weights")
    parser.add_argument(
        "--size", type=int, default=256, help="window side (default: the demo's tile; the paper's is 512)"
    )
    parser.add_argument("--scene", type=int, default=2048, help="side of the speed scene in pixels")
    parser.add_argument("--batch-sizes", default="1,4,8", help="comma-separated; ratios are against the first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-scene", type=int, default=6000, help="0 skips the memory comparison")
    parser.add_argument("--memory-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--memory-mode", choices=["whole", "windowed"], help=argparse.SUPPRESS)
    parser.add_argument("--memory-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_mode:
        memory_child(args)
        return
    speed(args, resolve_device(args.device))
    if args.memory_scene:
        memory(args)


if __name__ == "__main__":
    main()
