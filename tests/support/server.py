"""Real ``countersign serve`` processes for end-to-end tests, each one bounded in time.

``start_server`` runs ``python -m countersign serve`` on a free port of 127.0.0.1 with the
environment a test gives it, waits (bounded) until ``/health/ready`` answers 200, and returns a
``ServerProcess``. Its stdout and stderr go to a log file the test can read (``.stderr()``) for
assertions and for the failure message. A process is only ever signalled by its own PID (or
its own process group, when it was started in a new session)::

    with ServerProcesses(tmp_path) as servers:
        server = servers.start("a", env=server_env(database.url))
        ... httpx against server.base_url ...
        stopped = server.stop()          # SIGTERM, bounded wait, SIGKILL only if it had to
        assert not stopped.killed

Every wait here has a bound; running into one raises, naming the bound and the log's tail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from tests.support.postgres import free_port

START_TIMEOUT = 30.0
"""Seconds a server may take to answer ``/health/ready`` with 200."""
STOP_TIMEOUT = 15.0
"""Seconds a server may take to exit after SIGTERM before it is killed."""
KILL_TIMEOUT = 10.0
"""Seconds to wait for a killed process to be reaped."""
PORT_ATTEMPTS = 3
"""Starts on another free port when the chosen one was taken in the meantime."""
SERVE = (sys.executable, "-m", "countersign", "serve", "--host", "127.0.0.1")


def server_env(database_url: str, **settings: str) -> dict[str, str]:
    """This process's environment without ``COUNTERSIGN_*``, plus the database and settings.

    ``settings`` are Countersign settings by field name: ``run_lease_seconds="2"`` becomes
    ``COUNTERSIGN_RUN_LEASE_SECONDS=2``.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("COUNTERSIGN_")}
    env.update(
        COUNTERSIGN_DATABASE_URL=database_url,
        COUNTERSIGN_PROFILE="dev",
        COUNTERSIGN_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        # Well inside STOP_TIMEOUT: a server stopped with runs still going ends in time.
        COUNTERSIGN_SHUTDOWN_GRACE_SECONDS="3",
    )
    env.update({f"COUNTERSIGN_{name.upper()}": value for name, value in settings.items()})
    return env


@dataclass(frozen=True)
class Stopped:
    """How a server process ended."""

    returncode: int
    killed: bool
    """True when the bound ran out and the process had to be killed."""
    seconds: float
    """How long it took to end after the signal."""


@dataclass
class ServerProcess:
    """One ``countersign serve`` process this test started."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    new_session: bool
    paused: bool = field(default=False, init=False)
    ready_seconds: float = field(default=0.0, init=False)
    """How long the server took to become ready."""

    @property
    def pid(self) -> int:
        """The server's process id (its executor's name contains it)."""
        return self.process.pid

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        """Everything the server wrote so far (stdout and stderr)."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        """The last lines of the server's output, for failure messages."""
        return "\n".join(self.stderr().splitlines()[-lines:])

    def is_running(self) -> bool:
        """True while the process has not exited."""
        return self.process.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> float:
        """Poll ``/health/ready`` until 200; the seconds it took. Raises if it dies or times out."""
        started = time.monotonic()
        limit = started + timeout
        last = "no answer yet"
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while time.monotonic() < limit:
                if not self.is_running():
                    raise ServerExited(self, f"exited with {self.process.returncode} before ready")
                try:
                    response = client.get("/health/ready")
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                else:
                    if response.status_code == 200:
                        return time.monotonic() - started
                    last = f"{response.status_code} {response.text[:200]}"
                time.sleep(0.05)
        raise TimeoutError(
            f"server {self.name} was not ready within {timeout:g} s ({last}):\n{self.tail()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> Stopped:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; how it ended."""
        if not self.is_running():
            return Stopped(self.process.returncode, killed=False, seconds=0.0)
        self.resume()  # a stopped process cannot act on SIGTERM
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            return Stopped(self.process.returncode, killed=True, seconds=time.monotonic() - started)
        return Stopped(code, killed=False, seconds=time.monotonic() - started)

    def kill(self, *, group: bool = False) -> int:
        """SIGKILL the process (and its process group with ``group``); its return code."""
        if group and not self.new_session:
            raise ValueError(f"server {self.name} was not started in a process group of its own")
        self._kill(group=group)
        return self.process.returncode

    def pause(self) -> None:
        """SIGSTOP: the process stops where it is (a paused, not a dead, server)."""
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        if self.paused and self.is_running():
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def _kill(self, *, group: bool = False) -> None:
        if self.is_running() or group:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(self.pid, signal.SIGKILL)  # its group id is its pid
                else:
                    self.process.kill()
        self.paused = False
        self.process.wait(KILL_TIMEOUT)


class ServerExited(RuntimeError):
    """A server process ended before it was ready."""

    def __init__(self, server: ServerProcess, what: str) -> None:
        super().__init__(f"server {server.name} {what}:\n{server.tail()}")
        self.server = server


def start_server(
    name: str,
    *,
    env: dict[str, str],
    cwd: Path,
    log_dir: Path | None = None,
    new_session: bool = False,
    ready_timeout: float = START_TIMEOUT,
    args: Sequence[str] = (),
) -> ServerProcess:
    """Start ``countersign serve`` (with ``args``) on a free port and wait (bounded) until it
    is ready.

    ``new_session`` puts the server in a process group of its own, so that ``kill(group=True)``
    takes whatever it started in that group with it.
    """
    log_dir = log_dir or cwd
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        log = log_dir / f"server-{name}-{attempt}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [*SERVE, "--port", str(port), *args],
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=new_session,
            )
        server = ServerProcess(name, port, process, log, new_session)
        try:
            server.ready_seconds = server.wait_ready(ready_timeout)
        except ServerExited:
            if attempt < PORT_ATTEMPTS and "address already in use" in server.stderr().lower():
                continue  # another process took the port between free_port() and bind()
            raise
        except BaseException:
            server.stop()
            raise
        return server
    raise AssertionError("unreachable")  # pragma: no cover


class ServerProcesses:
    """The servers of one test; whatever still runs at the end is stopped by its own PID."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[ServerProcess] = []

    def start(
        self,
        name: str,
        *,
        env: dict[str, str],
        new_session: bool = False,
        ready_timeout: float = START_TIMEOUT,
        args: Sequence[str] = (),
    ) -> ServerProcess:
        """Start a server in this test's folder (see ``start_server``)."""
        server = start_server(
            name,
            env=env,
            cwd=self.folder,
            new_session=new_session,
            ready_timeout=ready_timeout,
            args=args,
        )
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        """Stop every server still running (SIGTERM, then SIGKILL after the bound)."""
        failures: list[BaseException] = []
        for server in self.started:
            try:
                server.stop()
            except (OSError, subprocess.SubprocessError) as exc:  # stop the others regardless
                failures.append(exc)
        if failures:
            raise failures[0]

    def __enter__(self) -> ServerProcesses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()
