"""What an MCP tool call costs, measured beside pydantic-ai's own MCP client in the same run.

Three figures, in interleaved rounds so that a noisy machine slows each alike:

- **floor**: ``MCPToolset.direct_call_tool("echo")`` on one stdio connection to the test MCP
  server (``tests/support/mcp_server.py``): what any design built on pydantic-ai pays.
- **hub**: ``McpServer.call("echo")``, Countersign's connection holder (time limit, outcome,
  metrics) over the same kind of connection.
- **turn**: a whole turn through the app (SQLite, in-process, ``httpx.ASGITransport``) whose
  demo model calls ``t_echo`` (policy ``auto``), beside the same turn calling the built-in
  ``read_file``: their difference is what an MCP call adds to a turn.

    python bench/mcp_calls.py                  # 300 calls per figure
    python bench/mcp_calls.py --calls 100      # a quicker run

Every process it starts (the MCP servers) is a child of a connection it closes; the run is
bounded by ``--deadline``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "tests" / "support" / "mcp_server.py"


async def timed(call: Callable[[], Awaitable[object]], count: int) -> list[float]:
    """Milliseconds of each of ``count`` sequential calls."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    return times


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=170.0)
    options = parser.parse_args()
    async with asyncio.timeout(options.deadline):
        return await measure(options.calls, options.rounds)


async def measure(calls: int, rounds: int) -> int:
    from fastmcp.client.transports import StdioTransport
    from pydantic_ai.mcp import MCPToolset

    from countersign.agent.mcp import McpHub, McpServerSpec
    from countersign.app import create_app
    from countersign.config import Settings
    from countersign.services.accounts import create_api_key, create_user

    command, args = sys.executable, [str(SERVER_SCRIPT), "stdio"]
    floor = MCPToolset(StdioTransport(command=command, args=args, env={}, keep_alive=False))
    hub = McpHub({"t": McpServerSpec("t", command=command, args=tuple(args))}, taken=set)
    folder = Path(tempfile.mkdtemp(prefix="countersign-bench-mcp-"))
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=f"sqlite:///{folder / 'bench.db'}",
        workspace_root=folder / "workspaces",
        log_level="WARNING",
        mcp_servers={"t": {"command": command, "args": args}},
    )
    app = create_app(settings)
    figures: dict[str, list[float]] = {"floor": [], "hub": [], "mcp turn": [], "builtin turn": []}
    async with floor, LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        await hub.start()
        try:
            services = app.state.services
            email = f"bench-{uuid.uuid4().hex[:8]}@example.test"
            await create_user(services, email=email, password="correct horse battery")  # noqa: S106
            _key, secret = await create_api_key(services, email=email, name="bench")
            headers = {"Authorization": f"Bearer {secret}"}
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://bench", headers=headers, timeout=60
            ) as http:
                tools = [
                    {"name": "t_echo", "policy": "auto"},
                    {"name": "read_file", "policy": "auto"},
                ]
                agent = await http.post("/api/v1/agents", json={"name": "b", "tools": tools})
                assert agent.status_code == 201, agent.text
                agent_id = agent.json()["id"]
                workspace = settings.workspace_root

                async def turn(message: str) -> None:
                    session = await http.post("/api/v1/sessions", json={"agent_id": agent_id})
                    session_id = session.json()["id"]
                    (workspace / session_id).mkdir(parents=True, exist_ok=True)
                    (workspace / session_id / "a.txt").write_text("hello")
                    sent = await http.post(
                        f"/api/v1/sessions/{session_id}/messages", json={"content": message}
                    )
                    run_id = sent.json()["run"]["id"]
                    events = await http.get(f"/api/v1/sessions/{session_id}/runs/{run_id}/events")
                    assert "event: tool.result" in events.text, events.text
                    assert "event: run.finished" in events.text, events.text

                async def floor_call() -> None:
                    assert await floor.direct_call_tool("echo", {"text": "hello"}) == "hello"

                async def hub_call() -> None:
                    assert await hub.servers["t"].call("echo", {"text": "hello"}) == "hello"

                async def mcp_turn() -> None:
                    await turn('/tool t_echo {"text": "hello"}')

                async def builtin_turn() -> None:
                    await turn('/tool read_file {"path": "a.txt"}')

                bodies = {
                    "floor": (floor_call, calls),
                    "hub": (hub_call, calls),
                    "mcp turn": (mcp_turn, max(calls // 3, 10)),
                    "builtin turn": (builtin_turn, max(calls // 3, 10)),
                }
                for body, _count in bodies.values():
                    await timed(body, 10)  # warm-up, not counted
                for _ in range(rounds):
                    for name, (body, count) in bodies.items():
                        figures[name] += await timed(body, count // rounds or 1)
        finally:
            await hub.stop()
    p50 = {name: statistics.median(values) for name, values in figures.items()}
    print(f"{'figure':<14}{'calls':>7}{'p50 ms':>9}{'p90 ms':>9}")
    for name, values in figures.items():
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"{name:<14}{len(values):>7}{p50[name]:>9.2f}{p90:>9.2f}")
    added = p50["mcp turn"] - p50["builtin turn"]
    print(f"hub / floor: {p50['hub'] / p50['floor']:.2f}x")
    print(
        f"an MCP call adds {added:.2f} ms to a turn (p50 difference), "
        f"{added / p50['floor']:.2f}x the floor's own call"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(asyncio.run(main()))
