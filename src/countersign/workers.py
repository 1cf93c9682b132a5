"""``countersign serve --workers N``: one parent keeps N server processes on one port.

The parent binds the port and starts the workers (``spawn``, so each is a fresh
interpreter) with the socket; each worker is a whole server (its own executor, pool and
metrics) and the kernel spreads the connections among them. The workers share nothing but
the port and the PostgreSQL database, exactly like servers on N hosts: runs are claimed with
leases, and a stream follows a run wherever it executes.

Signals: SIGTERM or SIGINT to the parent is passed to every worker as SIGTERM (a graceful
stop, ``COUNTERSIGN_SHUTDOWN_GRACE_SECONDS``); a second one again (urgent: the grace ends).
The workers are in a session of their own, so a terminal's Ctrl+C reaches them only through
the parent, once. A worker that dies while the server is not stopping is replaced; one that
dies within ``_STEADY_SECONDS`` of its start is replaced after a back-off that doubles up to
``_MAX_BACKOFF`` s (the database away, a setting that breaks it), while the others go on
serving. A worker whose parent dies is stopped by the kernel (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from socket import socket
from types import FrameType

from prometheus_client import multiprocess

from countersign.config import Settings

logger = logging.getLogger("countersign.workers")

Worker = Callable[[str, int, list[socket]], None]
"""What runs in a worker process: host, port and the parent's listening sockets."""

_METRICS_FOLDER = "PROMETHEUS_MULTIPROC_DIR"
_STEADY_SECONDS = 10.0
_MAX_BACKOFF = 30.0
"""A worker that lived this long was up: its death is not part of a crash loop."""
_PR_SET_PDEATHSIG = 1


def serve_workers(settings: Settings, count: int, worker: Worker) -> int:
    """Run ``count`` workers until a stop signal; the exit code (0 when every one stopped
    cleanly)."""
    import uvicorn

    # Where each worker writes its metrics for the others' scrapes (api/observability): a
    # fresh folder of this run's own (inside the operator's, when one is set).
    folder = tempfile.mkdtemp(
        prefix="countersign-metrics-", dir=os.environ.get(_METRICS_FOLDER) or None
    )
    os.environ[_METRICS_FOLDER] = folder
    try:
        bound = uvicorn.Config("countersign", host=settings.host, port=settings.port).bind_socket()
        try:
            return _Workers(settings, count, worker, bound).run()
        finally:
            bound.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _Workers:
    def __init__(self, settings: Settings, count: int, worker: Worker, bound: socket) -> None:
        self.settings = settings
        self.count = count
        self.worker = worker
        self.bound = bound
        self.context = multiprocessing.get_context("spawn")
        self.live: list[BaseProcess] = []
        self.codes: list[int | None] = []
        """Exit codes of the workers that ended while the server was stopping."""
        self.started: dict[int, float] = {}
        self.signals = 0
        self.backoff = 0.0
        self.restart_at: list[float] = []
        """When to start the replacements still due (after a back-off)."""

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for _ in range(self.count):
            self._start_one()
        passed_on = 0
        while self.live:
            while passed_on < self.signals:
                passed_on += 1
                self._signal_all(signal.SIGTERM)
            # Only live workers' sentinels: an ended one's is always ready.
            wait([process.sentinel for process in self.live], timeout=0.2)
            for process in [p for p in self.live if not p.is_alive()]:
                self._ended(process)
            if self.signals:
                continue  # stopping: no replacement; the workers end by themselves
            now = time.monotonic()
            for due in [at for at in self.restart_at if at <= now]:
                self.restart_at.remove(due)
                self._start_one()
        return 0 if all(code == 0 for code in self.codes) else 1

    def _ended(self, process: BaseProcess) -> None:
        self.live.remove(process)
        process.join()
        if process.pid is not None:  # its gauges are no longer shown
            multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
        lived = time.monotonic() - self.started.pop(process.pid or 0, 0.0)
        if self.signals:
            self.codes.append(process.exitcode)
            return
        # A worker that keeps dying at start (the database away, a broken setting) is started
        # again less and less often, up to once every _MAX_BACKOFF s; the others go on.
        self.backoff = 0.0 if lived >= _STEADY_SECONDS else min(_MAX_BACKOFF, self.backoff * 2 or 1)
        logger.warning(
            "worker %s exited with code %s after %.1f s; starting another%s",
            process.pid,
            process.exitcode,
            lived,
            f" in {self.backoff:g} s" if self.backoff else "",
        )
        self.restart_at.append(time.monotonic() + self.backoff)

    def _start_one(self) -> None:
        process = self.context.Process(
            target=_worker_main,
            args=(self.worker, self.settings.host, self.settings.port, [self.bound], os.getpid()),
            name="countersign-worker",
        )
        process.start()
        self.live.append(process)
        self.started[process.pid or 0] = time.monotonic()

    def _signal_all(self, sig: int) -> None:
        for process in self.live:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    def _on_signal(self, _sig: int, _frame: FrameType | None) -> None:
        self.signals += 1  # passed on by the loop, within its 0.2 s


def _worker_main(worker: Worker, host: str, port: int, sockets: list[socket], parent: int) -> None:
    """A worker's first steps: its own session, and an end when its parent is gone."""
    # A stop before the server is up (the parent passes SIGTERM on at once) is a clean end.
    signal.signal(signal.SIGTERM, _stopped_before_serving)
    os.setsid()  # a terminal's Ctrl+C reaches the parent only, which passes it on once
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above
        return
    worker(host, port, sockets)


def _stopped_before_serving(_sig: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)
