"""Conversation turns, measured: a message in, the agent's reply streamed back over SSE.

Starts ``python -m countersign serve`` (uvicorn on 127.0.0.1) on SQLite and on PostgreSQL,
and two floors, each a FastAPI app served by uvicorn the same way:

- the **pydantic-ai floor** (``pai-floor``), the reference every ratio is taken to: its
  ``POST /api/v1/sessions/{id}/messages`` runs the turn through pydantic-ai as Countersign's
  runner does (``agent.iter()`` and ``node.stream(run.ctx)`` over the same ``demo``
  FunctionModel, the same agent set-up, the session's earlier messages kept in memory) and
  streams each text delta as it comes; its only database work is ONE SQLite insert per turn
  (the reply, into a file of its own);
- the **bare floor** (``bare``), printed for reference: the same events made up on the spot,
  no model and no database.

Both stream what a ``demo`` run of the message streams (sse-starlette, same names, ids and
data keys: ``run.started``, one ``text.delta`` a word of ``You said: <message>``,
``message.completed``, ``run.finished``); the run checks that the shapes match first.

Every turn is one request: ``POST .../messages`` with ``Accept: text/event-stream`` and a
50-word message, read to ``run.finished``. A session takes one run at a time: at concurrency
16 there are 16 sessions, each sending its next message when its previous run ended (a
session is replaced by a fresh one after ``SESSION_TURNS`` turns). Phases (``--phases``):

- ``sql``: SQL per turn (one at a time, and 16 at a time) and per approval round trip, counted
  in-process (the app served by uvicorn on the script's own event loop) with SQLAlchemy engine
  and pool events, and on the throwaway PostgreSQL from the server's own statement log; for
  turns one at a time also the round trips before the first token reached the client.
- ``turns``: turns at concurrency 1 and 16, in interleaved rounds (bare, pai-floor, sqlite,
  postgres, bare...): turns/s, time to first token, turn time, server CPU per turn.
- ``tokens``: 50-token and 500-token replies one at a time: the marginal CPU per token.
- ``approval``: ``/tool write_file {...}`` → ``approval.required`` → ``POST .../approvals/{id}``
  approve → ``GET .../events`` with ``Last-Event-ID`` until ``run.finished``, beside plain turns
  measured in the same rounds.
- ``length``: the CPU and the bytes the database wrote for the 1st, 50th and 200th turn of a
  session.
- ``idle``: how many SSE streams of runs whose model never answers one server holds open while
  plain turns are still served, and their time to first token meanwhile.
- ``long``: ``--rss-turns`` turns at concurrency 16: RSS before, along and after, CPU per turn.
  It stops starting turns when its share of what ``--deadline`` leaves is used up, and says so.

    python bench/turns.py                  # both backends, every phase (< 12 min)
    python bench/turns.py --quick          # a smoke run (a few minutes)
    python bench/turns.py --backend sqlite --phases tokens,length

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
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI, status
from pydantic import BaseModel

from servers import (
    SQLITE_WAL_HEADER,
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
    free_port,
    has_uvloop,
    in_process_server,
    keyword,
    note,
    open_postgres,
    pg_transactions,
    pg_wal_bytes_since,
    pg_wal_lsn,
    rss_bytes,
    run_async,
    serve_app,
    serve_silent_openai,
    sqlite_truncate_wal,
    sqlite_wal_bytes,
    start_countersign,
    start_floor,
    statement_logging,
    tail,
    tree_cpu_seconds,
    wait_ready,
)

T = TypeVar("T")

SESSIONS = "/api/v1/sessions"
AGENTS = "/api/v1/agents"
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
TOKEN_SIZES = (50, 500)
"""Reply sizes of the tokens phase, in text deltas (one word each)."""
IDLE_MODEL = "openai:silent"
"""The model of the idle phase's agent: served by ``serve_silent_openai``, it never answers."""
IDLE_MESSAGE = "Take your time."
MARK = "cs-bench-mark"
"""Marker statements in PostgreSQL's statement log: a turn's start and its first token."""

BARE = "bare"
FLOOR = "pai-floor"
"""The reference of every ratio: the pydantic-ai floor."""
FLOORS = (BARE, FLOOR)
PHASES = ("sql", "turns", "tokens", "approval", "length", "idle", "long")


def token_message(deltas: int) -> str:
    """A message whose demo reply (``You said: ...``) streams exactly ``deltas`` text deltas."""
    words = MESSAGE.split() * (deltas // 50 + 1)
    return " ".join(words[: deltas - 2])


@dataclass(frozen=True)
class Sizes:
    """How much of each thing a run does."""

    turns: int
    """Measured turns per server and concurrency (split over the rounds)."""
    approvals: int
    """Measured approval round trips per backend (and as many plain turns beside them)."""
    token_turns: int
    """Measured turns per server and reply size in the tokens phase."""
    length_sessions: int
    """Sessions each server takes to the longest length (their turns at a length are
    measured together)."""
    lengths: tuple[int, ...]
    """Session lengths (the n-th turn of a session) whose turns are measured."""
    length_seconds: float
    """At most this long for the length phase."""
    idle_levels: tuple[int, ...]
    """Idle streams to ramp through."""
    idle_hold: float
    """Seconds each level of idle streams is held before it is checked."""
    idle_probes: int
    """Plain turns (one at a time) at each level, and unloaded."""
    idle_seconds: float
    """At most this long for the idle phase on one backend."""
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
    approvals=40,
    token_turns=30,
    length_sessions=3,
    lengths=(1, 50, 200),
    length_seconds=170.0,
    idle_levels=(250, 500, 1000, 2000),
    idle_hold=5.0,
    idle_probes=8,
    idle_seconds=90.0,
    rss_turns=10_000,
    statement_turns=40,
    statement_approvals=12,
    warmup_first=16,
    warmup_chunk=8,
    row_seconds=20.0,
    long_seconds=None,
    rounds=2,
)
QUICK = Sizes(
    turns=32,
    approvals=6,
    token_turns=6,
    length_sessions=1,
    lengths=(1, 50, 200),
    length_seconds=60.0,
    idle_levels=(50, 200),
    idle_hold=2.0,
    idle_probes=3,
    idle_seconds=30.0,
    rss_turns=500,
    statement_turns=8,
    statement_approvals=4,
    warmup_first=8,
    warmup_chunk=4,
    row_seconds=4.0,
    long_seconds=15.0,
    rounds=1,
)
REQUEST_TIMEOUT = 30.0
DEFAULT_DEADLINE = 700.0
QUICK_DEADLINE = 300.0
LONG_RUN_RESERVE = 30.0
"""Seconds the long phase leaves for what comes after it (PostgreSQL counters, the report)."""
SETTLE_SECONDS = 0.15
"""After a measured turn of the length phase, time for the server's last writes to land."""
IDLE_OPENING = 32
"""Idle streams being opened at once."""
IDLE_PROBE_TIMEOUT = 5.0
"""Seconds a plain turn may take while idle streams are open before it counts as not served."""
IDLE_MIN_SECONDS = 20.0
"""The idle phase is skipped on a backend (saying so) with less time than this left."""
IDLE_OVERRUN = 15.0
"""Seconds the idle phase may run past its budget (the plain turns of the last level)."""
MAX_FLOOR_SESSIONS = 256
"""Conversations the pydantic-ai floor keeps in memory (least recently used go first; a
session it no longer knows starts afresh, as an unused one would)."""

# Targets, as ratios to the pydantic-ai floor measured in the same run (never asserted).
TARGET_CPU = {"sqlite": 1.5, "postgres": 2.0}
TARGET_MARGINAL_CPU = 1.25
TARGET_THROUGHPUT = {"sqlite": 0.7, "postgres": 0.5}
TARGET_TTFT = 2.0
TARGET_APPROVAL = 1.0
"""decision→run.finished over a plain turn, both at concurrency 1."""
TARGET_DB_STATEMENTS = 8.0
TARGET_DB_BEFORE_FIRST_TOKEN = 3.0
TARGET_LENGTH_GROWTH = 1.2
TARGET_IDLE_STREAMS = 2000
TARGET_IDLE_TTFT = 2.0
TARGET_RSS_GROWTH = 0.20

if len(MESSAGE.split()) != 50:  # pragma: no cover - a guard for whoever edits the message
    raise SystemExit(f"MESSAGE has {len(MESSAGE.split())} words, not 50")


# --------------------------------------------------------------------------------------------
# The floors: FastAPI apps that stream a demo run's events without Countersign


class FloorMessage(BaseModel):
    """The floor's request body: the field of MessageCreate."""

    content: str


def sse_response(events: AsyncIterator[Any]) -> Any:
    """An EventSourceResponse with Countersign's ping and headers."""
    from sse_starlette import EventSourceResponse

    return EventSourceResponse(
        events, ping=15, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


def _now() -> str:
    """When an event was recorded, as Countersign's events say it (``at``)."""
    return datetime.now(UTC).isoformat()


def floor_app() -> FastAPI:
    """The bare floor: messages stream the events of a demo run, made up on the spot."""
    from sse_starlette import ServerSentEvent

    app = FastAPI()

    @app.post(SESSIONS, status_code=status.HTTP_201_CREATED)
    async def create_session() -> dict[str, str]:
        return {"id": str(uuid.uuid4())}

    @app.post(SESSIONS + "/{session_id}/messages")
    async def send_message(session_id: uuid.UUID, body: FloorMessage) -> Any:
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
                payload = {**data, "run_id": run_id, "seq": seq, "attempt": 1, "at": _now()}
                yield ServerSentEvent(data=json.dumps(payload), event=name, id=str(seq))

        return sse_response(events())

    @app.get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    return app


class _NoJournal:
    """The floor's tool journal: plain messages call no tool."""

    async def tool_started(self, *, call_id: str, tool: str, arguments: dict[str, Any]) -> None:
        """Nothing to record."""

    async def tool_finished(
        self, *, call_id: str, tool: str, output: str, stopped: bool = False
    ) -> None:
        """Nothing to record."""


def pydantic_floor_app(database: Path) -> FastAPI:
    """The pydantic-ai floor: a turn runs through pydantic-ai as Countersign's runner does, and
    the reply is stored with one SQLite insert.

    The agent is Countersign's default agent, built once (``build_agent`` over
    ``demo_model()``, the default instructions and tools): pydantic-ai does for a turn here
    what it does in Countersign. The loop mirrors ``countersign.agent.runner.run_turn``
    (``agent.iter``, ``node.stream(run.ctx)`` per model request, ``run.next``) without its
    checkpoints; the session's earlier messages are kept in memory and handed back as
    ``message_history``, where Countersign reads its stored history.
    """
    from pydantic_ai import Agent
    from pydantic_ai.messages import (
        ModelMessage,
        PartDeltaEvent,
        PartStartEvent,
        TextPart,
        TextPartDelta,
    )
    from sse_starlette import ServerSentEvent

    from countersign.agent.models import demo_model
    from countersign.agent.runner import build_agent
    from countersign.agent.tools import ToolLimits, TurnDeps
    from countersign.domain.models import DEFAULT_AGENT_INSTRUCTIONS, DEFAULT_AGENT_TOOLS

    agent = build_agent(
        demo_model(), instructions=DEFAULT_AGENT_INSTRUCTIONS, tools=DEFAULT_AGENT_TOOLS
    )
    workspace = database.parent / "pai-floor-workspace"
    workspace.mkdir(exist_ok=True)
    deps = TurnDeps(workspace=workspace, journal=_NoJournal(), limits=ToolLimits())
    # The stdlib driver on the event loop: one small autocommitted insert takes well under a
    # millisecond in WAL mode with synchronous=NORMAL (Countersign's SQLite settings).
    db = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS replies (id TEXT PRIMARY KEY, session_id TEXT NOT NULL, "
        "content TEXT NOT NULL)"
    )
    histories: OrderedDict[str, list[ModelMessage]] = OrderedDict()
    app = FastAPI()

    def text_of(event: object) -> str:
        if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
            return event.part.content
        if isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
            return event.delta.content_delta
        return ""

    @app.post(SESSIONS, status_code=status.HTTP_201_CREATED)
    async def create_session() -> dict[str, str]:
        return {"id": str(uuid.uuid4())}

    @app.post(SESSIONS + "/{session_id}/messages")
    async def send_message(session_id: uuid.UUID, body: FloorMessage) -> Any:
        run_id = str(uuid.uuid4())
        key = str(session_id)

        async def events() -> AsyncIterator[ServerSentEvent]:
            seq = 0

            def event(name: str, data: dict[str, Any]) -> ServerSentEvent:
                nonlocal seq
                seq += 1
                payload = {**data, "run_id": run_id, "seq": seq, "attempt": 1, "at": _now()}
                return ServerSentEvent(data=json.dumps(payload), event=name, id=str(seq))

            yield event("run.started", {"attempt": 1, "resumed_from_seq": 0})
            reply: list[str] = []
            async with agent.iter(
                body.content, message_history=histories.get(key) or None, deps=deps
            ) as run:
                node = run.next_node
                while not Agent.is_end_node(node):
                    if Agent.is_model_request_node(node):
                        async with node.stream(run.ctx) as stream:
                            async for part in stream:
                                text = text_of(part)
                                if text:
                                    reply.append(text)
                                    yield event("text.delta", {"text": text})
                    node = await run.next(node)
                assert run.result is not None
                histories[key] = run.result.all_messages()
            histories.move_to_end(key)
            while len(histories) > MAX_FLOOR_SESSIONS:
                histories.popitem(last=False)
            content = "".join(reply)
            message_id = str(uuid.uuid4())
            db.execute("INSERT INTO replies VALUES (?, ?, ?)", (message_id, key, content))
            yield event("message.completed", {"message_id": message_id, "content": content})
            yield event("run.finished", {"status": "succeeded"})

        return sse_response(events())

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


async def new_session(
    client: httpx.AsyncClient, auth: dict[str, str], *, agent_id: str | None = None
) -> str:
    """Create a session (the default agent unless ``agent_id``); its id."""
    body: dict[str, str] = {"title": "bench"}
    if agent_id is not None:
        body["agent_id"] = agent_id
    response = await client.post(SESSIONS, json=body, headers=auth)
    if response.status_code != 201:
        raise TurnFailed(f"POST {SESSIONS} answered {response.status_code}: {response.text[:200]}")
    return str(response.json()["id"])


async def new_agent(client: httpx.AsyncClient, auth: dict[str, str], *, model: str) -> str:
    """Create an agent on ``model`` (default instructions and tools); its id."""
    response = await client.post(
        AGENTS, json={"name": f"bench {model}", "model": model}, headers=auth
    )
    if response.status_code != 201:
        raise TurnFailed(f"POST {AGENTS} answered {response.status_code}: {response.text[:200]}")
    return str(response.json()["id"])


async def stream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    body: dict[str, Any] | None = None,
    on_event: Callable[[Event], None] | None = None,
    on_first_delta: Callable[[], Awaitable[None]] | None = None,
) -> list[Event]:
    """Send a request whose answer is an SSE stream; its events, read to the end.

    ``on_first_delta`` is awaited when the first ``text.delta`` has been read, before reading
    on.
    """
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
            if on_first_delta is not None and event.name == "text.delta":
                await on_first_delta()
                on_first_delta = None
    return events


class TurnMarks:
    """Marks a turn's start and its first token in the SQL being counted (the SQL phase)."""

    async def start(self) -> None:
        """The request is about to be sent."""

    async def first_token(self) -> None:
        """The first ``text.delta`` was just read."""


@dataclass
class TurnTimes:
    """One turn as the client saw it (seconds from the request's start)."""

    first_token: float
    total: float
    events: list[Event]


async def one_turn(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    session_id: str,
    content: str = MESSAGE,
    *,
    marks: TurnMarks | None = None,
) -> TurnTimes:
    """Send a message with Accept: text/event-stream and read the run to its end."""
    first: list[float] = []
    if marks is not None:
        await marks.start()
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
        on_first_delta=marks.first_token if marks is not None else None,
    )
    total = time.perf_counter() - started
    if not events or events[-1].name != "run.finished":
        last = events[-1].name if events else "nothing"
        reason = events[-1].data.get("reason") if events else None
        because = f" ({reason})" if reason else ""
        raise TurnFailed(f"the stream ended with {last}{because}, not run.finished")
    text = "".join(str(e.data.get("text", "")) for e in events if e.name == "text.delta")
    expected = REPLY if content == MESSAGE else f"You said: {content}"
    if text != expected:
        raise TurnFailed(f"the reply was {text[:80]!r}, not {expected[:40]!r}...")
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
    """Server process CPU seconds (its CPU-time clock) over the measured turns."""
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

    def __init__(
        self, client: httpx.AsyncClient, auth: dict[str, str], *, agent_id: str | None = None
    ) -> None:
        self.client = client
        self.auth = auth
        self.agent_id = agent_id
        self.ready: list[str] = []

    async def fill(
        self, count: int, *, concurrency: int = 16, stop_at: float | None = None
    ) -> None:
        """Create ``count`` sessions now (none started after ``stop_at``)."""
        tickets = iter(range(count))

        async def worker() -> None:
            for _ in tickets:
                if stop_at is not None and time.monotonic() >= stop_at:
                    return
                self.ready.append(await new_session(self.client, self.auth, agent_id=self.agent_id))

        await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))

    async def take(self) -> str:
        """A session nobody has used (made now if the pool ran dry)."""
        if self.ready:
            return self.ready.pop()
        return await new_session(self.client, self.auth, agent_id=self.agent_id)


def sessions_needed(turns: int, concurrency: int, session_turns: int = SESSION_TURNS) -> int:
    """Sessions a chunk of ``turns`` can use up at ``concurrency``."""
    return math.ceil(turns / session_turns) + concurrency


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
    content: str = MESSAGE,
    session_turns: int = SESSION_TURNS,
    marks: TurnMarks | None = None,
) -> None:
    """Up to ``turns`` turns (or approval round trips) with ``concurrency`` sessions at a time.

    The sessions are made before the clock starts (unless ``pool`` already has them); each
    takes ``session_turns`` turns of ``content``. The CPU time of process ``pid`` (and of
    PostgreSQL's postmaster ``db_pid`` and its backends) is read around the turns alone. No
    turn starts after ``stop_at`` (``time.monotonic()``).
    """
    if pool is None:
        pool = SessionPool(client, auth)
        await pool.fill(sessions_needed(turns, concurrency, session_turns))
    tickets = iter(range(turns))

    async def worker() -> None:
        session: str | None = None
        used = 0
        for _ in tickets:
            if stop_at is not None and time.monotonic() >= stop_at:
                return
            try:
                if session is None or used >= session_turns:
                    session, used = await pool.take(), 0
                used += 1
                if approvals:
                    into.approvals.append(await one_approval(client, auth, session))
                else:
                    times = await one_turn(client, auth, session, content, marks=marks)
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


def client_for(target: Target, *, connections: int = max(CONCURRENCIES) + 4) -> httpx.AsyncClient:
    """An HTTP client with room for every session at once."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=None)
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
    reference = shapes[targets[0].name]
    for name, found in shapes.items():
        if found != reference:
            differences = [
                f"#{i + 1}: {a} vs {b}"
                for i, (a, b) in enumerate(zip(found, reference, strict=False))
                if a != b
            ][:3]
            raise RuntimeError(
                f"{name} streams {len(found)} events, {targets[0].name} {len(reference)}; "
                f"first differences: {differences}"
            )
    return len(reference)


def split(total: int, rounds: int) -> list[int]:
    """``total`` in ``rounds`` nearly equal chunks."""
    return [total // rounds + (i < total % rounds) for i in range(rounds)]


@dataclass
class Phase:
    """What a measuring phase needs of the run: clients, PostgreSQL's PID, sizes."""

    sizes: Sizes
    rounds: int
    db_pid: int | None
    clients: dict[str, httpx.AsyncClient] = field(default_factory=dict)

    def client(self, target: Target) -> httpx.AsyncClient:
        """The phase's client for a server (made on first use)."""
        if target.name not in self.clients:
            self.clients[target.name] = client_for(target)
        return self.clients[target.name]

    def pg_pid(self, target: Target) -> int | None:
        """PostgreSQL's postmaster, for the PostgreSQL server (its CPU is read apart)."""
        return self.db_pid if target.name == "postgres" else None

    async def close(self) -> None:
        """Close every client."""
        for client in self.clients.values():
            await client.aclose()

    async def measure(
        self,
        target: Target,
        *,
        turns: int,
        concurrency: int,
        into: Sample,
        approvals: bool = False,
        content: str = MESSAGE,
        session_turns: int = SESSION_TURNS,
        seconds: float,
    ) -> None:
        """A measured chunk on one server, after uncounted warm-up turns: at most ``turns``
        turns, none started after ``seconds``."""
        client = self.client(target)
        warm = min(self.sizes.warmup_chunk, 3) if approvals else self.sizes.warmup_chunk
        await drive(
            client,
            target.headers,
            turns=warm,
            concurrency=concurrency,
            into=Sample(),
            approvals=approvals,
            content=content,
            session_turns=session_turns,
        )
        pool = SessionPool(client, target.headers)
        await pool.fill(sessions_needed(turns, concurrency, session_turns))
        await drive(
            client,
            target.headers,
            turns=turns,
            concurrency=concurrency,
            into=into,
            pid=target.process.pid,
            db_pid=self.pg_pid(target),
            approvals=approvals,
            pool=pool,
            stop_at=time.monotonic() + seconds,
            content=content,
            session_turns=session_turns,
        )

    async def warm(self, targets: list[Target]) -> None:
        """Uncounted turns on every server (first use: imports, pools, caches)."""
        for target in targets:
            await drive(
                self.client(target),
                target.headers,
                turns=self.sizes.warmup_first,
                concurrency=4,
                into=Sample(),
            )


# --------------------------------------------------------------------------------------------
# Phases: turns, tokens, approvals


async def turns_phase(targets: list[Target], phase: Phase) -> dict[tuple[str, int], Sample]:
    """Interleaved rounds of turns at each concurrency on every server.

    Each measured chunk is ``sizes.turns / rounds`` turns, or ``sizes.row_seconds / rounds``
    seconds of starting turns, whichever ends first.
    """
    sizes = phase.sizes
    samples = {(t.name, c): Sample() for t in targets for c in CONCURRENCIES}
    await phase.warm(targets)
    for concurrency in CONCURRENCIES:
        for chunk in split(sizes.turns, phase.rounds):
            for target in targets:
                await phase.measure(
                    target,
                    turns=chunk,
                    concurrency=concurrency,
                    into=samples[(target.name, concurrency)],
                    seconds=sizes.row_seconds / phase.rounds,
                )
    return samples


async def tokens_phase(targets: list[Target], phase: Phase) -> dict[tuple[str, int], Sample]:
    """Replies of each size in ``TOKEN_SIZES``, one turn at a time, in interleaved rounds.

    Every turn is the first of a fresh session (made before the clock starts), so that the
    difference between the sizes is the reply's (and the message's) size, not a longer
    history. A chunk is at most ``row_seconds / rounds`` seconds.
    """
    sizes = phase.sizes
    samples = {(t.name, n): Sample() for t in targets for n in TOKEN_SIZES}
    for chunk in split(sizes.token_turns, phase.rounds):
        for target in targets:
            for deltas in TOKEN_SIZES:
                await phase.measure(
                    target,
                    turns=chunk,
                    concurrency=1,
                    into=samples[(target.name, deltas)],
                    content=token_message(deltas),
                    session_turns=1,
                    seconds=sizes.row_seconds / phase.rounds,
                )
    return samples


@dataclass
class Approvals:
    """Approval round trips and plain turns measured in the same rounds (concurrency 1)."""

    approvals: Sample
    plain: Sample


async def approval_phase(targets: list[Target], phase: Phase) -> dict[str, Approvals]:
    """Approval round trips on each backend, each chunk followed by as many plain turns."""
    sizes = phase.sizes
    found = {t.name: Approvals(Sample(), Sample()) for t in targets}
    for chunk in split(sizes.approvals, phase.rounds):
        for target in targets:
            await phase.measure(
                target,
                turns=chunk,
                concurrency=1,
                into=found[target.name].approvals,
                approvals=True,
                seconds=sizes.row_seconds / phase.rounds,
            )
            await phase.measure(
                target,
                turns=chunk,
                concurrency=1,
                into=found[target.name].plain,
                seconds=sizes.row_seconds / phase.rounds,
            )
    return found


# --------------------------------------------------------------------------------------------
# Turn cost by session length


class WrittenBytes:
    """Bytes a server's database writes for one turn (see the subclasses for how)."""

    what = ""
    """How the bytes are counted, for the report."""

    async def prepare(self) -> None:
        """Before a measured turn, outside its CPU window."""

    async def start(self) -> None:
        """Right before the measured turn."""

    async def written(self) -> tuple[int, bool]:
        """Bytes written since ``start``, and whether the count may be short."""
        return 0, False


class SqliteWal(WrittenBytes):
    """A SQLite database in WAL mode: the WAL is checkpointed and truncated before the turn,
    so its size after the turn is what the turn's transactions appended (whole pages, each
    with a frame header). SQLite's own checkpoint restarts the WAL once it holds
    ``wal_autocheckpoint`` pages (1000 by default); a WAL that big is flagged as maybe short."""

    what = "SQLite WAL bytes appended (pages written, with frame headers)"

    def __init__(self, database: Path) -> None:
        self.database = database
        self.page_size = 4096

    async def prepare(self) -> None:
        self.page_size = await asyncio.to_thread(sqlite_truncate_wal, self.database)

    async def written(self) -> tuple[int, bool]:
        size = sqlite_wal_bytes(self.database)
        restarted = size >= 1000 * (self.page_size + 24)
        return max(0, size - SQLITE_WAL_HEADER), restarted


class PostgresWal(WrittenBytes):
    """PostgreSQL: the growth of the WAL position (``pg_current_wal_insert_lsn``) over the turn.

    It is the whole cluster's WAL, so on a shared server other databases' writes count too.
    Before each measured turn a ``CHECKPOINT`` and one uncounted turn on another session make
    the full-page images that follow a checkpoint land on that turn, not at random on a
    measured one: the measured turn still writes full pages for what only it touches.
    """

    what = "PostgreSQL WAL bytes (pg_current_wal_insert_lsn growth, whole cluster)"

    def __init__(self, connection: Any, warm: Callable[[], Awaitable[None]]) -> None:
        self.connection = connection
        """An admin connection, opened once: a new one would cost PostgreSQL CPU in the
        measured window."""
        self.warm = warm
        self.lsn = ""

    async def prepare(self) -> None:
        await self.connection.execute("CHECKPOINT")
        await self.warm()

    async def start(self) -> None:
        self.lsn = await pg_wal_lsn(self.connection)

    async def written(self) -> tuple[int, bool]:
        return await pg_wal_bytes_since(self.connection, self.lsn), False


@dataclass
class LengthPoint:
    """The measured turns at one session length on one server."""

    total: list[float] = field(default_factory=list)
    cpu: float = 0.0
    db_cpu: float | None = None
    written: int = 0
    maybe_short: bool = False

    @property
    def turns(self) -> int:
        """Turns measured."""
        return len(self.total)

    def cpu_ms(self) -> float:
        """Server CPU per turn, ms."""
        return self.cpu / self.turns * 1000 if self.turns else math.nan

    def db_cpu_ms(self) -> float:
        """PostgreSQL's CPU per turn, ms."""
        return (
            self.db_cpu / self.turns * 1000 if self.turns and self.db_cpu is not None else math.nan
        )

    def bytes_per_turn(self) -> float:
        """Bytes written per turn."""
        return self.written / self.turns if self.turns else math.nan


@dataclass
class LengthRun:
    """The length phase on one server."""

    points: dict[int, LengthPoint]
    bytes_from: str
    reached: int = 0
    """The longest length all its sessions reached."""
    sample: Sample = field(default_factory=Sample)
    """Errors only."""


async def length_phase(
    targets: list[Target],
    phase: Phase,
    *,
    written: dict[str, WrittenBytes],
    stop_at: float,
) -> dict[str, LengthRun]:
    """Take ``length_sessions`` sessions per server to the longest of ``sizes.lengths``.

    The servers go in lockstep, one session length at a time, so that a slow moment of the
    machine hits every server alike. At a measured length the sessions' turns go one at a
    time, each with the server's CPU and its database's bytes read around it (and
    ``SETTLE_SECONDS`` for the last writes to land); between, the sessions of a server take
    their turns together, unmeasured. No length is started after ``stop_at``.
    """
    sizes = phase.sizes
    runs = {
        t.name: LengthRun(
            points={n: LengthPoint() for n in sizes.lengths}, bytes_from=written[t.name].what
        )
        for t in targets
    }
    sessions = {}
    for target in targets:
        client = phase.client(target)
        sessions[target.name] = [
            await new_session(client, target.headers) for _ in range(sizes.length_sessions)
        ]
    live = list(targets)
    for length in range(1, max(sizes.lengths) + 1):
        if time.monotonic() >= stop_at:
            break
        for target in list(live):
            run = runs[target.name]
            client = phase.client(target)
            try:
                if length in run.points:
                    for session in sessions[target.name]:
                        await measured_turn(
                            target, phase, client, session, run.points[length], written[target.name]
                        )
                else:
                    outcomes = await asyncio.gather(
                        *(one_turn(client, target.headers, s) for s in sessions[target.name]),
                        return_exceptions=True,
                    )
                    for outcome in outcomes:
                        if isinstance(outcome, BaseException):
                            raise outcome
                run.reached = length
            except (TurnFailed, httpx.HTTPError, KeyError, ValueError, RuntimeError) as exc:
                run.sample.fail(f"length {length}: {type(exc).__name__}: {exc}"[:300])
                live.remove(target)
        if not live:
            break
    return runs


async def measured_turn(
    target: Target,
    phase: Phase,
    client: httpx.AsyncClient,
    session: str,
    point: LengthPoint,
    written: WrittenBytes,
) -> None:
    """One turn with the server's CPU and its database's bytes read around it."""
    pid, db_pid = target.process.pid, phase.pg_pid(target)
    await written.prepare()
    cpu_before = cpu_seconds(pid)
    db_before = tree_cpu_seconds(db_pid) if db_pid else 0.0
    await written.start()
    times = await one_turn(client, target.headers, session)
    await asyncio.sleep(SETTLE_SECONDS)
    count, short = await written.written()
    point.cpu += cpu_seconds(pid) - cpu_before
    if db_pid:
        point.db_cpu = (point.db_cpu or 0.0) + tree_cpu_seconds(db_pid) - db_before
    point.total.append(times.total)
    point.written += count
    point.maybe_short = point.maybe_short or short


# --------------------------------------------------------------------------------------------
# Idle streams


class IdleStreams:
    """SSE streams of runs waiting for a model that never answers, held open.

    Each is a raw connection (``Connection: close``, so that the end of the response is the
    end of the connection): an httpx stream apiece would cost the load generator, which shares
    the machine, more than the streams cost the server.
    """

    def __init__(self, base_url: str, auth: dict[str, str]) -> None:
        address = httpx.URL(base_url)
        self.host = address.host
        self.port = address.port or 80
        self.authorization = auth["Authorization"]
        self.open = 0
        """Streams open now."""
        self.opened = 0
        """Streams that were answered 200 (open now or not)."""
        self.failed = 0
        self.ended = 0
        """Streams that ended on the server's side."""
        self.examples: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def problem(self, text: str) -> None:
        """Keep the first few problems."""
        if len(self.examples) < 3:
            self.examples.append(text[:300])

    async def open_many(self, sessions: list[str], *, stop_at: float) -> None:
        """Open a stream on each session, ``IDLE_OPENING`` at a time, none after ``stop_at``."""
        tickets = iter(sessions)

        async def worker() -> None:
            for session in tickets:
                if time.monotonic() >= stop_at:
                    return
                try:
                    async with asyncio.timeout(max(0.1, stop_at - time.monotonic())):
                        await self._open(session)
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    self.failed += 1
                    self.problem(f"opening a stream: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(worker() for _ in range(IDLE_OPENING)))

    async def _open(self, session: str) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps({"content": IDLE_MESSAGE}).encode()
        head = (
            f"POST {SESSIONS}/{session}/messages HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            f"Authorization: {self.authorization}\r\n"
            "Accept: text/event-stream\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode() + body)
            await writer.drain()
            answer = await reader.readuntil(b"\r\n\r\n")
        except BaseException:
            writer.close()
            raise
        status_line = answer.split(b"\r\n", 1)[0].decode(errors="replace")
        if status_line.split()[1:2] != ["200"]:
            self.failed += 1
            rest = await asyncio.wait_for(reader.read(300), 2.0)
            self.problem(f"a stream was answered {status_line}: {rest!r}")
            writer.close()
            return
        self.open += 1
        self.opened += 1
        task = asyncio.create_task(self._hold(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        last = b""
        try:
            while chunk := await reader.read(65536):
                last = (last + chunk)[-400:]
        except OSError as exc:
            last += f" ({type(exc).__name__})".encode()
        finally:
            self.open -= 1
            writer.close()
            if not self._closing:
                self.ended += 1
                self.problem(f"a stream ended: ...{last[-200:]!r}")

    async def close(self) -> None:
        """Close every stream this holds."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class IdleLevel:
    """One step of the ramp: this many idle streams open at once."""

    streams: int
    opened: int
    """Streams open when the opening ended."""
    held: int
    """Streams still open after the hold."""
    open_seconds: float
    """Making the level's sessions and opening its streams."""
    cpu_percent: float
    """Server CPU over the hold, % of one core."""
    db_cpu_percent: float | None
    probes: Sample
    probes_asked: int
    timed_out: bool
    """A plain turn was not served within ``IDLE_PROBE_TIMEOUT``."""

    @property
    def streams_held(self) -> bool:
        """Every stream opened and stayed open."""
        return self.opened >= self.streams and self.held >= self.streams

    @property
    def served(self) -> bool:
        """Every plain turn asked for was served."""
        return self.probes.ok >= self.probes_asked and not self.probes.errors

    @property
    def ok(self) -> bool:
        """Streams held and turns served."""
        return self.streams_held and self.served


@dataclass
class IdleRun:
    """The idle phase on one backend."""

    unloaded: Sample
    baseline_cpu_percent: float
    """Server CPU with no stream open, % of one core."""
    levels: list[IdleLevel] = field(default_factory=list)
    stopped: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def largest_held(self) -> int:
        """The most streams held with plain turns still served (0: none)."""
        return max((level.streams for level in self.levels if level.ok), default=0)

    @property
    def largest_open(self) -> int:
        """The most streams held open, whether or not plain turns were served."""
        return max((level.streams for level in self.levels if level.streams_held), default=0)


async def idle_probes(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    pool: SessionPool,
    count: int,
    *,
    until: float,
) -> tuple[Sample, bool]:
    """Plain turns one at a time, each given ``IDLE_PROBE_TIMEOUT``; stops at the first that
    fails or is not served in time, and starts none after ``until``. Whether one was not
    served in time (that is a figure, not an error)."""
    sample = Sample()
    for _ in range(count):
        if time.monotonic() >= until:
            break
        try:
            async with asyncio.timeout(IDLE_PROBE_TIMEOUT):
                times = await one_turn(client, auth, await pool.take())
        except TimeoutError:
            return sample, True
        except (TurnFailed, httpx.HTTPError, KeyError, ValueError) as exc:
            sample.fail(f"{type(exc).__name__}: {exc}"[:300])
            break
        sample.first_token.append(times.first_token)
        sample.total.append(times.total)
    return sample, False


async def cpu_percent(pid: int, db_pid: int | None, seconds: float) -> tuple[float, float | None]:
    """CPU of a process (and of PostgreSQL) over ``seconds`` of waiting, % of one core."""
    cpu_before = cpu_seconds(pid)
    db_before = tree_cpu_seconds(db_pid) if db_pid else 0.0
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    wall = time.perf_counter() - started
    db = (tree_cpu_seconds(db_pid) - db_before) / wall * 100 if db_pid else None
    return (cpu_seconds(pid) - cpu_before) / wall * 100, db


async def idle_phase(
    target: Target, *, sizes: Sizes, db_pid: int | None, stop_at: float
) -> IdleRun:
    """Ramp idle streams up through ``sizes.idle_levels`` on one server.

    An agent on ``IDLE_MODEL`` (whose provider never answers) takes one message per session,
    each with ``Accept: text/event-stream``: the executor's slots fill with runs waiting for
    the model, the rest stay queued; every stream stays open with nothing to send. At each
    level: the level's sessions are made and its streams opened, the server's CPU is read
    over ``idle_hold`` seconds, then ``idle_probes`` plain turns (demo model) go one at a
    time. The ramp ends at the first level whose streams did not all open and stay open, or
    when ``stop_at`` comes.
    """
    async with client_for(target) as client:
        agent_id = await new_agent(client, target.headers, model=IDLE_MODEL)
        plain = SessionPool(client, target.headers)
        await plain.fill(sizes.idle_probes * (len(sizes.idle_levels) + 1) + 4)
        await drive(client, target.headers, turns=4, concurrency=1, into=Sample(), pool=plain)
        unloaded, _ = await idle_probes(
            client, target.headers, plain, sizes.idle_probes, until=stop_at
        )
        baseline, _ = await cpu_percent(target.process.pid, None, sizes.idle_hold)
        run = IdleRun(unloaded=unloaded, baseline_cpu_percent=baseline)
        streams = IdleStreams(target.base_url, target.headers)
        try:
            for level in sizes.idle_levels:
                if time.monotonic() + sizes.idle_hold + 2 * IDLE_PROBE_TIMEOUT >= stop_at:
                    run.stopped = f"no time left for {level} streams"
                    break
                began = time.monotonic()
                # What is left after the opening: the hold and the plain turns.
                opening_end = stop_at - sizes.idle_hold - 2 * IDLE_PROBE_TIMEOUT
                waiting = SessionPool(client, target.headers, agent_id=agent_id)
                await waiting.fill(level - streams.opened, stop_at=opening_end)
                await streams.open_many(waiting.ready, stop_at=opening_end)
                opened = streams.open
                open_seconds = time.monotonic() - began
                cpu, db_cpu = await cpu_percent(target.process.pid, db_pid, sizes.idle_hold)
                held = streams.open
                probes, timed_out = await idle_probes(
                    client, target.headers, plain, sizes.idle_probes, until=stop_at
                )
                run.levels.append(
                    IdleLevel(
                        streams=level,
                        opened=opened,
                        held=held,
                        open_seconds=open_seconds,
                        cpu_percent=cpu,
                        db_cpu_percent=db_cpu,
                        probes=probes,
                        probes_asked=sizes.idle_probes,
                        timed_out=timed_out,
                    )
                )
                if not run.levels[-1].streams_held:
                    out_of_time = time.monotonic() >= opening_end and opened < level
                    run.stopped = (
                        f"the phase's time ran out opening {level} streams"
                        if out_of_time
                        else f"{level} streams were not all held open"
                    )
                    break
        finally:
            await streams.close()
        run.problems = streams.examples
    return run


# --------------------------------------------------------------------------------------------
# The long run


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
    before_first_token: list[int] = field(default_factory=list)
    """For each turn of the one-at-a-time flow: what the database executed from the request's
    start until the client read the first ``text.delta``."""


class DriverMarks(TurnMarks):
    """SQLite: how many hand-offs to the driver's threads had been made at each mark."""

    def __init__(self, counts: StatementCounts) -> None:
        self.counts = counts
        self.starts: list[int] = []
        self.firsts: list[int] = []

    async def start(self) -> None:
        self.starts.append(self.counts.driver_calls)

    async def first_token(self) -> None:
        self.firsts.append(self.counts.driver_calls)

    def before_first_token(self) -> list[int]:
        """Driver calls between each turn's two marks."""
        return [first - start for start, first in zip(self.starts, self.firsts, strict=False)]


class LogMarks(TurnMarks):
    """PostgreSQL: a marker statement in the server's statement log at each mark, sent on a
    connection of this script's own (SQLAlchemy does not see it, and the counts leave it out).
    The log is in the order the server received statements, markers included."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.turn = 0

    async def start(self) -> None:
        self.turn += 1
        await self.connection.execute(f"SELECT '{MARK} start {self.turn}'")

    async def first_token(self) -> None:
        await self.connection.execute(f"SELECT '{MARK} first {self.turn}'")


def before_first_token_in_log(statements: list[str]) -> list[int]:
    """Statements logged between each turn's start and first-token markers."""
    found: list[int] = []
    counting: int | None = None
    for statement in statements:
        if MARK in statement:
            if f"{MARK} start" in statement:
                counting = 0
            elif counting is not None:
                found.append(counting)
                counting = None
            continue
        if counting is not None:
            counting += 1
    return found


async def count_statements(
    database_url: str,
    key: str,
    *,
    sizes: Sizes,
    log: StatementLog | None,
    postgres: Postgres | None,
    deadline: Deadline,
) -> TurnStatements:
    """Serve the real app in-process and count the SQL behind its turns.

    The count covers everything the process sent while the turns ran: the request's own
    units of work, the executor's (claim, context, event batches, finish, heartbeats) and the
    SSE stream's reads. Sessions are made before counting starts. Three flows: turns one at a
    time, turns at the highest concurrency (at most ``sizes.row_seconds`` of starting them),
    and approval round trips one at a time. For turns one at a time each turn is also marked
    at its start and when its first ``text.delta`` was read (``DriverMarks``, ``LogMarks``).
    """
    auth = {"Authorization": f"Bearer {key}"}
    top = max(CONCURRENCIES)
    flows = (
        ("turn, c=1", sizes.statement_turns, 1, False),
        (f"turn, c={top}", sizes.statement_turns, top, False),
        ("approval", sizes.statement_approvals, 1, True),
    )
    found: dict[str, StatementCounts] = {}
    before_first: list[int] = []
    marker = None
    if log is not None and postgres is not None:
        marker = await postgres.server.connect(postgres.database)
    try:
        async with in_process_server(database_url, deadline=deadline) as client:
            for _ in range(3):  # warm-up: first-use work (API key last_used_at) is not typical
                await one_turn(client, auth, await new_session(client, auth))
            for flow, turns, concurrency, approvals in flows:
                pool = SessionPool(client, auth)
                await pool.fill(sessions_needed(turns, concurrency))
                sample = Sample()
                start = log.offset() if log else 0
                with counting_sql() as counts:
                    marks: TurnMarks | None = None
                    if concurrency == 1 and not approvals:
                        marks = LogMarks(marker) if marker is not None else DriverMarks(counts)
                    await drive(
                        client,
                        auth,
                        turns=turns,
                        concurrency=concurrency,
                        into=sample,
                        approvals=approvals,
                        pool=pool,
                        # Turns at concurrency 16 on a slow backend take long: half a row's time.
                        stop_at=time.monotonic()
                        + sizes.row_seconds / (2 if concurrency > 1 else 1),
                        marks=marks,
                    )
                if sample.errors:
                    raise RuntimeError(
                        f"in-process {flow}: {sample.errors} failed: {sample.error_examples[0]}"
                    )
                counts.requests = sample.ok
                if log is not None:
                    if marker is not None:
                        await asyncio.sleep(0.2)  # the log is written by another process
                    logged = log.since(start)
                    if isinstance(marks, LogMarks):
                        before_first = before_first_token_in_log(logged)
                    counts.received = Counter(keyword(line) for line in logged if MARK not in line)
                    counts.received_from = "PostgreSQL statement log"
                elif database_url.startswith("sqlite"):
                    counts.received = Counter(counts.handoffs)
                    counts.received_from = "SQLite driver hand-offs"
                    if isinstance(marks, DriverMarks):
                        before_first = marks.before_first_token()
                found[flow] = counts
    finally:
        if marker is not None:
            await marker.close()
    return TurnStatements(flows=found, before_first_token=before_first)


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


def mean(values: list[int]) -> float:
    """The mean, nan for nothing."""
    return statistics.fmean(values) if values else math.nan


def verdict(value: float, target: float, *, at_most: bool) -> str:
    """'met' or 'MISSED' (or 'n/a' without a figure)."""
    if math.isnan(value):
        return "n/a"
    return "met" if (value <= target if at_most else value >= target) else "MISSED"


def marginal_cpu_us(tokens: dict[tuple[str, int], Sample], name: str) -> float:
    """(CPU per 500-token turn - CPU per 50-token turn) / 450, microseconds per token."""
    small, large = TOKEN_SIZES
    low = tokens[(name, small)].per_turn_ms(tokens[(name, small)].cpu)
    high = tokens[(name, large)].per_turn_ms(tokens[(name, large)].cpu)
    return (high - low) / (large - small) * 1000


@dataclass
class Results:
    """What the report needs; a phase that did not run leaves its part empty."""

    names: list[str]
    """Every server measured, floors first."""
    backends: list[str]
    turns: dict[tuple[str, int], Sample] = field(default_factory=dict)
    tokens: dict[tuple[str, int], Sample] = field(default_factory=dict)
    approvals: dict[str, Approvals] = field(default_factory=dict)
    statements: dict[str, TurnStatements] = field(default_factory=dict)
    lengths: dict[str, LengthRun] = field(default_factory=dict)
    idle: dict[str, IdleRun] = field(default_factory=dict)
    long_runs: dict[str, LongRun] = field(default_factory=dict)
    events_per_turn: int | None = None

    def errors(self) -> int:
        """Turns that failed, in any phase."""
        samples = [*self.turns.values(), *self.tokens.values()]
        samples += [a.approvals for a in self.approvals.values()]
        samples += [a.plain for a in self.approvals.values()]
        samples += [run.sample for run in self.lengths.values()]
        samples += [run.sample for run in self.long_runs.values()]
        samples += [run.unloaded for run in self.idle.values()]
        samples += [level.probes for run in self.idle.values() for level in run.levels]
        return sum(sample.errors for sample in samples)


def print_turns(results: Results, sizes: Sizes, rounds: int) -> None:
    """Turns at each concurrency, beside the floors."""
    turns = results.turns
    print(
        f"Turns: POST {SESSIONS}/{{id}}/messages with Accept: text/event-stream, a 50-word "
        f"message to the demo model ({results.events_per_turn} SSE events a turn), "
        f"up to {sizes.turns} measured turns or {sizes.row_seconds:.0f} s of starting them per "
        f"row, in {rounds} interleaved round(s); a session takes {SESSION_TURNS} turns, one "
        "run at a time. x floor = figure / the pydantic-ai floor's in the same run. TTFT = "
        "first text.delta received, from the request's start. CPU = the server process's "
        "CPU-time clock; PG CPU = PostgreSQL's own (postmaster and backends)."
    )
    header = (
        f"{'server':<10}{'conc':>5}{'turns':>6}{'turns/s':>9}{'x floor':>9}{'TTFT p50':>10}"
        f"{'TTFT p99':>10}{'x floor':>9}"
        f"{'turn p50':>10}{'turn p99':>10}{'x floor':>9}{'CPU ms/turn':>13}{'x floor':>9}"
        f"{'PG CPU ms':>11}{'errors':>8}"
    )
    print(header)
    print("-" * len(header))
    for concurrency in CONCURRENCIES:
        floor = turns[(FLOOR, concurrency)]
        for name in results.names:
            if (name, concurrency) not in turns:
                continue
            sample = turns[(name, concurrency)]
            cpu = sample.per_turn_ms(sample.cpu)
            ttft = percentile(sample.first_token, 50)
            turn = percentile(sample.total, 50)
            print(
                f"{name:<10}{concurrency:>5}{sample.ok:>6}{sample.throughput:>9.1f}"
                f"{cell(ratio(sample.throughput, floor.throughput), 9, 3)}"
                f"{cell(ttft, 10)}{cell(percentile(sample.first_token, 99), 10)}"
                f"{cell(ratio(ttft, percentile(floor.first_token, 50)), 9)}"
                f"{cell(turn, 10)}{cell(percentile(sample.total, 99), 10)}"
                f"{cell(ratio(turn, percentile(floor.total, 50)), 9)}"
                f"{cell(cpu, 13)}{cell(ratio(cpu, floor.per_turn_ms(floor.cpu)), 9)}"
                f"{cell(sample.per_turn_ms(sample.db_cpu), 11)}{sample.errors:>8}"
            )
        print()


def print_tokens(results: Results, sizes: Sizes) -> None:
    """CPU per turn for short and long replies, and the marginal CPU per token."""
    tokens = results.tokens
    small, large = TOKEN_SIZES
    print(
        f"Tokens: replies of {small} and {large} text deltas (one word each), one turn at a "
        f"time, each the first of a fresh session; up to {sizes.token_turns} measured turns "
        f"per size. marginal = (CPU per {large}-token turn - CPU per {small}-token turn) / "
        f"{large - small}, microseconds of server CPU per token."
    )
    header = (
        f"{'server':<10}{'turns':>7}{f'CPU ms @{small}':>13}{f'CPU ms @{large}':>14}"
        f"{'marginal us/token':>19}{'x floor':>9}{f'TTFT p50 @{small}':>16}"
        f"{f'@{large}':>8}{f'turn p50 @{small}':>16}{f'@{large}':>9}"
        f"{f'PG CPU ms @{small}':>17}{f'@{large}':>8}{'errors':>8}"
    )
    print(header)
    print("-" * len(header))
    floor_marginal = marginal_cpu_us(tokens, FLOOR)
    for name in results.names:
        if (name, small) not in tokens:
            continue
        low, high = tokens[(name, small)], tokens[(name, large)]
        marginal = marginal_cpu_us(tokens, name)
        print(
            f"{name:<10}{f'{low.ok}+{high.ok}':>7}{cell(low.per_turn_ms(low.cpu), 13)}"
            f"{cell(high.per_turn_ms(high.cpu), 14)}{cell(marginal, 19, 1)}"
            f"{cell(ratio(marginal, floor_marginal), 9)}"
            f"{cell(percentile(low.first_token, 50), 16)}"
            f"{cell(percentile(high.first_token, 50), 8)}"
            f"{cell(percentile(low.total, 50), 16)}{cell(percentile(high.total, 50), 9)}"
            f"{cell(low.per_turn_ms(low.db_cpu), 17)}{cell(high.per_turn_ms(high.db_cpu), 8)}"
            f"{low.errors + high.errors:>8}"
        )
    print()


def print_approvals(results: Results, sizes: Sizes) -> None:
    """Approval round trips beside plain turns of the same rounds."""
    print(
        f"Approval round trips (concurrency 1, up to {sizes.approvals} per backend): send "
        f"{APPROVAL_MESSAGE!r} → approval.required → POST decision approve → GET events "
        "with Last-Event-ID → run.finished; each chunk followed by as many plain turns "
        "(50-word message, concurrency 1). Milliseconds."
    )
    header = (
        f"{'backend':<10}{'decision→finished p50':>23}{'p99':>9}{'plain turn p50':>16}"
        f"{'x plain':>9}{'ask→finished p50':>18}{'ask→approval.required p50':>27}"
        f"{'decision POST p50':>19}{'n':>5}{'errors':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, found in results.approvals.items():
        sample = found.approvals
        done = percentile([a.decision_to_finished for a in sample.approvals], 50)
        plain = percentile(found.plain.total, 50)
        print(
            f"{name:<10}{cell(done, 23)}"
            f"{cell(percentile([a.decision_to_finished for a in sample.approvals], 99), 9)}"
            f"{cell(plain, 16)}{cell(ratio(done, plain), 9)}"
            f"{cell(percentile([a.ask_to_finished for a in sample.approvals], 50), 18)}"
            f"{cell(percentile([a.ask_to_required for a in sample.approvals], 50), 27)}"
            f"{cell(percentile([a.decision_post for a in sample.approvals], 50), 19)}"
            f"{len(sample.approvals):>5}{sample.errors + found.plain.errors:>8}"
        )
    print()


def print_statements(results: Results, show: int) -> None:
    """SQL per turn, counted in-process."""
    top = max(CONCURRENCIES)
    print(
        "SQL, counted in-process (the same app served by uvicorn on this script's event loop) "
        "with SQLAlchemy engine and pool events; DB stmts = what the database executed "
        "(SQLite: hand-offs to the driver's thread; PostgreSQL: its statement log), i.e. round "
        "trips. before 1st "
        "token = DB stmts from the request's start until the client read the first "
        "text.delta (mean per turn, turns one at a time). An approval row is per round trip."
    )
    header = (
        f"{'backend':<10}{'flow':<12}{'turns':>6}{'SQL/turn':>10}{'tx/turn':>9}"
        f"{'DB stmts/turn':>15}{'before 1st token':>18}{'pool checkouts':>16}"
    )
    print(header)
    print("-" * len(header))
    for name, found in results.statements.items():
        for flow, counts in found.flows.items():
            before = mean(found.before_first_token) if flow == "turn, c=1" else math.nan
            print(
                f"{name:<10}{flow:<12}{counts.requests:>6}"
                f"{counts.per_request(counts.total_statements):>10.2f}"
                f"{counts.per_request(counts.begins):>9.2f}"
                f"{cell(db_statements(counts), 15)}{cell(before, 18)}"
                f"{counts.per_request(counts.checkouts):>16.2f}"
            )
    print()
    for name, found in results.statements.items():
        one, many = found.flows["turn, c=1"], found.flows[f"turn, c={top}"]
        if found.before_first_token:
            spread = Counter(found.before_first_token)
            print(
                f"  {name}, c=1, DB stmts before the first token, turns: "
                + ", ".join(f"{n} stmts: {k}" for n, k in sorted(spread.items()))
            )
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
        texts = (one.by_text + many.by_text).most_common(show)
        for statement, _n in texts:
            print(
                f"    {one.per_request(one.by_text[statement]):>7.2f}"
                f"{many.per_request(many.by_text[statement]):>8.2f}  {statement[:120]}"
            )
        approval = found.flows.get("approval")
        if approval is not None and approval.requests:
            print(
                f"  {name}, an approval round trip (ask, decide, resume): {approval_line(approval)}"
            )
            for statement, n in approval.by_text.most_common(show):
                print(f"    {approval.per_request(n):>7.2f}  {statement[:120]}")
    print()


def approval_line(counts: StatementCounts) -> str:
    """SQL and transactions per approval round trip (and, on SQLite, its hand-offs)."""
    line = (
        f"{per(counts, counts.statements)}; {counts.per_request(counts.commits):.2f} commit, "
        f"{counts.per_request(counts.rollbacks):.2f} rollback"
    )
    if counts.received_from:
        line += f"; the database executed: {per(counts, counts.received)}"
    return line


def print_lengths(results: Results, sizes: Sizes) -> None:
    """Turn cost at each session length."""
    print(
        f"Session length: the n-th turn of {sizes.length_sessions} session(s) per server "
        "(50-word messages), measured one at a time; the turns between are taken unmeasured. "
        "CPU = server process; bytes = what its database wrote for the turn; x len 1 = over "
        "the same server's first turn."
    )
    header = (
        f"{'server':<10}{'length':>7}{'turns':>6}{'CPU ms/turn':>13}{'x len 1':>9}"
        f"{'bytes/turn':>12}{'x len 1':>9}{'turn p50 ms':>13}{'PG CPU ms':>11}{'errors':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, run in results.lengths.items():
        first = run.points[min(run.points)]
        for length, point in run.points.items():
            if not point.turns:
                continue
            short = "+" if point.maybe_short else " "
            print(
                f"{name:<10}{length:>7}{point.turns:>6}{cell(point.cpu_ms(), 13)}"
                f"{cell(ratio(point.cpu_ms(), first.cpu_ms()), 9)}"
                f"{cell(point.bytes_per_turn(), 11, 0)}{short}"
                f"{cell(ratio(point.bytes_per_turn(), first.bytes_per_turn()), 9)}"
                f"{cell(percentile(point.total, 50), 13)}{cell(point.db_cpu_ms(), 11)}"
                f"{run.sample.errors:>8}"
            )
        if run.reached < max(run.points):
            print(f"{name:<10}  reached length {run.reached} only (time or errors)")
    print()
    for name, run in results.lengths.items():
        print(f"  {name}: bytes = {run.bytes_from}")
    if any(p.maybe_short for run in results.lengths.values() for p in run.points.values()):
        print("  + the WAL reached SQLite's auto-checkpoint size: the count may be short")
    print()


def print_idle(results: Results, sizes: Sizes, setting: str) -> None:
    """Idle streams, per backend."""
    print(
        f"Idle streams: an agent on {IDLE_MODEL!r}, a provider that takes the request and never "
        "answers; one message per session with Accept: text/event-stream, the streams kept "
        f"open ({setting}). At each level: streams opened, server CPU over a "
        f"{sizes.idle_hold:.0f} s hold (% of one core), then up to {sizes.idle_probes} plain "
        f"turns one at a time (demo model, each given {IDLE_PROBE_TIMEOUT:.0f} s)."
    )
    header = (
        f"{'backend':<10}{'streams':>8}{'opened':>8}{'held':>7}{'open s':>8}{'CPU %':>8}"
        f"{'PG CPU %':>10}{'plain turns':>13}{'TTFT p50':>10}{'x unloaded':>12}{'ok':>5}"
    )
    print(header)
    print("-" * len(header))
    for name, run in results.idle.items():
        unloaded = percentile(run.unloaded.first_token, 50)
        print(
            f"{name:<10}{'0':>8}{'':>8}{'':>7}{'':>8}{cell(run.baseline_cpu_percent, 8, 1)}"
            f"{'':>10}{f'{run.unloaded.ok}/{sizes.idle_probes}':>13}{cell(unloaded, 10)}"
            f"{cell(1.0, 12)}{'':>5}"
        )
        for level in run.levels:
            ttft = percentile(level.probes.first_token, 50)
            print(
                f"{name:<10}{level.streams:>8}{level.opened:>8}{level.held:>7}"
                f"{level.open_seconds:>8.1f}{cell(level.cpu_percent, 8, 1)}"
                f"{cell(level.db_cpu_percent, 10, 1)}"
                f"{f'{level.probes.ok}/{level.probes_asked}':>13}{cell(ttft, 10)}"
                f"{cell(ratio(ttft, unloaded), 12)}{'yes' if level.ok else 'no':>5}"
            )
        print(
            f"{name:<10}  most streams held with plain turns served: {run.largest_held}; "
            f"held open at all: {run.largest_open}"
            + (f"; stopped: {run.stopped}" if run.stopped else "")
        )
        for problem in run.problems:
            print(f"{name:<10}  {problem}")
        for level in run.levels:
            if level.timed_out:
                print(
                    f"{name:<10}  at {level.streams} streams a plain turn was not served "
                    f"within {IDLE_PROBE_TIMEOUT:.0f} s"
                )
            for example in level.probes.error_examples[:1]:
                print(f"{name:<10}  at {level.streams} streams: {example}")
    print()


def print_long_runs(results: Results, sizes: Sizes) -> None:
    """Memory and CPU over the long run."""
    floor_run = results.long_runs.get(FLOOR)
    print(
        f"Long run: up to {sizes.rss_turns} turns per server at concurrency "
        f"{max(CONCURRENCIES)}, within the deadline (RSS of the server process from /proc: "
        "at start-up, before and after this phase; growth is over this phase)."
    )
    header = (
        f"{'server':<10}{'turns':>7}{'turns/s':>9}{'RSS ready MB':>14}{'before MB':>11}"
        f"{'after MB':>10}{'growth':>8}{'RSS x floor':>13}{'CPU ms/turn':>13}"
        f"{'x floor':>9}{'PG CPU ms':>11}{'PG tx/turn':>12}{'errors':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, run in results.long_runs.items():
        cpu = run.sample.per_turn_ms(run.sample.cpu)
        floor_cpu = floor_run.sample.per_turn_ms(floor_run.sample.cpu) if floor_run else math.nan
        rss_ratio = ratio(run.rss_after, floor_run.rss_after) if floor_run else math.nan
        print(
            f"{name:<10}{run.turns:>7}{run.sample.throughput:>9.1f}"
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
        print(f"  {name:<10}" + ", ".join(f"{n}: {rss / 2**20:.1f}" for n, rss in points))
    print()


def print_report(results: Results, args: argparse.Namespace, context: str) -> None:
    """The figures, each beside the pydantic-ai floor measured in the same run."""
    sizes: Sizes = args.sizes
    print(f"command: {args.command}")
    print(f"({context})")
    print()
    if results.turns:
        print_turns(results, sizes, args.rounds)
    if results.tokens:
        print_tokens(results, sizes)
    if results.approvals:
        print_approvals(results, sizes)
    if results.statements:
        print_statements(results, args.show_statements)
    if results.lengths:
        print_lengths(results, sizes)
    if results.idle:
        print_idle(results, sizes, args.idle_setting)
    if results.long_runs:
        print_long_runs(results, sizes)
    print_targets(results)
    for (name, concurrency), sample in results.turns.items():
        for example in sample.error_examples:
            print(f"  error {name} conc {concurrency}: {example}")
    for (name, deltas), sample in results.tokens.items():
        for example in sample.error_examples:
            print(f"  error {name} {deltas}-token turns: {example}")
    for name, found in results.approvals.items():
        for example in found.approvals.error_examples + found.plain.error_examples:
            print(f"  error {name} approvals: {example}")
    for name, length_run in results.lengths.items():
        for example in length_run.sample.error_examples:
            print(f"  error {name} session length: {example}")
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
    rows: list[str] = []

    def add(
        name: str,
        figure: str,
        value: float,
        target: str,
        met: str,
        detail: str = "",
        digits: int = 2,
    ) -> None:
        rows.append(f"{name:<9}{figure:<50}{cell(value, 9, digits)}  {target:<9}{met:<9}{detail}")

    def absent(name: str, figure: str, target: str, phase: str) -> None:
        rows.append(f"{name:<9}{figure:<50}{'-':>9}  {target:<9}{'n/a':<9}({phase} not run)")

    top = max(CONCURRENCIES)
    turns, tokens = results.turns, results.tokens
    for name in results.backends:
        # CPU per turn, and throughput, against the pydantic-ai floor
        target = TARGET_CPU.get(name, 2.0)
        figure = "server CPU per turn at c=1, x floor"
        if turns:
            mine, floor = turns[(name, 1)], turns[(FLOOR, 1)]
            cpu, floor_cpu = mine.per_turn_ms(mine.cpu), floor.per_turn_ms(floor.cpu)
            value = ratio(cpu, floor_cpu)
            add(
                name,
                figure,
                value,
                f"<= {target}",
                verdict(value, target, at_most=True),
                f"{cpu:.1f} vs {floor_cpu:.1f} ms",
            )
        else:
            absent(name, figure, f"<= {target}", "turns")
        figure = "marginal CPU per token, x floor"
        if tokens:
            mine_us, floor_us = marginal_cpu_us(tokens, name), marginal_cpu_us(tokens, FLOOR)
            value = ratio(mine_us, floor_us)
            add(
                name,
                figure,
                value,
                f"<= {TARGET_MARGINAL_CPU}",
                verdict(value, TARGET_MARGINAL_CPU, at_most=True),
                f"{mine_us:.1f} vs {floor_us:.1f} us/token",
            )
        else:
            absent(name, figure, f"<= {TARGET_MARGINAL_CPU}", "tokens")
        target = TARGET_THROUGHPUT.get(name, 0.5)
        figure = f"turns/s at c={top}, x floor"
        if turns:
            mine, floor = turns[(name, top)], turns[(FLOOR, top)]
            value = ratio(mine.throughput, floor.throughput)
            add(
                name,
                figure,
                value,
                f">= {target}",
                verdict(value, target, at_most=False),
                f"{mine.throughput:.1f} vs {floor.throughput:.1f}",
            )
        else:
            absent(name, figure, f">= {target}", "turns")
        figure = "TTFT p50 at c=1, x floor"
        if turns:
            ttft = percentile(turns[(name, 1)].first_token, 50)
            floor_ttft = percentile(turns[(FLOOR, 1)].first_token, 50)
            value = ratio(ttft, floor_ttft)
            add(
                name,
                figure,
                value,
                f"<= {TARGET_TTFT}",
                verdict(value, TARGET_TTFT, at_most=True),
                f"{ttft:.1f} vs {floor_ttft:.1f} ms",
            )
        else:
            absent(name, figure, f"<= {TARGET_TTFT}", "turns")
        figure = "decision→run.finished p50 / plain turn p50, c=1"
        if name in results.approvals:
            found = results.approvals[name]
            done = percentile([a.decision_to_finished for a in found.approvals.approvals], 50)
            plain = percentile(found.plain.total, 50)
            value = ratio(done, plain)
            add(
                name,
                figure,
                value,
                f"<= {TARGET_APPROVAL}",
                verdict(value, TARGET_APPROVAL, at_most=True),
                f"{done:.1f} vs {plain:.1f} ms",
            )
        else:
            absent(name, figure, f"<= {TARGET_APPROVAL}", "approval")
        statements = results.statements.get(name)
        if statements is not None:
            for flow, counts in statements.flows.items():
                if not flow.startswith("turn"):
                    continue
                value = db_statements(counts)
                add(
                    name,
                    f"SQL round trips per turn, {flow.removeprefix('turn, ')}",
                    value,
                    f"<= {TARGET_DB_STATEMENTS:.0f}",
                    verdict(value, TARGET_DB_STATEMENTS, at_most=True),
                )
            value = mean(statements.before_first_token)
            add(
                name,
                "SQL round trips before the first token, c=1",
                value,
                f"<= {TARGET_DB_BEFORE_FIRST_TOKEN:.0f}",
                verdict(value, TARGET_DB_BEFORE_FIRST_TOKEN, at_most=True),
            )
        else:
            absent(name, "SQL round trips per turn", f"<= {TARGET_DB_STATEMENTS:.0f}", "sql")
        run = results.lengths.get(name)
        if run is not None:
            first, last = min(run.points), max(run.points)
            a, b = run.points[first], run.points[last]
            for label, low, high, unit in (
                ("turn CPU", a.cpu_ms(), b.cpu_ms(), "ms"),
                ("bytes written", a.bytes_per_turn(), b.bytes_per_turn(), "B"),
            ):
                value = ratio(high, low)
                add(
                    name,
                    f"{label} at session length {last} / length {first}",
                    value,
                    f"<= {TARGET_LENGTH_GROWTH}",
                    verdict(value, TARGET_LENGTH_GROWTH, at_most=True),
                    f"{high:.{0 if unit == 'B' else 1}f} vs {low:.{0 if unit == 'B' else 1}f} "
                    f"{unit}",
                )
        else:
            absent(name, "turn cost at session length", f"<= {TARGET_LENGTH_GROWTH}", "length")
        idle = results.idle.get(name)
        if idle is not None:
            held = idle.largest_held
            add(
                name,
                "idle SSE streams held, plain turns served",
                held,
                f">= {TARGET_IDLE_STREAMS}",
                "met" if held >= TARGET_IDLE_STREAMS else "MISSED",
                f"held open at all: {idle.largest_open}",
                digits=0,
            )
            unloaded = percentile(idle.unloaded.first_token, 50)
            levels = [level for level in idle.levels if level.ok] or idle.levels[:1]
            if levels:
                level = levels[-1]
                ttft = percentile(level.probes.first_token, 50)
                value = ratio(ttft, unloaded)
                met = verdict(value, TARGET_IDLE_TTFT, at_most=True)
                add(
                    name,
                    f"plain TTFT p50 with {level.streams} idle streams / unloaded",
                    value,
                    f"<= {TARGET_IDLE_TTFT}",
                    "MISSED" if met == "n/a" else met,
                    f"{ttft:.1f} vs {unloaded:.1f} ms" if not math.isnan(ttft) else "not served",
                )
        else:
            absent(name, "idle SSE streams", f">= {TARGET_IDLE_STREAMS}", "idle")
        long = results.long_runs.get(name)
        if long is not None:
            short = "" if long.turns >= long.asked else f" (of {long.asked})"
            add(
                name,
                f"RSS growth over {long.turns} turns{short}, %",
                long.growth * 100,
                f"<= {TARGET_RSS_GROWTH:.0%}",
                verdict(long.growth, TARGET_RSS_GROWTH, at_most=True),
                "target for 10k turns",
            )
    print(
        "Targets (printed beside the figures, not asserted; x floor = over the pydantic-ai "
        "floor in this run):"
    )
    header = f"{'backend':<9}{'figure':<50}{'value':>9}  {'target':<9}{'':<9}figures"
    print(header)
    print("-" * (len(header) + 20))
    for row in rows:
        print(row)
    print()


# --------------------------------------------------------------------------------------------
# Main


def int_list(text: str) -> tuple[int, ...]:
    """``1,50,200`` → (1, 50, 200), each positive."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"give positive whole numbers: {text!r}")
    return tuple(sorted(set(values)))


def phase_list(text: str) -> tuple[str, ...]:
    """``turns,sql`` → the phases, in the order they run."""
    asked = {part.strip() for part in text.split(",") if part.strip()}
    unknown = asked - set(PHASES)
    if unknown or not asked:
        raise argparse.ArgumentTypeError(
            f"unknown phase(s) {', '.join(sorted(unknown)) or '(none given)'}; "
            f"choose from {','.join(PHASES)}"
        )
    return tuple(phase for phase in PHASES if phase in asked)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Conversation turns (a message in, the reply streamed over SSE) on SQLite "
        "and PostgreSQL, beside a pydantic-ai floor and a bare-FastAPI floor measured in the "
        "same run."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"A smoke run (a few minutes): {QUICK.turns} turns per row, {QUICK.token_turns} "
        f"per reply size, {QUICK.approvals} approvals, {QUICK.length_sessions} session to "
        f"length {max(QUICK.lengths)}, idle streams up to {max(QUICK.idle_levels)}, "
        f"{QUICK.rss_turns} turns in the long run.",
    )
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres", "both"],
        default="both",
        help="Which database(s) to measure (default both).",
    )
    parser.add_argument(
        "--phases",
        type=phase_list,
        default=PHASES,
        help=f"Comma-separated phases to run (default all: {','.join(PHASES)}); they run in "
        "that order whatever the order given.",
    )
    parser.add_argument(
        "--turns",
        type=int,
        help=f"Measured turns per server and concurrency (default {FULL.turns}).",
    )
    parser.add_argument(
        "--token-turns",
        type=int,
        help=f"Measured turns per server and reply size, tokens phase (default "
        f"{FULL.token_turns}).",
    )
    parser.add_argument(
        "--approvals",
        type=int,
        help=f"Measured approval round trips per backend (default {FULL.approvals}).",
    )
    parser.add_argument(
        "--lengths",
        type=int_list,
        help="Session lengths whose turns the length phase measures (default "
        f"{','.join(map(str, FULL.lengths))}).",
    )
    parser.add_argument(
        "--length-sessions",
        type=int,
        help=f"Sessions per server in the length phase (default {FULL.length_sessions}; "
        f"quick {QUICK.length_sessions}).",
    )
    parser.add_argument(
        "--idle-streams",
        type=int_list,
        help="Levels of idle streams to ramp through (default "
        f"{','.join(map(str, FULL.idle_levels))}; quick "
        f"{','.join(map(str, QUICK.idle_levels))}).",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        help=f"At most this long for the idle phase on one backend (default "
        f"{FULL.idle_seconds:.0f}; quick {QUICK.idle_seconds:.0f}).",
    )
    parser.add_argument(
        "--rss-turns",
        type=int,
        help=f"Turns per server in the long phase (default {FULL.rss_turns}). The phase stops "
        "early, saying so, when it would pass the deadline: raise --deadline to get them all.",
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
    parser.add_argument("--serve-pydantic-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--floor-db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-silent-openai", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.command = shlex.join(["python", "bench/turns.py", *given])
    preset = QUICK if args.quick else FULL

    def pick(value: T | None, default: T) -> T:
        return default if value is None else value

    args.sizes = Sizes(
        turns=pick(args.turns, preset.turns),
        approvals=pick(args.approvals, preset.approvals),
        token_turns=pick(args.token_turns, preset.token_turns),
        length_sessions=pick(args.length_sessions, preset.length_sessions),
        lengths=pick(args.lengths, preset.lengths),
        length_seconds=preset.length_seconds,
        idle_levels=pick(args.idle_streams, preset.idle_levels),
        idle_hold=preset.idle_hold,
        idle_probes=preset.idle_probes,
        idle_seconds=pick(args.idle_seconds, preset.idle_seconds),
        rss_turns=pick(args.rss_turns, preset.rss_turns),
        statement_turns=pick(args.statement_turns, preset.statement_turns),
        statement_approvals=preset.statement_approvals,
        warmup_first=preset.warmup_first,
        warmup_chunk=preset.warmup_chunk,
        row_seconds=pick(args.row_seconds, preset.row_seconds),
        long_seconds=preset.long_seconds,
        rounds=pick(args.rounds, preset.rounds),
    )
    args.rounds = args.sizes.rounds
    sizes: Sizes = args.sizes
    if sizes.turns < 1 or sizes.rounds < 1 or sizes.rounds > sizes.turns:
        parser.error("--turns and --rounds must be positive, rounds <= turns")
    if sizes.approvals < sizes.rounds or sizes.token_turns < sizes.rounds:
        parser.error("--approvals and --token-turns must be >= --rounds")
    if sizes.statement_turns < 1 or sizes.rss_turns < 1 or sizes.length_sessions < 1:
        parser.error("--statement-turns, --rss-turns and --length-sessions must be >= 1")
    if args.deadline is None:
        args.deadline = QUICK_DEADLINE if args.quick else DEFAULT_DEADLINE
    if args.deadline <= 0:
        parser.error("--deadline must be positive")
    return args


def executor_setting() -> str:
    """The executor's concurrency the idle servers run with (the server's default)."""
    from countersign.config import Settings

    slots = Settings.model_fields["executor_concurrency"].default
    return f"executor concurrency {slots}, the server's default: runs past it stay queued"


def run(args: argparse.Namespace, deadline: Deadline, processes: Processes, work: Path) -> int:
    """The whole measurement; returns the exit code."""
    sizes: Sizes = args.sizes
    phases: tuple[str, ...] = args.phases
    load_at_start = os.getloadavg()[0]
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    serving = [p for p in phases if p in ("turns", "tokens", "approval", "length", "long")]
    postgres: Postgres | None = None
    idle_database = ""
    try:
        urls: dict[str, str] = {}
        idle_urls: dict[str, str] = {}
        if "postgres" in backends:
            postgres = open_postgres(deadline)
        for name in backends:
            if name == "sqlite":
                urls[name] = f"sqlite:///{work / 'bench.db'}"
                idle_urls[name] = f"sqlite:///{work / 'idle.db'}"
            else:
                assert postgres is not None
                urls[name] = postgres.url
                if "idle" in phases:
                    # The idle phase leaves runs behind: a database of its own.
                    idle_database = f"{postgres.database}_idle"
                    run_async(postgres.server.create_database(idle_database), deadline, limit=30)
                    idle_urls[name] = str(postgres.server.url(idle_database))
        if "idle" not in phases:
            idle_urls = {}
        if "sql" not in phases and not serving:
            urls = {}
        db_pid = postgres.postmaster_pid() if postgres is not None else None

        accounts = {**urls, **{f"{n}-idle": u for n, u in idle_urls.items()}}
        note(f"{', '.join(accounts)}: migrating, creating the user and an API key", deadline)
        with ThreadPoolExecutor(max_workers=max(1, len(accounts))) as threads:
            made = {
                name: threads.submit(create_account, url, cwd=work, deadline=deadline)
                for name, url in accounts.items()
            }
            keys = {name: future.result() for name, future in made.items()}

        results = Results(names=[], backends=backends)
        if "sql" in phases:
            for name, url in urls.items():
                note(
                    f"sql: {name}, counting in-process ({sizes.statement_turns} turns, "
                    f"{sizes.statement_approvals} approvals)",
                    deadline,
                )
                on_pg = postgres if name == "postgres" else None
                with statement_logging(on_pg, deadline) as log:
                    results.statements[name] = run_async(
                        count_statements(
                            url, keys[name], sizes=sizes, log=log, postgres=on_pg, deadline=deadline
                        ),
                        deadline,
                        limit=180,
                    )

        served: Served | None = None
        if serving:
            served = serve_phases(
                args, results, deadline, processes, work, urls, keys, postgres, db_pid
            )
        if "idle" in phases:
            idle_phases(args, results, deadline, processes, work, idle_urls, keys, db_pid)
        if "long" in phases and served is not None:
            results.long_runs = long_phase(served, sizes, deadline, processes, results, postgres)

        context = [
            f"client: httpx in this process, {'uvloop' if has_uvloop() else 'asyncio'}",
            f"{os.cpu_count()} CPUs",
            f"Python {platform.python_version()}",
            f"1-min load average {load_at_start:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end",
            f"run took {deadline.elapsed():.0f} s",
        ]
        if postgres is not None:
            version = run_async(postgres.server.fetchval("SHOW server_version"), deadline)
            kind = "throwaway" if postgres.owned else "COUNTERSIGN_TEST_DATABASE_URL"
            context.append(f"PostgreSQL {version} ({kind})")
        print()
        print_report(results, args, "; ".join(context))
        note(f"done in {deadline.elapsed():.1f} s", deadline)
        return 1 if results.errors() else 0
    finally:
        processes.stop_all()
        if postgres is not None:
            if idle_database and not postgres.owned:
                # Someone else's server: leave nothing behind (a throwaway goes as a whole).
                with suppress(Exception):
                    run_async(postgres.server.drop_database(idle_database), Deadline(15), limit=10)
            postgres.close()


@dataclass
class Served:
    """The long-lived servers, for the long run at the end."""

    targets: list[Target]
    """The pydantic-ai floor and the backends."""
    rss_ready: dict[str, int]


def serve_phases(
    args: argparse.Namespace,
    results: Results,
    deadline: Deadline,
    processes: Processes,
    work: Path,
    urls: dict[str, str],
    keys: dict[str, str],
    postgres: Postgres | None,
    db_pid: int | None,
) -> Served:
    """Start the long-lived servers and run the phases that load them: turns, tokens,
    approval, length (the long run comes last, after the idle phase)."""
    sizes: Sizes = args.sizes
    phases: tuple[str, ...] = args.phases
    note("starting the servers", deadline)
    script = Path(__file__)
    targets: list[Target] = []
    if "turns" in phases:
        targets.append(
            start_floor(
                script, processes=processes, work=work, deadline=deadline, wait=False, name=BARE
            )
        )
    floor_db = work / "pai-floor.db"
    targets.append(
        start_floor(
            script,
            processes=processes,
            work=work,
            deadline=deadline,
            wait=False,
            name=FLOOR,
            flag="--serve-pydantic-floor",
            extra_args=["--floor-db", str(floor_db)],
        )
    )
    for name, url in urls.items():
        targets.append(
            start_countersign(
                name, url, keys[name], processes=processes, work=work, deadline=deadline, wait=False
            )
        )
    for target in targets:
        wait_ready(target, deadline)
    rss_ready = {target.name: rss_bytes(target.process.pid) for target in targets}
    results.events_per_turn = run_async(check_shapes(targets), deadline, limit=60)
    results.names = [target.name for target in targets]
    by_name = {target.name: target for target in targets}
    floor_and_backends = [by_name[FLOOR], *(by_name[name] for name in urls)]
    backends = [by_name[name] for name in urls]

    def in_phase(work: Callable[[Phase], Awaitable[T]], limit: float = 3600.0) -> T:
        async def body() -> T:
            phase = Phase(sizes=sizes, rounds=args.rounds, db_pid=db_pid)
            try:
                return await work(phase)
            finally:
                await phase.close()

        return run_async(body(), deadline, limit=limit)

    if "turns" in phases:
        note(
            f"turns: {sizes.turns} turns x {len(CONCURRENCIES)} concurrencies x "
            f"{len(targets)} servers in {args.rounds} round(s)",
            deadline,
        )
        results.turns = in_phase(lambda phase: turns_phase(targets, phase))
        check_alive(targets)
    if "tokens" in phases:
        note(f"tokens: {sizes.token_turns} turns x {TOKEN_SIZES} deltas per server", deadline)
        results.tokens = in_phase(lambda phase: tokens_phase(floor_and_backends, phase))
        check_alive(targets)
    if "approval" in phases:
        note(f"approval: {sizes.approvals} round trips and plain turns per backend", deadline)
        results.approvals = in_phase(lambda phase: approval_phase(backends, phase))
        check_alive(targets)
    length_budget = min(sizes.length_seconds, deadline.remaining() - 2 * LONG_RUN_RESERVE)
    if "length" in phases and length_budget < LONG_RUN_RESERVE:
        note("length: no time left; raise --deadline", deadline)
    elif "length" in phases:
        note(
            f"length: {sizes.length_sessions} session(s) per server to length "
            f"{max(sizes.lengths)} (at most {length_budget:.0f} s)",
            deadline,
        )

        async def lengths(phase: Phase) -> dict[str, LengthRun]:
            written: dict[str, WrittenBytes] = {FLOOR: SqliteWal(floor_db)}
            connection = None
            if "sqlite" in by_name:
                written["sqlite"] = SqliteWal(work / "bench.db")
            if "postgres" in by_name:
                assert postgres is not None
                target = by_name["postgres"]
                client = phase.client(target)
                connection = await postgres.server.connect()

                async def warm() -> None:
                    await one_turn(
                        client, target.headers, await new_session(client, target.headers)
                    )

                written["postgres"] = PostgresWal(connection, warm)
            try:
                return await length_phase(
                    floor_and_backends,
                    phase,
                    written=written,
                    stop_at=time.monotonic() + length_budget,
                )
            finally:
                if connection is not None:
                    await connection.close()

        results.lengths = in_phase(lengths)
        check_alive(targets)
    return Served(targets=floor_and_backends, rss_ready=rss_ready)


def long_phase(
    served: Served,
    sizes: Sizes,
    deadline: Deadline,
    processes: Processes,
    results: Results,
    postgres: Postgres | None,
) -> dict[str, LongRun]:
    """The long run on each server, in what the deadline leaves."""
    targets, rss_ready = served.targets, served.rss_ready
    long_runs: dict[str, LongRun] = {}
    weights = {target.name: 0.5 if target.name in FLOORS else 1.0 for target in targets}
    phase_end = deadline.elapsed() + (sizes.long_seconds or math.inf)
    for index, target in enumerate(targets):
        # The time left is shared by the servers still to go (the floor's share is half: its
        # figures are the reference, not the subject).
        left = min(deadline.remaining() - LONG_RUN_RESERVE, phase_end - deadline.elapsed())
        share = left * weights[target.name] / sum(weights[t.name] for t in targets[index:])
        if share < 1:
            note(f"long run: no time left for {target.name}; raise --deadline", deadline)
            continue
        note(
            f"long run: up to {sizes.rss_turns} turns on {target.name} (at most {share:.0f} s)",
            deadline,
        )
        top = max(CONCURRENCIES)
        measured = results.turns.get((target.name, top))
        on_pg = postgres if target.name == "postgres" else None
        long_runs[target.name] = run_async(
            long_run(
                target,
                turns=sizes.rss_turns,
                until=time.monotonic() + share,
                expected_rate=measured.throughput if measured is not None else 20.0,
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
    return long_runs


def idle_phases(
    args: argparse.Namespace,
    results: Results,
    deadline: Deadline,
    processes: Processes,
    work: Path,
    urls: dict[str, str],
    keys: dict[str, str],
    db_pid: int | None,
) -> None:
    """The idle phase on each backend: a fresh database and server of its own, whose agent's
    provider (``serve_silent_openai``, a process of this run) never answers."""
    sizes: Sizes = args.sizes
    port = free_port()
    silent = Target(
        name="silent-openai",
        base_url=f"http://127.0.0.1:{port}",
        headers={},
        process=processes.start(
            [sys.executable, str(Path(__file__).resolve()), "--serve-silent-openai", str(port)],
            env={k: v for k, v in os.environ.items() if not k.startswith("COUNTERSIGN_")},
            log=work / "silent-openai.log",
            cwd=work,
        ),
        log=work / "silent-openai.log",
    )
    wait_ready(silent, deadline)
    settings = {
        "COUNTERSIGN_OPENAI_BASE_URL": f"{silent.base_url}/v1",
        # Runs must wait for the model longer than the phase lasts.
        "COUNTERSIGN_MODEL_TIMEOUT_SECONDS": "3600",
        # Every idle stream follows a run that is in a model call, which holds one of the
        # executor's slots: room for all of them and for the plain turns served beside them.
        "COUNTERSIGN_EXECUTOR_CONCURRENCY": str(max(sizes.idle_levels) + 64),
    }
    for name, url in urls.items():
        budget = min(sizes.idle_seconds, deadline.remaining() - LONG_RUN_RESERVE - IDLE_OVERRUN)
        if budget < IDLE_MIN_SECONDS:
            note(f"idle: no time left for {name}; raise --deadline", deadline)
            continue
        server = start_countersign(
            f"{name}-idle",
            url,
            keys[f"{name}-idle"],
            processes=processes,
            work=work,
            deadline=deadline,
            extra_env=settings,
        )
        note(
            f"idle: {name}, up to {max(sizes.idle_levels)} streams (at most {budget:.0f} s)",
            deadline,
        )
        results.idle[name] = run_async(
            idle_phase(
                server,
                sizes=sizes,
                db_pid=db_pid if name == "postgres" else None,
                stop_at=time.monotonic() + budget,
            ),
            deadline,
        )
        processes.stop(server.process)
    processes.stop(silent.process)


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
    if args.serve_pydantic_floor is not None:
        serve_app(
            pydantic_floor_app(args.floor_db or Path("pai-floor.db")), args.serve_pydantic_floor
        )
        return 0
    if args.serve_silent_openai is not None:
        run_async(serve_silent_openai(args.serve_silent_openai), Deadline(math.inf))
        return 0
    args.idle_setting = executor_setting()
    deadline = Deadline(args.deadline)

    def body(processes: Processes) -> int:
        with tempfile.TemporaryDirectory(prefix="countersign-bench-") as folder:
            return run(args, deadline, processes, Path(folder))

    return bounded_main(args.deadline, body)


if __name__ == "__main__":
    sys.exit(main())
