"""Request metrics and access logs, as plain ASGI middleware.

Metrics live in a registry of the application's own (not the process-wide default), so that
several apps in one process (tests) do not clash.

Under ``serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set by the parent) every worker
writes its metrics to that folder and a scrape, whichever worker answers it, reads all of
them: request counts and latencies summed over the workers, and per process (a ``pid``
label) the database pool's gauges and the runs each executes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from countersign.agent.mcp import CALL_OUTCOMES, LATENCY_BUCKETS, McpHub
from countersign.api.errors import internal_error_response
from countersign.db.engine import PoolStatus
from countersign.supervisor import Loop

access_logger = logging.getLogger("countersign.access")


class PoolCollector(Collector):
    """Exports the database pool's size, checked-out connections and overflow."""

    def __init__(self, status: Callable[[], PoolStatus]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        """Read the pool now."""
        status = self._status()
        values = (status.size, status.checked_out, status.overflow, status.checked_in)
        for (name, text), value in zip(_POOL_GAUGES, values, strict=True):
            yield GaugeMetricFamily(name, text, value=value)


class McpCollector(Collector):
    """Exports each MCP server's state and its tool calls (this process's)."""

    def __init__(self, hub: McpHub) -> None:
        self._hub = hub

    def collect(self) -> Iterable[Metric]:
        """Read the servers now."""
        up = GaugeMetricFamily(
            "countersign_mcp_up", "1 while the MCP server is connected.", labels=["server"]
        )
        calls = CounterMetricFamily(
            "countersign_mcp_calls",
            "MCP tool calls by outcome (ok, error, timeout, unreachable, broken).",
            labels=["server", "outcome"],
        )
        latency = HistogramMetricFamily(
            "countersign_mcp_call_duration_seconds",
            "Time an MCP tool call took, by server.",
            labels=["server"],
        )
        for server in self._hub.servers.values():
            up.add_metric([server.name], 1 if server.up else 0)
            stats = server.stats
            for outcome in CALL_OUTCOMES:
                calls.add_metric([server.name, outcome], stats.calls[outcome])
            buckets = [
                (f"{bound:g}", count)
                for bound, count in zip(LATENCY_BUCKETS, stats.buckets, strict=True)
            ]
            buckets.append(("+Inf", stats.count))
            latency.add_metric([server.name], buckets, stats.seconds)
        yield from (up, calls, latency)


class Metrics:
    """The application's Prometheus registry and its request metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR))
        self.requests = Counter(
            "countersign_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "countersign_http_request_duration_seconds",
            "Time to the end of the response, by route.",
            ["method", "route"],
            registry=self.registry,
        )
        self._pool: Callable[[], PoolStatus] | None = None
        self._mcp: McpCollector | None = None
        self._executing: Callable[[], int] | None = None
        self._gauges: dict[str, Gauge] = {}
        if self.multiprocess:
            # One value per live worker (``pid`` label), written by each worker for itself.
            for name, text in (*_POOL_GAUGES, _EXECUTING):
                self._gauges[name] = Gauge(
                    name, text, registry=self.registry, multiprocess_mode="liveall"
                )

    def watch_pool(self, status: Callable[[], PoolStatus]) -> None:
        """Export the pool's gauges."""
        self._pool = status
        if not self.multiprocess:
            self.registry.register(PoolCollector(status))

    def watch_executor(self, executing: Callable[[], int]) -> None:
        """Export how many runs this process's executor carries out now."""
        self._executing = executing
        if not self.multiprocess:
            self.registry.register(_ExecutingCollector(executing))

    def watch_mcp(self, hub: McpHub) -> None:
        """Export the MCP servers' state and calls (under workers: the answering one's)."""
        self._mcp = McpCollector(hub)
        self.registry.register(self._mcp)

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request (and, under workers, write this process's gauges)."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
        if self.multiprocess:
            self._write_gauges()

    def exposition(self) -> bytes:
        """The metrics in Prometheus's text format."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        self._write_gauges()
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if self._mcp is not None:
            registry.register(self._mcp)
        return generate_latest(registry)

    async def keep_written(self, loop: Loop) -> None:
        """Under workers: write this process's gauges every few seconds, so that a scrape
        answered by another worker shows them even when this one answers no request."""
        while True:
            self._write_gauges()
            loop.working()
            await asyncio.sleep(GAUGES_EVERY_SECONDS)

    def _write_gauges(self) -> None:
        if self._pool is not None:
            status = self._pool()
            values = (status.size, status.checked_out, status.overflow, status.checked_in)
            for (name, _text), value in zip(_POOL_GAUGES, values, strict=True):
                self._gauges[name].set(value)
        if self._executing is not None:
            self._gauges[_EXECUTING[0]].set(self._executing())


GAUGES_EVERY_SECONDS = 2.0
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's folder for the metrics of several processes (``serve --workers``)."""
_POOL_GAUGES = (
    ("countersign_db_pool_size", "Connections the pool keeps."),
    ("countersign_db_pool_checked_out", "Connections in use."),
    ("countersign_db_pool_overflow", "Connections beyond the pool size."),
    ("countersign_db_pool_checked_in", "Idle pooled connections."),
)
_EXECUTING = ("countersign_runs_executing", "Runs this process's executor carries out now.")


class _ExecutingCollector(Collector):
    def __init__(self, executing: Callable[[], int]) -> None:
        self._executing = executing

    def collect(self) -> Iterable[Metric]:
        name, text = _EXECUTING
        yield GaugeMetricFamily(name, text, value=self._executing())


class ObservabilityMiddleware:
    """Counts and times every HTTP request, and writes one access-log line for it.

    It also answers an unexpected error with the 500 envelope itself: Starlette's own answer
    is sent from outside every middleware, so it would carry no ``X-Request-ID``.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code, response_started
            if message["type"] == "http.response.start":
                status_code = message["status"]
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            if not response_started:
                await internal_error_response()(scope, receive, send_wrapper)
            raise  # on to Starlette, which logs it (and sends nothing more)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.record(method, route, status_code, elapsed)
            access_logger.info(
                "%s %s %s %.1fms",
                method,
                scope["path"],
                status_code,
                elapsed * 1000,
                extra={
                    "method": method,
                    "path": scope["path"],
                    "route": route,
                    "status": status_code,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
