"""Soak: several ``countersign serve`` processes on one PostgreSQL under mixed load for
minutes, one of them SIGKILLed (and started again) every interval.

    python bench/soak.py                      # 3 processes, 10 minutes, a kill a minute
    python bench/soak.py --quick              # 2 minutes, a kill every 30 s
    python bench/soak.py --minutes 30 --clients 24

Clients (``--clients``, each an asyncio task of this process) loop over four kinds of work,
each against a server picked at random, and each step that meets a dead server is tried on
another one (a *retry*, not an error):

- turn: a new session, a message, its stream followed to the end;
- approval: a ``/tool write_file`` message, its stream to ``approval.required``, the decision
  sent to another server, the stream followed there to the end (a kill while the tool runs
  makes the run ask again, outcome unknown: approved again);
- cancel: a message, then ``/cancel`` sent to another server (200, or 409 when it had ended);
- reconnect: a message, two events read, the stream dropped and resumed on another server
  with ``Last-Event-ID``.

Every stream is checked: its events' ids run 1, 2, 3… with no gap and no repeat, across
reconnects. Printed per minute: turns finished, errors, latency (message to the run's last
event) p50/p99, each process's RSS, and at the end: totals, kills, retries and the runs left
queued or running (stuck) a minute after the load stopped. The baseline is the run itself:
the last minute beside the first minute after warm-up (RSS and p99), as ratios.

Errors (the goal is 0): a 5xx, an answer no step expects, a stream with a gap or a repeat, a
run that failed. The script exits 1 when there is an error or a stuck run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from servers import (
    Deadline,
    Postgres,
    Processes,
    Target,
    bounded_main,
    create_account,
    note,
    open_postgres,
    rss_bytes,
    run_async,
    start_countersign,
    wait_ready,
)

API = "/api/v1"
STEP_TIMEOUT = 30.0
"""Seconds one request or one stream read may take before it counts as an error."""
RETRIES = 8
"""How many other servers a step is tried on when the one it reached is down."""
SETTLE_SECONDS = 90.0
"""After the load: how long runs may take to end before the ones still going are stuck."""
SERVER_SETTINGS = {
    # A killed process's runs are taken over after this long.
    "COUNTERSIGN_RUN_LEASE_SECONDS": "5",
}
KINDS = (("turn", 50), ("approval", 25), ("cancel", 10), ("reconnect", 15))


class Down(Exception):
    """The server a step reached is down (killed, or starting again)."""


class Wrong(Exception):
    """An answer no step expects: an error of the run."""


@dataclass
class Minute:
    turns: int = 0
    errors: int = 0
    retries: int = 0
    latencies: list[float] = field(default_factory=list)
    rss: dict[str, int] = field(default_factory=dict)


@dataclass
class Soak:
    targets: dict[str, Target]
    processes: Processes
    work: Path
    deadline: Deadline
    database_url: str
    key: str
    started: float = field(default_factory=time.monotonic)
    minutes: dict[int, Minute] = field(default_factory=lambda: defaultdict(Minute))
    errors: list[str] = field(default_factory=list)
    kills: int = 0
    stopping: bool = False

    def minute(self) -> Minute:
        return self.minutes[int((time.monotonic() - self.started) // 60)]

    def live(self) -> list[Target]:
        return [t for t in self.targets.values() if t.process.poll() is None]

    def error(self, what: str) -> None:
        self.minute().errors += 1
        if len(self.errors) < 50:
            self.errors.append(what)


# --- one step against some server, tried on another when the server is down ----------------


def _url(target: Target, path: str) -> str:
    return f"{target.base_url}{API}{path}"


async def pick(soak: Soak, avoid: Target | None) -> Target:
    """A live server, another than ``avoid`` when there is one (waits while none is up)."""
    while True:
        choices = [t for t in soak.live() if t is not avoid] or soak.live()
        if choices:
            return random.choice(choices)
        await asyncio.sleep(0.5)


async def call(
    soak: Soak,
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    expect: tuple[int, ...],
    body: Any = None,
    avoid: Target | None = None,
) -> tuple[httpx.Response, Target]:
    """One request on a live server (another than ``avoid`` when there is one)."""
    for _ in range(RETRIES):
        target = await pick(soak, avoid)
        try:
            answer = await client.request(
                method, _url(target, path), json=body, headers=target.headers
            )
        except (httpx.TransportError, httpx.TimeoutException):
            soak.minute().retries += 1
            await asyncio.sleep(0.2)
            continue
        if answer.status_code == 503:  # a server starting or stopping: another one
            soak.minute().retries += 1
            await asyncio.sleep(0.2)
            continue
        if answer.status_code not in expect:
            raise Wrong(f"{method} {path}: {answer.status_code} {answer.text[:200]}")
        return answer, target
    raise Wrong(f"{method} {path}: no server answered after {RETRIES} tries")


async def follow(
    soak: Soak,
    client: httpx.AsyncClient,
    session_id: str,
    run_id: str,
    seen: list[int],
    *,
    stop_after: int | None = None,
    avoid: Target | None = None,
) -> str:
    """Read the run's stream from after ``seen`` until it ends (or ``stop_after`` more
    events); the last event's type. Resumes on another server when one goes down."""
    path = f"/sessions/{session_id}/runs/{run_id}/events"
    last_type = ""
    read = 0
    for _ in range(RETRIES):
        target = await pick(soak, avoid)
        headers = dict(target.headers)
        if seen:
            headers["Last-Event-ID"] = str(seen[-1])
        try:
            async with client.stream("GET", _url(target, path), headers=headers) as stream:
                if stream.status_code == 503:
                    raise Down
                if stream.status_code != 200:
                    raise Wrong(f"GET {path}: {stream.status_code}")
                event_id: int | None = None
                async for line in stream.aiter_lines():
                    if line.startswith("id:"):
                        event_id = int(line[3:].strip())
                    elif line.startswith("event:"):
                        last_type = line[6:].strip()
                    elif line == "" and event_id is not None:
                        seen.append(event_id)
                        event_id = None
                        read += 1
                        if stop_after is not None and read >= stop_after:
                            return last_type
            return last_type
        except (httpx.TransportError, httpx.TimeoutException, Down):
            soak.minute().retries += 1
            avoid = None
            await asyncio.sleep(0.2)
    raise Wrong(f"GET {path}: no server kept the stream after {RETRIES} tries")


def check_sequence(seen: list[int], what: str) -> None:
    if seen != list(range(1, len(seen) + 1)):
        raise Wrong(f"{what}: event ids {seen[:40]} have a gap or a repeat")


# --- the kinds of work ------------------------------------------------------------------------


async def one_turn(soak: Soak, client: httpx.AsyncClient, kind: str) -> None:
    created, _ = await call(soak, client, "POST", "/sessions", expect=(201,), body={})
    session_id = created.json()["id"]
    if kind == "approval":
        content = "/tool write_file " + json.dumps({"path": "soak.txt", "content": "x"})
    else:
        content = "a few words for the soak, " * (8 if kind == "cancel" else 2)
    began = time.monotonic()
    sent, where = await call(
        soak,
        client,
        "POST",
        f"/sessions/{session_id}/messages",
        expect=(202,),
        body={"content": content},
    )
    run_id = sent.json()["run"]["id"]
    seen: list[int] = []
    last = ""
    if kind == "approval":
        if await follow(soak, client, session_id, run_id, seen) != "approval.required":
            raise Wrong(f"run {run_id}: the tool call did not wait for a person")
        # A kill while the approved tool runs makes the run ask again (outcome unknown).
        for _ in range(4):
            await decide_pending(soak, client, session_id, avoid=where)
            last = await follow(soak, client, session_id, run_id, seen, avoid=where)
            if last != "approval.required":
                break
    elif kind == "cancel":
        await follow(soak, client, session_id, run_id, seen, stop_after=1)
        await call(
            soak,
            client,
            "POST",
            f"/sessions/{session_id}/runs/{run_id}/cancel",
            expect=(200, 202, 409),  # 409: it had ended already
            avoid=where,
        )
    elif kind == "reconnect":
        await follow(soak, client, session_id, run_id, seen, stop_after=2)
    if kind != "approval":
        last = await follow(soak, client, session_id, run_id, seen, avoid=where)
    check_sequence(seen, f"run {run_id}")
    if last not in ("run.finished", "run.failed"):
        raise Wrong(f"run {run_id}: its stream ended at {last!r}")
    run, _ = await call(soak, client, "GET", f"/sessions/{session_id}/runs/{run_id}", expect=(200,))
    status = run.json()["status"]
    allowed = ("succeeded", "cancelled") if kind == "cancel" else ("succeeded",)
    if status not in allowed:
        raise Wrong(f"run {run_id} ({kind}) ended {status}: {run.json().get('error')}")
    minute = soak.minute()
    minute.turns += 1
    minute.latencies.append(time.monotonic() - began)


async def decide_pending(
    soak: Soak, client: httpx.AsyncClient, session_id: str, *, avoid: Target
) -> None:
    """Approve the session's one pending approval, on another server than ``avoid``."""
    pending, _ = await call(
        soak, client, "GET", f"/sessions/{session_id}/pending-approvals", expect=(200,)
    )
    items = pending.json()["items"]
    if len(items) != 1:
        raise Wrong(f"session {session_id}: {len(items)} pending approvals, not 1")
    await call(
        soak,
        client,
        "POST",
        f"/sessions/{session_id}/approvals/{items[0]['id']}",
        expect=(200, 409),  # 409: a retry of a decision that was made
        body={"decision": "approve"},
        avoid=avoid,
    )


async def client_loop(soak: Soak) -> None:
    kinds = [kind for kind, weight in KINDS for _ in range(weight)]
    limits = httpx.Limits(max_connections=20, max_keepalive_connections=10)
    async with httpx.AsyncClient(timeout=STEP_TIMEOUT, limits=limits) as client:
        while not soak.stopping:
            kind = random.choice(kinds)
            try:
                await one_turn(soak, client, kind)
            except Wrong as wrong:
                soak.error(str(wrong))
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                soak.error(f"{kind}: {type(exc).__name__}: {exc}")


# --- kills, samples, the end -------------------------------------------------------------------


async def killer(soak: Soak, every: float) -> None:
    if every <= 0:
        return  # --kill-every 0: no kills (each process's RSS over the whole run)
    names = sorted(soak.targets)
    turn = 0
    while not soak.stopping:
        await asyncio.sleep(every)
        if soak.stopping:
            return
        name = names[turn % len(names)]
        turn += 1
        victim = soak.targets[name]
        victim.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.process.wait, 10)
        soak.processes.owned.remove(victim.process)
        soak.kills += 1
        note(f"soak: SIGKILL {name} (pid {victim.process.pid}); starting it again", soak.deadline)
        fresh = await asyncio.to_thread(
            start_countersign,
            name,
            soak.database_url,
            soak.key,
            processes=soak.processes,
            work=soak.work,
            deadline=soak.deadline,
            wait=False,
            extra_env=SERVER_SETTINGS,
        )
        soak.targets[name] = fresh
        await asyncio.to_thread(wait_ready, fresh, soak.deadline)


async def sampler(soak: Soak) -> None:
    while not soak.stopping:
        minute = soak.minute()
        for name, target in soak.targets.items():
            if target.process.poll() is None:
                with contextlib.suppress(OSError):
                    minute.rss[name] = max(minute.rss.get(name, 0), rss_bytes(target.process.pid))
        await asyncio.sleep(5)


async def stuck_runs(postgres: Postgres, settle: float) -> int:
    """Runs still queued or running once ``settle`` seconds have passed (0 as soon as none)."""
    limit = time.monotonic() + settle
    while True:
        count = int(
            await postgres.server.fetchval(
                "SELECT count(*) FROM runs WHERE status IN ('queued', 'running')",
                database=postgres.database,
            )
        )
        if count == 0 or time.monotonic() > limit:
            return count
        await asyncio.sleep(1)


async def soak_run(soak: Soak, args: argparse.Namespace, postgres: Postgres) -> int:
    loops = [asyncio.create_task(client_loop(soak)) for _ in range(args.clients)]
    helpers = [
        asyncio.create_task(killer(soak, args.kill_every)),
        asyncio.create_task(sampler(soak)),
    ]
    await asyncio.sleep(args.minutes * 60)
    soak.stopping = True
    note("soak: load stopped; waiting for the turns in flight", soak.deadline)
    done, pending = await asyncio.wait(loops, timeout=STEP_TIMEOUT * 3)
    for task in pending:
        task.cancel()
        soak.error("a client's turn did not end within 90 s of the load stopping")
    for task in helpers:
        task.cancel()
    await asyncio.gather(*helpers, *pending, return_exceptions=True)
    del done
    return await stuck_runs(postgres, SETTLE_SECONDS)


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def report(soak: Soak, stuck: int, args: argparse.Namespace) -> int:
    names = sorted(soak.targets)
    print()
    print(
        f"soak: {args.processes} processes on one PostgreSQL, {args.clients} clients, "
        f"{args.minutes:g} min, SIGKILL every {args.kill_every:g} s"
    )
    header = f"{'min':>4} {'turns':>6} {'errors':>6} {'retries':>7} {'p50 ms':>7} {'p99 ms':>7}"
    header += "".join(f" {'RSS ' + n + ' MB':>12}" for n in names)
    print(header)
    for index in sorted(soak.minutes):
        m = soak.minutes[index]
        p50, p99 = (percentile(m.latencies, share) * 1000 for share in (0.5, 0.99))
        line = f"{index + 1:>4} {m.turns:>6} {m.errors:>6} {m.retries:>7} {p50:>7.0f} {p99:>7.0f}"
        line += "".join(f" {m.rss.get(n, 0) / 2**20:>12.1f}" for n in names)
        print(line)
    turns = sum(m.turns for m in soak.minutes.values())
    errors = sum(m.errors for m in soak.minutes.values())
    retries = sum(m.retries for m in soak.minutes.values())
    print(
        f"total: {turns} turns, {errors} errors (goal 0), {retries} retries on another server, "
        f"{soak.kills} kills, {stuck} stuck runs (goal 0)"
    )
    full = [i for i in sorted(soak.minutes) if soak.minutes[i].turns]
    if len(full) >= 3:
        first, last = soak.minutes[full[1]], soak.minutes[full[-2]]  # past warm-up; whole
        p99 = percentile(last.latencies, 0.99) / percentile(first.latencies, 0.99)
        print(f"p99 latency, minute {full[-2] + 1} / minute {full[1] + 1}: {p99:.2f}x")
        for name in names:
            if first.rss.get(name) and last.rss.get(name):
                growth = last.rss[name] / first.rss[name]
                print(f"RSS {name}, minute {full[-2] + 1} / minute {full[1] + 1}: {growth:.2f}x")
    if soak.errors:
        print("first errors:")
        for line in soak.errors[:20]:
            print(f"  {line}")
    latencies = [x for m in soak.minutes.values() for x in m.latencies]
    if latencies:
        print(f"latency over the run: p50 {statistics.median(latencies) * 1000:.0f} ms")
    return 1 if errors or stuck else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument(
        "--kill-every", type=float, default=60.0, help="seconds between kills (0: none)"
    )
    parser.add_argument("--quick", action="store_true", help="2 minutes, a kill every 30 s")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.kill_every = 2.0, 30.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    random.seed(args.seed)
    seconds = args.minutes * 60 + 420

    def body(processes: Processes) -> int:
        deadline = Deadline(seconds)
        work = Path(os.environ.get("TMPDIR", "/tmp")) / f"countersign-soak-{os.getpid()}"  # noqa: S108
        work.mkdir(parents=True, exist_ok=True)
        postgres = open_postgres(deadline)
        try:
            key = create_account(postgres.url, cwd=work, deadline=deadline)
            targets = {
                f"p{n}": start_countersign(
                    f"p{n}",
                    postgres.url,
                    key,
                    processes=processes,
                    work=work,
                    deadline=deadline,
                    extra_env=SERVER_SETTINGS,
                )
                for n in range(1, args.processes + 1)
            }
            soak = Soak(targets, processes, work, deadline, postgres.url, key)
            note(f"soak: {args.processes} servers up; {args.minutes:g} min of load", deadline)
            stuck = run_async(soak_run(soak, args, postgres), deadline, limit=seconds)
            return report(soak, stuck, args)
        finally:
            processes.stop_all()
            postgres.close()

    return bounded_main(seconds, body)


if __name__ == "__main__":
    raise SystemExit(main())
