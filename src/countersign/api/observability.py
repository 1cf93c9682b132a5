"""Request metrics and access logs, as plain ASGI middleware.

Metrics live in a registry of the application's own (not the process-wide default), so that
several apps in one process (tests) do not clash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from countersign.agent.mcp import CALL_OUTCOMES, LATENCY_BUCKETS, McpHub
from countersign.api.errors import internal_error_response
from countersign.db.engine import PoolStatus

access_logger = logging.getLogger("countersign.access")


class PoolCollector(Collector):
    """Exports the database pool's size, checked-out connections and overflow."""

    def __init__(self, status: Callable[[], PoolStatus]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        """Read the pool now."""
        status = self._status()
        for name, value, text in (
            ("countersign_db_pool_size", status.size, "Connections the pool keeps."),
            ("countersign_db_pool_checked_out", status.checked_out, "Connections in use."),
            ("countersign_db_pool_overflow", status.overflow, "Connections beyond the pool size."),
            ("countersign_db_pool_checked_in", status.checked_in, "Idle pooled connections."),
        ):
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

    def watch_pool(self, status: Callable[[], PoolStatus]) -> None:
        """Export the pool's gauges."""
        self.registry.register(PoolCollector(status))

    def watch_mcp(self, hub: McpHub) -> None:
        """Export the MCP servers' state and calls."""
        self.registry.register(McpCollector(hub))


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
            self.metrics.requests.labels(method, route, str(status_code)).inc()
            self.metrics.latency.labels(method, route).observe(elapsed)
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
