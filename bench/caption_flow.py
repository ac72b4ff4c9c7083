"""Overhead of the generate-captions flow over an expert of fixed latency.

An OpenAI-compatible server on loopback (its own process) answers every request LATENCY_S after it arrived; the
expert keeps IN_FLIGHT requests in flight, so the ideal is ``in_flight / latency`` captions/s. The same tiles go
through a plain loop (``caption_tiles`` over the backend, no Prefect, no store) and through the flow, side by
side, for a short run (2304 captions, about 7 s of ideal time) and a long one (9216 captions, about 29 s).

For each run it prints captions/s as a share of ideal and of the loop, and splits the wall time in three: head
(start to the first request at the server), the expert's busy span (first request to last reply) and tail (last
reply to the end: compaction, summary, Prefect's flow teardown). Target: the flow at >= 0.9 of ideal.

The long flow runs twice, with the absolute gate (the paper's tau) and with the contrastive gate (each caption also
scored against every tile of its shard: one more matrix product per chunk), so their ratios to ideal compare.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

for name, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(name, value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LATENCY_S = 0.05
IN_FLIGHT = 16
IDEAL = IN_FLIGHT / LATENCY_S
AREAS, SCENE, TILE = 12, 1024, 64  # 12 x 256 tiles x 3 prompts = 9216 captions
SHORT_TILES = 768  # 2304 captions
TARGET = 0.9

RESPONSE = json.dumps({"choices": [{"message": {"content": "roofs, trees and a road"}, "finish_reason": "stop"}]})
REPLY = (
    f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(RESPONSE)}\r\n\r\n{RESPONSE}"
).encode()
FIRST_ARRIVAL, LAST_REPLY, REPLIES = range(3)


class Clock:
    """First request arrival, last reply and replies, in memory shared with the bench process."""

    def __init__(self, shared) -> None:
        self.shared = shared
        self.lock = threading.Lock()

    def arrived(self) -> None:
        with self.lock:
            if self.shared[FIRST_ARRIVAL] == 0:
                self.shared[FIRST_ARRIVAL] = time.time()

    def replied(self) -> None:
        with self.lock:
            self.shared[LAST_REPLY] = time.time()
            self.shared[REPLIES] += 1


def _read_request(conn: socket.socket, buffer: bytearray) -> bool:
    """Consume one HTTP/1.1 request with a Content-Length body from ``buffer``; False once the client has gone."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if not (data := conn.recv(1 << 16)):
            return False
        buffer += data
    head = bytes(buffer[:end]).lower()
    start = head.index(b"content-length:") + len(b"content-length:")
    stop = head.find(b"\r\n", start)
    needed = end + 4 + int(head[start : stop if stop > 0 else None])
    while len(buffer) < needed:
        if not (data := conn.recv(1 << 16)):
            return False
        buffer += data
    del buffer[:needed]
    return True


def _connection(conn: socket.socket, clock: Clock) -> None:
    """A keep-alive connection: every request is answered LATENCY_S after it arrived."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    with conn:
        while _read_request(conn, buffer):
            arrived = time.perf_counter()
            clock.arrived()
            time.sleep(max(0.0, arrived + LATENCY_S - time.perf_counter()))
            conn.sendall(REPLY)
            clock.replied()


def serve(port_queue, shared) -> None:
    """The fixed-latency expert: a thread per connection in its own process. Threads sleeping to a deadline hold
    the latency closer to LATENCY_S than an asyncio server, whose timers round up to the next millisecond and whose
    replies to a burst of requests go out one after another."""
    clock = Clock(shared)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port_queue.put(listener.getsockname()[1])
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_connection, args=(conn, clock), daemon=True).start()


@dataclass(frozen=True)
class Timing:
    name: str
    captions: int
    seconds: float
    head_s: float
    busy_s: float
    tail_s: float

    @property
    def rate(self) -> float:
        return self.captions / self.seconds


def timed(name: str, clock, run) -> Timing:
    """Run ``run()`` (which returns the number of captions made) and read the server's clock around it."""
    clock[FIRST_ARRIVAL] = clock[LAST_REPLY] = clock[REPLIES] = 0
    started = time.time()
    captions = run()
    ended = time.time()
    assert clock[REPLIES] == captions, (name, clock[REPLIES], captions)
    first, last = clock[FIRST_ARRIVAL], clock[LAST_REPLY]
    return Timing(name, captions, ended - started, first - started, last - first, ended - last)


def main() -> None:
    from tabulate import tabulate

    from caption_pipeline.experts import build_expert
    from caption_pipeline.gate import GateSettings, RunInfo, caption_tiles, tile_tasks
    from caption_pipeline.policy import GatePolicy
    from caption_pipeline.scoring import ClipScorer
    from caption_pipeline.tiny_models import build_tiny_clip
    from flows.generate_captions import frozen_heap, generate_captions
    from flows.model_cache import ModelCache
    from manifests.run_manifest import load_manifest
    from manifests.tile_index import read_tile_index
    from segmenter.demo_scenes import write_demo_dataset
    from segmenter.prepare import prepare_tiles

    clock = multiprocessing.Array("d", 3, lock=False)  # written by the server only while a run is timed
    queue: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(queue, clock), daemon=True)
    server.start()
    port = queue.get(timeout=30)
    work = Path(tempfile.mkdtemp(prefix="bench-captions-"))
    areas = write_demo_dataset(work / "raw", n_areas=AREAS, size=SCENE)
    _, checkpoint = build_tiny_clip(work / "clip")
    manifest_path = work / "run.yaml"
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
    contrastive_path = work / "contrastive.yaml"  # the same run under the contrastive gate
    contrastive_path.write_text(
        manifest_path.read_text().replace("  max_attempts: 1\n", "  max_attempts: 1\n  gate: {mode: contrastive}\n")
    )
    manifest = load_manifest(manifest_path)
    assert load_manifest(contrastive_path).captions.gate.mode == "contrastive"
    prepare_tiles(manifest.dataset, manifest.tiling)
    index = read_tile_index(manifest.tiling.out)
    tasks = tile_tasks(index, index.frame.sort_values("tile_id"), manifest.captions.prompts)
    settings = GateSettings(GatePolicy.from_captions(manifest.captions))

    scorer = ClipScorer(manifest.captions.clip)
    expert = build_expert(manifest.captions.experts[0])
    caption_tiles(tasks[:8], expert, scorer, settings, RunInfo("warm"))
    # Hold the process's models over every flow run, so each timed run finds the scorer and expert loaded, as the
    # plain loop does (a run alone clears the cache when it ends).
    with ModelCache.of_process().hold():
        generate_captions(manifest_path, store=work / "warm", limit=8)  # starts Prefect's local server

        def plain_loop(n_tiles: int) -> int:
            with frozen_heap():  # as the flow does, so that the two differ by Prefect and the store only
                return len(caption_tiles(tasks[:n_tiles], expert, scorer, settings, RunInfo("loop")))

        timings = []
        for label, n_tiles in (("short", SHORT_TILES), ("long", len(tasks))):
            loop = timed(f"loop, {label}", clock, lambda n=n_tiles: plain_loop(n))
            flow = timed(
                f"flow, {label}", clock,
                lambda n=n_tiles, label=label: generate_captions(manifest_path, store=work / label, limit=n).new_rows,
            )  # fmt: skip
            timings += [(loop, loop), (flow, loop)]
        contrastive = timed(
            "flow, long, contrastive", clock,
            lambda: generate_captions(contrastive_path, store=work / "contrastive").new_rows,
        )  # fmt: skip
        timings.append((contrastive, loop))
    server.terminate()
    shutil.rmtree(work, ignore_errors=True)

    rows = [
        [t.name, t.captions, t.seconds, t.rate, t.rate / IDEAL, t.rate / loop.rate, t.head_s, t.tail_s,
         t.captions / t.busy_s / IDEAL]
        for t, loop in timings
    ]  # fmt: skip
    headers = ["run", "captions", "s", "captions/s", "of ideal", "of loop", "head s", "tail s", "busy of ideal"]
    print(f"latency {LATENCY_S * 1000:.0f} ms, {IN_FLIGHT} in flight: ideal {IDEAL:.0f} captions/s")
    print(tabulate(rows, headers=headers, floatfmt=("", "", ".2f", ".1f", ".3f", ".3f", ".2f", ".2f", ".3f")))
    long_flow = timings[-2][0]
    print(
        f"long flow of ideal: absolute gate {long_flow.rate / IDEAL:.3f}, contrastive gate "
        f"{contrastive.rate / IDEAL:.3f} (one run each)"
    )
    verdict = "met" if long_flow.rate / IDEAL >= TARGET else "NOT met"
    print(f"target: flow >= {TARGET} of ideal on the long run: {long_flow.rate / IDEAL:.3f}, {verdict}")


if __name__ == "__main__":
    main()
