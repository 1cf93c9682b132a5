"""A small MCP server for the tests, built on the MCP SDK's own ``MCPServer``.

Run it as a program: ``python mcp_server.py stdio`` (stdio), or
``python mcp_server.py http PORT [TOKEN]`` (streamable HTTP on 127.0.0.1:PORT at ``/mcp``;
with TOKEN, a request without ``Authorization: Bearer TOKEN`` gets 401). ``McpHttpServer``
starts the HTTP one in a process of its own and stops it by its PID.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
WAIT_SECONDS = 20.0


def build() -> Any:
    from mcp.server import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    app = MCPServer("countersign-test", log_level="ERROR")

    @app.tool()
    def add(a: int, b: int) -> int:
        """Add two whole numbers."""
        return a + b

    @app.tool()
    def echo(text: str) -> str:
        """Say the text back."""
        return text

    @app.tool()
    def fail(message: str) -> str:
        """Always fail with this message."""
        raise ToolError(message)

    @app.tool()
    async def sleep(seconds: float) -> str:
        """Wait this long, then say so."""
        await asyncio.sleep(seconds)
        return f"slept {seconds:g} s"

    @app.tool()
    async def record(path: str, seconds: float = 0.0) -> str:
        """Add a line to a file (the test counts how often the tool ran), then wait."""
        with Path(path).open("a", encoding="utf-8") as file:  # noqa: ASYNC230 - a line
            file.write("ran\n")
        await asyncio.sleep(seconds)
        return "recorded"

    @app.tool()
    def pid() -> int:
        """The server process's id (one process serves every call of a connection)."""
        return os.getpid()

    @app.tool()
    def files() -> str:
        """A tool whose full name can clash with a built-in (a server named "list")."""
        return "none"

    @app.tool()
    def environment() -> str:
        """The names of the process's environment variables."""
        return ",".join(sorted(os.environ))

    return app


def _guarded(app: Any, token: str) -> Any:
    """The ASGI app, answering 401 to a request without the bearer token."""

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            if headers.get(b"authorization") != f"Bearer {token}".encode():
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"unauthorized"})
                return
        await app(scope, receive, send)

    return guarded


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class McpHttpServer:
    """The test MCP server over streamable HTTP, in a process of its own."""

    def __init__(self, *, token: str | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.token = token
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> None:
        args = [sys.executable, str(SCRIPT), "http", str(self.port)]
        if self.token:
            args.append(self.token)
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the MCP test server ended with {self.process.returncode}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise AssertionError("the MCP test server did not start listening")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=WAIT_SECONDS)

    def __enter__(self) -> McpHttpServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def stdio_settings(**extra: Any) -> dict[str, Any]:
    """``COUNTERSIGN_MCP_SERVERS`` entry for the stdio server."""
    return {"command": sys.executable, "args": [str(SCRIPT), "stdio"], **extra}


def main() -> None:
    app = build()
    if sys.argv[1] == "stdio":
        app.run("stdio")
        return
    import uvicorn

    port = int(sys.argv[2])
    asgi = app.streamable_http_app()
    if len(sys.argv) > 3:
        asgi = _guarded(asgi, sys.argv[3])
    uvicorn.run(asgi, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
