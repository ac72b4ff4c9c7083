"""The Prefect API every flow of the toolkit reports to, made sure of before the flow starts.

Either the running server that ``PREFECT_API_URL`` names (checked, never started), or a local API server for this
process, started with a window that fits a busy or slow machine: Prefect's own default of 20 s
(``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``) is too short on a 2-core machine with other work beside it,
where the server's imports and database migration take longer. The user's own setting of that variable (environment
or Prefect profile) wins over the toolkit's default.

A command starts the API first (:func:`process_api`) and waits for it (:meth:`PrefectApi.wait`) just before its first
flow call: the server process boots while the command imports torch, checks its inputs and loads its models. Prefect's
client then finds the running server by itself (one local server per process) and starts no second one. A command
that stops before its flow (bad input) stops the server it started (:func:`_stop_at_exit`).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from manifests.errors import InputError, first_line
from manifests.redaction import redact

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer

STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_S = 180
SERVER_ADVICE = "start one with `prefect server start` and point PREFECT_API_URL at it"


def startup_window() -> int:
    """Seconds the local API server gets to start: the user's Prefect setting where one is set (environment or the
    active profile), else the toolkit's default, :data:`DEFAULT_STARTUP_S`."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if STARTUP_SETTING in settings.to_environment_variables(exclude_unset=True):
        return int(settings.server.ephemeral.startup_timeout_seconds)
    return DEFAULT_STARTUP_S


def configured_api_url() -> str | None:
    """The API URL of the user's Prefect settings (``PREFECT_API_URL`` or the active profile), or None."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


class PrefectApi:
    """The Prefect API of this process: checked, or started in the background, then waited for.

    Args:
        say: told in one line each what the command waits for and when it is ready (a console's print); called
            only from :meth:`wait`, so a command that stops before it says nothing of the server.
    """

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self._say = say or (lambda _line: None)
        self.configured = configured_api_url()
        self._thread: threading.Thread | None = None
        self._server: SubprocessASGIServer | None = None
        self._error: InputError | None = None
        self._began = 0.0
        self.window = 0
        self.url: str | None = None

    @property
    def failed(self) -> bool:
        """Whether the check or start has ended in an error."""
        return self._error is not None

    def start(self, local: bool = True) -> PrefectApi:
        """Check the configured server, or begin starting a local one in a background thread.

        Args:
            local: whether a local server may be started now (False: only a configured server is checked).

        Raises:
            InputError: no URL is configured and the local server is turned off.
        """
        if self._thread is not None or self.url is not None or not (local or self.configured):
            return self
        if self.configured:
            self.url = check_running_server(self.configured)
            return self
        from prefect.server.api.server import SubprocessASGIServer  # imported here, never in two threads at once
        from prefect.settings import get_current_settings

        if not get_current_settings().server.ephemeral.enabled:
            raise InputError(
                "Prefect API: PREFECT_API_URL is not set and the local server is turned off "
                f"(PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false); {SERVER_ADVICE}"
            )
        self.window = startup_window()
        self._server = SubprocessASGIServer()  # the one Prefect's client uses for this process
        if self._server.running:
            self.url = self._server.api_url
            return self
        self._began = time.perf_counter()
        _quiet_server_notes()
        self._thread = threading.Thread(target=self._boot, name="prefect-api", daemon=True)
        atexit.register(_stop_at_exit, self._server, self._thread)
        self._thread.start()
        return self

    def _boot(self) -> None:
        assert self._server is not None
        try:
            self._server.start(timeout=self.window)
            self.url = self._server.api_url
        except Exception as exc:
            self._error = InputError(
                f"Prefect's local API server did not start within {self.window} s "
                f"({redact(first_line(exc))[:200]}): raise {STARTUP_SETTING}, or {SERVER_ADVICE}"
            )

    def wait(self) -> str:
        """Block until the API answers, saying so while a local server is still starting; its URL.

        Raises:
            InputError: one line naming the setting to change and the alternative, when no API answers.
        """
        self.start()
        if self._thread is not None:
            waiting = self._thread.is_alive()
            if waiting:
                self._say(f"starting Prefect's local API server (up to {self.window} s, {STARTUP_SETTING})")
            self._thread.join()
            if waiting and self._error is None:
                seconds = time.perf_counter() - self._began
                self._say(f"Prefect's local API server is ready ({seconds:.1f} s after its start)")
        if self._error is not None:
            raise self._error
        assert self.url is not None
        return self.url


class _ServerNotes(logging.Filter):
    """Drops Prefect's own notes on starting and stopping the local server: the command says what it waits for, and
    a command refused before its flow ends on its one-line error, not on a note that the server stopped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Starting temporary server", "Stopping temporary server"))


def _quiet_server_notes() -> None:
    logger = logging.getLogger("prefect")  # the logger Prefect's SubprocessASGIServer writes these notes to
    if not any(isinstance(existing, _ServerNotes) for existing in logger.filters):
        logger.addFilter(_ServerNotes())


def _stop_at_exit(server: SubprocessASGIServer, thread: threading.Thread) -> None:
    """Stop a local server whose start may still be under way when the process exits (a command refused before its
    flow): Prefect registers its own stop only once the server process exists, which takes a moment after the
    thread starts."""
    deadline = time.monotonic() + 10
    while server.server_process is None and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    server.stop()


def check_running_server(url: str) -> str:
    """``url`` when the Prefect server there answers its health check.

    Raises:
        InputError: nothing answers, or the answer is an error; one line naming PREFECT_API_URL.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise InputError(
            f"PREFECT_API_URL={redact(url)}: no Prefect server answers there ({redact(first_line(problem))[:200]}); "
            "start one with `prefect server start`, or unset PREFECT_API_URL to let the toolkit start a local one"
        )
    return url


_process_api: PrefectApi | None = None
_process_lock = threading.Lock()


def process_api(say: Callable[[str], None] | None = None, local: bool = True) -> PrefectApi:
    """This process's :class:`PrefectApi`, started on the first call (a new one when the configured URL changed or the
    last one failed); every caller waits on the same start. ``local``: see :meth:`PrefectApi.start`.

    Raises:
        InputError: a configured server that does not answer, or no URL and the local server turned off.
    """
    global _process_api
    with _process_lock:
        current = _process_api
        if current is None or current.configured != configured_api_url() or current.failed:
            current = _process_api = PrefectApi(say)
        return current.start(local)


def ensure_prefect_api(say: Callable[[str], None] | None = None) -> str:
    """Check or start this process's Prefect API and wait for it; its URL."""
    return process_api(say).wait()
