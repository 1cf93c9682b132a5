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
cannot stay up for ``_STEADY_SECONDS`` twice in a row stops the whole server (exit 1), so a
broken worker does not restart forever. A worker whose parent dies is stopped by the kernel
(``PR_SET_PDEATHSIG``) and, failing that, stops itself when it notices.
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
import threading
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
"""A worker that lived this long was up: its death is not part of a crash loop."""
_PR_SET_PDEATHSIG = 1


def serve_workers(settings: Settings, count: int, worker: Worker) -> int:
    """Run ``count`` workers until a stop signal; the exit code (0 when every one stopped
    cleanly)."""
    import uvicorn

    own_folder = not os.environ.get(_METRICS_FOLDER)
    if own_folder:
        # Where each worker writes its metrics for the others' scrapes (api/observability).
        os.environ[_METRICS_FOLDER] = tempfile.mkdtemp(prefix="countersign-metrics-")
    bound = uvicorn.Config("countersign", host=settings.host, port=settings.port).bind_socket()
    supervisor = _Workers(settings, count, worker, bound)
    try:
        return supervisor.run()
    finally:
        bound.close()
        if own_folder:
            shutil.rmtree(os.environ.pop(_METRICS_FOLDER), ignore_errors=True)


class _Workers:
    def __init__(self, settings: Settings, count: int, worker: Worker, bound: socket) -> None:
        self.settings = settings
        self.count = count
        self.worker = worker
        self.bound = bound
        self.context = multiprocessing.get_context("spawn")
        self.processes: list[BaseProcess] = []
        self.started: dict[int, float] = {}
        self.signals = 0
        self.woken = threading.Event()
        self.failed = False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for _ in range(self.count):
            self._start_one()
        quick_deaths = 0
        passed_on = 0
        while any(process.is_alive() for process in self.processes):
            while passed_on < self.signals:
                passed_on += 1
                self._signal_all(signal.SIGTERM)
            wait([process.sentinel for process in self.processes], timeout=0.2)
            if self.signals:
                continue  # stopping: the workers end by themselves
            for process in [p for p in self.processes if not p.is_alive()]:
                self.processes.remove(process)
                if process.pid is not None:  # its gauges are no longer shown
                    multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                lived = time.monotonic() - self.started.pop(process.pid or 0, 0.0)
                quick_deaths = quick_deaths + 1 if lived < _STEADY_SECONDS else 0
                if quick_deaths >= 2:
                    logger.error(
                        "worker %s exited with code %s after %.1f s, again; stopping the server",
                        process.pid,
                        process.exitcode,
                        lived,
                    )
                    self.failed = True
                    self.signals += 1
                    break
                logger.warning(
                    "worker %s exited with code %s; starting another",
                    process.pid,
                    process.exitcode,
                )
                self._start_one()
        for process in self.processes:
            process.join()
        codes = [process.exitcode for process in self.processes]
        return 1 if self.failed or any(code != 0 for code in codes) else 0

    def _start_one(self) -> None:
        process = self.context.Process(
            target=_worker_main,
            args=(self.worker, self.settings.host, self.settings.port, [self.bound], os.getpid()),
            name="countersign-worker",
        )
        process.start()
        self.processes.append(process)
        self.started[process.pid or 0] = time.monotonic()

    def _signal_all(self, sig: int) -> None:
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    def _on_signal(self, _sig: int, _frame: FrameType | None) -> None:
        self.signals += 1  # passed on by the loop, within its 0.2 s


def _worker_main(worker: Worker, host: str, port: int, sockets: list[socket], parent: int) -> None:
    """A worker's first steps: its own session, and an end when its parent is gone."""
    os.setsid()  # a terminal's Ctrl+C reaches the parent only, which passes it on once
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above
        return
    worker(host, port, sockets)
