"""Conversation turns, measured: a message in, the agent's reply streamed back over SSE.

Starts ``python -m countersign serve`` (uvicorn on 127.0.0.1) on SQLite and on PostgreSQL,
and a bare FastAPI app served by uvicorn the same way: the floor. The floor's
``POST /api/v1/sessions/{id}/messages`` answers ``Accept: text/event-stream`` with the same
SSE events a ``demo`` run of the message gives (sse-starlette, same names, ids and data keys:
``run.started``, one ``text.delta`` a word of ``You said: <message>``, ``message.completed``,
``run.finished``) and touches no database. The run checks that the shapes match first.

Every turn is one request: ``POST .../messages`` with ``Accept: text/event-stream`` and a
50-word message, read to ``run.finished``. A session takes one run at a time: at concurrency
16 there are 16 sessions, each sending its next message when its previous run ended (a
session is replaced by a fresh one after ``SESSION_TURNS`` turns, so conversations keep a
realistic length). Phases:

1. SQL per turn (one at a time, and 16 at a time) and per approval round trip, counted
   in-process (the same app driven through ``httpx.ASGITransport``) with SQLAlchemy engine and
   pool events, and on the throwaway PostgreSQL from the server's own statement log.
2. Turns at concurrency 1 and 16, in interleaved rounds (floor, sqlite, postgres, floor...):
   turns/s, time to first token (first ``text.delta`` received, from the request's start),
   turn time, and the server process's CPU time per turn (``/proc/<pid>/stat``). A row is
   ``--turns`` turns or ``--row-seconds`` of starting them, whichever ends first.
3. Approval round trips (countersign only): ``/tool write_file {...}`` → ``approval.required``
   → ``POST .../approvals/{id}`` approve → ``GET .../events`` with ``Last-Event-ID`` until
   ``run.finished``.
4. A long run (``--rss-turns``, 10,000 by default) at concurrency 16 on each server: RSS
   before, along and after, CPU per turn, and on PostgreSQL its transactions per turn. It
   stops starting turns when its share of what ``--deadline`` leaves is used up, and says so.

    python bench/turns.py                  # both backends (< 10 min)
    python bench/turns.py --quick          # a smoke run
    python bench/turns.py --backend sqlite --deadline 2100   # all 10,000 long-run turns

Every process this script starts is stopped by its own PID; the whole run is bounded by
``--deadline``. Targets are printed beside the figures, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI, status
from pydantic import BaseModel

from servers import (
    Deadline,
    Postgres,
    Processes,
    StatementCounts,
    StatementLog,
    Target,
    bounded_main,
    counting_sql,
    cpu_seconds,
    create_account,
    has_uvloop,
    in_process_app,
    keyword,
    note,
    open_postgres,
    pg_transactions,
    rss_bytes,
    run_async,
    serve_app,
    start_countersign,
    start_floor,
    statement_logging,
    tail,
    tree_cpu_seconds,
    wait_ready,
)

T = TypeVar("T")

SESSIONS = "/api/v1/sessions"
MESSAGE = (
    "Please read the quarterly report on the shared drive and write a short summary of the "
    "revenue figures for each region, then list the three biggest risks the finance team "
    "mentions, note any numbers that changed since last quarter, and ask Dana whether the "
    "March totals include the late invoices"
)
REPLY = f"You said: {MESSAGE}"
WORD = re.compile(r"\s*\S+")
"""How the demo model cuts its reply into ``text.delta`` events: one word (and the space before
it) each."""
APPROVAL_MESSAGE = '/tool write_file {"path":"f.txt","content":"x"}'
CONCURRENCIES = (1, 16)
SESSION_TURNS = 20
"""Turns a session takes before the load generator moves on to a fresh one."""


@dataclass(frozen=True)
class Sizes:
    """How much of each thing a run does."""

    turns: int
    """Measured turns per server and concurrency (split over the rounds)."""
    approvals: int
    """Measured approval round trips per backend."""
    rss_turns: int
    """Turns per server in the long phase (fewer if its time budget runs out)."""
    statement_turns: int
    """Sequential turns the SQL is counted over (in-process)."""
    statement_approvals: int
    """Sequential approval round trips the SQL is counted over (in-process)."""
    warmup_first: int
    """Uncounted turns a server gets before its first measured chunk."""
    warmup_chunk: int
    """Uncounted turns before every measured chunk (fills the pools at the new concurrency)."""
    row_seconds: float
    """At most this long starting the turns of one row (server and concurrency), and the
    approvals of one backend; split over the rounds."""
    long_seconds: float | None
    """At most this long for the whole long phase (None: what the deadline leaves)."""
    rounds: int
    """Interleaved rounds per concurrency."""


FULL = Sizes(
    turns=200,
    approvals=60,
    rss_turns=10_000,
    statement_turns=50,
    statement_approvals=20,
    warmup_first=16,
    warmup_chunk=8,
    row_seconds=24.0,
    long_seconds=None,
    rounds=2,
)
QUICK = Sizes(
    turns=32,
    approvals=8,
    rss_turns=500,
    statement_turns=8,
    statement_approvals=4,
    warmup_first=8,
    warmup_chunk=4,
    row_seconds=4.0,
    long_seconds=20.0,
    rounds=1,
)
REQUEST_TIMEOUT = 30.0
DEFAULT_DEADLINE = 570.0
QUICK_DEADLINE = 170.0
LONG_RUN_RESERVE = 30.0
"""Seconds the long phase leaves for what comes after it (PostgreSQL counters, the report)."""

TARGET_TTFT_MS = 10.0
TARGET_APPROVAL_MS = 50.0
TARGET_DB_STATEMENTS = 10.0
TARGET_THROUGHPUT = 0.40
TARGET_CPU = 2.0
TARGET_RSS_GROWTH = 0.20

if len(MESSAGE.split()) != 50:  # pragma: no cover - a guard for whoever edits the message
    raise SystemExit(f"MESSAGE has {len(MESSAGE.split())} words, not 50")


# --------------------------------------------------------------------------------------------
# The floor: a bare FastAPI app that streams a demo run's events, without a database


class FloorMessage(BaseModel):
    """The floor's request body: the field of MessageCreate."""

    content: str


def floor_app() -> FastAPI:
    """A FastAPI app whose messages stream the events of a demo run, made up on the spot."""
    from sse_starlette import EventSourceResponse, ServerSentEvent

    app = FastAPI()

    @app.post(SESSIONS, status_code=status.HTTP_201_CREATED)
    async def create_session() -> dict[str, str]:
        return {"id": str(uuid.uuid4())}

    @app.post(SESSIONS + "/{session_id}/messages")
    async def send_message(session_id: uuid.UUID, body: FloorMessage) -> EventSourceResponse:
        run_id = str(uuid.uuid4())

        async def events() -> AsyncIterator[ServerSentEvent]:
            reply = f"You said: {body.content}"
            chunks: list[tuple[str, dict[str, Any]]] = [
                ("run.started", {"attempt": 1, "resumed_from_seq": 0}),
                *(("text.delta", {"text": word}) for word in WORD.findall(reply)),
                ("message.completed", {"message_id": str(uuid.uuid4()), "content": reply}),
                ("run.finished", {"status": "succeeded"}),
            ]
            for seq, (name, data) in enumerate(chunks, start=1):
                payload = {**data, "run_id": run_id, "seq": seq, "attempt": 1}
                yield ServerSentEvent(data=json.dumps(payload), event=name, id=str(seq))

        return EventSourceResponse(
            events(), ping=15, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    @app.get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    return app


# --------------------------------------------------------------------------------------------
# The client side of a turn


@dataclass
class Event:
    """One server-sent event as the client parsed it."""

    id: str | None
    name: str
    data: dict[str, Any]


async def sse_events(response: httpx.Response) -> AsyncIterator[Event]:
    """The events of a streamed SSE response (pings and comments left out)."""
    name: str | None = None
    event_id: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if name is not None or data:
                yield Event(event_id, name or "message", json.loads("\n".join(data) or "{}"))
            name, event_id, data = None, None, []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
        elif key == "id":
            event_id = value


class TurnFailed(Exception):
    """A turn did not go as a demo run goes."""


def stream_headers(auth: dict[str, str], *, last_event_id: str | None = None) -> dict[str, str]:
    """The caller's headers plus ``Accept: text/event-stream``."""
    headers = {**auth, "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return headers


async def new_session(client: httpx.AsyncClient, auth: dict[str, str]) -> str:
    """Create a session (default agent); its id."""
    response = await client.post(SESSIONS, json={"title": "bench"}, headers=auth)
    if response.status_code != 201:
        raise TurnFailed(f"POST {SESSIONS} answered {response.status_code}: {response.text[:200]}")
    return str(response.json()["id"])


async def stream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    body: dict[str, Any] | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> list[Event]:
    """Send a request whose answer is an SSE stream; its events, read to the end."""
    events: list[Event] = []
    async with client.stream(method, url, json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            raise TurnFailed(f"{method} {url} answered {response.status_code}: {response.text}")
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            raise TurnFailed(f"{method} {url} answered {response.headers.get('content-type')}")
        async for event in sse_events(response):
            events.append(event)
            if on_event is not None:
                on_event(event)
    return events


@dataclass
class TurnTimes:
    """One turn as the client saw it (seconds from the request's start)."""

    first_token: float
    total: float
    events: list[Event]


async def one_turn(
    client: httpx.AsyncClient, auth: dict[str, str], session_id: str, content: str = MESSAGE
) -> TurnTimes:
    """Send a message with Accept: text/event-stream and read the run to its end."""
    first: list[float] = []
    started = time.perf_counter()

    def seen(event: Event) -> None:
        if not first and event.name == "text.delta":
            first.append(time.perf_counter())

    events = await stream(
        client,
        "POST",
        f"{SESSIONS}/{session_id}/messages",
        headers=stream_headers(auth),
        body={"content": content},
        on_event=seen,
    )
    total = time.perf_counter() - started
    if not events or events[-1].name != "run.finished":
        last = events[-1].name if events else "nothing"
        reason = events[-1].data.get("reason") if events else None
        because = f" ({reason})" if reason else ""
        raise TurnFailed(f"the stream ended with {last}{because}, not run.finished")
    text = "".join(str(e.data.get("text", "")) for e in events if e.name == "text.delta")
    if content == MESSAGE and text != REPLY:
        raise TurnFailed(f"the reply was {text[:80]!r}, not {REPLY[:40]!r}...")
    return TurnTimes(
        first_token=(first[0] - started) if first else math.nan, total=total, events=events
    )


@dataclass
class ApprovalTimes:
    """One approval round trip (seconds)."""

    ask_to_required: float
    """From sending the tool message to ``approval.required`` received."""
    decision_post: float
    """The ``POST .../approvals/{id}`` request alone."""
    decision_to_finished: float
    """From sending the decision to ``run.finished`` received on the resumed stream."""
    ask_to_finished: float


async def one_approval(
    client: httpx.AsyncClient, auth: dict[str, str], session_id: str
) -> ApprovalTimes:
    """Ask for a write_file, approve it, follow the run to its end."""
    started = time.perf_counter()
    asked = await stream(
        client,
        "POST",
        f"{SESSIONS}/{session_id}/messages",
        headers=stream_headers(auth),
        body={"content": APPROVAL_MESSAGE},
    )
    required = time.perf_counter()
    if not asked or asked[-1].name != "approval.required":
        last = asked[-1].name if asked else "nothing"
        raise TurnFailed(f"the tool message's stream ended with {last}, not approval.required")
    approval_id = asked[-1].data["approval_id"]
    run_id = asked[-1].data["run_id"]
    decide = time.perf_counter()
    response = await client.post(
        f"{SESSIONS}/{session_id}/approvals/{approval_id}",
        json={"decision": "approve"},
        headers=auth,
    )
    decided = time.perf_counter()
    if response.status_code != 200:
        raise TurnFailed(f"the decision answered {response.status_code}: {response.text[:200]}")
    rest = await stream(
        client,
        "GET",
        f"{SESSIONS}/{session_id}/runs/{run_id}/events",
        headers=stream_headers(auth, last_event_id=asked[-1].id),
    )
    finished = time.perf_counter()
    names = [event.name for event in rest]
    if not names or names[-1] != "run.finished" or "tool.result" not in names:
        raise TurnFailed(f"after the decision the stream was {names}")
    return ApprovalTimes(
        ask_to_required=required - started,
        decision_post=decided - decide,
        decision_to_finished=finished - decide,
        ask_to_finished=finished - started,
    )


# --------------------------------------------------------------------------------------------
# Load


def percentile(values: list[float], p: int) -> float:
    """The p-th percentile in milliseconds (nan when there is nothing)."""
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return values[0] * 1000 if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] * 1000


@dataclass
class Sample:
    """Turns of one server at one concurrency, and what they cost the server."""

    first_token: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    approvals: list[ApprovalTimes] = field(default_factory=list)
    elapsed: float = 0.0
    cpu: float = 0.0
    """Server process CPU seconds (user + system) over the measured turns."""
    db_cpu: float | None = None
    """PostgreSQL's CPU seconds (postmaster and backends), when the server is ours."""
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        """Turns (or approval round trips) that went as they should."""
        return len(self.total) + len(self.approvals)

    @property
    def throughput(self) -> float:
        """Successful turns per second of wall time."""
        return self.ok / self.elapsed if self.elapsed else 0.0

    def per_turn_ms(self, seconds: float | None) -> float:
        """A cost in seconds as milliseconds per successful turn."""
        if seconds is None or not self.ok:
            return math.nan
        return seconds / self.ok * 1000

    def fail(self, problem: str) -> None:
        """Count an error and keep the first few."""
        self.errors += 1
        if len(self.error_examples) < 3:
            self.error_examples.append(problem)


class SessionPool:
    """Sessions made before the clock starts; each worker takes a fresh one when it needs it."""

    def __init__(self, client: httpx.AsyncClient, auth: dict[str, str]) -> None:
        self.client = client
        self.auth = auth
        self.ready: list[str] = []

    async def fill(self, count: int, *, concurrency: int = 16) -> None:
        """Create ``count`` sessions now."""
        tickets = iter(range(count))

        async def worker() -> None:
            for _ in tickets:
                self.ready.append(await new_session(self.client, self.auth))

        await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))

    async def take(self) -> str:
        """A session nobody has used (made now if the pool ran dry)."""
        if self.ready:
            return self.ready.pop()
        return await new_session(self.client, self.auth)


def sessions_needed(turns: int, concurrency: int) -> int:
    """Sessions a chunk of ``turns`` can use up at ``concurrency``."""
    return math.ceil(turns / SESSION_TURNS) + concurrency


async def drive(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    *,
    turns: int,
    concurrency: int,
    into: Sample,
    pid: int | None = None,
    db_pid: int | None = None,
    approvals: bool = False,
    pool: SessionPool | None = None,
    stop_at: float | None = None,
) -> None:
    """Up to ``turns`` turns (or approval round trips) with ``concurrency`` sessions at a time.

    The sessions are made before the clock starts (unless ``pool`` already has them). The CPU
    time of process ``pid`` (and of PostgreSQL's postmaster ``db_pid`` and its backends) is
    read around the turns alone. No turn starts after ``stop_at`` (``time.monotonic()``).
    """
    if pool is None:
        pool = SessionPool(client, auth)
        await pool.fill(sessions_needed(turns, concurrency))
    tickets = iter(range(turns))

    async def worker() -> None:
        session: str | None = None
        used = 0
        for _ in tickets:
            if stop_at is not None and time.monotonic() >= stop_at:
                return
            try:
                if session is None or used >= SESSION_TURNS:
                    session, used = await pool.take(), 0
                used += 1
                if approvals:
                    into.approvals.append(await one_approval(client, auth, session))
                else:
                    times = await one_turn(client, auth, session)
                    into.first_token.append(times.first_token)
                    into.total.append(times.total)
            except (TurnFailed, httpx.HTTPError, KeyError, ValueError) as exc:
                into.fail(f"{type(exc).__name__}: {exc}"[:300])
                session = None  # the session may still have a run going: leave it

    cpu_before = cpu_seconds(pid) if pid else 0.0
    db_before = tree_cpu_seconds(db_pid) if db_pid else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    into.elapsed += time.perf_counter() - started
    if pid:
        into.cpu += cpu_seconds(pid) - cpu_before
    if db_pid:
        into.db_cpu = (into.db_cpu or 0.0) + tree_cpu_seconds(db_pid) - db_before


def client_for(target: Target) -> httpx.AsyncClient:
    """An HTTP client with room for every session at once."""
    limits = httpx.Limits(max_connections=max(CONCURRENCIES) + 4, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=target.base_url, limits=limits, timeout=REQUEST_TIMEOUT)


def shape(events: list[Event]) -> list[tuple[str, tuple[str, ...]]]:
    """A stream's event names and data keys, in order."""
    return [(event.name, tuple(sorted(event.data))) for event in events]


async def check_shapes(targets: list[Target]) -> int:
    """Every server streams the same events with the same keys for one turn; their number."""
    shapes: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for target in targets:
        async with client_for(target) as client:
            session = await new_session(client, target.headers)
            shapes[target.name] = shape((await one_turn(client, target.headers, session)).events)
    floor = shapes["floor"]
    for name, found in shapes.items():
        if found != floor:
            differences = [
                f"#{i + 1}: {a} vs {b}"
                for i, (a, b) in enumerate(zip(found, floor, strict=False))
                if a != b
            ][:3]
            raise RuntimeError(
                f"{name} streams {len(found)} events, the floor {len(floor)}; "
                f"first differences: {differences}"
            )
    return len(floor)


@dataclass
class Measured:
    """Everything the timed phases found."""

    turns: dict[tuple[str, int], Sample]
    approvals: dict[str, Sample]


async def load(targets: list[Target], *, sizes: Sizes, rounds: int, db_pid: int | None) -> Measured:
    """Interleaved rounds: turns at each concurrency, then approval round trips.

    Each measured chunk is ``sizes.turns / rounds`` turns, or ``sizes.row_seconds / rounds``
    seconds of starting turns, whichever ends first.
    """
    samples = {(t.name, c): Sample() for t in targets for c in CONCURRENCIES}
    approval_samples = {t.name: Sample() for t in targets if t.name != "floor"}
    clients = {t.name: client_for(t) for t in targets}
    chunk_seconds = sizes.row_seconds / rounds

    async def measure(
        target: Target, *, turns: int, concurrency: int, into: Sample, approvals: bool = False
    ) -> None:
        client = clients[target.name]
        warm = min(sizes.warmup_chunk, 3) if approvals else sizes.warmup_chunk
        await drive(
            client,
            target.headers,
            turns=warm,
            concurrency=concurrency,
            into=Sample(),
            approvals=approvals,
        )
        pool = SessionPool(client, target.headers)
        await pool.fill(sessions_needed(turns, concurrency))
        await drive(
            client,
            target.headers,
            turns=turns,
            concurrency=concurrency,
            into=into,
            pid=target.process.pid,
            db_pid=db_pid if target.name == "postgres" else None,
            approvals=approvals,
            pool=pool,
            stop_at=time.monotonic() + chunk_seconds,
        )

    try:
        for target in targets:
            await drive(
                clients[target.name],
                target.headers,
                turns=sizes.warmup_first,
                concurrency=4,
                into=Sample(),
            )
        for concurrency in CONCURRENCIES:
            for chunk in split(sizes.turns, rounds):
                for target in targets:
                    await measure(
                        target,
                        turns=chunk,
                        concurrency=concurrency,
                        into=samples[(target.name, concurrency)],
                    )
        for chunk in split(sizes.approvals, rounds):
            for target in targets:
                if target.name != "floor":
                    await measure(
                        target,
                        turns=chunk,
                        concurrency=1,
                        into=approval_samples[target.name],
                        approvals=True,
                    )
    finally:
        for client in clients.values():
            await client.aclose()
    return Measured(turns=samples, approvals=approval_samples)


def split(total: int, rounds: int) -> list[int]:
    """``total`` in ``rounds`` nearly equal chunks."""
    return [total // rounds + (i < total % rounds) for i in range(rounds)]


@dataclass
class LongRun:
    """The long phase on one server: memory before and after, and what the turns cost."""

    asked: int
    """Turns asked for; fewer are done when the phase's time budget runs out."""
    rss_ready: int
    rss_before: int
    rss_after: int
    sample: Sample
    db_transactions: float | None = None
    """PostgreSQL transactions per turn (pg_stat_database), when measured (the counter
    before the turns until ``finish_long_run``)."""
    trace: list[tuple[int, int]] = field(default_factory=list)
    """(turns done, RSS) along the way."""

    @property
    def turns(self) -> int:
        """Turns done."""
        return self.sample.ok

    @property
    def growth(self) -> float:
        """RSS growth over the phase, as a fraction of the RSS at its start."""
        return (self.rss_after - self.rss_before) / self.rss_before


async def long_run(
    target: Target,
    *,
    turns: int,
    until: float,
    expected_rate: float,
    rss_ready: int,
    postgres: Postgres | None,
) -> LongRun:
    """Up to ``turns`` turns at the highest concurrency, none started after ``until``
    (``time.monotonic()``); the server's RSS before and after.

    Sessions for the turns expected in the time (at ``expected_rate`` turns/s) are made
    first; any more are made as needed. With ``postgres`` (the PostgreSQL target), its CPU is
    read too (a throwaway server), and its transaction counter before the turns, for
    ``finish_long_run``.
    """
    concurrency = max(CONCURRENCIES)
    sample = Sample()
    async with client_for(target) as client:
        pool = SessionPool(client, target.headers)
        budget = max(0.0, until - time.monotonic())
        expected = min(turns, math.ceil(expected_rate * budget * 1.2) + concurrency)
        await pool.fill(sessions_needed(expected, concurrency))
        transactions = None
        if postgres is not None:
            transactions = await pg_transactions(postgres.server, postgres.database)
        rss_before = rss_bytes(target.process.pid)
        trace: list[tuple[int, int]] = [(0, rss_before)]

        async def watch() -> None:
            """RSS after every tenth of the turns asked (or every 10 s, if sooner)."""
            step = max(1, turns // 10)
            while True:
                await asyncio.sleep(0.25)
                done = sample.ok
                last_turns, _ = trace[-1]
                if done - last_turns >= step or len(trace) < (time.monotonic() - began) / 10:
                    trace.append((done, rss_bytes(target.process.pid)))

        began = time.monotonic()
        watcher = asyncio.create_task(watch())
        try:
            await drive(
                client,
                target.headers,
                turns=turns,
                concurrency=concurrency,
                into=sample,
                pid=target.process.pid,
                db_pid=postgres.postmaster_pid() if postgres is not None else None,
                pool=pool,
                stop_at=until,
            )
        finally:
            watcher.cancel()
        rss_after = rss_bytes(target.process.pid)
        trace.append((sample.ok, rss_after))
    return LongRun(
        asked=turns,
        rss_ready=rss_ready,
        rss_before=rss_before,
        rss_after=rss_after,
        sample=sample,
        db_transactions=transactions,
        trace=trace,
    )


# --------------------------------------------------------------------------------------------
# SQL per turn, counted in-process with SQLAlchemy events (and PostgreSQL's own log)


@dataclass
class TurnStatements:
    """SQL behind turns one at a time, turns 16 at a time, and approval round trips."""

    flows: dict[str, StatementCounts]


async def count_statements(
    database_url: str, key: str, *, sizes: Sizes, log: StatementLog | None
) -> TurnStatements:
    """Drive the real app in-process and count the SQL behind its turns.

    The count covers everything the process sent while the turns ran: the request's own
    units of work, the executor's (claim, context, event batches, finish, heartbeats) and the
    SSE stream's reads. Sessions are made before counting starts. Three flows: turns one at a
    time, turns at the highest concurrency (at most ``sizes.row_seconds`` of starting them),
    and approval round trips one at a time.
    """
    auth = {"Authorization": f"Bearer {key}"}
    top = max(CONCURRENCIES)
    flows = (
        ("turn, c=1", sizes.statement_turns, 1, False),
        (f"turn, c={top}", sizes.statement_turns, top, False),
        ("approval", sizes.statement_approvals, 1, True),
    )
    found: dict[str, StatementCounts] = {}
    async with in_process_app(database_url) as client:
        for _ in range(3):  # warm-up: first-use work (API key last_used_at) is not typical
            await one_turn(client, auth, await new_session(client, auth))
        for flow, turns, concurrency, approvals in flows:
            pool = SessionPool(client, auth)
            await pool.fill(sessions_needed(turns, concurrency))
            sample = Sample()
            start = log.offset() if log else 0
            with counting_sql() as counts:
                await drive(
                    client,
                    auth,
                    turns=turns,
                    concurrency=concurrency,
                    into=sample,
                    approvals=approvals,
                    pool=pool,
                    # Turns at concurrency 16 on a slow backend take long: half a row's time.
                    stop_at=time.monotonic() + sizes.row_seconds / (2 if concurrency > 1 else 1),
                )
            if sample.errors:
                raise RuntimeError(
                    f"in-process {flow}: {sample.errors} failed: {sample.error_examples[0]}"
                )
            counts.requests = sample.ok
            if log is not None:
                counts.received = Counter(keyword(line) for line in log.since(start))
                counts.received_from = "PostgreSQL statement log"
            elif database_url.startswith("sqlite"):
                counts.received = Counter(counts.statements)
                counts.received["BEGIN"] += counts.begins
                counts.received["COMMIT"] += counts.commits
                counts.received["ROLLBACK"] += counts.rollbacks
                counts.received_from = "SQLite driver calls"
            found[flow] = counts
    return TurnStatements(flows=found)


# --------------------------------------------------------------------------------------------
# Report


def ratio(value: float, floor: float) -> float:
    """value / floor, nan when either is missing."""
    if math.isnan(value) or math.isnan(floor) or not floor:
        return math.nan
    return value / floor


def cell(value: float | None, width: int, digits: int = 2) -> str:
    """A right-aligned number, or '-' for a missing one."""
    if value is None or math.isnan(value):
        return f"{'-':>{width}}"
    return f"{value:>{width}.{digits}f}"


def per(counts: StatementCounts, counter: Counter[str]) -> str:
    """``1.00 SELECT, 1.00 INSERT``: a counter per turn, biggest first."""
    return ", ".join(
        f"{counts.per_request(n):.2f} {kind}" for kind, n in counter.most_common() if n
    )


def db_statements(counts: StatementCounts) -> float:
    """What the database executed per turn (round trips), nan when it cannot be seen."""
    if not counts.received_from:
        return math.nan
    return counts.per_request(sum(counts.received.values()))


def verdict(value: float, target: float, *, at_most: bool) -> str:
    """'met' or 'MISSED' (or 'n/a' without a figure)."""
    if math.isnan(value):
        return "n/a"
    return "met" if (value <= target if at_most else value >= target) else "MISSED"


@dataclass
class Results:
    """What the report needs."""

    targets: list[Target]
    measured: Measured
    statements: dict[str, TurnStatements]
    long_runs: dict[str, LongRun]
    events_per_turn: int


def print_report(results: Results, args: argparse.Namespace, context: str) -> None:
    """The figures, each beside the floor measured in the same run."""
    names = [target.name for target in results.targets]
    backends = [name for name in names if name != "floor"]
    turns = results.measured.turns
    sizes: Sizes = args.sizes
    print(f"command: {args.command}")
    print(
        f"Turns: POST {SESSIONS}/{{id}}/messages with Accept: text/event-stream, a 50-word "
        f"message to the demo model ({results.events_per_turn} SSE events a turn), "
        f"up to {sizes.turns} measured turns or {sizes.row_seconds:.0f} s of starting them per "
        f"row, in {args.rounds} interleaved round(s); "
        f"a session takes {SESSION_TURNS} turns, one run at a time\n({context})\n"
        "x floor = countersign / floor measured in the same run. TTFT = first text.delta "
        "received, from the request's start. CPU = the server process's user+system time."
    )
    print()
    header = (
        f"{'backend':<9}{'conc':>5}{'turns':>6}{'turns/s':>9}{'x floor':>9}{'TTFT p50':>10}"
        f"{'TTFT p99':>10}"
        f"{'turn p50':>10}{'turn p99':>10}{'p50 x fl':>10}{'CPU ms/turn':>13}{'x floor':>9}"
        f"{'PG CPU ms':>11}{'errors':>8}"
    )
    print(header)
    print("-" * len(header))
    for concurrency in CONCURRENCIES:
        floor = turns[("floor", concurrency)]
        for name in names:
            sample = turns[(name, concurrency)]
            cpu = sample.per_turn_ms(sample.cpu)
            print(
                f"{name:<9}{concurrency:>5}{sample.ok:>6}{sample.throughput:>9.1f}"
                f"{cell(ratio(sample.throughput, floor.throughput), 9, 3)}"
                f"{cell(percentile(sample.first_token, 50), 10)}"
                f"{cell(percentile(sample.first_token, 99), 10)}"
                f"{cell(percentile(sample.total, 50), 10)}"
                f"{cell(percentile(sample.total, 99), 10)}"
                f"{cell(ratio(percentile(sample.total, 50), percentile(floor.total, 50)), 10)}"
                f"{cell(cpu, 13)}{cell(ratio(cpu, floor.per_turn_ms(floor.cpu)), 9)}"
                f"{cell(sample.per_turn_ms(sample.db_cpu), 11)}{sample.errors:>8}"
            )
        print()

    approvals = results.measured.approvals
    if approvals:
        print(
            f"Approval round trips (concurrency 1, up to {sizes.approvals} per backend): send "
            f"{APPROVAL_MESSAGE!r} → approval.required → POST decision approve → GET events "
            "with Last-Event-ID → run.finished. Milliseconds."
        )
        header = (
            f"{'backend':<9}{'decision→finished p50':>23}{'p99':>9}{'ask→finished p50':>18}"
            f"{'ask→approval.required p50':>27}{'decision POST p50':>19}{'n':>5}{'errors':>8}"
        )
        print(header)
        print("-" * len(header))
        for name in backends:
            sample = approvals[name]
            done = [a.decision_to_finished for a in sample.approvals]
            print(
                f"{name:<9}{cell(percentile(done, 50), 23)}{cell(percentile(done, 99), 9)}"
                f"{cell(percentile([a.ask_to_finished for a in sample.approvals], 50), 18)}"
                f"{cell(percentile([a.ask_to_required for a in sample.approvals], 50), 27)}"
                f"{cell(percentile([a.decision_post for a in sample.approvals], 50), 19)}"
                f"{len(sample.approvals):>5}{sample.errors:>8}"
            )
        print()

    if results.statements:
        top = max(CONCURRENCIES)
        print(
            "SQL, counted in-process (the same app through httpx.ASGITransport) with SQLAlchemy "
            "engine and pool events; DB stmts = what the database executed (SQLite: driver "
            "calls; PostgreSQL: its statement log), i.e. round trips. An approval row is per "
            "round trip."
        )
        header = (
            f"{'backend':<9}{'flow':<12}{'turns':>6}{'SQL/turn':>10}{'tx/turn':>9}"
            f"{'DB stmts/turn':>15}{'pool checkouts':>16}"
        )
        print(header)
        print("-" * len(header))
        for name, found in results.statements.items():
            for flow, counts in found.flows.items():
                print(
                    f"{name:<9}{flow:<12}{counts.requests:>6}"
                    f"{counts.per_request(counts.total_statements):>10.2f}"
                    f"{counts.per_request(counts.begins):>9.2f}"
                    f"{cell(db_statements(counts), 15)}"
                    f"{counts.per_request(counts.checkouts):>16.2f}"
                )
        print()
        for name, found in results.statements.items():
            one, many = found.flows["turn, c=1"], found.flows[f"turn, c={top}"]
            for label, counts in (("c=1", one), (f"c={top}", many)):
                print(
                    f"  {name}, {label}, per turn: {per(counts, counts.statements)}; "
                    f"{counts.per_request(counts.commits):.2f} commit, "
                    f"{counts.per_request(counts.rollbacks):.2f} rollback"
                )
                if counts.received_from:
                    print(
                        f"    the database executed ({counts.received_from}): "
                        f"{per(counts, counts.received)}"
                    )
            print(f"  {name}, the most frequent statements, per turn:")
            print(f"    {'c=1':>7}{f'c={top}':>8}  statement")
            texts = (one.by_text + many.by_text).most_common(args.show_statements)
            for statement, _n in texts:
                print(
                    f"    {one.per_request(one.by_text[statement]):>7.2f}"
                    f"{many.per_request(many.by_text[statement]):>8.2f}  {statement[:120]}"
                )
        print()

    if results.long_runs:
        floor_run = results.long_runs.get("floor")
        print(
            f"Long run: up to {sizes.rss_turns} turns per server at concurrency "
            f"{max(CONCURRENCIES)}, within the deadline (RSS of the server process from /proc: "
            "at start-up, before and after this phase; growth is over this phase)."
        )
        header = (
            f"{'backend':<9}{'turns':>7}{'turns/s':>9}{'RSS ready MB':>14}{'before MB':>11}"
            f"{'after MB':>10}{'growth':>8}{'RSS x floor':>13}{'CPU ms/turn':>13}"
            f"{'x floor':>9}{'PG CPU ms':>11}{'PG tx/turn':>12}{'errors':>8}"
        )
        print(header)
        print("-" * len(header))
        for name, run in results.long_runs.items():
            cpu = run.sample.per_turn_ms(run.sample.cpu)
            floor_cpu = (
                floor_run.sample.per_turn_ms(floor_run.sample.cpu) if floor_run else math.nan
            )
            rss_ratio = ratio(run.rss_after, floor_run.rss_after) if floor_run else math.nan
            print(
                f"{name:<9}{run.turns:>7}{run.sample.throughput:>9.1f}"
                f"{run.rss_ready / 2**20:>14.1f}"
                f"{run.rss_before / 2**20:>11.1f}{run.rss_after / 2**20:>10.1f}"
                f"{run.growth:>8.1%}{cell(rss_ratio, 13)}{cell(cpu, 13)}"
                f"{cell(ratio(cpu, floor_cpu), 9)}"
                f"{cell(run.sample.per_turn_ms(run.sample.db_cpu), 11)}"
                f"{cell(run.db_transactions, 12)}{run.sample.errors:>8}"
            )
        print()
        print("  RSS along the long run, MB at turns done:")
        for name, run in results.long_runs.items():
            points = thin(run.trace, 12)
            print(f"  {name:<9}" + ", ".join(f"{n}: {rss / 2**20:.1f}" for n, rss in points))
        print()

    print_targets(results)
    for (name, concurrency), sample in turns.items():
        for example in sample.error_examples:
            print(f"  error {name} conc {concurrency}: {example}")
    for name, sample in approvals.items():
        for example in sample.error_examples:
            print(f"  error {name} approvals: {example}")
    for name, run in results.long_runs.items():
        for example in run.sample.error_examples:
            print(f"  error {name} long run: {example}")


def thin(points: list[T], most: int) -> list[T]:
    """At most ``most`` of the points, evenly spread, the first and last kept."""
    if len(points) <= most:
        return points
    step = (len(points) - 1) / (most - 1)
    return [points[round(i * step)] for i in range(most)]


def print_targets(results: Results) -> None:
    """Each target beside the figure it is about (printed, not asserted)."""
    backends = [t.name for t in results.targets if t.name != "floor"]
    turns = results.measured.turns
    top = max(CONCURRENCIES)
    rows: list[str] = []

    def add(name: str, figure: str, value: float, target: str, met: str) -> None:
        rows.append(f"{name:<9}{figure:<50}{cell(value, 9)}  {target:<14}{met}")

    for name in backends:
        ttft = percentile(turns[(name, 1)].first_token, 50)
        add(
            name,
            "TTFT p50 at c=1, ms",
            ttft,
            f"<= {TARGET_TTFT_MS:.0f}",
            verdict(ttft, TARGET_TTFT_MS, at_most=True),
        )
        done = [a.decision_to_finished for a in results.measured.approvals[name].approvals]
        approval = percentile(done, 50)
        add(
            name,
            "approval round trip p50 (decision→run.finished), ms",
            approval,
            f"<= {TARGET_APPROVAL_MS:.0f}",
            verdict(approval, TARGET_APPROVAL_MS, at_most=True),
        )
        for flow, counts in results.statements.get(name, TurnStatements({})).flows.items():
            if not flow.startswith("turn"):
                continue
            sql = db_statements(counts)
            add(
                name,
                f"SQL round trips per turn, {flow.removeprefix('turn, ')} (DB stmts/turn)",
                sql,
                f"<= {TARGET_DB_STATEMENTS:.0f}",
                verdict(sql, TARGET_DB_STATEMENTS, at_most=True),
            )
        thru = ratio(turns[(name, top)].throughput, turns[("floor", top)].throughput)
        add(
            name,
            f"turns/s at c={top}, x floor",
            thru,
            f">= {TARGET_THROUGHPUT:.2f}",
            verdict(thru, TARGET_THROUGHPUT, at_most=False)
            + ("" if name == "sqlite" else " (the target is SQLite's)"),
        )
        long = results.long_runs.get(name)
        floor = results.long_runs.get("floor")
        if long is not None and floor is not None:
            cpu = ratio(
                long.sample.per_turn_ms(long.sample.cpu), floor.sample.per_turn_ms(floor.sample.cpu)
            )
            add(
                name,
                "server CPU per turn x floor (long run)",
                cpu,
                f"<= {TARGET_CPU:.1f}",
                verdict(cpu, TARGET_CPU, at_most=True),
            )
            short = "" if long.turns >= long.asked else f" (of {long.asked} asked)"
            add(
                name,
                f"RSS growth over {long.turns} turns{short}, %",
                long.growth * 100,
                f"<= {TARGET_RSS_GROWTH:.0%} (10k)",
                verdict(long.growth, TARGET_RSS_GROWTH, at_most=True),
            )
    print("Targets (printed beside the figures, not asserted):")
    header = f"{'backend':<9}{'figure':<50}{'value':>9}  {'target':<14}"
    print(header)
    print("-" * (len(header) + 8))
    for row in rows:
        print(row)
    print()


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Conversation turns (a message in, the reply streamed over SSE) on SQLite "
        "and PostgreSQL, beside a bare-FastAPI floor measured in the same run."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"A smoke run (< 2 min): {QUICK.turns} turns per row, {QUICK.approvals} "
        f"approvals, {QUICK.rss_turns} turns in the long run.",
    )
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres", "both"],
        default="both",
        help="Which database(s) to measure (default both).",
    )
    parser.add_argument(
        "--turns",
        type=int,
        help=f"Measured turns per server and concurrency (default {FULL.turns}).",
    )
    parser.add_argument(
        "--approvals",
        type=int,
        help=f"Measured approval round trips per backend (default {FULL.approvals}).",
    )
    parser.add_argument(
        "--rss-turns",
        type=int,
        help=f"Turns per server in the long phase (default {FULL.rss_turns}; 0 skips it). The "
        "phase stops early, saying so, when it would pass the deadline: raise --deadline to "
        "get them all.",
    )
    parser.add_argument(
        "--statement-turns",
        type=int,
        help=f"Sequential turns the SQL is counted over (default {FULL.statement_turns}).",
    )
    parser.add_argument(
        "--row-seconds",
        type=float,
        help="Stop starting turns of a row (server, concurrency) after this many seconds, "
        f"even if --turns are not done (default {FULL.row_seconds:.0f}; quick "
        f"{QUICK.row_seconds:.0f}).",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"Interleaved rounds per concurrency (default {FULL.rounds}; quick {QUICK.rounds}).",
    )
    parser.add_argument(
        "--show-statements",
        type=int,
        default=15,
        metavar="N",
        help="Print the N most frequent SQL statements of a turn (default 15).",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        help="Give up after this many seconds, stopping everything; the long phase fits itself "
        f"in what is left (default {DEFAULT_DEADLINE:.0f}; quick {QUICK_DEADLINE:.0f}).",
    )
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.command = shlex.join(["python", "bench/turns.py", *given])
    preset = QUICK if args.quick else FULL
    args.sizes = Sizes(
        turns=preset.turns if args.turns is None else args.turns,
        approvals=preset.approvals if args.approvals is None else args.approvals,
        rss_turns=preset.rss_turns if args.rss_turns is None else args.rss_turns,
        statement_turns=(
            preset.statement_turns if args.statement_turns is None else args.statement_turns
        ),
        statement_approvals=preset.statement_approvals,
        warmup_first=preset.warmup_first,
        warmup_chunk=preset.warmup_chunk,
        row_seconds=preset.row_seconds if args.row_seconds is None else args.row_seconds,
        long_seconds=preset.long_seconds,
        rounds=preset.rounds if args.rounds is None else args.rounds,
    )
    args.rounds = args.sizes.rounds
    sizes: Sizes = args.sizes
    if sizes.turns < 1 or sizes.rounds < 1 or sizes.rounds > sizes.turns:
        parser.error("--turns and --rounds must be positive, rounds <= turns")
    if sizes.approvals < sizes.rounds or sizes.statement_turns < 1 or sizes.rss_turns < 0:
        parser.error("--approvals must be >= --rounds, --statement-turns >= 1, --rss-turns >= 0")
    if args.deadline is None:
        args.deadline = QUICK_DEADLINE if args.quick else DEFAULT_DEADLINE
    if args.deadline <= 0:
        parser.error("--deadline must be positive")
    return args


def run(args: argparse.Namespace, deadline: Deadline, processes: Processes, work: Path) -> int:
    """The whole measurement; returns the exit code."""
    sizes: Sizes = args.sizes
    load_at_start = os.getloadavg()[0]
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    postgres: Postgres | None = None
    try:
        urls: dict[str, str] = {}
        if "sqlite" in backends:
            urls["sqlite"] = f"sqlite:///{work / 'bench.db'}"
        if "postgres" in backends:
            postgres = open_postgres(deadline)
            urls["postgres"] = postgres.url
        db_pid = postgres.postmaster_pid() if postgres is not None else None

        note(f"{', '.join(urls)}: migrating, creating the user and an API key", deadline)
        with ThreadPoolExecutor(max_workers=len(urls)) as threads:
            made = {
                name: threads.submit(create_account, url, cwd=work, deadline=deadline)
                for name, url in urls.items()
            }
            keys = {name: future.result() for name, future in made.items()}

        statements: dict[str, TurnStatements] = {}
        for name, url in urls.items():
            note(
                f"{name}: counting SQL in-process ({sizes.statement_turns} turns, "
                f"{sizes.statement_approvals} approvals)",
                deadline,
            )
            with statement_logging(postgres if name == "postgres" else None, deadline) as log:
                statements[name] = run_async(
                    count_statements(url, keys[name], sizes=sizes, log=log),
                    deadline,
                    limit=120,
                )

        note("starting the servers", deadline)
        targets = [
            start_floor(
                Path(__file__), processes=processes, work=work, deadline=deadline, wait=False
            )
        ]
        for name, url in urls.items():
            targets.append(
                start_countersign(
                    name,
                    url,
                    keys[name],
                    processes=processes,
                    work=work,
                    deadline=deadline,
                    wait=False,
                )
            )
        for target in targets:
            wait_ready(target, deadline)
        rss_ready = {target.name: rss_bytes(target.process.pid) for target in targets}
        events_per_turn = run_async(check_shapes(targets), deadline, limit=60)

        note(
            f"load: {sizes.turns} turns x {len(CONCURRENCIES)} concurrencies x {len(targets)} "
            f"servers in {args.rounds} rounds, then {sizes.approvals} approvals per backend",
            deadline,
        )
        measured = run_async(
            load(
                targets,
                sizes=sizes,
                rounds=args.rounds,
                db_pid=db_pid,
            ),
            deadline,
        )
        check_alive(targets)

        long_runs: dict[str, LongRun] = {}
        if sizes.rss_turns:
            weights = {target.name: 0.5 if target.name == "floor" else 1.0 for target in targets}
            phase_end = deadline.elapsed() + (sizes.long_seconds or math.inf)
            for index, target in enumerate(targets):
                # The time left is shared by the servers still to go (the floor's share is
                # half: its figures are the reference, not the subject).
                left = min(deadline.remaining() - LONG_RUN_RESERVE, phase_end - deadline.elapsed())
                share = left * weights[target.name] / sum(weights[t.name] for t in targets[index:])
                if share < 1:
                    note(f"long run: no time left for {target.name}; raise --deadline", deadline)
                    continue
                note(
                    f"long run: up to {sizes.rss_turns} turns on {target.name} "
                    f"(at most {share:.0f} s)",
                    deadline,
                )
                on_pg = postgres if target.name == "postgres" else None
                long_runs[target.name] = run_async(
                    long_run(
                        target,
                        turns=sizes.rss_turns,
                        until=time.monotonic() + share,
                        expected_rate=measured.turns[(target.name, max(CONCURRENCIES))].throughput,
                        rss_ready=rss_ready[target.name],
                        postgres=on_pg,
                    ),
                    deadline,
                )
                check_alive([target])
                if on_pg is not None:
                    # Idle pooled backends keep their statistics to themselves until they exit.
                    processes.stop(target.process)
                    long_runs[target.name].db_transactions = run_async(
                        finish_long_run(long_runs[target.name], on_pg), deadline, limit=15
                    )

        context = [
            f"client: httpx in this process, {'uvloop' if has_uvloop() else 'asyncio'}",
            f"{os.cpu_count()} CPUs",
            f"Python {platform.python_version()}",
            f"1-min load average {load_at_start:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end",
        ]
        if postgres is not None:
            version = run_async(postgres.server.fetchval("SHOW server_version"), deadline)
            kind = "throwaway" if postgres.owned else "COUNTERSIGN_TEST_DATABASE_URL"
            context.append(f"PostgreSQL {version} ({kind})")
        print()
        print_report(
            Results(
                targets=targets,
                measured=measured,
                statements=statements,
                long_runs=long_runs,
                events_per_turn=events_per_turn,
            ),
            args,
            "; ".join(context),
        )
        errors = sum(s.errors for s in measured.turns.values())
        errors += sum(s.errors for s in measured.approvals.values())
        errors += sum(r.sample.errors for r in long_runs.values())
        note(f"done in {deadline.elapsed():.1f} s", deadline)
        return 1 if errors else 0
    finally:
        processes.stop_all()
        if postgres is not None:
            postgres.close()


async def finish_long_run(run: LongRun, postgres: Postgres) -> float:
    """PostgreSQL transactions per turn over the long run (its server must be stopped)."""
    after = await pg_transactions(postgres.server, postgres.database)
    return (after - (run.db_transactions or 0)) / run.turns


def check_alive(targets: list[Target]) -> None:
    """Raise if a server died during the load."""
    for target in targets:
        if target.process.poll() is not None:
            raise RuntimeError(f"{target.name} server died during the run:\n{tail(target.log)}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print; exit code 0 when every turn succeeded."""
    args = parse_args(argv)
    if args.serve_floor is not None:
        serve_app(floor_app(), args.serve_floor)
        return 0
    deadline = Deadline(args.deadline)

    def body(processes: Processes) -> int:
        with tempfile.TemporaryDirectory(prefix="countersign-bench-") as folder:
            return run(args, deadline, processes, Path(folder))

    return bounded_main(args.deadline, body)


if __name__ == "__main__":
    sys.exit(main())
