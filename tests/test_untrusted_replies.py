"""A server is not trusted: credentials in a URL never leave the process (rows, messages, Prefect's logs), a malformed
reply is a failed row and never a crash, a shard keeps what it received when it fails later, and a huge caption is cut
and says so."""

from __future__ import annotations

import base64
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from caption_pipeline.experts.base import CaptionRequest
from caption_pipeline.experts.openai_backend import OpenAIExpert
from caption_pipeline.gate import GateSettings, RunInfo, caption_tiles
from caption_pipeline.policy import GatePolicy
from caption_pipeline.scoring import ClipScorer
from flows import generate_captions as flow_module
from flows import model_cache
from flows.cli import app as flows_app
from manifests.caption_store import CUT_FINISH_REASON, read_store
from manifests.errors import InputError
from manifests.run_manifest import OpenAIExpertConfig, load_manifest
from tests.helpers import AnsweringExpert, ChatServer, closed_port_url, demo_data_yaml, flat_tiles, serving

PASSWORD = "s3cret-pw"
BASIC = base64.b64encode(f"user:{PASSWORD}".encode()).decode()
runner = CliRunner()


def write_manifest(folder: Path, small_index, clip_config, expert: str, tau: float = 0.0) -> Path:
    """A manifest over the small demo index with one expert entry (a YAML flow mapping) and its store in ``folder``."""
    path = folder / "run.yaml"
    path.write_text(
        f"name: untrusted\n{demo_data_yaml(small_index)}\ncaptions:\n  store: {folder / 'store'}\n  tau: {tau}\n"
        f"  max_attempts: 2\n  shard_size: 4\n"
        f"  clip: {{model: demo-tiny-clip, pretrained: null, config: {clip_config.config}, "
        f"checkpoint: {clip_config.checkpoint}, device: cpu}}\n  experts:\n    - {expert}\n"
    )
    return path


def prefect_logs_since(started: datetime, awaited: str, window_s: float = 90.0) -> list[str]:
    """The messages of every log line the Prefect API holds from ``started`` on, once one holds ``awaited``.

    Log lines reach the API from a background worker; the flush waits for it at most 5 s (Prefect's bound), which a
    busy machine can exceed: read until the awaited line is there (a generous window), then every line of the run is.
    The line must be logged at all: see ``info_run_logs``.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    deadline = time.monotonic() + window_s
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(LogFilter(timestamp=LogFilterTimestamp(after_=started)), limit=200)
            messages = [log.message for log in logs]
            if any(awaited in message for message in messages) or time.monotonic() > deadline:
                return messages
            time.sleep(0.5)


@pytest.fixture
def info_run_logs():
    """The flow and task run loggers at INFO for one test: `make test` runs Prefect at WARNING, and the endpoint
    line this test reads in Prefect's database is an INFO line."""
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def test_credentials_in_a_url_reach_no_row_message_or_log(
    prefect_api, info_run_logs, small_index, clip_config, tmp_path
):
    started = datetime.now(UTC)
    with serving(ChatServer()) as server:
        live = f"http://user:{PASSWORD}@127.0.0.1:{server.server_port}/v1"
        dead = closed_port_url().replace("http://", f"http://user:{PASSWORD}@")
        echo = "{p1: status 500, p2: status 500, p3: status 500}"  # the server's error repeats the Authorization
        expert = f"{{name: gpt, backend: openai, model: m, base_url: [{live}, {dead}], max_retries: 0, " \
                 f"prompts: {echo}}}"  # fmt: skip
        manifest = write_manifest(tmp_path, small_index, clip_config, expert)
        result = runner.invoke(flows_app, ["run", "generate-captions", "--manifest", str(manifest), "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert server.auth_headers == {f"Basic {BASIC}"}  # the credentials were sent, as the URL asked
    rows = read_store(tmp_path / "store")
    errors = " ".join(rows["error"].dropna())
    assert "Incorrect API key provided: Basic ***" in errors and "ClientConnectorError (http://127.0.0.1:" in errors
    logs = prefect_logs_since(started, awaited="gpt endpoints: ")
    assert any("gpt endpoints: http://127.0.0.1:" in line for line in logs)  # logged, without the userinfo
    for where, text in [("store", rows.astype(str).to_csv()), ("console", result.output), ("logs", "\n".join(logs))]:
        assert PASSWORD not in text and BASIC not in text, f"a credential reached the {where}"


@pytest.mark.parametrize("with_key", [False, True], ids=["url-credentials", "api-key"])
def test_a_caption_that_echoes_the_credentials_is_stored_without_them(
    prefect_api, small_index, clip_config, tmp_path, monkeypatch, with_key
):
    """A server may repeat what it was sent anywhere, a caption too, and in any form (the Basic header's Base64
    without its label): the key and the URL's credentials are masked, the rest of the caption kept."""
    key = "sk-TOPKEY-98765"
    monkeypatch.setenv("TEST_CHAT_KEY", key)
    with serving(ChatServer()) as server:
        userinfo = "" if with_key else f"user:{PASSWORD}@"
        auth = ", api_key_env: TEST_CHAT_KEY" if with_key else ""
        expert = f"{{name: gpt, backend: openai, model: m, base_url: http://{userinfo}127.0.0.1:{server.server_port}" \
                 f"/v1{auth}, prompts: {{p1: echo, p2: echo, p3: echo}}}}"  # fmt: skip
        manifest = write_manifest(tmp_path, small_index, clip_config, expert)
        result = runner.invoke(flows_app, ["run", "generate-captions", "--manifest", str(manifest), "--limit", "2"])
        report = runner.invoke(flows_app, ["run", "caption-report", "--store", str(tmp_path / "store"), "--out",
                                           str(tmp_path / "report")])  # fmt: skip
    assert result.exit_code == 0 and report.exit_code == 0, result.output + report.output
    captions = read_store(tmp_path / "store")["caption"].dropna().tolist()
    assert captions and all(caption.startswith("a road. ") and "***" in caption for caption in captions)
    written = "\n".join(
        [
            *captions,
            *(
                path.read_text(errors="replace")
                for path in (tmp_path / "report").rglob("*")
                if path.is_file() and path.suffix in (".html", ".md", ".csv", ".json")
            ),
        ]
    )
    for secret in (key, PASSWORD, BASIC):
        assert secret not in written, f"{secret} reached a caption or the report"


def test_a_key_with_a_newline_is_refused_in_one_line(monkeypatch):
    from caption_pipeline.experts.openai_backend import api_key

    monkeypatch.setenv("TEST_CHAT_KEY", "sk-NL\r\nX-Evil: 1")
    config = OpenAIExpertConfig(name="gpt", backend="openai", model="m", base_url="http://127.0.0.1:9/v1",
                                api_key_env="TEST_CHAT_KEY")  # fmt: skip
    with pytest.raises(InputError, match=r"^expert gpt: environment variable TEST_CHAT_KEY \(api_key_env\) holds "
                                         r"white space or a control character"):  # fmt: skip
        api_key(config)


def test_a_base_url_with_a_query_string_is_refused_without_showing_it(tmp_path, small_index, clip_config):
    expert = "{name: gpt, backend: openai, model: m, base_url: 'http://127.0.0.1:9/v1?token=TOKSECRET'}"
    manifest = write_manifest(tmp_path, small_index, clip_config, expert)
    with pytest.raises(InputError, match=r"a base_url takes no query string or fragment") as error:
        load_manifest(manifest)
    assert "TOKSECRET" not in str(error.value)


def test_a_key_with_url_credentials_is_refused_before_the_run(small_index, clip_config, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_CHAT_KEY", "sk-test")
    expert = f"{{name: gpt, backend: openai, model: m, base_url: http://user:{PASSWORD}@127.0.0.1:9/v1, " \
             "api_key_env: TEST_CHAT_KEY}"  # fmt: skip
    manifest = write_manifest(tmp_path, small_index, clip_config, expert)
    result = runner.invoke(flows_app, ["run", "generate-captions", "--manifest", str(manifest)])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert "base_url carries credentials" in line and "api_key_env" in line and PASSWORD not in line
    assert not (tmp_path / "store").exists()


def test_malformed_replies_are_failed_rows_and_the_run_goes_on(prefect_api, small_index, clip_config, tmp_path):
    prompts = "{p1: content not text, p2: usage not an object, p3: finish reason object}"
    with serving(ChatServer()) as server:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        expert = f"{{name: gpt, backend: openai, model: m, base_url: {url}, max_retries: 0, prompts: {prompts}}}"
        manifest = write_manifest(tmp_path, small_index, clip_config, expert)
        result = runner.invoke(flows_app, ["run", "generate-captions", "--manifest", str(manifest), "--limit", "2"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    rows = read_store(tmp_path / "store").set_index(["prompt_id", "attempt"]).sort_index()
    first = rows.xs(0, level="attempt")["error"]
    assert first["p1"].str.contains(r"choices\.0\.message\.content: Input should be a valid string").all()
    assert first["p2"].str.contains(r"usage: Input should be an object").all()
    assert first["p3"].str.contains(r"choices\.0\.finish_reason: Input should be a valid string").all()
    assert first.str.contains(r"\(received: \{").all()  # what the server sent, in the row that failed
    again = rows.xs(1, level="attempt")  # the re-prompt's wording is answered properly: captioned and selected
    assert again["error"].isna().all() and again["selected"].all()
    assert again["caption"].str.startswith("caption for").all()


@pytest.mark.parametrize(
    ("prompt", "problem"),
    [("no choices", "choices: List should have at least 1 item"), ("content not text", "valid string")],
)
def test_the_expert_turns_a_malformed_reply_into_a_failed_result(monkeypatch, tmp_path, prompt, problem):
    image = flat_tiles(tmp_path, 1)[0].image_path
    with serving(ChatServer()) as server:
        config = OpenAIExpertConfig(name="gpt", backend="openai", model="m", max_retries=0,
                                    base_url=f"http://127.0.0.1:{server.server_port}/v1")  # fmt: skip
        requests = [CaptionRequest("t", image, prompt), CaptionRequest("t", image, "ok")]
        bad, good = OpenAIExpert(config).generate(requests)
    assert bad.caption is None and problem in bad.error and good.caption == "caption for ok"


def test_a_shard_that_fails_later_writes_what_it_received(small_index, clip_config, tmp_path, monkeypatch):
    def answer(tile_id: str, prompt_id: str, attempt: int) -> str:
        if attempt:
            raise RuntimeError("the server went away")
        return "a paid answer"

    manifest = write_manifest(tmp_path, small_index, clip_config, "{name: gpt, backend: openai, model: m, "
                              "base_url: http://127.0.0.1:9/v1}", tau=1.0)  # fmt: skip
    monkeypatch.setattr(model_cache, "expert", lambda config: AnsweringExpert(answer, name="gpt"))
    tiles = sorted(small_index.frame["tile_id"])[:2]
    store = str(tmp_path / "store")
    with pytest.raises(RuntimeError, match="went away"):  # round 0 fails the gate (tau 1); round 1 raises
        flow_module.caption_shard.fn(str(manifest), "gpt", tiles, store, "run1", "sha")
    rows = read_store(store)
    assert len(rows) == 2 * 3 and set(rows["attempt"]) == {0} and rows["selected"].all()
    assert set(rows["caption"]) == {"a paid answer"}


def test_a_huge_caption_is_cut_before_scoring_and_says_so(tmp_path, clip_config, small_index):
    tiles = flat_tiles(tmp_path, 1)
    with serving(ChatServer()) as server:
        config = OpenAIExpertConfig(name="gpt", backend="openai", model="m", prompts={"p1": "huge"},
                                    base_url=f"http://127.0.0.1:{server.server_port}/v1")  # fmt: skip
        settings = GateSettings(GatePolicy(tau=0.0, max_attempts=1), prompt_ids=("p1",), overrides=dict(config.prompts),
                                max_caption_chars=1000)  # fmt: skip
        [row] = caption_tiles(tiles, OpenAIExpert(config), ClipScorer(clip_config), settings, RunInfo("r"))
    assert len(row["caption"]) == 1000 and row["finish_reason"] == CUT_FINISH_REASON
    assert row["n_chunks"] <= 4  # CLIP read 1,000 characters, not a megabyte
    manifest = write_manifest(tmp_path, small_index, clip_config, "{name: a, backend: annotation}")
    assert load_manifest(manifest).captions.max_caption_chars == 4000  # the default every run has
