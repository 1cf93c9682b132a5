"""``countersign serve --workers N``: N real processes on one port and one PostgreSQL.

What an operator sees: turns complete whichever worker takes the request or the run, a
stream follows a run another worker executes, ``/metrics`` shows every worker (per-process
gauges with a ``pid`` label, request counts summed), a killed worker is replaced, and
SIGTERM to the parent stops them all gracefully with exit 0.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_crash_safety import (
    WAIT,
    Database,
    api,
    eventually,
    new_api_key,
    new_session,
    no_traceback,
    replay,
    run_ended,
    send,
)
from tests.support.databases import TestDatabase
from tests.support.server import ServerProcesses, server_env

pytestmark = pytest.mark.slow

TURNS = 12
STEADY_SECONDS = 10
"""How long a worker must have lived for its death not to back off (workers.py)."""


def gauge_pids(metrics: str, name: str) -> dict[int, float]:
    """The per-process values of one gauge, by pid."""
    found = re.findall(rf'^{name}{{pid="(\d+)"}} ([0-9.e+-]+)$', metrics, re.MULTILINE)
    return {int(pid): float(value) for pid, value in found}


def requests_counted(metrics: str, method: str, route: str, status: str) -> float:
    pattern = (
        rf'^countersign_http_requests_total{{method="{method}",route="{re.escape(route)}",'
        rf'status="{status}"}} ([0-9.e+-]+)$'
    )
    found = re.findall(pattern, metrics, re.MULTILINE)
    return float(found[0]) if found else 0.0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.backends("postgres")
async def test_workers_share_the_port_and_the_runs_and_stop_together(
    database: TestDatabase, db: Database, servers: ServerProcesses, tmp_path: Path
) -> None:
    env = server_env(
        database.url, workspace_root=str(tmp_path / "workspaces"), run_lease_seconds="3"
    )
    key = await new_api_key(database.url)
    server = await asyncio.to_thread(servers.start, "workers", env=env, args=["--workers", "2"])

    async with api(server, key) as http, httpx.AsyncClient(base_url=server.base_url) as ops:

        async def workers_shown() -> dict[int, float] | None:
            # Each scrape is answered by one worker; every worker's gauge is in it.
            # (A worker still starting shows a pool size of 0.)
            shown = gauge_pids((await ops.get("/metrics")).text, "countersign_db_pool_size")
            up = {pid: size for pid, size in shown.items() if size > 0}
            return up if len(up) == 2 else None

        pids, _took = await eventually(workers_shown, within=WAIT, what="two workers' gauges")
        assert server.pid not in pids

        # Turns complete whichever worker takes them; streams follow them wherever they run.
        sessions = [await new_session(http) for _ in range(TURNS)]
        runs = await asyncio.gather(
            *(send(http, session, f"turn {n}") for n, session in enumerate(sessions))
        )
        for session, run_id in zip(sessions, runs, strict=True):
            events = await replay(http, session, run_id)
            assert events[-1].event == "run.finished", events
        for run_id in runs:
            state, _ = await run_ended(db, run_id, within=WAIT)
            assert state.status == "succeeded", state

        # The request counts are summed over the workers.
        metrics = (await ops.get("/metrics")).text
        assert requests_counted(metrics, "POST", "/api/v1/sessions", "201") == TURNS

        # A worker killed outright is replaced; the server goes on serving.
        victim = next(iter(pids))
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> dict[int, float] | None:
            try:
                shown = await workers_shown()
            except httpx.TransportError:
                return None  # a kept-alive connection to the killed worker
            return shown if shown is not None and victim not in shown else None

        after, _took = await eventually(replaced, within=WAIT, what="the killed worker's successor")
        assert len(set(after) - set(pids)) == 1, (pids, after)
    # New connections (the old ones may have been the killed worker's): all served.
    async with api(server, key) as http:
        for _ in range(4):
            session = await new_session(http)
            run_id = await send(http, session, "after the kill")
            state, _ = await run_ended(db, run_id, within=WAIT)
            assert state.status == "succeeded", state

    # SIGTERM to the parent: every worker stops gracefully, the parent exits 0.
    stopped = await asyncio.to_thread(server.stop)
    assert (stopped.returncode, stopped.killed) == (0, False), server.tail()
    assert not any(alive(pid) for pid in after), after
    no_traceback(server)


def test_workers_need_postgresql(tmp_path: Path) -> None:
    """On SQLite ``--workers`` is refused in one sentence, before anything starts."""
    env = server_env(f"sqlite:///{tmp_path / 'countersign.db'}")
    done = subprocess.run(
        [sys.executable, "-m", "countersign", "serve", "--workers", "2", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--workers needs PostgreSQL: a SQLite file is served by one process." in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "countersign.db").exists()


@pytest.mark.backends("postgres")
async def test_a_worker_that_keeps_dying_at_start_is_restarted_less_and_less_often(
    database: TestDatabase, servers: ServerProcesses, tmp_path: Path
) -> None:
    """A worker killed soon after it started is replaced after 1 s; its successor, killed as
    soon, after 2 s, the next after 4 s (the back-off doubles; a worker that lived 10 s
    resets it); the other worker serves all along."""
    env = server_env(database.url, workspace_root=str(tmp_path / "workspaces"))
    server = await asyncio.to_thread(servers.start, "backoff", env=env, args=["--workers", "2"])
    seen: set[int] = set()

    async with httpx.AsyncClient(base_url=server.base_url) as ops:

        async def new_workers(count: int) -> list[int] | None:
            try:
                shown = gauge_pids((await ops.get("/metrics")).text, "countersign_db_pool_size")
            except httpx.TransportError:
                return None  # a kept-alive connection to a killed worker
            new = [pid for pid, size in shown.items() if size > 0 and pid not in seen]
            return new if len(new) >= count else None

        first, _ = await eventually(lambda: new_workers(2), within=WAIT, what="two workers")
        seen.update(first)
        victim = first[0]
        delays: list[float] = []
        previous = 0.0
        for _ in range(3):
            os.kill(victim, signal.SIGKILL)
            line = (
                rf"worker {victim} exited with code -9 after (?P<lived>[0-9.]+) s; "
                rf"starting another(?: in (?P<delay>[0-9.]+) s)?"
            )

            async def logged(pattern: str = line) -> re.Match[str] | None:
                return re.search(pattern, server.stderr())

            found, _ = await eventually(logged, within=WAIT, what="the worker's replacement")
            delay = float(found["delay"] or 0)
            # The rule: none after a worker that lived its steady time, else double (from 1 s).
            steady = float(found["lived"]) >= STEADY_SECONDS
            assert delay == (0 if steady else min(30, 2 * previous or 1)), (delay, found[0])
            [successor], took = await eventually(
                lambda: new_workers(1), within=WAIT, what="a successor"
            )
            assert took >= delay * 0.9, (delay, took)  # not before its back-off
            delays.append(delay)
            previous = delay
            seen.add(successor)
            victim = successor
        assert max(delays) >= 2, delays  # the back-off did double at least once
        ready = await ops.get("/health/ready")
        assert ready.status_code == 200, ready.text
    stopped = await asyncio.to_thread(server.stop)
    assert (stopped.returncode, stopped.killed) == (0, False), server.tail()
    no_traceback(server)
