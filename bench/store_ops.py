"""Caption-store operations at scale, each next to a plain pyarrow baseline, in one run.

Builds a store with the real writer (``write_fragment``) in a temporary folder: by default 1,000,000 rows in about
470 fragments with about 360k keys, as a resumed 40k-tile run leaves it (3 experts x 3 prompts, shards of 256 tiles,
one fragment per shard and expert, 1 to 4 attempts per key). Then, each in a fresh subprocess (so that one operation's
memory cannot hide in another's):

- ``done_keys`` vs the plain filter: the dataset's key columns where ``selected & usable`` (the rule pushed down),
  made into the same set of key tuples;
- ``selected_captions`` vs the plain filter: the view's columns where ``selected``, sorted by key (the view's order),
  to pandas (no dedup of keys two runs selected);
- the per-shard resume lookup (``attempt_counts`` of 256 tiles): the first call of a process (every fragment's
  footer checked) and the mean of the next 20 shards, on the full store and on one an eighth its size (flat in
  the store's size), vs the plain filter over every fragment;
- ``compact`` (on a copy) vs the plain merge: the whole dataset read into one table and written as one file.

Time is taken around the operation twice: wall (``time.perf_counter``) and CPU (``time.process_time``: user + system
of every thread of the child); the targets are judged on CPU time, which other jobs on a shared machine do not
inflate. Memory is the child's peak RSS (``resource.getrusage`` ru_maxrss, which includes the interpreter and its
imports, the same on both sides), and that peak above the RSS just before the operation. Targets (issue 14):
``done_keys`` and ``selected_captions`` <= 1.2x the baseline's time and peak; the per-shard lookup <= 0.1 s at 1M
rows; ``compact``'s peak <= 1.0x the baseline's.

    python bench/store_ops.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from tabulate import tabulate

from caption_pipeline.policy import GatePolicy  # imported by both sides: not part of what compaction costs
from manifests.caption_store import (
    ATTEMPT_KEY,
    KEY_COLUMNS,
    VIEW_COLUMNS,
    StoreMeta,
    attempt_counts,
    compact,
    done_keys,
    selected_captions,
    write_fragment,
)

EXPERTS = ("llava", "gpt4o", "qwen")
PROMPTS = ("p1", "p2", "p3")
SHARD = 256
ROWS_PER_TILE = 1_026_579 / 40_000  # the store: 1,026,579 rows over 40k tiles x 9 keys
ATTEMPTS = np.array([1, 2, 3, 4, 4])  # 2.8 attempts per key on average
META = StoreMeta(class_names=["impervious", "building", "low_vegetation", "tree", "car", "clutter"],
                 clip_model="ViT-B-32:openai", tau=0.55)  # fmt: skip
LOOKUP_SHARDS = 20
POLICY = GatePolicy(tau=META.tau)  # the gate of every row (absolute), and the rules the store applies
TIME_RATIO, SHARD_SECONDS = 1.2, 0.1


def tile_ids(n_tiles: int) -> list[str]:
    return [f"vaihingen/area{i // 1024:03d}/{(i % 1024) // 32 * 512:05d}_{i % 32 * 512:05d}" for i in range(n_tiles)]


def fragment_frame(tiles: list[str], expert: str, rng: np.random.Generator) -> pd.DataFrame:
    """Every attempt of ``expert`` on ``tiles``, as a shard task writes them: the last attempt passes and is
    selected, except for keys whose attempts all failed."""
    keys = [(tile, prompt) for tile in tiles for prompt in PROMPTS]
    counts = rng.choice(ATTEMPTS, size=len(keys))
    tile_col = np.repeat([tile for tile, _ in keys], counts)
    prompt_col = np.repeat([prompt for _, prompt in keys], counts)
    attempt = np.concatenate([np.arange(n) for n in counts])
    last = np.concatenate([np.arange(n) == n - 1 for n in counts])
    similarity = np.where(last, 0.58, 0.52).astype(np.float32)
    failed = rng.random(len(attempt)) < 0.02
    n = len(attempt)
    now = datetime.now(UTC)
    return pd.DataFrame({
        "tile_id": tile_col, "expert": expert, "model": f"{expert}-model", "backend": "openai", "prompt_id": prompt_col,
        "attempt": attempt.astype(np.int16), "prompt_text": "This image contains the following land cover types: "
        "impervious surfaces, building, low vegetation, tree, car. Describe it in one concise paragraph.",
        "temperature": np.where(attempt == 0, 0.0, 0.7).astype(np.float32), "seed": attempt.astype(np.int32),
        "caption": np.where(failed, None, "Red-roofed houses along a road, trees in the gardens, two cars parked "
                                          "near the crossing and a strip of low vegetation to the south."),
        "n_tokens": np.int32(38), "n_chunks": np.int16(1), "clip_model": META.clip_model,
        "raw_cosine": (similarity * 2 - 1), "similarity": np.where(failed, np.nan, similarity).astype(np.float32),
        "tau": np.float32(POLICY.tau), "gate_mode": POLICY.mode, "gate_threshold": np.float32(POLICY.tau),
        "gate_score": np.where(failed, np.nan, similarity).astype(np.float32), "usable": ~failed,
        "passed": ~failed & last, "selected": last, "finish_reason": "stop",
        "latency_s": rng.random(n).astype(np.float32), "created_at": pd.Timestamp(now),
        "run_id": "bench", "manifest_sha256": "0" * 64, "image_sha256": "1" * 64, "split": "train",
        "protocol": "oracle", "class_source": "labels", "error": np.where(failed, "HTTP 500", None),
    })  # fmt: skip


def build(store: Path, rows: int) -> tuple[int, int]:
    """A store of about ``rows`` rows; returns (fragments, rows)."""
    rng = np.random.default_rng(0)
    tiles = tile_ids(max(SHARD, round(rows / ROWS_PER_TILE)))
    written = fragments = 0
    for start in range(0, len(tiles), SHARD):
        for expert in EXPERTS:
            frame = fragment_frame(tiles[start : start + SHARD], expert, rng)
            write_fragment(store, frame, META)
            written += len(frame)
            fragments += 1
    return fragments, written


def shards(store: Path) -> list[list[str]]:
    """The shards of the store's tiles, as the flow cuts them (contiguous slices of the tile list)."""
    tiles = sorted(pc.unique(ds.dataset(store, format="parquet").to_table(columns=["tile_id"])["tile_id"]).to_pylist())
    return [tiles[start : start + SHARD] for start in range(0, len(tiles), SHARD)]


def _done_keys(store: Path, paths: list[str], shard_sample: list[list[str]]) -> dict:
    return {"n": len(done_keys(store, done=POLICY.done, requires=GatePolicy.DONE_REQUIRES))}


def _done_keys_baseline(store: Path, paths: list[str], shard_sample: list[list[str]]) -> dict:
    table = ds.dataset(paths, format="parquet").to_table(
        columns=list(KEY_COLUMNS), filter=pc.field("selected") & pc.field("usable")
    )
    return {"n": len(set(zip(*(table.column(key).to_pylist() for key in KEY_COLUMNS), strict=True)))}


def _selected_captions(store: Path, paths: list[str], shard_sample: list[list[str]]) -> dict:
    return {"n": len(selected_captions(store))}


def _selected_captions_baseline(store: Path, paths: list[str], shard_sample: list[list[str]]) -> dict:
    table = ds.dataset(paths, format="parquet").to_table(columns=VIEW_COLUMNS, filter=pc.field("selected"))
    return {"n": len(table.sort_by([(key, "ascending") for key in KEY_COLUMNS]).to_pandas())}


def _shard(store: Path, paths: list[str], shard_sample: list[list[str]]) -> dict:
    """The first lookup of the process, then the mean of the next ones."""
    started, cpu = time.perf_counter(), time.process_time()
    attempt_counts(store, shard_sample[0], done=POLICY.done)
    first = {"first_s": time.perf_counter() - started, "first_cpu": time.process_time() - cpu}
    started, cpu = time.perf_counter(), time.process_time()
    for part in shard_sample[1:]:
        attempt_counts(store, part, done=POLICY.done)
    return {**first, **_per_lookup(started, cpu)}


def _shard_baseline(store: Path, paths: list[str], shard_sample: list[list[str]]) -> dict:
    started, cpu = time.perf_counter(), time.process_time()
    dataset = ds.dataset(paths, format="parquet")
    for part in shard_sample[1:]:
        dataset.to_table(columns=[*ATTEMPT_KEY, "selected", "usable", "passed"], filter=pc.field("tile_id").isin(part))
    return _per_lookup(started, cpu)


def _per_lookup(started: float, cpu: float) -> dict:
    return {
        "warm_s": (time.perf_counter() - started) / LOOKUP_SHARDS,
        "warm_cpu": (time.process_time() - cpu) / LOOKUP_SHARDS,
    }


def _compact(store: Path, paths: list[str], shard_sample: list[list[str]]) -> dict:
    compact(store, select=POLICY.select)
    return {}


def _compact_baseline(store: Path, paths: list[str], shard_sample: list[list[str]]) -> dict:
    out = store.parent / "plain-compacted.parquet"
    pq.write_table(ds.dataset(paths, format="parquet").to_table(), out)
    out.unlink()
    return {}


OPERATIONS = {
    "done_keys": _done_keys, "done_keys:baseline": _done_keys_baseline,
    "selected_captions": _selected_captions, "selected_captions:baseline": _selected_captions_baseline,
    "shard": _shard, "shard:baseline": _shard_baseline,
    "compact": _compact, "compact:baseline": _compact_baseline,
}  # fmt: skip


def run_operation(name: str, store: Path) -> dict:
    """One operation in this (fresh) process: seconds and peak RSS."""
    paths = sorted(str(path) for path in store.glob("*.parquet"))
    sample = []
    if name.startswith("shard"):  # picked before the clock starts: listing the store's tiles is not a lookup
        parts = shards(store)
        sample = [parts[i] for i in np.linspace(0, len(parts) - 1, LOOKUP_SHARDS + 1).astype(int)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started, cpu = time.perf_counter(), time.process_time()
    extra = OPERATIONS[name](store, paths, sample)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    memory = {"peak_mib": peak / 1024, "above_mib": (peak - before) / 1024}
    return {"seconds": seconds, "cpu": cpu_seconds, **memory, **extra}


def child(name: str, store: Path) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", name, str(store)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure(work: Path, rows: int) -> tuple[dict, int, int]:
    """Build the full and the small store in ``work`` and run every operation on them, each in its own process;
    returns the results and the two stores' row counts."""
    started = time.perf_counter()
    store, small = work / "store", work / "small"
    n_fragments, n_rows = build(store, rows)
    small_fragments, small_rows = build(small, rows // 8)
    print(f"built {n_rows:,} rows in {n_fragments} fragments ({time.perf_counter() - started:.0f} s); "
          f"small store {small_rows:,} rows in {small_fragments} fragments")  # fmt: skip
    results = {}
    for name in ("done_keys", "selected_captions"):
        results[f"{name}:baseline"] = child(f"{name}:baseline", store)
        results[name] = child(name, store)
    results["shard:baseline"] = child("shard:baseline", store)
    results["shard"] = child("shard", store)
    results["shard small"] = child("shard", small)
    copy = work / "copy"
    shutil.copytree(store, copy)
    results["compact:baseline"] = child("compact:baseline", copy)
    results["compact"] = child("compact", copy)
    return results, n_rows, small_rows


def print_results(results: dict, n_rows: int, small_rows: int) -> None:
    """The table of every operation against its baseline, and the targets."""
    rows, verdicts = [], []
    for name in ("done_keys", "selected_captions", "compact"):
        ours, base = results[name], results[f"{name}:baseline"]
        time_ratio, peak_ratio = ours["cpu"] / base["cpu"], ours["peak_mib"] / base["peak_mib"]
        rows.append([name, base["seconds"], ours["seconds"], base["cpu"], ours["cpu"], time_ratio, base["peak_mib"],
                     ours["peak_mib"], peak_ratio, base["above_mib"], ours["above_mib"]])  # fmt: skip
        if name == "compact":
            verdicts.append(("compact peak <= 1.0x baseline", peak_ratio <= 1.0, f"{peak_ratio:.2f}x"))
        else:
            ok = time_ratio <= TIME_RATIO and peak_ratio <= TIME_RATIO
            verdicts.append((f"{name} <= {TIME_RATIO}x baseline CPU time and peak", ok,
                             f"CPU time {time_ratio:.2f}x, peak {peak_ratio:.2f}x"))  # fmt: skip
    shard, base, small_shard = results["shard"], results["shard:baseline"], results["shard small"]
    rows.append(["shard lookup (warm mean)", base["warm_s"], shard["warm_s"], base["warm_cpu"], shard["warm_cpu"],
                 shard["warm_cpu"] / base["warm_cpu"], base["peak_mib"], shard["peak_mib"],
                 shard["peak_mib"] / base["peak_mib"], base["above_mib"], shard["above_mib"]])  # fmt: skip
    headers = ["operation", "plain wall s", "store wall s", "plain CPU s", "store CPU s", "CPU x", "plain peak MiB",
               "store peak MiB", "peak x", "plain +MiB", "store +MiB"]  # fmt: skip
    print(tabulate(rows, headers=headers, floatfmt=".3f"))
    print(f"shard lookup: first call of a process {shard['first_s']:.3f} s wall, {shard['first_cpu']:.3f} s CPU (every "
          f"footer checked); then per shard {shard['warm_s'] * 1000:.1f} ms wall, {shard['warm_cpu'] * 1000:.1f} ms "
          f"CPU at {n_rows:,} rows vs {small_shard['warm_s'] * 1000:.1f} ms wall, "
          f"{small_shard['warm_cpu'] * 1000:.1f} ms CPU at {small_rows:,} rows")  # fmt: skip
    verdicts.append(("shard lookup <= 0.1 s", shard["warm_cpu"] <= SHARD_SECONDS,
                     f"{shard['warm_cpu']:.3f} s CPU, {shard['warm_s']:.3f} s wall"))  # fmt: skip
    for target, ok, measured in verdicts:
        print(f"target: {target}: {measured}, {'met' if ok else 'NOT met'}")
    load = os.getloadavg()[0]
    print(
        f"(one run, {os.cpu_count()} CPUs, load average {load:.1f}; peak = child's max RSS incl. interpreter and "
        "imports; +MiB = peak above the RSS just before the operation)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the store (default 1,000,000)")
    parser.add_argument("--child", nargs=2, metavar=("OPERATION", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_operation(args.child[0], Path(args.child[1]))))
        return
    work = Path(tempfile.mkdtemp(prefix="store-ops-"))
    try:
        results, n_rows, small_rows = measure(work, args.rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_results(results, n_rows, small_rows)


if __name__ == "__main__":
    main()
