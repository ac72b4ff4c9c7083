"""Fast SWDA against DilateFormer's unfold reference and against global MHSA: time and peak memory.

One forward + backward of the attention alone (q, k, v given), batch 1, 256 channels, 8 heads, maps of 64x64
and 128x128, dilation r = 1, 2, 3. Each measurement runs in a fresh process; peak memory is
``torch.cuda.max_memory_allocated`` on a GPU and the peak resident set (VmHWM, reset before the run) on the
CPU. Printed as ratios from one run. Target: fast SWDA at most half the reference's peak memory, no slower.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHANNELS, HEADS = 256, 8


def _rss_peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _read_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def _measure(variant: str, size: int, dilation: int, device: str, repeats: int, queue) -> None:
    import torch
    import torch.nn.functional as F

    from segmenter.model.swda import swda, swda_reference

    torch.manual_seed(0)
    dim = CHANNELS // HEADS
    q, k, v = (torch.randn(1, HEADS, dim, size, size, device=device, requires_grad=True) for _ in range(3))

    def step() -> None:
        if variant == "swda":
            out = swda(q, k, v, 3, dilation)
        elif variant == "unfold":
            out = swda_reference(q, k, v, 3, dilation)
        else:
            flat = [t.flatten(3).transpose(-1, -2) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*flat)
        out.sum().backward()
        q.grad = k.grad = v.grad = None

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (kernels, allocator)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _rss_peak_reset()
        base = _read_kib("VmRSS") * 1024
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _read_kib("VmHWM") * 1024
    queue.put((statistics.median(times), max(peak - base, 0)))


class _Result:
    def put(self, value):
        self.value = value


def measure(variant: str, size: int, dilation: int, device: str, repeats: int) -> tuple[float, int]:
    if device == "cuda":  # CUDA peaks are reset per measurement: one process, so compiled kernels are reused
        result = _Result()
        _measure(variant, size, dilation, device, repeats, result)
        return result.value
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(variant, size, dilation, device, repeats, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"device {args.device}; forward+backward, batch 1, {CHANNELS} channels, {HEADS} heads")
    print(f"{'map':>8} {'r':>2} | {'swda ms':>8} {'unfold ms':>9} {'mhsa ms':>8} | {'swda MiB':>8} {'unfold MiB':>10} "
          f"{'mhsa MiB':>8} | {'time swda/unfold':>16} {'mem swda/unfold':>15} {'time swda/mhsa':>14}")  # fmt: skip
    for size in args.sizes:
        if args.device == "cpu" and size > 64:
            # SDPA's CPU backward materialises the (HW)^2 attention: about 25 GB at 128x128, more than this machine.
            mhsa_time, mhsa_mem = float("nan"), 0
        else:
            mhsa_time, mhsa_mem = measure("mhsa", size, 1, args.device, args.repeats)
        for dilation in (1, 2, 3):
            fast_time, fast_mem = measure("swda", size, dilation, args.device, args.repeats)
            ref_time, ref_mem = measure("unfold", size, dilation, args.device, args.repeats)
            mib = 1 << 20
            times = f"{fast_time * 1e3:8.1f} {ref_time * 1e3:9.1f} {mhsa_time * 1e3:8.1f}"
            memory = f"{fast_mem / mib:8.1f} {ref_mem / mib:10.1f} {mhsa_mem / mib:8.1f}"
            ratios = f"{fast_time / ref_time:16.2f} {fast_mem / max(ref_mem, 1):15.2f} {fast_time / mhsa_time:14.2f}"
            print(f"{size:>4}x{size:<3} {dilation:>2} | {times} | {memory} | {ratios}")
    if args.device == "cpu" and max(args.sizes) > 64:
        print("mhsa at maps over 64x64 skipped on the CPU: its backward needs the full attention matrix in memory")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
