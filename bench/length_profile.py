"""Where a turn's CPU goes as a session grows: py-spy on a real server, length 1 vs length N.

    python bench/length_profile.py                     # PostgreSQL (throwaway), N = 200 (~1 min)
    python bench/length_profile.py --backend sqlite --length 400 --turns 60

One ``countersign serve`` (demo model) on a fresh database. A session is taken to ``--length``
turns, unmeasured. Then ``--turns`` turns go one at a time on that session (lengths N+1 ...),
and as many on fresh sessions (length 1, the baseline), each batch under ``py-spy record``
(500 Hz, from outside the process). It prints the server's CPU per turn in both batches (its
CPU-time clock) and the sampled time per turn by the innermost library on each stack (the
standard library and the event loop are attributed to the library that called them), with the
difference: what grows with the session's length, and whose code it is.

Needs ``py-spy`` (``pip install py-spy``) and the right to attach to a child process (root, or
``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import (
    Deadline,
    Processes,
    bounded_main,
    cpu_seconds,
    create_account,
    open_postgres,
    start_countersign,
)

MESSAGE = " ".join(f"word{index}" for index in range(50))
RATE = 500
"""py-spy's samples per second."""
_STANDARD = {"asyncio", "threading", "selectors", "concurrent", "json", "uuid", "dataclasses"}
_STANDARD |= {"enum", "typing", "functools", "contextlib", "re", "copy", "abc", "collections"}
_STANDARD |= {"weakref", "inspect", "socket", "logging", "datetime", "queue", "<frozen runpy>"}


def turn(client: httpx.Client, headers: dict[str, str], session: str) -> None:
    """One message, its stream read to the run's end."""
    with client.stream(
        "POST",
        f"/api/v1/sessions/{session}/messages",
        json={"content": MESSAGE},
        headers={**headers, "Accept": "text/event-stream"},
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"a turn answered {response.status_code}")
        for line in response.iter_lines():
            if line.startswith(("event: run.finished", "event: run.failed")):
                return
    raise RuntimeError("a stream ended before its run did")


def new_session(client: httpx.Client, headers: dict[str, str]) -> str:
    answer = client.post("/api/v1/sessions", json={}, headers=headers)
    answer.raise_for_status()
    return str(answer.json()["id"])


def library(frame: str) -> str:
    """The top-level package of a py-spy frame ``name (path:line)``."""
    found = re.search(r"\(([^)]*)\)$", frame)
    path = (found.group(1) if found else frame).rsplit(":", 1)[0]
    return path.split("/")[0].removesuffix(".py")


def by_library(raw: Path) -> collections.Counter[str]:
    """Samples per innermost non-standard library of each stack."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        owners = [library(frame) for frame in stack.split(";")]
        owner = next((o for o in reversed(owners) if o not in _STANDARD), "event loop")
        counts[owner or "(native)"] += int(count)
    return counts


def profiled(
    pid: int, out: Path, client: httpx.Client, headers: dict[str, str], sessions: list[str]
) -> float:
    """Take one turn per session under py-spy; the server's CPU ms per turn."""
    command = ["py-spy", "record", "-p", str(pid), "-r", str(RATE), "--format", "raw"]
    spy = subprocess.Popen(
        [*command, "--nonblocking", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # py-spy attached
        before = cpu_seconds(pid)
        for session in sessions:
            turn(client, headers, session)
        spent = cpu_seconds(pid) - before
    finally:
        spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
        spy.wait(timeout=30)
    return spent * 1000 / len(sessions)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--length", type=int, default=200, help="session length (default 200)")
    parser.add_argument("--turns", type=int, default=40, help="profiled turns per batch")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        print("error: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 1

    def body(processes: Processes) -> int:
        deadline = Deadline(600)
        work = Path(tempfile.mkdtemp(prefix="cs-length-profile-"))
        postgres = open_postgres(deadline) if args.backend == "postgres" else None
        try:
            url = postgres.url if postgres else f"sqlite+aiosqlite:///{work / 'cs.db'}"
            key = create_account(url, cwd=work, deadline=deadline)
            target = start_countersign(
                "server", url, key, processes=processes, work=work, deadline=deadline
            )
            pid = target.process.pid
            with httpx.Client(base_url=target.base_url, timeout=60) as client:
                headers = target.headers
                long = new_session(client, headers)
                for _ in range(args.length):
                    turn(client, headers, long)
                fresh = [new_session(client, headers) for _ in range(args.turns)]
                cpu_long = profiled(pid, work / "long.txt", client, headers, [long] * args.turns)
                cpu_one = profiled(pid, work / "one.txt", client, headers, fresh)
            one, long_counts = by_library(work / "one.txt"), by_library(work / "long.txt")
        finally:
            if postgres is not None and postgres.owned:
                postgres.server.stop()
        per_turn = 1000 / RATE / args.turns
        n = args.length
        print(f"command: python bench/length_profile.py --backend {args.backend} --length {n}")
        span = f"{n + 1}-{n + args.turns}"
        print(
            f"server CPU ms/turn: length 1 {cpu_one:.2f}, length {span} {cpu_long:.2f} "
            f"({cpu_long / cpu_one:.2f}x)"
        )
        print(f"\nsampled ms/turn by innermost library ({RATE} Hz, {args.turns} turns each)")
        print(f"{'library':22} {'length 1':>9} {'length N':>9} {'growth':>8}")
        names = sorted(set(one) | set(long_counts), key=lambda k: one[k] - long_counts[k])
        for name in names[:12]:
            a, b = one[name] * per_turn, long_counts[name] * per_turn
            print(f"{name:22} {a:9.2f} {b:9.2f} {b - a:+8.2f}")
        total_a, total_b = sum(one.values()) * per_turn, sum(long_counts.values()) * per_turn
        print(f"{'all samples':22} {total_a:9.2f} {total_b:9.2f} {total_b - total_a:+8.2f}")
        return 0

    return bounded_main(900, body)


if __name__ == "__main__":
    raise SystemExit(main())
