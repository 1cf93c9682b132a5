"""PostgreSQL WAL written by one turn at session length 1, 50 and 200, by record type.

    python bench/walstats.py                 # a throwaway PostgreSQL (~1 min)
    python bench/walstats.py --lengths 1,50,200,500

The app runs in this process on a fresh database (demo model, 50-word messages, every stream
read to its end). Before each measured turn the cluster is checkpointed and left a moment, so
that background work is not counted; the turn's WAL is the range between the write position
before and after it. On a throwaway server this run owns, ``pg_waldump --stats=record`` then
breaks that range down by record type (on another server, only the bytes are printed). The
baseline is the same run's turn at length 1: ``x len 1`` compares with it.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import (
    Deadline,
    Postgres,
    in_process_app,
    open_postgres,
    run_async,
)

MESSAGE = " ".join(f"word{index}" for index in range(50))


def waldump(postgres: Postgres) -> Path | None:
    """The server's own pg_waldump, when this run owns the server (and so its files)."""
    if not postgres.owned:
        return None
    owned = postgres.server.process
    tool = Path(owned._server.bin_path) / "pg_waldump"  # pgserver knows its binaries
    return tool if tool.exists() else None


def breakdown(tool: Path, pgdata: Path, start: str, end: str) -> list[tuple[str, int, int]]:
    """(record type, count, bytes) of the WAL between two positions, biggest first."""
    out = subprocess.run(
        [str(tool), "--stats=record", "-p", str(pgdata / "pg_wal"), "-s", start, "-e", end],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    rows = []
    for line in out.stdout.splitlines():
        found = _ROW.match(line)
        if found is not None:
            rows.append((found["kind"], int(found["count"]), int(found["combined"])))
    return sorted(rows, key=lambda row: -row[2])


_PERCENT = r"\(\s*[\d.]+\)"
_ROW = re.compile(
    rf"^(?P<kind>\S+/\S+)\s+(?P<count>\d+)\s+{_PERCENT}\s+\d+\s+{_PERCENT}\s+\d+\s+{_PERCENT}"
    rf"\s+(?P<combined>\d+)\s+{_PERCENT}"
)


async def insert_lsn(admin: object) -> str:
    """Where the next WAL record goes: with ``synchronous_commit = off`` a commit returns
    before its WAL is written, so the write position (``pg_current_wal_lsn``) lags."""
    return str(await admin.fetchval("SELECT pg_current_wal_insert_lsn()::text"))  # type: ignore[attr-defined]


async def measure(postgres: Postgres, lengths: list[int]) -> dict[int, tuple[str, str, int]]:
    """Each measured length's WAL range and size."""
    import asyncpg

    admin = await asyncpg.connect(postgres.server.url(postgres.database).replace("+asyncpg", ""))
    ranges: dict[int, tuple[str, str, int]] = {}
    try:
        async with in_process_app(postgres.url) as client:
            account = {"email": f"wal-{uuid.uuid4().hex[:8]}@example.test", "password": "x" * 16}
            registered = await client.post("/api/v1/auth/register", json=account)
            assert registered.status_code == 201, registered.text
            login = await client.post("/api/v1/auth/login", json=account)
            headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
            session = (await client.post("/api/v1/sessions", json={}, headers=headers)).json()
            for length in range(1, max(lengths) + 1):
                measured = length in lengths
                if measured:
                    await admin.execute("CHECKPOINT")
                    await asyncio.sleep(1.0)
                    start = await insert_lsn(admin)
                answer = await client.post(
                    f"/api/v1/sessions/{session['id']}/messages",
                    json={"content": MESSAGE},
                    headers={**headers, "Accept": "text/event-stream"},
                )
                assert answer.status_code == 200, answer.text
                if measured:
                    await asyncio.sleep(0.3)  # the executor's last write has committed
                    end = await insert_lsn(admin)
                    size = await admin.fetchval(
                        "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)", end, start
                    )
                    ranges[length] = (start, end, int(size))
    finally:
        await admin.close()
    return ranges


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1,50,200", help="session lengths to measure")
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args()
    lengths = sorted({int(value) for value in args.lengths.split(",")})
    deadline = Deadline(args.deadline)
    postgres = open_postgres(deadline)
    try:
        ranges = run_async(measure(postgres, lengths), deadline)
        tool = waldump(postgres)
        base = ranges[lengths[0]][2]
        print("length  WAL bytes/turn  x len 1")
        for length, (_start, _end, size) in ranges.items():
            print(f"{length:>6}  {size:>14}  {size / base:>7.2f}")
        if tool is None:
            print("(no pg_waldump breakdown: the server is not this run's)")
            return 0
        pgdata: Path = postgres.server.process.pgdata
        run_async(asyncio.sleep(1.0), deadline)  # the WAL writer has put it all on disk
        for length, (start, end, _size) in ranges.items():
            print(
                f"\nlength {length}: WAL records of the turn, by type (pg_waldump --stats=record)"
            )
            print(f"  {'type':<28} {'count':>6} {'bytes':>8}")
            for kind, count, size in breakdown(tool, pgdata, start, end):
                print(f"  {kind:<28} {count:>6} {size:>8}")
    finally:
        postgres.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
