"""The ``openai`` backend against a local OpenAI-compatible chat-completions server started by the test."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from caption_pipeline.experts.base import CaptionRequest
from caption_pipeline.experts.openai_backend import OpenAIExpert
from manifests.errors import InputError
from manifests.run_manifest import ExpertConfig

SECRET = "sk-test-SECRET-4242"


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: Counter[str] = Counter()
        self.image_sizes: list[tuple[int, int]] = []
        self.auth_headers: set[str] = set()
        self.bodies: list[dict] = []  # every request body without its messages, plus the prompt text


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args):  # keep test output quiet
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        prompt = next(part["text"] for part in content if part["type"] == "text")
        url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
        server = self.server
        with server.lock:
            server.calls[prompt] += 1
            calls = server.calls[prompt]
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            server.auth_headers.add(self.headers.get("Authorization", ""))
            server.bodies.append({**{key: value for key, value in body.items() if key != "messages"}, "prompt": prompt})
            assert url.startswith("data:image/png;base64,")
            with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
                server.image_sizes.append(image.size)
        # The request leaves the server's count before its reply is written: the client may send its next request
        # as soon as it reads the reply, and counting both would be the server's race, not the client's bound.
        try:
            time.sleep(0.05)
            if prompt == "hang":
                time.sleep(3)
            choice = {"message": {"content": f" caption for {prompt} "}, "finish_reason": "stop"}
            status, payload = 200, {"choices": [choice], "usage": {"completion_tokens": 4}}
            if prompt == "fail":
                status, payload = 500, {"error": "boom"}
            if prompt == "bad request":
                status, payload = 400, {"error": "no"}
            if prompt == "flaky" and calls == 1:
                status, payload = 429, {"error": "slow down"}
            if prompt == "flaky" and calls == 2:
                status, payload = 503, {"error": "busy"}
        finally:
            with server.lock:
                server.in_flight -= 1
        self._reply(status, payload)


@pytest.fixture
def server():
    chat = ChatServer()
    thread = threading.Thread(target=chat.serve_forever, daemon=True)
    thread.start()
    yield chat
    chat.shutdown()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "tile.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(path)
    return path


def expert(server, monkeypatch, **overrides) -> OpenAIExpert:
    monkeypatch.setenv("TEST_CHAT_KEY", SECRET)
    settings = {"name": "gpt", "backend": "openai", "model": "gpt-4o", "base_url": f"http://127.0.0.1:{server.server_port}/v1",
                "api_key_env": "TEST_CHAT_KEY", "max_side": 128, "concurrency": 3, "timeout_s": 5.0, "max_retries": 3,
                **overrides}  # fmt: skip
    return OpenAIExpert(ExpertConfig(**settings), backoff_s=0.01)


def test_concurrency_bound_and_base64_images(server, monkeypatch, image):
    backend = expert(server, monkeypatch)
    results = backend.generate([CaptionRequest(f"t{i}", image, f"prompt {i}") for i in range(12)])
    assert [r.caption for r in results] == [f"caption for prompt {i}" for i in range(12)]
    assert server.max_in_flight == 3 and backend.max_in_flight == 3
    assert set(server.image_sizes) == {(128, 85)}  # resized to max_side before sending
    assert server.auth_headers == {f"Bearer {SECRET}"}
    assert results[0].finish_reason == "stop" and results[0].n_generated == 4


def test_temperature_and_seed_of_each_request_reach_the_server(server, monkeypatch, image):
    backend = expert(server, monkeypatch, temperature=0.2)
    backend.generate([CaptionRequest("a", image, "first", temperature=0.0, seed=0),
                      CaptionRequest("a", image, "again", temperature=0.7, seed=2),
                      CaptionRequest("b", image, "plain")])  # fmt: skip
    bodies = {body["prompt"]: body for body in server.bodies}
    assert (bodies["first"]["temperature"], bodies["first"]["seed"]) == (0.0, 0)
    assert (bodies["again"]["temperature"], bodies["again"]["seed"]) == (0.7, 2)
    assert bodies["plain"]["temperature"] == 0.2 and "seed" not in bodies["plain"]  # the expert's own settings


def test_429_and_5xx_are_retried(server, monkeypatch, image):
    [result] = expert(server, monkeypatch).generate([CaptionRequest("t", image, "flaky")])
    assert result.caption == "caption for flaky" and result.error is None
    assert server.calls["flaky"] == 3


def test_hanging_request_times_out_and_the_batch_goes_on(server, monkeypatch, image):
    backend = expert(server, monkeypatch, timeout_s=0.5, max_retries=1)
    results = backend.generate([CaptionRequest("a", image, "hang"), CaptionRequest("b", image, "fine")])
    assert results[0].caption is None and "timed out after 0.5 s" in results[0].error
    assert results[1].caption == "caption for fine"
    assert server.calls["hang"] == 2


def test_permanent_failures_are_recorded_without_stopping(server, monkeypatch, image):
    backend = expert(server, monkeypatch, max_retries=2)
    results = backend.generate([CaptionRequest("a", image, "fail"), CaptionRequest("b", image, "bad request"),
                                CaptionRequest("c", image, "fine")])  # fmt: skip
    assert results[0].error.startswith("HTTP 500") and server.calls["fail"] == 3
    assert results[1].error.startswith("HTTP 400") and server.calls["bad request"] == 1  # not retried
    assert results[2].caption == "caption for fine"


def test_connection_refused_is_an_error_result(monkeypatch, image):
    monkeypatch.setenv("TEST_CHAT_KEY", SECRET)
    config = ExpertConfig(name="gpt", backend="openai", model="m", base_url="http://127.0.0.1:9/v1",
                          api_key_env="TEST_CHAT_KEY", max_retries=1)  # fmt: skip
    [result] = OpenAIExpert(config, backoff_s=0.01).generate([CaptionRequest("a", image, "x")])
    assert result.caption is None and "Connect" in result.error


def test_missing_api_key_variable(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    config = ExpertConfig(name="gpt", backend="openai", model="m", base_url="http://x", api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(InputError, match="environment variable NO_SUCH_KEY_VAR"):
        OpenAIExpert(config)


def test_concurrency_bound_holds_across_caller_threads(server, monkeypatch, image):
    from concurrent.futures import ThreadPoolExecutor

    backend = expert(server, monkeypatch, concurrency=4)
    batches = [[CaptionRequest(f"t{b}-{i}", image, f"p{b}-{i}") for i in range(6)] for b in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(backend.generate, batches))
    assert all(r.caption for batch in results for r in batch)
    assert server.max_in_flight == 4
