"""The Prefect API of a flow command: a configured server checked, a local one started with a window that fits a busy
machine, and one line with exit 2 when neither answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from flows.prefect_api import DEFAULT_STARTUP_S, STARTUP_SETTING, PrefectApi
from tests.helpers import closed_port_url

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's environment without Prefect API settings, a fresh PREFECT_HOME, and ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.pop(STARTUP_SETTING, None)
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT), **extra)
    return env


def test_the_session_api_answers(prefect_api):
    # The one test that reports a harness that could not start (the others that need it are then skipped).
    assert httpx.get(f"{prefect_api}/health", timeout=30).status_code == 200
    api = PrefectApi()
    assert api.configured == prefect_api and api.wait() == prefect_api


def test_the_start_window_is_the_toolkits_unless_the_user_set_prefects(tmp_path):
    code = "from flows.prefect_api import startup_window; print(startup_window())"
    assert run_python(code, clean_env(tmp_path), ROOT).stdout.strip() == str(DEFAULT_STARTUP_S)
    assert DEFAULT_STARTUP_S > 20  # Prefect's own default
    assert run_python(code, clean_env(tmp_path, **{STARTUP_SETTING: "45"}), ROOT).stdout.strip() == "45"
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'active = "slow"\n\n[profiles.slow]\n{STARTUP_SETTING} = "75"\n')
    env = clean_env(tmp_path, PREFECT_PROFILES_PATH=str(profiles))
    assert run_python(code, env, ROOT).stdout.strip() == "75"


def test_a_closed_api_url_is_one_line_and_exit_2(tmp_path):
    url = closed_port_url().replace("http://", "http://user:secret@").replace("/v1", "/api")
    env = clean_env(tmp_path, PREFECT_API_URL=url)
    flows = Path(sys.executable).parent / "flows"
    result = subprocess.run(
        [str(flows), "run", "generate-captions", "--manifest", "demo"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: PREFECT_API_URL=http://***@127.0.0.1"), result.stderr
    assert "prefect server start" in lines[0] and "secret" not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_a_local_server_that_cannot_start_in_its_window_is_one_line(tmp_path):
    # Too short a window for any machine: what a busy one with Prefect's 20 s default met.
    code = "from flows.prefect_api import ensure_prefect_api; ensure_prefect_api(print)"
    result = run_python(code, clean_env(tmp_path, **{STARTUP_SETTING: "0"}), tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "did not start within 0 s" in last and STARTUP_SETTING in last and "PREFECT_API_URL" in last
    assert not servers_of(tmp_path / "prefect-home")


def servers_of(prefect_home: Path) -> list[int]:
    """The process ids of local Prefect API servers running with this PREFECT_HOME."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if b"prefect.server.api.server:create_app" in command and f"PREFECT_HOME={prefect_home}\0".encode() in environ:
            found.append(int(proc.name))
    return found


def test_a_command_refused_before_its_flow_leaves_no_server_behind(tmp_path):
    # The command starts the server first, so that it boots while the inputs are checked; here they fail (no tiles).
    flows = Path(sys.executable).parent / "flows"
    result = subprocess.run(
        [str(flows), "run", "generate-captions", "--manifest", "demo"],
        env=clean_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip().removeprefix('error: ')}"]
    assert "tile index" in result.stderr and "Prefect" not in result.stderr
    assert not servers_of(tmp_path / "prefect-home")


def test_a_local_server_starts_and_is_said(tmp_path):
    code = (
        "from flows.prefect_api import ensure_prefect_api\n"
        "import httpx\n"
        "url = ensure_prefect_api(print)\n"
        "print('health', httpx.get(url + '/health', timeout=30).status_code)\n"
    )
    result = run_python(code, clean_env(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr
    said = result.stdout.splitlines()
    assert said[0] == f"starting Prefect's local API server (up to {DEFAULT_STARTUP_S} s, {STARTUP_SETTING})"
    assert said[1].startswith("Prefect's local API server is ready (") and said[-1] == "health 200"
