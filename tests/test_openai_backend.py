"""The ``openai`` backend against a local OpenAI-compatible chat-completions server started by the test."""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from email.utils import format_datetime, parsedate_to_datetime

import pytest
from multidict import CIMultiDict
from PIL import Image

from caption_pipeline.experts import base, openai_backend
from caption_pipeline.experts.base import CaptionRequest, DataUrlCache, ExpertUnavailable, image_data_url
from caption_pipeline.experts.openai_backend import MAX_BACKOFF_S, OpenAIExpert, retry_after_s
from manifests.errors import InputError
from manifests.run_manifest import OpenAIExpertConfig
from tests.helpers import SECRET, ChatHandler, ChatServer, serving

ENCODE = base._encode  # the real encoder, for comparisons that must not count as the cache's work


@pytest.fixture
def server():
    with serving(ChatServer()) as chat:
        yield chat


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "tile.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(path)
    return path


def expert(server, monkeypatch, backoff_s: float = 0.01, **overrides) -> OpenAIExpert:
    monkeypatch.setenv("TEST_CHAT_KEY", SECRET)
    settings = {"name": "gpt", "backend": "openai", "model": "gpt-4o", "base_url": f"http://127.0.0.1:{server.server_port}/v1",
                "api_key_env": "TEST_CHAT_KEY", "max_side": 128, "concurrency": 3, "timeout_s": 5.0, "max_retries": 3,
                **overrides}  # fmt: skip
    return OpenAIExpert(OpenAIExpertConfig(**settings), backoff_s=backoff_s)


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


def test_every_sampling_field_reaches_the_server(server, monkeypatch, image):
    """vllm serve fills each field a request leaves unset from the model's generation_config.json (Qwen2.5-VL:
    top_k 1, repetition_penalty 1.05): the body carries all of them, off unless the manifest sets them."""
    expert(server, monkeypatch).generate([CaptionRequest("a", image, "again", temperature=0.7, seed=2)])
    expert(server, monkeypatch, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1).generate(
        [CaptionRequest("a", image, "tuned", temperature=0.7, seed=2)]
    )
    bodies = {body["prompt"]: body for body in server.bodies}
    fields = ("temperature", "seed", "top_p", "top_k", "min_p", "repetition_penalty")
    assert [bodies["again"][name] for name in fields] == [0.7, 2, 1.0, -1, 0.0, 1.0]  # top-k off is -1 for vLLM
    assert [bodies["tuned"][name] for name in fields] == [0.7, 2, 0.9, 40, 0.05, 1.1]


def test_standard_sampling_fields_for_the_openai_api(server, monkeypatch, image):
    expert(server, monkeypatch, sampling_fields="standard", top_p=0.8).generate(
        [CaptionRequest("a", image, "openai", temperature=0.7, seed=2)]
    )
    [body] = server.bodies
    assert {key: body[key] for key in ("temperature", "seed", "top_p")} == {"temperature": 0.7, "seed": 2, "top_p": 0.8}
    assert not {"top_k", "min_p", "repetition_penalty"} & set(body)
    with pytest.raises(ValueError, match=r"expert gpt: sampling_fields standard sends no top_k: 40, repetition_penal"):
        expert(server, monkeypatch, sampling_fields="standard", top_k=40, repetition_penalty=1.2)


class OpenAIApiHandler(ChatHandler):
    """Answers as the OpenAI API does to a field it does not know."""

    def _answer(self, prompt: str, calls: int, body: dict) -> tuple[int, dict, dict[str, str]]:
        unknown = sorted({"top_k", "min_p", "repetition_penalty"} & set(body))
        if unknown:
            message = f"Unrecognized request argument supplied: {unknown[0]}"
            return 400, {"error": {"message": message, "type": "invalid_request_error"}}, {}
        return super()._answer(prompt, calls, body)


def test_a_server_that_refuses_the_extended_fields_names_the_setting(server, monkeypatch, image):
    server.RequestHandlerClass = OpenAIApiHandler
    [result] = expert(server, monkeypatch).generate([CaptionRequest("a", image, "any")])
    assert result.caption is None and "HTTP 400: Unrecognized request argument supplied: min_p" in result.error
    assert "(fix: set sampling_fields: standard on this expert" in result.error
    [result] = expert(server, monkeypatch, sampling_fields="standard").generate([CaptionRequest("a", image, "any")])
    assert result.caption == "caption for any"


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
    config = OpenAIExpertConfig(name="gpt", backend="openai", model="m", base_url="http://127.0.0.1:9/v1",
                          api_key_env="TEST_CHAT_KEY", max_retries=1)  # fmt: skip
    [result] = OpenAIExpert(config, backoff_s=0.01).generate([CaptionRequest("a", image, "x")])
    assert result.caption is None and "Connect" in result.error
    assert "http://127.0.0.1:9/v1/chat/completions" in result.error  # which server, for a run with several


def test_missing_api_key_variable(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    config = OpenAIExpertConfig(
        name="gpt", backend="openai", model="m", base_url="http://x", api_key_env="NO_SUCH_KEY_VAR"
    )
    with pytest.raises(InputError, match="environment variable NO_SUCH_KEY_VAR"):
        OpenAIExpert(config)


def test_concurrency_bound_holds_across_caller_threads(server, monkeypatch, image):
    backend = expert(server, monkeypatch, concurrency=4)
    batches = [[CaptionRequest(f"t{b}-{i}", image, f"p{b}-{i}") for i in range(6)] for b in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(backend.generate, batches))
    assert all(r.caption for batch in results for r in batch)
    assert server.max_in_flight == 4


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_rejection_before_any_success_stops_the_run_at_once(server, monkeypatch, image, status):
    backend = expert(server, monkeypatch, concurrency=8, max_retries=3, timeout_s=30.0)
    started = time.monotonic()
    with pytest.raises(ExpertUnavailable) as raised:
        backend.generate([CaptionRequest(f"t{i}", image, f"status {status}") for i in range(64)])
    assert time.monotonic() - started < 5  # one round trip, not 64 requests' worth of retries and backoff
    # Never retried, and nothing sent once the first rejection arrived: at most the first `concurrency` requests.
    assert 1 <= server.calls[f"status {status}"] <= 8
    message = str(raised.value)
    assert isinstance(raised.value, InputError) and "\n" not in message
    assert f"expert gpt: {backend.url} answered HTTP {status}" in message
    assert "Incorrect API key provided" in message and SECRET not in message
    # The expert stays unavailable: a later batch raises before sending anything.
    with pytest.raises(ExpertUnavailable):
        backend.generate([CaptionRequest("a", image, "fine")])
    assert server.calls["fine"] == 0


def test_a_rejection_names_the_key_variable(server, monkeypatch, image):
    with pytest.raises(ExpertUnavailable, match=r"API key in TEST_CHAT_KEY \(api_key_env\)"):
        expert(server, monkeypatch).generate([CaptionRequest("a", image, "status 401")])


def test_a_rejection_cancels_requests_in_flight_in_every_caller_thread(server, monkeypatch, image):
    backend = expert(server, monkeypatch, concurrency=8, max_retries=0, timeout_s=60.0)
    batches = [[CaptionRequest(f"s{i}", image, "stall") for i in range(3)], [CaptionRequest("d", image, "status 401")]]
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(backend.generate, batch) for batch in batches]
        errors = [future.exception(timeout=30) for future in futures]
    assert all(isinstance(error, ExpertUnavailable) for error in errors)
    assert time.monotonic() - started < 10  # the stalled requests (20 s) were not waited for
    deadline = time.monotonic() + 5  # a cancelled request gives its slot back on the loop, just after the raise
    while backend.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.in_flight == 0


def test_after_a_success_a_rejection_is_a_failed_result(server, monkeypatch, image):
    backend = expert(server, monkeypatch)
    assert backend.generate([CaptionRequest("a", image, "fine")])[0].caption == "caption for fine"
    results = backend.generate([CaptionRequest("a", image, "status 401"), CaptionRequest("b", image, "status 404"),
                                CaptionRequest("c", image, "again")])  # fmt: skip
    assert results[0].error.startswith("HTTP 401: Incorrect API key") and SECRET not in results[0].error
    assert results[1].error.startswith("HTTP 404") and results[2].caption == "caption for again"
    assert server.calls["status 401"] == 1 and server.calls["status 404"] == 1  # recorded, not retried


def test_retry_after_ms_is_honoured_over_the_exponential_backoff(server, monkeypatch, image):
    backend = expert(server, monkeypatch, backoff_s=20.0)  # the default wait would be 20-40 s
    started = time.monotonic()
    [result] = backend.generate([CaptionRequest("a", image, "throttled")])
    assert result.caption == "caption for throttled" and server.calls["throttled"] == 2
    assert time.monotonic() - started < 5  # 50 ms asked (retry-after-ms wins over Retry-After: 20)


def test_retry_after_headers_are_parsed_safely(monkeypatch):
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    then = parsedate_to_datetime(date).timestamp()
    assert retry_after_s(CIMultiDict({"Retry-After-Ms": "50", "Retry-After": "20"})) == 0.05
    assert retry_after_s(CIMultiDict({"retry-after": "2"})) == 2.0
    assert retry_after_s(CIMultiDict({"Retry-After": date}), now=then - 3) == 3.0
    assert retry_after_s(CIMultiDict({"Retry-After": date.removesuffix(" GMT")}), now=then - 3) == 3.0  # GMT, not local
    assert retry_after_s(CIMultiDict({"Retry-After": format_datetime(parsedate_to_datetime(date))}), now=then + 60) == 0
    assert retry_after_s(CIMultiDict({"retry-after-ms": "nan", "Retry-After": "1"})) == 1.0
    for headers in ({}, {"Retry-After": "soon"}, {"Retry-After": "-3"}, {"retry-after-ms": "-5"}, {"Retry-After": ""}):
        assert retry_after_s(CIMultiDict(headers)) is None
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    backend = OpenAIExpert(OpenAIExpertConfig(name="gpt", backend="openai", model="m", base_url="http://x"))
    assert backend._delay(0, CIMultiDict({"Retry-After": "3600"})) == MAX_BACKOFF_S  # capped
    assert 0.5 <= backend._delay(0, CIMultiDict({"Retry-After": "later"})) <= 1.0  # the default backoff


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_new_tokens_is_sent_under_the_configured_field(server, monkeypatch, image, field):
    expert(server, monkeypatch, token_limit_field=field, max_new_tokens=77).generate([CaptionRequest("a", image, "x")])
    [body] = server.bodies
    other = "max_completion_tokens" if field == "max_tokens" else "max_tokens"
    assert body[field] == 77 and other not in body


@pytest.mark.parametrize(("sent", "advice"), [("max_tokens", "max_completion_tokens"),
                                              ("max_completion_tokens", "max_tokens")])  # fmt: skip
def test_a_refused_token_field_tells_how_to_fix_the_manifest(server, monkeypatch, image, sent, advice):
    server.refused_field = sent
    backend = expert(server, monkeypatch, token_limit_field=sent)
    with pytest.raises(ExpertUnavailable) as raised:
        backend.generate([CaptionRequest(f"t{i}", image, "x") for i in range(6)])
    message = str(raised.value)
    assert f"set token_limit_field: {advice} on this expert in the manifest" in message
    assert f"Unsupported parameter: '{sent}'" in message and "\n" not in message
    assert server.calls["x"] <= 3  # concurrency: nothing retried, nothing sent after the first answer


def test_a_400_that_only_names_the_token_field_fails_that_request_alone(server, monkeypatch, image):
    results = expert(server, monkeypatch).generate([CaptionRequest("a", image, "too long"),
                                                    CaptionRequest("b", image, "fine")])  # fmt: skip
    assert results[0].error.startswith("HTTP 400: 'max_tokens' or 'max_completion_tokens' is too large")
    assert results[1].caption == "caption for fine" and server.calls["too long"] == 1


def test_a_400_that_a_server_option_fixes_names_the_option(server, monkeypatch, image):
    [result] = expert(server, monkeypatch).generate([CaptionRequest("a", image, "image limit")])
    assert result.caption is None and result.error.startswith("HTTP 400: At most 0 image(s)")
    assert result.error.endswith("(fix: start `vllm serve` with --limit-mm-per-prompt '{\"image\": 1}' (one image per "
                                 "prompt))")  # fmt: skip


def _tile(path, color, size=(40, 30)):
    Image.new("RGB", size, color).save(path)
    return path


def _counting_encoder(monkeypatch) -> Counter:
    encoded: Counter = Counter()

    def counting(path, max_side):
        encoded[path.stem] += 1
        return ENCODE(path, max_side)

    monkeypatch.setattr(base, "_encode", counting)
    return encoded


def test_data_url_cache_is_bounded_by_bytes_and_evicts_least_recently_used(tmp_path, monkeypatch):
    a, b, c = (_tile(tmp_path / f"{name}.png", color, size) for name, color, size in
               [("a", (255, 0, 0), (40, 30)), ("b", (0, 255, 0), (50, 20)), ("c", (0, 0, 255), (30, 30))])  # fmt: skip
    lengths = {path.stem: len(ENCODE(path, 64)) for path in (a, b, c)}
    encoded = _counting_encoder(monkeypatch)
    cache = DataUrlCache(max_bytes=sum(lengths.values()) - 1)  # room for any two, never all three
    monkeypatch.setattr(base, "_DATA_URLS", cache)
    assert image_data_url(a, 64) == ENCODE(a, 64)
    image_data_url(b, 64)
    image_data_url(a, 64)  # a hit: a is now the most recently used
    image_data_url(c, 64)  # over the bound: b goes
    assert encoded == {"a": 1, "b": 1, "c": 1}
    assert len(cache) == 2 and cache.nbytes == lengths["a"] + lengths["c"] <= cache.max_bytes
    image_data_url(a, 64)
    image_data_url(c, 64)
    assert encoded == {"a": 1, "b": 1, "c": 1}
    image_data_url(b, 64)
    assert encoded["b"] == 2 and cache.nbytes <= cache.max_bytes


def test_data_url_cache_returns_but_never_stores_an_entry_larger_than_its_bound(tmp_path, monkeypatch):
    a = _tile(tmp_path / "a.png", (255, 0, 0))
    encoded = _counting_encoder(monkeypatch)
    cache = DataUrlCache(max_bytes=10)
    monkeypatch.setattr(base, "_DATA_URLS", cache)
    assert image_data_url(a, 64).startswith("data:image/png;base64,")
    image_data_url(a, 64)
    assert encoded["a"] == 2 and len(cache) == 0 and cache.nbytes == 0


def test_data_url_cache_re_encodes_a_changed_file(tmp_path, monkeypatch):
    a = _tile(tmp_path / "a.png", (255, 0, 0))
    encoded = _counting_encoder(monkeypatch)
    monkeypatch.setattr(base, "_DATA_URLS", DataUrlCache())
    before = image_data_url(a, 64)
    assert image_data_url(a, 64) == before and encoded["a"] == 1
    mtime_ns = a.stat().st_mtime_ns
    _tile(a, (0, 0, 255))
    os.utime(a, ns=(mtime_ns + 10**9, mtime_ns + 10**9))  # a clock too coarse to tell the two writes apart
    after = image_data_url(a, 64)
    assert after != before and after == ENCODE(a, 64) and encoded["a"] == 2
    assert len(base._DATA_URLS) == 1  # the stale encoding was replaced, not left to age out
    assert image_data_url(a, 32) != after and len(base._DATA_URLS) == 2  # another size is another entry


def test_data_url_cache_stays_within_its_bound_under_threads(tmp_path):
    tiles = [_tile(tmp_path / f"t{i}.png", (i * 20, 0, 0), (20 + i, 20)) for i in range(8)]
    cache = DataUrlCache(max_bytes=3 * len(ENCODE(tiles[-1], 64)))
    with ThreadPoolExecutor(8) as pool:
        urls = list(pool.map(lambda i: cache.get(tiles[i % 8], 64), range(400)))
    assert urls == [ENCODE(tiles[i % 8], 64) for i in range(400)]
    assert 0 < cache.nbytes <= cache.max_bytes and cache.nbytes == sum(len(url) for _, url in cache._entries.values())


def test_a_failure_in_the_servers_thread_fails_the_test(monkeypatch, image):
    """What the stand-in server finds wrong in a request reaches the test, not only a traceback on stderr."""
    with pytest.raises(AssertionError, match="not a PNG data URL"), serving(ChatServer()) as chat:
        monkeypatch.setattr(openai_backend, "image_data_url", lambda path, max_side: "data:image/gif;base64,R0lGOD")
        expert(chat, monkeypatch, max_retries=0).generate([CaptionRequest("a", image, "fine")])
