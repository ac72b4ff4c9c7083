"""Any OpenAI-compatible chat-completions server: ``vllm serve``, SGLang, GPT-4o.

Requests run concurrently (at most ``concurrency`` in flight), are retried with exponential backoff and
jitter on 429, 5xx, connection errors and timeouts (or after the wait the server asks for in ``retry-after-ms`` or
``Retry-After``), and a request that still fails becomes a failed result. An answer that no retry and no other
request can change (a rejected key, an unknown model or URL, a refused request field) before the expert has
answered anything stops the run with :class:`ExpertUnavailable` instead of failing every request one by one.
The API key comes from the environment variable named by ``api_key_env`` and is sent only as a header.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import email.utils
import json
import math
import os
import random
import re
import threading
import time
from collections.abc import Mapping, Sequence

import aiohttp

from caption_pipeline.experts.base import (
    CaptionRequest,
    CaptionResult,
    ExpertUnavailable,
    chat_messages,
    image_data_url,
)
from manifests.errors import InputError
from manifests.run_manifest import OpenAIExpertConfig

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# Answers that mean no request of this expert can succeed, as long as none has: the key or the model/URL is wrong.
UNAVAILABLE_STATUS = {
    401: "the server rejected the API key",
    403: "the server refused access with this API key",
    404: "no such model or endpoint: check model and base_url (OpenAI-compatible servers usually end it in /v1)",
}
MAX_BACKOFF_S = 30.0
# How a 400 says that a request field is not accepted (OpenAI: "Unsupported parameter: 'max_tokens' ...", pydantic
# servers: "Extra inputs are not permitted"). A 400 that merely names the field, such as vLLM's "'max_tokens' ... is
# too large" for a long prompt, is a failure of that request only.
_REFUSED_FIELD = re.compile(r"unsupported|not supported|unrecognized|unknown|extra (inputs|fields)|not permitted")
MESSAGE_CHARS = 200
# What `vllm serve` answers with a 400 when one of its options, not the request, is what must change.
SERVER_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"at most \d+ image|maximum number of images|limit_mm_per_prompt|limit-mm-per-prompt", re.I),
        "start `vllm serve` with --limit-mm-per-prompt '{\"image\": 1}' (one image per prompt)",
    ),
    (
        re.compile(r"maximum context length|max_model_len|longer than the maximum model length", re.I),
        "start `vllm serve` with a larger --max-model-len, or lower max_side / max_new_tokens of this expert",
    ),
    (
        re.compile(r"not a multimodal model|does not support (image|multimodal|vision)", re.I),
        "serve a vision-language model: this one takes no images",
    ),
)


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked the client to wait, or None where it asked nothing usable.

    ``retry-after-ms`` (OpenAI, milliseconds) wins over ``Retry-After`` (seconds or an HTTP date, RFC 9110).

    Args:
        headers: the response headers; lookups must be case-insensitive as aiohttp's are.
        now: the POSIX time an HTTP date is measured from (the current time unless given).

    Returns:
        A finite wait of at least 0 s, uncapped; None for absent, negative or unparseable values.
    """
    milliseconds = _finite(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return seconds
    try:  # a server's header is not trusted to be a date the parser can handle
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        if parsed[9] is None:  # RFC 9110 dates are GMT; an obsolete form without a zone is read as GMT, not local
            parsed = (*parsed[:9], 0)
        when = email.utils.mktime_tz(parsed)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _finite(value: str | None) -> float | None:
    try:
        number = float(value) if value else math.nan
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def server_hint(status: int, text: str) -> str:
    """For a 400 that a server option fixes, `` (fix: ...)`` naming the option; else nothing."""
    if status != 400:
        return ""
    return next((f" (fix: {hint})" for pattern, hint in SERVER_HINTS if pattern.search(text)), "")


def api_key(config: OpenAIExpertConfig) -> str | None:
    """The expert's API key from the environment variable ``api_key_env`` names (None when it names none).

    Raises:
        InputError: the variable is not set (checked before a run starts, and again where the expert is built).
    """
    if not config.api_key_env:
        return None
    key = os.environ.get(config.api_key_env)
    if not key:
        raise InputError(f"expert {config.name}: environment variable {config.api_key_env} (api_key_env) is not set")
    return key


class OpenAIExpert:
    """An expert served over the OpenAI chat-completions protocol."""

    backend = "openai"
    reprompts = True
    needs_class_mask = False
    pipeline_chunk: int | None  # 4 * concurrency, set per instance

    def __init__(self, config: OpenAIExpertConfig, backoff_s: float = 0.5) -> None:
        self.config = config
        # The caption gate may hand this expert two chunks at once and score one while the other is served.
        self.pipeline_chunk = 4 * config.concurrency
        self.name = config.name
        self.model = config.model
        self.backoff_s = backoff_s
        self.in_flight = 0
        self.max_in_flight = 0
        self._headers = {"Content-Type": "application/json"}
        self._api_key = api_key(config)
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"
        # One event loop per expert, shared by every caller thread, so `concurrency` bounds the requests in
        # flight across all shard tasks of a run, not per task.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._limit: asyncio.Semaphore | None = None
        self._session: aiohttp.ClientSession | None = None
        # Touched only inside the event loop: whether any request got a 200, the requests in flight or queued
        # (cancelled together once the expert is found unavailable), and why it is; `_unavailable` is also read by
        # caller threads, after a future of the loop has handed it over.
        self._succeeded = False
        self._tasks: set[asyncio.Task] = set()
        self._unavailable: str | None = None

    @property
    def url(self) -> str:
        assert self.config.base_url is not None
        return self.config.base_url.rstrip("/") + "/chat/completions"

    def generate(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """Captions for ``requests``, in order; a request that fails after its retries gives a failed result.

        Raises:
            ExpertUnavailable: the server answered 401, 403 or 404, or refused the token-limit field, before this
                expert had any successful answer (for this batch or any batch of another caller thread); the
                remaining requests are cancelled rather than waited for.
        """
        self._raise_if_unavailable()
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name=f"expert-{self.name}", daemon=True).start()
                atexit.register(self.close)
            loop = self._loop
        # Each body (with its base64 image) is built here, in the caller's thread, and handed to the event loop at
        # once: the loop only does I/O, and the first requests go out while later images are still being encoded.
        futures: list[concurrent.futures.Future[CaptionResult]] = []
        for request in requests:
            self._raise_if_unavailable(futures)  # no point encoding the rest of a batch that cannot be sent
            futures.append(asyncio.run_coroutine_threadsafe(self._one(self._body(request)), loop))
        results: list[CaptionResult] = []
        for future in futures:
            try:
                results.append(future.result())
            except (ExpertUnavailable, concurrent.futures.CancelledError, asyncio.CancelledError):
                # The loop cancels every request once one answer shows the expert unavailable; a request it
                # cancelled before it started ends cancelled, not with the error, so the reason is re-read here.
                if self._unavailable is None:
                    raise
                self._raise_if_unavailable(futures)
        return results

    def _raise_if_unavailable(self, futures: Sequence[concurrent.futures.Future] = ()) -> None:
        """Raise a fresh ExpertUnavailable (one exception per raise: tracebacks must not be shared) if the expert is.

        Args:
            futures: requests of this caller still pending, cancelled first.
        """
        reason = self._unavailable
        if reason is not None:
            for future in futures:
                future.cancel()
            # `from None`: raised while handling a cancelled request, whose CancelledError says nothing more.
            raise ExpertUnavailable(reason) from None

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
            self.config.token_limit_field: self.config.max_new_tokens,
            "temperature": temperature,
        }
        if seed is not None:  # OpenAI, vLLM and SGLang honour it (best effort on OpenAI's side)
            body["seed"] = seed
        return json.dumps(body).encode()

    def _delay(self, retry: int, headers: Mapping[str, str] | None) -> float:
        """Seconds to wait before retry ``retry`` + 1: what the server asked for, else exponential with jitter."""
        asked = retry_after_s(headers) if headers is not None else None
        if asked is not None:
            return min(asked, MAX_BACKOFF_S)
        base = min(self.backoff_s * 2**retry, MAX_BACKOFF_S)
        return base + random.uniform(0, base)

    async def _one(self, body: bytes) -> CaptionResult:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await self._attempts(body)
        finally:
            self._tasks.discard(task)

    async def _attempts(self, body: bytes) -> CaptionResult:
        started = time.perf_counter()
        session, limit = self._client()
        error = "no attempt made"
        async with limit:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                for retry in range(self.config.max_retries + 1):
                    self._raise_if_unavailable()
                    headers = None
                    try:
                        async with session.post(self.url, data=body) as response:
                            if response.status == 200:
                                self._succeeded = True
                                return self._parse(await response.read(), started)
                            text = (await response.read()).decode("utf-8", errors="replace")
                            error = f"HTTP {response.status}: {self._message(text)}{server_hint(response.status, text)}"
                            self._check_available(response.status, text)
                            headers = response.headers
                            if response.status not in RETRY_STATUS:
                                break
                    # aiohttp raises asyncio.TimeoutError: the builtin since Python 3.11, the minimum the package
                    # declares (on 3.10 it was another class, which this clause would miss).
                    except TimeoutError:
                        error = f"timed out after {self.config.timeout_s:g} s ({self.url})"
                    except aiohttp.ClientError as exc:
                        error = f"{type(exc).__name__} ({self.url}): {exc}"
                    if retry < self.config.max_retries:
                        await asyncio.sleep(self._delay(retry, headers))
            finally:
                self.in_flight -= 1
        return CaptionResult(None, None, None, time.perf_counter() - started, error=error)

    def _check_available(self, status: int, text: str) -> None:
        """Stop the expert on an answer that means none of its requests can succeed.

        Only before the first success: once a request has gone through, the key, model and fields are evidently
        accepted, and a later 401/403/404/400 is a failure of that request alone.

        Raises:
            ExpertUnavailable: the answer shows the expert unavailable; every other request is cancelled.
        """
        if self._succeeded:
            return
        field = self.config.token_limit_field
        where = f"expert {self.name}: {self.url} answered HTTP {status} before any success ({self._message(text)})"
        if status in UNAVAILABLE_STATUS:
            hint = UNAVAILABLE_STATUS[status]
            if status in (401, 403):
                hint += (
                    f" in {self.config.api_key_env} (api_key_env)"
                    if self.config.api_key_env
                    else "; the expert sends no key: set api_key_env"
                )
            reason = f"{where}: {hint}"
        elif status == 400 and field in text and _REFUSED_FIELD.search(text.lower()):
            other = "max_completion_tokens" if field == "max_tokens" else "max_tokens"
            reason = (
                f"{where}: the server refuses the field '{field}'; "
                f"set token_limit_field: {other} on this expert in the manifest"
            )
        else:
            return
        self._unavailable = reason
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        raise ExpertUnavailable(reason)

    def _message(self, text: str) -> str:
        """The start of a server's error answer on one line, its ``error.message`` where it is JSON, key masked."""
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            error = payload.get("error", payload.get("detail", payload.get("message")))
            if isinstance(error, dict):
                error = error.get("message", error)
            if error is not None:
                text = error if isinstance(error, str) else json.dumps(error)
        if self._api_key:  # some servers echo what they were sent; the key must not reach logs or caption stores
            text = text.replace(self._api_key, "***")
        return " ".join(text.split())[:MESSAGE_CHARS]

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
