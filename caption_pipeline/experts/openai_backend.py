"""Any OpenAI-compatible chat-completions server: ``vllm serve``, SGLang, GPT-4o.

Requests run concurrently (at most ``concurrency`` in flight), are retried with exponential backoff and
jitter on 429, 5xx, connection errors and timeouts, and a request that still fails becomes a failed result.
The API key comes from the environment variable named by ``api_key_env`` and is sent only as a header.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import random
import threading
import time

import aiohttp

from caption_pipeline.experts.base import CaptionRequest, CaptionResult, chat_messages, image_data_url
from manifests.errors import InputError
from manifests.run_manifest import ExpertConfig

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0


class OpenAIExpert:
    """An expert served over the OpenAI chat-completions protocol."""

    backend = "openai"
    reprompts = True

    def __init__(self, config: ExpertConfig, backoff_s: float = 0.5) -> None:
        self.config = config
        # The caption gate may hand this expert two chunks at once and score one while the other is served.
        self.pipeline_chunk = 4 * config.concurrency
        self.name = config.name
        self.model = config.model
        self.backoff_s = backoff_s
        self.in_flight = 0
        self.max_in_flight = 0
        self._headers = {"Content-Type": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise InputError(
                    f"expert {config.name}: environment variable {config.api_key_env} (api_key_env) is not set"
                )
            self._headers["Authorization"] = f"Bearer {key}"
        # One event loop per expert, shared by every caller thread, so `concurrency` bounds the requests in
        # flight across all shard tasks of a run, not per task.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._limit: asyncio.Semaphore | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        assert self.config.base_url is not None
        return self.config.base_url.rstrip("/") + "/chat/completions"

    def generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name=f"expert-{self.name}", daemon=True).start()
                atexit.register(self.close)
            loop = self._loop
        # Each body (with its base64 image) is built here, in the caller's thread, and handed to the event loop at
        # once: the loop only does I/O, and the first requests go out while later images are still being encoded.
        futures = [asyncio.run_coroutine_threadsafe(self._one(self._body(request)), loop) for request in requests]
        return [future.result() for future in futures]

    def close(self) -> None:
        """Close the HTTP session and stop the expert's event loop (also run at interpreter exit)."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._session is not None:
            asyncio.run_coroutine_threadsafe(self._session.close(), loop).result(timeout=10)
            self._session = None
        loop.call_soon_threadsafe(loop.stop)

    def _client(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        """The HTTP session and the in-flight bound, made on first use inside the expert's event loop."""
        if self._session is None or self._limit is None:
            self._limit = asyncio.Semaphore(self.config.concurrency)
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.config.concurrency),
            )
        return self._session, self._limit

    def _body(self, request: CaptionRequest) -> bytes:
        temperature, seed = request.decoding(self.config.temperature)
        body = {
            "model": self.model,
            "messages": chat_messages(request, image_data_url(request.image_path, self.config.max_side)),
            "max_tokens": self.config.max_new_tokens,
            "temperature": temperature,
        }
        if seed is not None:  # OpenAI, vLLM and SGLang honour it (best effort on OpenAI's side)
            body["seed"] = seed
        return json.dumps(body).encode()

    def _delay(self, retry: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), MAX_BACKOFF_S)
            except ValueError:
                pass
        base = min(self.backoff_s * 2**retry, MAX_BACKOFF_S)
        return base + random.uniform(0, base)

    async def _one(self, body: bytes) -> CaptionResult:
        started = time.perf_counter()
        session, limit = self._client()
        error = "no attempt made"
        async with limit:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                for retry in range(self.config.max_retries + 1):
                    retry_after = None
                    try:
                        async with session.post(self.url, data=body) as response:
                            if response.status == 200:
                                return self._parse(await response.read(), started)
                            error = f"HTTP {response.status}: {(await response.text())[:200]}"
                            retry_after = response.headers.get("retry-after")
                            if response.status not in RETRY_STATUS:
                                break
                    except TimeoutError:
                        error = f"timed out after {self.config.timeout_s:g} s"
                    except aiohttp.ClientError as exc:
                        error = f"{type(exc).__name__}: {exc}"
                    if retry < self.config.max_retries:
                        await asyncio.sleep(self._delay(retry, retry_after))
            finally:
                self.in_flight -= 1
        return CaptionResult(None, None, None, time.perf_counter() - started, error=error)

    @staticmethod
    def _parse(raw: bytes, started: float) -> CaptionResult:
        latency = time.perf_counter() - started
        try:
            payload = json.loads(raw)
            choice = payload["choices"][0]
            content = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return CaptionResult(None, None, None, latency, error=f"malformed response: {exc!r}")
        usage = payload.get("usage") or {}
        return CaptionResult(content.strip(), choice.get("finish_reason"), usage.get("completion_tokens"), latency)
