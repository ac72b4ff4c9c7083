"""One ``openai`` expert served by several endpoints: balancing, back-off of an unwell endpoint, counts per endpoint."""

from __future__ import annotations

import time
from contextlib import ExitStack

import pytest
from PIL import Image

from caption_pipeline.experts.base import CaptionRequest
from caption_pipeline.experts.openai_backend import FAILURE_STREAK, MAX_BACKOFF_S, EndpointPool, OpenAIExpert
from manifests.errors import InputError
from manifests.run_manifest import OpenAIExpertConfig, load_manifest
from tests.helpers import EndpointServer, closed_port_url, demo_data_yaml, serving


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "tile.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(path)
    return path


@pytest.fixture
def stack():
    with ExitStack() as resources:
        yield resources


def make_expert(stack: ExitStack, urls: list[str], **overrides) -> OpenAIExpert:
    settings = {"name": "gpt", "backend": "openai", "model": "m", "base_url": urls, "max_side": 32, "concurrency": 2,
                "timeout_s": 5.0, "max_retries": 3, **overrides}  # fmt: skip
    backoff = {key: settings.pop(key) for key in ("backoff_s", "endpoint_backoff_s") if key in settings}
    backend = OpenAIExpert(OpenAIExpertConfig(**settings), **backoff)
    stack.callback(backend.close)
    return backend


def requests(image, n: int, prefix: str = "p") -> list[CaptionRequest]:
    return [CaptionRequest(f"t{i}", image, f"{prefix}{i}") for i in range(n)]


# The pool alone: which endpoint an attempt goes to.


def test_fewest_in_flight_first_and_ties_in_turn():
    pool = EndpointPool(["http://a", "http://b", "http://c"], concurrency=2)
    a, b, c = pool.endpoints
    assert [pool.pick() for _ in range(7)] == [a, b, c, a, b, c, None]  # every slot taken: wait
    pool.release(b, ok=True)
    assert pool.pick() is b  # the only free slot
    pool.release(a, ok=True)
    pool.release(c, ok=True)
    assert pool.pick() is c and pool.pick() is a  # equal in flight: in turn, from after the last chosen (b)
    pool.release(a, ok=True)
    pool.release(b, ok=True)
    assert pool.pick(avoid=a) is b  # a retry goes elsewhere when it can


def test_an_unwell_endpoint_is_taken_out_backed_off_and_probed():
    pool = EndpointPool(["http://a", "http://b"], concurrency=4, backoff_s=2.0)
    a, b = pool.endpoints
    for _ in range(FAILURE_STREAK - 1):  # timeouts or 5xx, not yet a streak
        pool.release(pool.pick(avoid=b), ok=False, health="failing")
    pool.release(pool.pick(avoid=b), ok=True)  # a success ends the streak
    for _ in range(FAILURE_STREAK - 1):
        pool.release(pool.pick(avoid=b), ok=False, health="failing")
    pool.release(pool.pick(avoid=b), ok=False, health=None)  # a 400 or 429 says nothing about the server
    assert a.taken_out == 0
    pool.release(pool.pick(avoid=b), ok=False, health="failing")
    assert a.taken_out == 1 and not a.is_in(time.monotonic())
    assert {pool.pick() for _ in range(4)} == {b}  # out: nothing goes there while b takes the work
    now = time.monotonic()
    assert 1.9 < a.down_until - now <= 2.0
    a.down_until = time.monotonic()  # the back-off ends
    assert pool.pick() is a and pool.pick() is None  # back: one probe, while b is full
    pool.release(a, ok=False, health="failing")  # the probe failed: out again at once, for twice as long
    assert a.taken_out == 2 and 3.9 < a.down_until - time.monotonic() <= 4.0
    a.down_until = 0.0
    pool.release(pool.pick(avoid=b), ok=True)  # a probe that succeeds brings every slot back
    assert [pool.pick(avoid=b) for _ in range(4)] == [a] * 4 and a.outages == 0


def test_a_refused_connection_takes_an_endpoint_out_at_once_and_the_back_off_is_capped():
    pool = EndpointPool(["http://a", "http://b"], concurrency=1, backoff_s=1.0)
    a, b = pool.endpoints
    for outage in range(8):
        a.down_until = 0.0  # each back-off ends, and the endpoint refuses again
        assert pool.pick(avoid=b) is a
        pool.release(a, ok=False, health="down")
        assert a.taken_out == outage + 1
    assert a.down_until - time.monotonic() == pytest.approx(MAX_BACKOFF_S, abs=0.1)


def test_when_every_endpoint_is_out_requests_still_go_to_them():
    pool = EndpointPool(["http://a", "http://b"], concurrency=2)
    a, b = pool.endpoints
    pool.release(pool.pick(), ok=False, health="down")
    pool.release(pool.pick(), ok=False, health="down")
    assert a.taken_out == b.taken_out == 1
    assert [pool.pick() for _ in range(5)] == [a, b, a, b, None]  # as one endpoint would: every slot, paced by retries


# The expert against local servers.


def test_equal_endpoints_share_the_requests_evenly(stack, image):
    servers = [stack.enter_context(serving(EndpointServer(delay_s=0.1))) for _ in range(2)]
    backend = make_expert(stack, [server.url for server in servers])
    results = backend.generate(requests(image, 16))
    assert all(result.caption for result in results)
    counts = [server.received for server in servers]
    assert sum(counts) == 16 and abs(counts[0] - counts[1]) <= 1, counts
    assert all(server.max_in_flight <= 2 for server in servers) and backend.max_in_flight == 4  # per endpoint
    assert [(s.url, s.requests, s.failures) for s in backend.endpoint_stats()] == [
        (server.url, server.received, 0) for server in servers
    ]


def test_the_faster_endpoint_takes_more_requests(stack, image):
    fast, slow = (stack.enter_context(serving(EndpointServer(delay_s=delay))) for delay in (0.0, 0.4))
    backend = make_expert(stack, [slow.url, fast.url])
    assert all(result.caption for result in backend.generate(requests(image, 24)))
    assert fast.received > 2 * slow.received, (fast.received, slow.received)


def test_a_dead_endpoint_does_not_stop_the_run(stack, image):
    live = stack.enter_context(serving(EndpointServer()))
    dead = closed_port_url()
    # A retry delay of 5 s and an outage of 30 s: the run ends fast only if the retries go to the live server at once
    # and nothing more is sent to the dead one.
    backend = make_expert(stack, [dead, live.url], max_retries=2, backoff_s=5.0, endpoint_backoff_s=30.0)
    started = time.monotonic()
    results = backend.generate(requests(image, 12))
    assert time.monotonic() - started < 4
    assert [result.caption for result in results] == [f"caption for p{i}" for i in range(12)]
    dead_stats, live_stats = backend.endpoint_stats()
    assert dead_stats.url == dead and dead_stats.taken_out == 1
    assert 1 <= dead_stats.requests == dead_stats.failures <= 2  # what was sent before the first refusal came back
    assert (live_stats.requests, live_stats.failures, live_stats.taken_out) == (12, 0, 0) and live.received == 12


def test_an_endpoint_answering_500_is_backed_off_then_retried(stack, image):
    good = stack.enter_context(serving(EndpointServer()))
    failing = stack.enter_context(serving(EndpointServer(status=500)))
    backend = make_expert(stack, [failing.url, good.url], backoff_s=5.0, endpoint_backoff_s=1.5)
    started = time.monotonic()
    assert all(result.caption for result in backend.generate(requests(image, 8)))
    assert time.monotonic() - started < 1.5  # every retry went to the good server at once
    sent = failing.received
    assert FAILURE_STREAK <= sent <= FAILURE_STREAK + 1  # a streak, plus what was in flight when it ended
    assert backend.endpoint_stats()[0].taken_out == 1
    assert all(result.caption for result in backend.generate(requests(image, 8, "q")))
    assert failing.received == sent  # still out
    failing.status = 200  # the server recovers; once its back-off ends it gets requests again
    time.sleep(max(0.0, started + 1.6 - time.monotonic()))
    assert all(result.caption for result in backend.generate(requests(image, 12, "r")))
    stats = backend.endpoint_stats()[0]
    assert failing.received > sent and stats.taken_out == 1
    assert stats.requests == failing.received and stats.failures == sent


def test_every_endpoint_dead_fails_each_request_as_one_endpoint_would(stack, image):
    backend = make_expert(stack, [closed_port_url(), closed_port_url()], max_retries=1, backoff_s=0.01)
    results = backend.generate(requests(image, 4))
    assert all(result.caption is None and "ClientConnectorError" in result.error for result in results)
    assert sum(stats.requests for stats in backend.endpoint_stats()) == 8  # each request: its try and its retry


# The manifest.


def _manifest(tmp_path, base_url: str):
    path = tmp_path / "run.yaml"
    path.write_text(f"""
name: t
dataset: {{name: vaihingen, root: r}}
tiling: {{out: t}}
captions:
  store: s
  experts:
    - {{name: gpt, backend: openai, model: m, base_url: {base_url}}}
""")
    return load_manifest(path)


def test_manifest_takes_one_url_or_a_list(tmp_path):
    one = _manifest(tmp_path, "http://gpu0:8000/v1").captions.experts[0]
    assert one.endpoints == ["http://gpu0:8000/v1"]
    several = _manifest(tmp_path, "[http://gpu0:8000/v1, 'https://gpu1:8000/v1']").captions.experts[0]
    assert several.endpoints == ["http://gpu0:8000/v1", "https://gpu1:8000/v1"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", r"base_url: expected a URL or a non-empty list of URLs"),
        ("[http://gpu0:8000/v1, gpu1:8000]", r"base_url: 'gpu1:8000' is not an http\(s\) URL"),
        ("localhost", r"base_url: 'localhost' is not an http\(s\) URL"),
        ("[http://a/v1, http://a/v1]", r"base_url: a URL is given twice"),
        ("{url: http://a/v1}", r"base_url: expected a URL or a non-empty list"),
    ],
)
def test_manifest_refuses_an_empty_list_or_a_non_url_in_one_line(tmp_path, value, message):
    with pytest.raises(InputError, match=r"captions\.experts\.0\." + message) as raised:
        _manifest(tmp_path, value)
    assert "\n" not in str(raised.value)


# The run summary.


def test_endpoint_counts_of_a_run_from_overlapping_shard_tasks_and_several_processes():
    from caption_pipeline.experts.openai_backend import EndpointStats
    from flows.generate_captions import ShardResult, endpoint_counts

    def counts(a: tuple[int, int, int], b: tuple[int, int, int]) -> tuple[EndpointStats, ...]:
        return EndpointStats("http://a", *a), EndpointStats("http://b", *b)

    results = [  # two overlapping tasks of one process (its expert had done 10 + 4 attempts before this run) ...
        ShardResult("gpt", 4, 12, 0, endpoints=("w1", counts((10, 1, 0), (4, 0, 0)), counts((16, 2, 1), (9, 0, 0)))),
        ShardResult("gpt", 4, 12, 0, endpoints=("w1", counts((12, 1, 0), (5, 0, 0)), counts((20, 3, 1), (12, 0, 0)))),
        # ... one task of another process, and an expert without endpoints
        ShardResult("gpt", 4, 12, 0, endpoints=("w2", counts((0, 0, 0), (0, 0, 0)), counts((7, 0, 0), (6, 1, 0)))),
        ShardResult("annotation", 4, 12, 0, endpoints=("w1", (), ())),
    ]
    assert endpoint_counts(results) == {
        "gpt": [EndpointStats("http://a", 10 + 7, 2, 1), EndpointStats("http://b", 8 + 6, 1, 0)]
    }


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from caption_pipeline.tiny_models import build_tiny_clip

    folder = tmp_path_factory.mktemp("clip")
    _, checkpoint = build_tiny_clip(folder)
    return folder, checkpoint


@pytest.mark.slow
def test_a_flow_run_with_a_dead_endpoint_captions_everything_and_reports_each_endpoint(
    prefect_api, small_index, tiny_clip, tmp_path
):
    from rich.console import Console

    from flows.console import print_summary
    from flows.generate_captions import generate_captions
    from manifests.caption_store import read_store

    folder, checkpoint = tiny_clip
    dead = closed_port_url()
    with serving(EndpointServer()) as live:
        path = tmp_path / "run.yaml"
        path.write_text(f"""
name: endpoints
{demo_data_yaml(small_index)}
captions:
  store: {tmp_path / "store"}
  tau: 0.0
  max_attempts: 1
  shard_size: 4
  clip: {{model: demo-tiny-clip, pretrained: null, config: {folder}, checkpoint: {checkpoint}, device: cpu}}
  experts:
    - {{name: gpt, backend: openai, model: m, base_url: [{dead}, {live.url}], concurrency: 2, max_retries: 2,
        max_side: 32}}
""")
        summary = generate_captions(path)
    frame = read_store(tmp_path / "store")
    assert len(frame) == 12 * 3 and frame["caption"].notna().all() and frame["error"].isna().all()
    dead_stats, live_stats = summary.endpoints["gpt"]
    assert (live_stats.url, live_stats.requests, live_stats.failures, live_stats.taken_out) == (live.url, 36, 0, 0)
    assert dead_stats.url == dead and dead_stats.taken_out >= 1 and dead_stats.requests == dead_stats.failures >= 1
    out = Console(record=True, width=200)
    print_summary(summary, out)
    text = out.export_text()
    assert f"gpt endpoints:\n  {dead}: {dead_stats.requests} requests, {dead_stats.requests} failed, taken out" in text
    assert f"  {live.url}: 36 requests, 0 failed, taken out 0x" in text
