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

Endpoints: one expert served by ENDPOINTS servers (a process each) of ENDPOINT_LATENCY_S, IN_FLIGHT slots each, runs
the same tiles through the flow as the same expert with only the first of them; it prints the throughput ratio
(target >= ENDPOINT_TARGET). ``--endpoints-only`` runs this part alone.
"""

from __future__ import annotations

import argparse
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
from typing import Any

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
# A latency at which the 4-endpoint run (ideal 4 x 16 / 0.2 = 320 captions/s, the 1-endpoint bench's ideal) is bound
# by the servers, not by this machine's CPUs.
ENDPOINTS, ENDPOINT_LATENCY_S, ENDPOINT_TILES, ENDPOINT_TARGET = 4, 0.2, 768, 3.5

RESPONSE = json.dumps({"choices": [{"message": {"content": "roofs, trees and a road"}, "finish_reason": "stop"}]})
REPLY = (
    f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(RESPONSE)}\r\n\r\n{RESPONSE}"
).encode()
FIRST_ARRIVAL, LAST_REPLY, REPLIES = range(3)


class Clock:
    """First request arrival, last reply and replies, in memory shared with the bench process."""

    def __init__(self, shared, lock) -> None:
        self.shared = shared
        self.lock = lock  # one lock for every server process that writes the clock

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


def _connection(conn: socket.socket, clock: Clock, latency_s: float) -> None:
    """A keep-alive connection: every request is answered ``latency_s`` after it arrived."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    with conn:
        while _read_request(conn, buffer):
            arrived = time.perf_counter()
            clock.arrived()
            time.sleep(max(0.0, arrived + latency_s - time.perf_counter()))
            conn.sendall(REPLY)
            clock.replied()


def serve(port_queue, shared, lock, latency_s: float = LATENCY_S) -> None:
    """The fixed-latency expert: a thread per connection in its own process. Threads sleeping to a deadline hold
    the latency closer to LATENCY_S than an asyncio server, whose timers round up to the next millisecond and whose
    replies to a burst of requests go out one after another."""
    clock = Clock(shared, lock)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port_queue.put(listener.getsockname()[1])
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_connection, args=(conn, clock, latency_s), daemon=True).start()


def start_servers(count: int, clock, lock, latency_s: float) -> tuple[list[multiprocessing.Process], list[int]]:
    """``count`` fixed-latency servers, a process each (as separate machines would be), and their ports."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    servers = [
        multiprocessing.Process(target=serve, args=(queue, clock, lock, latency_s), daemon=True) for _ in range(count)
    ]
    for server in servers:
        server.start()
    return servers, [queue.get(timeout=30) for _ in servers]


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


MANIFEST = """
name: bench
dataset: {{name: vaihingen, root: {work}/raw, split: custom, custom_splits: {{train: {areas}}}}}
tiling: {{size: {tile}, out: {work}/tiles}}
captions:
  store: {work}/store
  tau: 0.0
  max_attempts: 1
  shard_size: 128
  clip: {{model: demo-tiny-clip, pretrained: null, config: {work}/clip, checkpoint: {checkpoint}, device: cpu}}
  experts:
    - {{name: fixed, backend: openai, model: fixed, base_url: {urls}, concurrency: {in_flight}, max_side: 64}}
"""


@dataclass(frozen=True)
class Manifests:
    """The bench's run manifests: one server, the same run under the contrastive gate, and one expert served by the
    first and by every slow endpoint server."""

    main: Path
    contrastive: Path
    endpoints: dict[int, Path]


def write_manifests(work: Path, port: int, endpoint_ports: list[int]) -> Manifests:
    """The demo scenes, the tiny CLIP and the manifests of the bench, in ``work``."""
    from caption_pipeline.policy import GatePolicy
    from caption_pipeline.tiny_models import build_tiny_clip
    from manifests.run_manifest import load_manifest
    from segmenter.data.demo_scenes import write_demo_dataset

    areas = write_demo_dataset(work / "raw", n_areas=AREAS, size=SCENE)
    _, checkpoint = build_tiny_clip(work / "clip")

    def manifest(name: str, ports: list[int], gate: str = "") -> Path:
        urls = "[" + ", ".join(f'"http://127.0.0.1:{port}/v1"' for port in ports) + "]"
        text = MANIFEST.format(work=work, areas=areas, tile=TILE, checkpoint=checkpoint, urls=urls, in_flight=IN_FLIGHT)
        path = work / name
        path.write_text(text.replace("  max_attempts: 1\n", f"  max_attempts: 1\n{gate}"))
        return path

    endpoints = {count: manifest(f"endpoints-{count}.yaml", endpoint_ports[:count]) for count in (1, ENDPOINTS)}
    for count, path in endpoints.items():
        assert len(load_manifest(path).captions.experts[0].endpoints) == count
    contrastive = manifest("contrastive.yaml", [port], "  gate: {mode: contrastive}\n")
    assert GatePolicy.from_captions(load_manifest(contrastive).captions).contrastive
    return Manifests(manifest("run.yaml", [port]), contrastive, endpoints)


@dataclass(frozen=True)
class Bench:
    """What the timed runs share: the servers' clock, the work folder, the manifests, and the tiles, gate and CLIP
    scorer of the plain loop."""

    clock: Any
    work: Path
    manifests: Manifests
    tasks: list
    settings: Any
    scorer: Any

    def loop(self, name: str, expert: Any, n_tiles: int) -> Timing:
        """``caption_tiles`` over the first ``n_tiles`` tiles with ``expert``, no Prefect, no store."""
        from caption_pipeline.gate import RunInfo, caption_tiles
        from flows.generate_captions import frozen_heap

        def run() -> int:
            with frozen_heap():  # as the flow does, so that the two differ by Prefect and the store only
                return len(caption_tiles(self.tasks[:n_tiles], expert, self.scorer, self.settings, RunInfo("loop")))

        return timed(name, self.clock, run)

    def flow(self, name: str, manifest: Path, store: str, limit: int | None = None) -> Timing:
        """The generate-captions flow on the first ``limit`` tiles of ``manifest`` into a fresh ``store``."""
        from flows.generate_captions import CaptionRunSettings, generate_captions

        run = CaptionRunSettings(manifest, store=self.work / store, limit=limit)
        return timed(name, self.clock, lambda: generate_captions(run).new_rows)

    def warm(self, expert: Any) -> None:
        """One short plain loop, so that a timed run finds the expert's session and the scorer ready."""
        from caption_pipeline.gate import RunInfo, caption_tiles

        caption_tiles(self.tasks[:8], expert, self.scorer, self.settings, RunInfo("warm"))


def endpoint_timings(bench: Bench) -> list[tuple[Timing, int]]:
    """The expert alone (plain loop), then the flow, with 1 and with every endpoint; each with its endpoint count."""
    from caption_pipeline.experts import build_expert
    from flows.generate_captions import CaptionRunSettings, generate_captions
    from manifests.run_manifest import load_manifest

    for count, path in bench.manifests.endpoints.items():  # its own warm-up: each configuration is another expert
        generate_captions(CaptionRunSettings(path, store=bench.work / f"warm-{count}", limit=8))
    timings = []
    for count, path in bench.manifests.endpoints.items():
        alone = build_expert(load_manifest(path).captions.experts[0])
        bench.warm(alone)
        timings.append((bench.loop(f"loop, {count} endpoint(s)", alone, ENDPOINT_TILES), count))
        alone.close()
    for count, path in bench.manifests.endpoints.items():
        timings.append((bench.flow(f"flow, {count} endpoint(s)", path, f"endpoints-{count}", ENDPOINT_TILES), count))
    return timings


def gate_timings(bench: Bench, expert: Any) -> list[tuple[Timing, Timing]]:
    """The plain loop and the flow on the short and the long run, then the long flow under the contrastive gate;
    each with the loop it is compared with."""
    timings = []
    for label, n_tiles in (("short", SHORT_TILES), ("long", len(bench.tasks))):
        loop = bench.loop(f"loop, {label}", expert, n_tiles)
        timings += [(loop, loop), (bench.flow(f"flow, {label}", bench.manifests.main, label, n_tiles), loop)]
    timings.append(
        (bench.flow("flow, long, contrastive", bench.manifests.contrastive, "long-contrastive"), timings[-1][1])
    )
    return timings


def print_endpoints(timings: list[tuple[Timing, int]]) -> None:
    """The endpoint comparison's table and its target."""
    from tabulate import tabulate

    rows = [
        [t.name, t.captions, t.seconds, t.rate, t.rate / (count * IN_FLIGHT / ENDPOINT_LATENCY_S), t.head_s, t.tail_s,
         t.captions / t.busy_s / (count * IN_FLIGHT / ENDPOINT_LATENCY_S)]
        for t, count in timings
    ]  # fmt: skip
    print(f"endpoints: latency {ENDPOINT_LATENCY_S * 1000:.0f} ms, {IN_FLIGHT} in flight per endpoint")
    headers = ["run", "captions", "s", "captions/s", "of ideal", "head s", "tail s", "busy of ideal"]
    print(tabulate(rows, headers=headers, floatfmt=("", "", ".2f", ".1f", ".3f", ".2f", ".2f", ".3f")))
    for what, (one, _), (many, _) in (("loop", *timings[:2]), ("flow", *timings[2:])):
        ratio = many.rate / one.rate
        verdict = "met" if ratio >= ENDPOINT_TARGET else "NOT met"
        print(f"target: {what}, {ENDPOINTS} endpoints >= {ENDPOINT_TARGET}x the rate of 1: {ratio:.2f}x, {verdict}")


def print_gates(timings: list[tuple[Timing, Timing]]) -> None:
    """The loop-versus-flow table, the two gates' long flows and the target."""
    from tabulate import tabulate

    rows = [
        [t.name, t.captions, t.seconds, t.rate, t.rate / IDEAL, t.rate / loop.rate, t.head_s, t.tail_s,
         t.captions / t.busy_s / IDEAL]
        for t, loop in timings
    ]  # fmt: skip
    headers = ["run", "captions", "s", "captions/s", "of ideal", "of loop", "head s", "tail s", "busy of ideal"]
    print(f"latency {LATENCY_S * 1000:.0f} ms, {IN_FLIGHT} in flight: ideal {IDEAL:.0f} captions/s")
    print(tabulate(rows, headers=headers, floatfmt=("", "", ".2f", ".1f", ".3f", ".3f", ".2f", ".2f", ".3f")))
    long_flow, contrastive = timings[-2][0], timings[-1][0]
    print(
        f"long flow of ideal: absolute gate {long_flow.rate / IDEAL:.3f}, contrastive gate "
        f"{contrastive.rate / IDEAL:.3f} (one run each)"
    )
    verdict = "met" if long_flow.rate / IDEAL >= TARGET else "NOT met"
    print(f"target: flow >= {TARGET} of ideal on the long run: {long_flow.rate / IDEAL:.3f}, {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints-only", action="store_true", help="only the 1- vs 4-endpoint comparison")
    endpoints_only = parser.parse_args().endpoints_only
    from caption_pipeline.experts import build_expert
    from caption_pipeline.gate import GateSettings, tile_tasks
    from caption_pipeline.policy import GatePolicy
    from caption_pipeline.scoring import ClipScorer
    from flows.generate_captions import CaptionRunSettings, generate_captions
    from flows.model_cache import ModelCache
    from manifests.run_manifest import load_manifest
    from manifests.tile_index import read_tile_index
    from segmenter.data.prepare import prepare_tiles

    clock = multiprocessing.Array("d", 3, lock=False)  # written by the servers only while a run is timed
    lock = multiprocessing.Lock()
    (server,), (port,) = start_servers(1, clock, lock, LATENCY_S)
    endpoint_servers, endpoint_ports = start_servers(ENDPOINTS, clock, lock, ENDPOINT_LATENCY_S)
    work = Path(tempfile.mkdtemp(prefix="bench-captions-"))
    manifests = write_manifests(work, port, endpoint_ports)
    manifest = load_manifest(manifests.main)
    prepare_tiles(manifest.dataset, manifest.tiling)
    index = read_tile_index(manifest.tiling.out)
    tasks = tile_tasks(index, index.frame.sort_values("tile_id"), manifest.captions.prompts)
    settings = GateSettings(GatePolicy.from_captions(manifest.captions))
    bench = Bench(clock, work, manifests, tasks, settings, ClipScorer(manifest.captions.clip))
    expert = build_expert(manifest.captions.experts[0])
    bench.warm(expert)
    # Hold the process's models over every flow run, so each timed run finds the scorer and expert loaded, as the
    # plain loop does (a run alone clears the cache when it ends).
    with ModelCache.of_process().hold():
        generate_captions(CaptionRunSettings(manifests.main, store=work / "warm", limit=8))  # starts Prefect's server
        endpoints = endpoint_timings(bench)
        gates = [] if endpoints_only else gate_timings(bench, expert)
    for process in (server, *endpoint_servers):
        process.terminate()
    shutil.rmtree(work, ignore_errors=True)
    print_endpoints(endpoints)
    if not endpoints_only:
        print_gates(gates)


if __name__ == "__main__":
    main()
