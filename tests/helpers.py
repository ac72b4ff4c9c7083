"""Helpers shared by several test modules. Test modules import from here, never from each other or from conftest
(``tests/test_layout.py`` checks); fixtures stay in ``conftest.py``."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from caption_pipeline.experts.base import CaptionRequest, CaptionResult
from caption_pipeline.scoring import Score
from manifests.caption_store import StoreMeta, write_fragment
from manifests.class_predictions import write_class_predictions
from manifests.run_manifest import ClipConfig, DatasetConfig, TilingConfig, dataset_config
from manifests.tile_index import TileIndex

if TYPE_CHECKING:
    from caption_pipeline.gate import TileTask

SECRET = "sk-test-SECRET-4242"
META = StoreMeta(class_names=["a", "b"], clip_model="tiny:random", tau=0.55)


class CheckedServer(ThreadingHTTPServer):
    """An HTTP stand-in whose handler failures reach the test.

    An ``assert`` in a handler thread only prints a traceback: :meth:`check` records a failed condition in
    :attr:`errors`, and an exception escaping a handler is recorded too; :func:`serving` fails the test when the
    list is not empty at the end.
    """

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        super().__init__(("127.0.0.1", 0), handler)
        self.lock = threading.Lock()
        self.errors: list[str] = []

    def check(self, condition: bool, message: str) -> None:
        """Record ``message`` as a failure when ``condition`` is false (an ``assert`` for handler threads)."""
        if not condition:
            with self.lock:
                self.errors.append(message)

    def handle_error(self, request, client_address) -> None:
        """Record an exception escaping a handler, except a socket the client closed (cancelled or timed out)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):  # broken pipe, connection reset or aborted
            with self.lock:
                self.errors.append(traceback.format_exc())


@contextmanager
def serving(server: CheckedServer) -> Iterator[CheckedServer]:
    """Serve ``server`` on a daemon thread; shut it down and fail on any error its handlers recorded."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
    assert not server.errors, "the stand-in server recorded errors:\n" + "\n".join(server.errors)


class ChatServer(CheckedServer):
    """A local OpenAI-compatible chat-completions server; the prompt text picks its behaviour (see ChatHandler)."""

    def __init__(self):
        super().__init__(ChatHandler)
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: Counter[str] = Counter()
        self.image_sizes: list[tuple[int, int]] = []
        self.auth_headers: set[str] = set()
        self.bodies: list[dict] = []  # every request body without its messages, plus the prompt text
        self.refused_field: str | None = None  # a request field answered with OpenAI's "Unsupported parameter"


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args):  # keep test output quiet
        pass

    def _reply(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        raw = self.rfile.read(length)
        if len(raw) < length:  # the client cancelled the request while sending it: nothing to answer
            return
        body = json.loads(raw)
        content = body["messages"][0]["content"]
        prompt = next(part["text"] for part in content if part["type"] == "text")
        calls = self._record(
            body, prompt, next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
        )
        # The request leaves the server's count before its reply is written: the client may send its next request
        # as soon as it reads the reply, and counting both would be the server's race, not the client's bound.
        try:
            time.sleep(0.05 + DELAYS.get(prompt, 0.0))
            status, payload, headers = self._answer(prompt, calls, body)
        finally:
            with self.server.lock:
                self.server.in_flight -= 1
        self._reply(status, payload, headers)

    def _record(self, body: dict, prompt: str, url: str) -> int:
        """Count the request in flight and record what it sent; returns how often its prompt was asked so far."""
        server = self.server
        server.check(url.startswith("data:image/png;base64,"), f"not a PNG data URL: {url[:40]}")
        with server.lock:
            server.calls[prompt] += 1
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            server.auth_headers.add(self.headers.get("Authorization", ""))
            server.bodies.append({**{key: value for key, value in body.items() if key != "messages"}, "prompt": prompt})
            with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
                server.image_sizes.append(image.size)
            return server.calls[prompt]

    def _answer(self, prompt: str, calls: int, body: dict) -> tuple[int, dict, dict[str, str]]:
        """(status, payload, headers) of the reply the prompt (and the how-manieth call of it) asks for."""
        refused = self.server.refused_field
        if refused in body:
            message = (
                f"Unsupported parameter: '{refused}' is not supported with this model. "
                f"Use '{({'max_tokens', 'max_completion_tokens'} - {refused}).pop()}' instead."
            )
            return 400, {"error": {"message": message, "param": refused}}, {}
        if prompt in FIXED_ANSWERS:
            return *FIXED_ANSWERS[prompt], {}
        if prompt == "flaky" and calls <= 2:
            return (429, {"error": "slow down"}, {}) if calls == 1 else (503, {"error": "busy"}, {})
        if prompt == "throttled" and calls == 1:  # OpenAI sends both; the millisecond one is the precise one
            return 429, {"error": "rate limited"}, {"retry-after-ms": "50", "Retry-After": "20"}
        if prompt.startswith("status "):  # an OpenAI-style error that echoes the key it was sent
            message = f"Incorrect API key provided: {self.headers.get('Authorization')}.\nSee the docs."
            return int(prompt.split()[1]), {"error": {"message": message, "code": "invalid_api_key"}}, {}
        if prompt == "echo":  # a caption that repeats the header it was sent, and its bare credential
            auth = self.headers.get("Authorization", "")
            content = f"a road. {auth} raw={auth.split(' ', 1)[-1]}"
            return 200, {"choices": [{"message": {"content": content}, "finish_reason": "stop"}]}, {}
        choice = {"message": {"content": f" caption for {prompt} "}, "finish_reason": "stop"}
        return 200, {"choices": [choice], "usage": {"completion_tokens": 4}}, {}


# How much longer than the usual 50 ms the chat server takes to answer these prompts.
DELAYS = {"hang": 3.0, "stall": 20.0}  # stall: far longer than any bound a test puts on the client
# Prompts the chat server answers with a fixed error: (status, payload).
FIXED_ANSWERS: dict[str, tuple[int, dict]] = {
    "fail": (500, {"error": "boom"}),
    "bad request": (400, {"error": "no"}),
    # vLLM started without room for an image per prompt
    "image limit": (400, {"object": "error", "type": "BadRequestError",
                          "message": "At most 0 image(s) may be provided in one request. You can set "
                                     "`--limit-mm-per-prompt`"}),
    # vLLM: names the field, but only this request is at fault
    "too long": (400, {"object": "error", "message": "'max_tokens' or 'max_completion_tokens' is too large: 160. This "
                                                     "model's maximum context"}),
    # Replies of 200 that break the chat-completions format where a client reads it
    "content not text": (200, {"choices": [{"message": {"content": 5}, "finish_reason": "stop"}]}),
    "usage not an object": (200, {"choices": [{"message": {"content": "a road"}, "finish_reason": "stop"}],
                                  "usage": "many"}),
    "finish reason object": (200, {"choices": [{"message": {"content": "a road"}, "finish_reason": {"why": 1}}]}),
    "no choices": (200, {"choices": []}),
    "huge": (200, {"choices": [{"message": {"content": "road " * 200_000}, "finish_reason": "stop"}]}),
}  # fmt: skip


def row(tile: str, prompt: str = "p1", attempt: int = 0, similarity: float | None = 0.6, **extra: Any) -> dict:
    """One caption-store row for ``tile``; ``similarity=None`` makes it a failed attempt."""
    base = {
        "tile_id": tile, "expert": "e", "model": "m", "backend": "annotation", "prompt_id": prompt,
        "attempt": attempt, "prompt_text": "describe", "temperature": 0.0 if attempt == 0 else 0.7, "seed": attempt,
        "caption": None if similarity is None else f"caption {tile}",
        "n_tokens": 3, "n_chunks": 1, "clip_model": "tiny:random", "raw_cosine": 0.2, "similarity": similarity,
        "tau": 0.55, "gate_mode": "absolute", "gate_threshold": 0.55, "gate_score": similarity,
        "usable": similarity is not None, "passed": bool(similarity and similarity >= 0.55),
        "selected": True, "finish_reason": "stop",
        "latency_s": 0.1, "created_at": datetime.now(UTC), "run_id": "r", "manifest_sha256": None,
        "image_sha256": "x", "split": "train", "protocol": "custom", "class_source": "labels",
        "error": None if similarity is not None else "HTTP 500",
    }  # fmt: skip
    return {**base, **extra}


def write_predictions(index, folder: Path) -> Path:
    """A predictions file for every tile of ``index`` that disagrees with the labels: each tile is 70% tree and
    30% car, with its class-index mask."""
    names = index.class_names
    tree, car = names.index("tree"), names.index("car")
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for number, tile_id in enumerate(index.frame["tile_id"]):
        mask = np.full((64, 64), tree, np.uint8)
        mask[:, 45:] = car
        Image.fromarray(mask).save(folder / "masks" / f"{number}.png")
        fractions = np.bincount(mask.ravel(), minlength=len(names)) / mask.size
        rows.append({"tile_id": tile_id, "class_fractions": fractions.tolist(), "mask_path": f"masks/{number}.png",
                     "run_id": "notext", "model": "test_tiny_notext"})  # fmt: skip
    return write_class_predictions(folder / "class_predictions.parquet", rows, names, 255)


def vaihingen_configs(
    root: Path, out: Path, size: int = 32, stride: int | None = None, **dataset: Any
) -> tuple[DatasetConfig, TilingConfig]:
    """The dataset and tiling configuration of a Vaihingen release at ``root`` cut into ``size`` px tiles."""
    return (
        dataset_config(name="vaihingen", root=root, **dataset),
        TilingConfig(size=size, stride=stride, out=out),
    )


class CaptionScorer:
    """Stands in for CLIP: a caption ``"sim X"`` has similarity X, so a test sets every score it needs exactly."""

    model_id = "fake:similarity-in-text"

    def __init__(self) -> None:
        self.scored: list[str] = []

    def score(self, keys: list[str], paths: list[Path], captions: list[str], pool: object = None) -> list[Score]:
        self.scored += captions
        return [Score(2 * float(text.split()[-1]) - 1, float(text.split()[-1]), 2, 1) for text in captions]


@dataclasses.dataclass
class AnsweringExpert:
    """Answers ``answer(tile_id, prompt_id, attempt)``: a caption, or None for a failed request (an HTTP 503)."""

    answer: Callable[[str, str, int], str | None]
    name: str = "fake"
    model: str = "fake"
    backend: str = "openai"
    reprompts: bool = True
    needs_class_mask: bool = False
    pipeline_chunk: int | None = None
    asked: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)

    def generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        results = []
        for request in requests:
            attempt = request.seed  # the gate seeds every attempt with its number
            self.asked.append((request.tile_id, request.prompt_id, attempt))
            caption = self.answer(request.tile_id, request.prompt_id, attempt)
            failed = CaptionResult(None, None, None, 0.0, error="HTTP 503")
            results.append(failed if caption is None else CaptionResult(caption, "stop", 3, 0.0))
        return results


def annotation_store(
    folder: Path, index: TileIndex, clip: ClipConfig, class_source: dict[str, str] | None = None
) -> Path:
    """A caption store of ``index`` written by the annotation expert from the labels of every split, one attempt per
    key, every caption passing (tau 0): captions a test can train on, evaluate with or calibrate against.
    ``class_source`` replaces the labels of a split (``{"test": "none"}``: the expert has no caption there)."""
    from caption_pipeline.experts import build_expert
    from caption_pipeline.gate import GateSettings, RunInfo, caption_tiles, tile_tasks
    from caption_pipeline.policy import GatePolicy
    from caption_pipeline.scoring import ClipScorer
    from manifests.run_manifest import AnnotationExpertConfig, PromptConfig

    store = folder / "captions"
    sources = {"train": "labels", "test": "labels", **(class_source or {})}
    prompts = PromptConfig(class_source=sources, allow_labels_on_eval=True)
    annotation = build_expert(AnnotationExpertConfig(name="annotation", backend="annotation"))
    rows = caption_tiles(
        tile_tasks(index, index.frame, prompts), annotation, ClipScorer(clip),
        GateSettings(GatePolicy(tau=0.0, max_attempts=1)), RunInfo("r"),
    )  # fmt: skip
    write_fragment(store, rows, StoreMeta(index.class_names, "tiny", 0.0))
    return store


def flat_tiles(folder: Path, n: int = 3) -> list[TileTask]:
    """``n`` train tiles ``t0``... sharing one flat image, labelled all building: for stand-in scorers that read the
    caption, not the pixels."""
    from caption_pipeline.gate import TileTask
    from caption_pipeline.prompts import TileClasses

    image = folder / "tile.png"
    Image.new("RGB", (8, 8), (90, 120, 60)).save(image)
    classes = TileClasses("labels", {"building": 1.0})
    return [TileTask(f"t{i}", "train", image, None, f"sha{i}", classes, "labels") for i in range(n)]


class EndpointHandler(ChatHandler):
    """ChatHandler behind an extra delay, or answering every request with the server's ``status`` when not 200."""

    server: EndpointServer

    def do_POST(self):
        server = self.server
        with server.lock:
            server.received += 1
            status = server.status
        time.sleep(server.delay_s)
        if status == 200:
            super().do_POST()
            return
        self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(status, {"error": "unwell"})


class EndpointServer(ChatServer):
    """One of several servers of an expert: a ChatServer that answers ``delay_s`` later, or with ``status``."""

    def __init__(self, delay_s: float = 0.0, status: int = 200):
        super().__init__()
        self.RequestHandlerClass = EndpointHandler
        self.delay_s = delay_s
        self.status = status
        self.received = 0  # every request, whatever it was answered

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/v1"


def assert_same_classes(classes: np.ndarray, logits: Any, tie: float = 1e-4) -> None:
    """``classes`` is the argmax of ``logits`` (K x H x W) computed on another code path: equal wherever the top two
    logits differ by more than ``tie``; where two classes tie within it, either may win (floating-point results of
    two paths agree to a tolerance, not bit for bit)."""
    import torch

    logits = torch.as_tensor(logits)
    top = logits.topk(2, dim=0).values
    decided = ((top[0] - top[1]) > tie).numpy()
    assert classes.shape == decided.shape
    expected = logits.argmax(0).numpy()
    wrong = decided & (classes != expected)
    assert not wrong.any(), f"{int(wrong.sum())} pixels differ where no two classes tie within {tie}"
    assert decided.mean() > 0.9, "almost every pixel is a tie: the comparison shows nothing"


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on (bound, then released): connections to it are refused."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def demo_data_yaml(index: TileIndex) -> str:
    """The ``dataset`` and ``tiling`` lines of a manifest over the small demo index (areas 1 and 3 train, 7 test)."""
    return (
        f"dataset: {{name: vaihingen, id: demo, root: {index.root.parent / 'raw'}, split: custom,\n"
        f'          custom_splits: {{train: ["1", "3"], test: ["7"]}}}}\n'
        f"tiling: {{size: 64, out: {index.root}}}"
    )


def demo_manifest(folder: Path, index: TileIndex) -> Path:
    """A run manifest over the small demo index in ``folder``."""
    manifest = folder / "run.yaml"
    manifest.write_text(f"name: tiny\n{demo_data_yaml(index)}\n")
    return manifest


# The ISPRS palette written out here, independently of segmenter.data.datasets.isprs: colour -> class index.
ISPRS_COLOURS = {(255, 255, 255): 0, (0, 0, 255): 1, (0, 255, 255): 2, (0, 255, 0): 3, (255, 255, 0): 4, (255, 0, 0): 5}


def decode_isprs(mask: np.ndarray, ignore: int = 255) -> np.ndarray:
    """An ISPRS colour mask as class indices, black and any other colour ``ignore`` (what a user checks by hand)."""
    classes = np.full(mask.shape[:2], ignore, dtype=np.uint8)
    for colour, index in ISPRS_COLOURS.items():
        classes[np.all(mask[..., :3] == colour, axis=-1)] = index
    return classes
