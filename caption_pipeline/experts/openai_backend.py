"""Any OpenAI-compatible chat-completions server: ``vllm serve``, SGLang, GPT-4o.

Requests run concurrently (at most ``concurrency`` in flight), are retried with exponential backoff and
jitter on 429, 5xx, connection errors and timeouts (or after the wait the server asks for in ``retry-after-ms`` or
``Retry-After``), and a request that still fails becomes a failed result. An answer that no retry and no other
request can change (a rejected key, an unknown model or URL, a refused request field) before the expert has
answered anything stops the run with :class:`ExpertUnavailable` instead of failing every request one by one.
The API key comes from the environment variable named by ``api_key_env`` and is sent only as a header.

An expert may have several endpoints (``base_url`` a list of servers of the same model), each with ``concurrency``
slots. Each attempt goes to the endpoint with the fewest requests in flight, ties in turn. An endpoint that refuses a
connection, or fails ``FAILURE_STREAK`` attempts in a row (timeouts, 5xx, broken connections), is taken out for a
back-off that doubles with each outage in a row (capped); a failed attempt is retried at once on another endpoint
that is in. When the back-off ends one probe request goes there, and its success brings back all its slots. When
every endpoint is out, requests go to them anyway, paced by their own retry delays, as with a single endpoint.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import email.utils
import json
import math
import os
import random
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from pydantic import BaseModel, Field, ValidationError

from caption_pipeline.experts.base import (
    CaptionRequest,
    CaptionResult,
    Expert,
    ExpertUnavailable,
    chat_messages,
    image_data_url,
)
from manifests.errors import InputError
from manifests.redaction import has_credentials, mask_secrets, redact, strip_credentials, url_secrets
from manifests.run_manifest import OpenAIExpertConfig

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# Answers that mean no request of this expert can succeed, as long as none has: the key or the model/URL is wrong.
UNAVAILABLE_STATUS = {
    401: "the server rejected the API key",
    403: "the server refused access with this API key",
    404: "no such model or endpoint: check model and base_url (OpenAI-compatible servers usually end it in /v1)",
}
MAX_BACKOFF_S = 30.0
# An endpoint is taken out after this many failed attempts in a row (at once for a refused connection) ...
FAILURE_STREAK = 3
# ... for this long, doubled with each outage in a row up to MAX_BACKOFF_S.
ENDPOINT_BACKOFF_S = 1.0
# How a 400 says that a request field is not accepted (OpenAI: "Unsupported parameter: 'max_tokens' ...", pydantic
# servers: "Extra inputs are not permitted"). A 400 that merely names the field, such as vLLM's "'max_tokens' ... is
# too large" for a long prompt, is a failure of that request only.
_REFUSED_FIELD = re.compile(r"unsupported|not supported|unrecognized|unknown|extra (inputs|fields)|not permitted")
MESSAGE_CHARS = 200
# The sampling fields of the OpenAI chat-completions API (`sampling_fields: standard`); vLLM and SGLang read more.
STANDARD_SAMPLING_FIELDS = frozenset({"temperature", "top_p", "seed"})
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
    (
        re.compile(r"(unrecognized|unsupported|unknown|not permitted).{0,60}(top_k|min_p|repetition_penalty)", re.I),
        "set sampling_fields: standard on this expert: the server takes only the OpenAI API's sampling fields",
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
    if not key.isprintable() or key != key.strip():
        # a header cannot carry it: aiohttp would stop the run with a traceback at the first request
        raise InputError(
            f"expert {config.name}: environment variable {config.api_key_env} (api_key_env) holds white space or a "
            "control character (a pasted newline?); set it to the key alone"
        )
    return key


@dataclass(frozen=True)
class EndpointStats:
    """What one endpoint of an expert did: attempts sent, attempts without an answer of 200, and outages."""

    url: str
    requests: int = 0
    failures: int = 0
    taken_out: int = 0

    def __sub__(self, other: EndpointStats) -> EndpointStats:
        return EndpointStats(
            self.url, self.requests - other.requests, self.failures - other.failures, self.taken_out - other.taken_out
        )

    def __add__(self, other: EndpointStats) -> EndpointStats:
        return EndpointStats(
            self.url, self.requests + other.requests, self.failures + other.failures, self.taken_out + other.taken_out
        )

    def describe(self) -> str:
        """One phrase: the URL and its counts."""
        return f"{self.url}: {self.requests} requests, {self.failures} failed, taken out {self.taken_out}x"


class Endpoint:
    """One server of an expert: its URL, its requests in flight and its health. Touched only in the event loop."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.url = base_url.rstrip("/") + "/chat/completions"  # what requests go to (aiohttp sends its userinfo)
        self.shown_url = strip_credentials(self.url)  # what messages, rows and logs name
        self.in_flight = 0
        self.requests = 0
        self.failures = 0
        self.taken_out = 0
        self.streak = 0  # failed attempts in a row
        self.outages = 0  # outages in a row (no success in between): the back-off's exponent
        self.down_until = 0.0  # time.monotonic() at which the back-off ends
        self.probing = False  # back from an outage without a success yet

    def is_in(self, now: float) -> bool:
        """Whether the endpoint takes requests at ``now`` (not taken out after failures)."""
        return now >= self.down_until

    def stats(self) -> EndpointStats:
        """Its counts so far."""
        return EndpointStats(strip_credentials(self.base_url), self.requests, self.failures, self.taken_out)


class EndpointPool:
    """The endpoints of an expert: which one the next attempt goes to, and which are out for a back-off.

    Not thread-safe: used only inside the expert's event loop, where no two callers interleave between awaits.
    """

    def __init__(self, urls: Sequence[str], concurrency: int, backoff_s: float = ENDPOINT_BACKOFF_S) -> None:
        self.endpoints = [Endpoint(url) for url in urls]
        self.concurrency = concurrency
        self.backoff_s = backoff_s
        self._turn = 0  # where the round-robin among equally loaded endpoints starts next
        self._changed: asyncio.Event | None = None

    def pick(self, avoid: Endpoint | None = None, now: float | None = None) -> Endpoint | None:
        """The endpoint for the next attempt, its slot taken; None while every eligible endpoint is full.

        Eligible are the endpoints that are in (all of them while none is), except ``avoid`` (the endpoint the
        request just failed on) where another is eligible. Fewest in flight wins; ties go round-robin.
        """
        now = time.monotonic() if now is None else now
        live = [endpoint for endpoint in self.endpoints if endpoint.is_in(now)] or self.endpoints
        if avoid is not None and len(live) > 1:
            live = [endpoint for endpoint in live if endpoint is not avoid]
        free = [endpoint for endpoint in live if endpoint.in_flight < self._slots(endpoint, now)]
        if not free:
            return None
        count = len(self.endpoints)
        order = {id(endpoint): (number - self._turn) % count for number, endpoint in enumerate(self.endpoints)}
        chosen = min(free, key=lambda endpoint: (endpoint.in_flight, order[id(endpoint)]))
        self._turn = (self.endpoints.index(chosen) + 1) % count
        chosen.in_flight += 1
        chosen.requests += 1
        return chosen

    def _slots(self, endpoint: Endpoint, now: float) -> int:
        # A probe: one request to an endpoint back from an outage, while another could take the rest. A lone endpoint
        # keeps all its slots, as the expert behaved before endpoints backed off.
        if endpoint.probing and endpoint.is_in(now) and len(self.endpoints) > 1:
            return 1
        return self.concurrency

    async def acquire(self, avoid: Endpoint | None = None) -> Endpoint:
        """An endpoint with its slot taken, waiting for a slot to free or a back-off to end where none is free."""
        while True:
            endpoint = self.pick(avoid)
            if endpoint is not None:
                return endpoint
            now = time.monotonic()
            ends = [endpoint.down_until - now for endpoint in self.endpoints if not endpoint.is_in(now)]
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            with contextlib.suppress(TimeoutError):  # a back-off ended: look again
                await asyncio.wait_for(changed.wait(), min(ends) if ends else None)

    def release(self, endpoint: Endpoint, ok: bool, health: str | None = None) -> None:
        """Give the slot back, with the outcome of the attempt.

        Args:
            ok: the server answered 200.
            health: for a failure, whether it says the endpoint is unwell: ``"down"`` (a refused connection: out at
                once), ``"failing"`` (a timeout, a 5xx, a broken connection: out after FAILURE_STREAK in a row) or
                None (an answer about this request only, such as a 400 or 429).
        """
        endpoint.in_flight -= 1
        if ok:
            endpoint.streak = endpoint.outages = 0
            endpoint.probing = False
        else:
            endpoint.failures += 1
            if health is not None:
                endpoint.streak += 1
                now = time.monotonic()
                if endpoint.is_in(now) and (health == "down" or endpoint.probing or endpoint.streak >= FAILURE_STREAK):
                    self._take_out(endpoint, now)
        if self._changed is not None:  # wake every waiter: one new Event per change, so no wake-up is lost
            self._changed.set()
            self._changed = None

    def _take_out(self, endpoint: Endpoint, now: float) -> None:
        endpoint.down_until = now + min(self.backoff_s * 2**endpoint.outages, MAX_BACKOFF_S)
        endpoint.outages += 1
        endpoint.taken_out += 1
        endpoint.streak = 0
        endpoint.probing = True

    def has_other_in(self, endpoint: Endpoint) -> bool:
        """Whether an endpoint other than ``endpoint`` is in (a failed attempt is then retried at once)."""
        now = time.monotonic()
        return any(other is not endpoint and other.is_in(now) for other in self.endpoints)


class _ReplyMessage(BaseModel):
    content: str | None = None


class _ReplyChoice(BaseModel):
    message: _ReplyMessage
    finish_reason: str | None = None


class _ReplyUsage(BaseModel):
    completion_tokens: int | None = None


class ChatReply(BaseModel):
    """What the expert reads of a chat-completions reply: the first choice's text and finish reason, and the tokens it
    took. Anything else in the reply is ignored; a reply that is not JSON, has no choice, or whose text is not a
    string, whose ``usage`` is not an object or whose ``finish_reason`` is not a string is a failed attempt."""

    choices: list[_ReplyChoice] = Field(min_length=1)
    usage: _ReplyUsage | None = None


class OpenAIExpert(Expert):
    """An expert served over the OpenAI chat-completions protocol."""

    backend = "openai"
    reprompts = True
    needs_class_mask = False
    pipeline_chunk: int | None  # 4 * the slots of all endpoints, set per instance

    @classmethod
    def preflight(cls, config: OpenAIExpertConfig) -> None:
        """Refuse an expert whose ``api_key_env`` names an environment variable that is not set.

        Raises:
            InputError: the variable is not set.
        """
        api_key(config)

    def __init__(
        self, config: OpenAIExpertConfig, backoff_s: float = 0.5, endpoint_backoff_s: float = ENDPOINT_BACKOFF_S
    ) -> None:
        """
        Args:
            config: the expert's manifest entry.
            backoff_s: the first retry delay of a request (doubled per retry, with jitter).
            endpoint_backoff_s: how long an unwell endpoint is first taken out (doubled per outage in a row).
        """
        self.config = config
        self.pool = EndpointPool(config.endpoints, config.concurrency, endpoint_backoff_s)
        self.slots = config.concurrency * len(self.pool.endpoints)
        # The caption gate may hand this expert two chunks at once and score one while the other is served.
        self.pipeline_chunk = 4 * self.slots
        self.name = config.name
        self.model = config.model
        self.backoff_s = backoff_s
        self.in_flight = 0
        self.max_in_flight = 0
        self._headers = {"Content-Type": "application/json"}
        self._api_key = api_key(config)
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"
        # What a server may echo of what it was sent, in any reply: masked in captions, errors and logs alike.
        self._secrets = [self._api_key or "", *(secret for url in config.endpoints for secret in url_secrets(url))]
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
        """The chat-completions URL of the first endpoint, without credentials (the form to show)."""
        return self.pool.endpoints[0].shown_url

    def endpoint_stats(self) -> list[EndpointStats]:
        """Per endpoint, in the manifest's order: attempts sent, failed, times taken out, since the expert was built.

        Read from any thread: each count is one int, so a snapshot may straddle an attempt but never tears a count.
        """
        return [endpoint.stats() for endpoint in self.pool.endpoints]

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
            # A request holds its place from its first attempt to its last, retry delays included (as with one
            # endpoint: a failing server is not sent more requests than it has slots); each attempt also holds a slot
            # of the endpoint it goes to (EndpointPool), which bounds what each server sees to `concurrency`.
            self._limit = asyncio.Semaphore(self.slots)
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.slots),
            )
        return self._session, self._limit

    def _body(self, request: CaptionRequest) -> bytes:
        # Every sampling field the expert means, so `vllm serve` fills none from the model's generation config;
        # `standard` keeps those the OpenAI API takes (its seed is best effort).
        sampling = request.sampling(self.config).vllm_fields()
        if self.config.sampling_fields == "standard":
            sampling = {name: value for name, value in sampling.items() if name in STANDARD_SAMPLING_FIELDS}
        body = {
            "model": self.model,
            "messages": chat_messages(request, image_data_url(request.image_path, self.config.max_side)),
            self.config.token_limit_field: self.config.max_new_tokens,
            **sampling,
        }
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
        failed_on: Endpoint | None = None
        async with limit:
            for retry in range(self.config.max_retries + 1):
                self._raise_if_unavailable()
                endpoint = await self.pool.acquire(avoid=failed_on)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                headers, ok, health, final = None, False, None, False
                try:
                    async with session.post(endpoint.url, data=body) as response:
                        if response.status == 200:
                            ok = self._succeeded = True
                            return self._parse(await response.read(), started, endpoint.shown_url)
                        text = (await response.read()).decode("utf-8", errors="replace")
                        error = f"HTTP {response.status}: {self._message(text)}{server_hint(response.status, text)}"
                        self._check_available(response.status, text, endpoint.shown_url)
                        headers = response.headers
                        health = "failing" if response.status >= 500 else None
                        final = response.status not in RETRY_STATUS
                # aiohttp raises asyncio.TimeoutError: the builtin since Python 3.11, the minimum the package
                # declares (on 3.10 it was another class, which this clause would miss).
                except TimeoutError:
                    error = f"timed out after {self.config.timeout_s:g} s ({endpoint.shown_url})"
                    health = "failing"
                except aiohttp.ClientConnectorError as exc:  # refused, unreachable, unknown host
                    error = f"{type(exc).__name__} ({endpoint.shown_url}): {redact(str(exc), self._secrets)}"
                    health = "down"
                except aiohttp.ClientError as exc:
                    error = f"{type(exc).__name__} ({endpoint.shown_url}): {redact(str(exc), self._secrets)}"
                    health = "failing"
                finally:
                    self.in_flight -= 1
                    self.pool.release(endpoint, ok, health)
                if final:
                    break
                failed_on = endpoint
                # Another endpoint that is in takes the retry at once; a lone or failing server gets its delay.
                if retry < self.config.max_retries and not self.pool.has_other_in(endpoint):
                    await asyncio.sleep(self._delay(retry, headers))
        return CaptionResult(None, None, None, time.perf_counter() - started, error=error)

    def _check_available(self, status: int, text: str, url: str) -> None:
        """Stop the expert on an answer that means none of its requests can succeed.

        Only before the first success: once a request has gone through, the key, model and fields are evidently
        accepted, and a later 401/403/404/400 is a failure of that request alone.

        Raises:
            ExpertUnavailable: the answer shows the expert unavailable; every other request is cancelled.
        """
        if self._succeeded:
            return
        field = self.config.token_limit_field
        where = f"expert {self.name}: {url} answered HTTP {status} before any success ({self._message(text)})"
        if status in UNAVAILABLE_STATUS:
            hint = UNAVAILABLE_STATUS[status]
            if status in (401, 403):
                hint += self._credentials_hint()
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

    def _credentials_hint(self) -> str:
        """Which credentials the refused requests carried: the key's variable, the URL's, or none."""
        if self.config.api_key_env:
            return f" in {self.config.api_key_env} (api_key_env)"
        if any(has_credentials(url) for url in self.config.endpoints):
            return " (here the user:password of base_url, sent as a Basic header)"
        return "; the expert sends no key: set api_key_env"

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
        # some servers echo what they were sent: the key and the URL's credentials must not reach logs or stores
        return " ".join(redact(text, self._secrets).split())[:MESSAGE_CHARS]

    def _parse(self, raw: bytes, started: float, url: str) -> CaptionResult:
        """A reply of 200 as a caption, or, where it does not follow :class:`ChatReply`, a failed result that says
        what was wrong and what was received (its start, credentials masked)."""
        latency = time.perf_counter() - started
        try:
            reply = ChatReply.model_validate_json(raw)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(part) for part in problem["loc"]) or "reply"
            received = self._message(raw.decode("utf-8", errors="replace"))
            error = f"malformed reply from {url}: {where}: {problem['msg']} (received: {received})"
            return CaptionResult(None, None, None, latency, error=error)
        choice = reply.choices[0]
        tokens = reply.usage.completion_tokens if reply.usage is not None else None
        caption = mask_secrets((choice.message.content or "").strip(), self._secrets)  # one that echoes a header
        return CaptionResult(caption, choice.finish_reason, tokens, latency)
