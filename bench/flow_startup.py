"""Seconds from ``flows run generate-captions`` to the first expert request, idle and under load, and where they go.

Each measurement is a fresh process, as a user's command is. The first request is seen by a loopback
OpenAI-compatible stand-in (bench/caption_flow.py's fixed-latency server), so the time covers everything a user
waits for: imports, the manifest and pre-flight checks, the start of Prefect's local API server (with a fresh
``PREFECT_HOME``: its database is created and migrated, as on a first run; and again with that home kept), the CLIP
scorer, and the flow up to the expert's first request. Beside it, the parts alone (each in a fresh process): the
imports of the caption flow, the local server's start, and the CLIP scorer's load. The command overlaps the server's
start with the CLIP load, so its total is less than the sum of the parts; the sum is printed beside it as the
sequential baseline.

"Under load" runs the same with LOAD_PROCESSES CPU-bound Python loops beside it (the 2-core machine is then
oversubscribed, as a shared workstation or CI runner often is). Each loop stops by itself after LOAD_LIMIT_S.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from caption_flow import FIRST_ARRIVAL, start_servers  # noqa: E402  (the fixed-latency stand-in)

LOAD_PROCESSES = 2
LOAD_LIMIT_S = 900
RUNS = 3  # per condition; the median is printed with the range
IMPORTS = (
    "import time; t = time.perf_counter(); import flows.cli, flows.generate_captions; print(time.perf_counter() - t)"
)
SERVER = (
    "import time; from flows.prefect_api import ensure_prefect_api; t = time.perf_counter(); ensure_prefect_api(); "
    "print(time.perf_counter() - t)"
)
CLIP = (
    "import sys, time; from manifests.run_manifest import load_manifest; "
    "from caption_pipeline.scoring import ClipScorer; m = load_manifest(sys.argv[1]); t = time.perf_counter(); "
    "ClipScorer(m.captions.clip); print(time.perf_counter() - t)"
)


def base_env(prefect_home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING", PREFECT_HOME=str(prefect_home), PYTHONPATH=str(ROOT),
    )  # fmt: skip
    return env


def seconds_of(code: str, env: dict[str, str], *args: str) -> float:
    """What a fresh Python process running ``code`` prints: its own timing of the part."""
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def to_first_request(manifest: Path, store: Path, env: dict[str, str], clock) -> float:
    """Seconds from launching ``flows run generate-captions`` to the stand-in's first request."""
    clock[FIRST_ARRIVAL] = 0
    flows = Path(sys.executable).parent / "flows"
    started = time.time()
    subprocess.run(
        [str(flows), "run", "generate-captions", "--manifest", str(manifest), "--store", str(store)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert clock[FIRST_ARRIVAL] > 0, "no request reached the stand-in"
    return clock[FIRST_ARRIVAL] - started


@contextmanager
def cpu_load(processes: int):
    """``processes`` CPU-bound Python loops beside the measurement, each ending by itself after LOAD_LIMIT_S."""
    code = f"import time\nend = time.time() + {LOAD_LIMIT_S}\nwhile time.time() < end: pass"
    loops = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(processes)]
    try:
        time.sleep(1)
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def write_inputs(work: Path, port: int) -> Path:
    """A 12-tile demo index, the tiny CLIP and a manifest with one expert served by the stand-in."""
    from caption_pipeline.tiny_models import build_tiny_clip
    from manifests.run_manifest import load_manifest
    from segmenter.data.demo_scenes import write_demo_dataset
    from segmenter.data.prepare import prepare_tiles

    areas = write_demo_dataset(work / "raw", n_areas=3, size=128)
    _, checkpoint = build_tiny_clip(work / "clip")
    manifest = work / "run.yaml"
    manifest.write_text(f"""
name: startup
dataset: {{name: vaihingen, root: {work / "raw"}, split: custom, custom_splits: {{train: {areas}}}}}
tiling: {{size: 64, out: {work / "tiles"}}}
captions:
  store: {work / "store"}
  max_attempts: 1
  clip: {{model: demo-tiny-clip, pretrained: null, config: {work / "clip"}, checkpoint: {checkpoint}, device: cpu}}
  experts:
    - {{name: fixed, backend: openai, model: fixed, base_url: "http://127.0.0.1:{port}/v1", max_side: 64}}
""")
    loaded = load_manifest(manifest)
    prepare_tiles(loaded.dataset, loaded.tiling)
    return manifest


def measure(work: Path, manifest: Path, clock, label: str) -> list[list]:
    """Every number of one condition (idle or under load), the median of RUNS with its range."""
    rows: dict[str, list[float]] = {}
    for run in range(RUNS):
        fresh = work / f"prefect-{label}-{run}"
        env = base_env(fresh)  # a fresh PREFECT_HOME: the server creates and migrates its database
        rows.setdefault("to first request, fresh PREFECT_HOME", []).append(
            to_first_request(manifest, work / f"store-{label}-{run}-a", env, clock)
        )
        rows.setdefault("to first request, PREFECT_HOME kept", []).append(
            to_first_request(manifest, work / f"store-{label}-{run}-b", env, clock)
        )
        rows.setdefault("  imports of the caption flow", []).append(seconds_of(IMPORTS, env))
        rows.setdefault("  local API server start, fresh PREFECT_HOME", []).append(
            seconds_of(SERVER, base_env(work / f"prefect-{label}-{run}-alone"))
        )
        rows.setdefault("  local API server start, PREFECT_HOME kept", []).append(seconds_of(SERVER, env))
        rows.setdefault("  CLIP scorer load", []).append(seconds_of(CLIP, env, str(manifest)))
    return [[name, label, *summary(values)] for name, values in rows.items()]


def summary(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 2], ordered[0], ordered[-1]


def main() -> None:
    from tabulate import tabulate

    clock = multiprocessing.Array("d", 3, lock=False)
    (server,), (port,) = start_servers(1, clock, multiprocessing.Lock(), 0.05)
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        manifest = write_inputs(work, port)
        rows = measure(work, manifest, clock, "idle")
        with cpu_load(LOAD_PROCESSES):
            rows += measure(work, manifest, clock, f"{LOAD_PROCESSES} busy loops")
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{RUNS} runs per condition on {os.cpu_count()} CPUs; median (min - max) in seconds")
    print(tabulate(
        [[name, label, f"{median:.1f}", f"{low:.1f} - {high:.1f}"] for name, label, median, low, high in rows],
        headers=["what", "machine", "median s", "range s"],
    ))  # fmt: skip
    for label in {row[1] for row in rows}:
        part = {name.strip(): median for name, machine, median, _, _ in rows if machine == label}
        sequential = (
            part["imports of the caption flow"]
            + part["local API server start, fresh PREFECT_HOME"]
            + part["CLIP scorer load"]
        )
        total = part["to first request, fresh PREFECT_HOME"]
        print(f"{label}: to first request {total:.1f} s against {sequential:.1f} s for the parts one after another "
              f"(imports + server + CLIP), {total / sequential:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
