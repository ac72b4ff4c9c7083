"""Overhead of the generate-captions flow over an expert of fixed latency.

An OpenAI-compatible server on loopback answers every request after LATENCY_S; the expert keeps IN_FLIGHT
requests in flight. Printed, from one run: captions/s of the flow against the ideal ``in_flight / latency``
and against a plain loop (``caption_tiles`` over the same tiles and backend, no Prefect). Target: >= 0.9 of ideal.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LATENCY_S = 0.05
IN_FLIGHT = 16
AREAS, SCENE, TILE = 12, 512, 64  # 768 tiles x 3 prompts = 2304 captions


RESPONSE = json.dumps({"choices": [{"message": {"content": "roofs, trees and a road"}, "finish_reason": "stop"}]})
REPLY = (
    f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(RESPONSE)}\r\n\r\n{RESPONSE}"
).encode()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive HTTP/1.1 connection: every POST is answered after LATENCY_S."""
    try:
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            await asyncio.sleep(LATENCY_S)
            writer.write(REPLY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def serve(port_queue) -> None:
    """The fixed-latency server, an asyncio one in its own process, so that neither its CPU time nor the GIL
    is shared with the client under test."""

    async def run() -> None:
        server = await asyncio.start_server(_handle, "127.0.0.1", 0)
        port_queue.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(run())


def main() -> None:
    from caption_pipeline.experts import build_expert
    from caption_pipeline.gate import GateSettings, RunInfo, caption_tiles, tile_tasks
    from caption_pipeline.scoring import ClipScorer
    from caption_pipeline.tiny_models import build_tiny_clip
    from flows.generate_captions import generate_captions
    from manifests.run_manifest import load_manifest
    from manifests.tile_index import read_tile_index
    from segmenter.demo_scenes import write_demo_dataset
    from segmenter.prepare import prepare_tiles

    queue: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(queue,), daemon=True)
    server.start()
    port = queue.get(timeout=30)
    work = Path(tempfile.mkdtemp(prefix="bench-captions-"))
    write_demo_dataset(work / "raw", n_areas=AREAS, size=SCENE)
    _, checkpoint = build_tiny_clip(work / "clip")
    manifest_path = work / "run.yaml"
    areas = [str(area) for area in (1, 3, 7, 11, 13, 17, 23, 26, 28, 32, 34, 37)[:AREAS]]
    manifest_path.write_text(f"""
name: bench
dataset: {{name: vaihingen, root: {work / "raw"}, split: custom, custom_splits: {{train: {areas}}}}}
tiling: {{size: {TILE}, out: {work / "tiles"}}}
captions:
  store: {work / "store"}
  tau: 0.0
  max_attempts: 1
  shard_size: 128
  clip: {{model: demo-tiny-clip, pretrained: null, config: {work / "clip"}, checkpoint: {checkpoint}, device: cpu}}
  experts:
    - {{name: fixed, backend: openai, model: fixed, base_url: "http://127.0.0.1:{port}/v1",
        concurrency: {IN_FLIGHT}, max_side: 64}}
""")
    manifest = load_manifest(manifest_path)
    prepare_tiles(manifest.dataset, manifest.tiling)
    index = read_tile_index(manifest.tiling.out)
    n_captions = len(index.frame) * 3

    scorer = ClipScorer(manifest.captions.clip)
    expert = build_expert(manifest.captions.experts[0])
    tasks = tile_tasks(index, index.frame, manifest.captions.prompts)
    caption_tiles(tasks[:8], expert, scorer, GateSettings(tau=0.0, max_attempts=1), RunInfo("warm"))
    started = time.perf_counter()
    rows = caption_tiles(tasks, expert, scorer, GateSettings(tau=0.0, max_attempts=1), RunInfo("loop"))
    loop_rate = len(rows) / (time.perf_counter() - started)

    generate_captions(manifest_path, store=work / "warm", limit=8)  # starts Prefect's local server
    started = time.perf_counter()
    summary = generate_captions(manifest_path)
    flow_rate = summary.new_rows / (time.perf_counter() - started)
    assert summary.new_rows == n_captions, summary.new_rows
    ideal = IN_FLIGHT / LATENCY_S
    print(f"{n_captions} captions, latency {LATENCY_S * 1000:.0f} ms, {IN_FLIGHT} in flight; ideal {ideal:.0f}/s")
    print(f"plain loop : {loop_rate:7.1f} captions/s  ({loop_rate / ideal:.2f} of ideal)")
    print(
        f"flow       : {flow_rate:7.1f} captions/s  ({flow_rate / ideal:.2f} of ideal, "
        f"{flow_rate / loop_rate:.2f} of loop)"
    )
    server.terminate()


if __name__ == "__main__":
    main()
