"""The composition root: ``create_app(settings)`` builds the FastAPI application.

The lifespan opens the engine, passes the start-up gate (SPEC invariant 7), makes the default
agent and hands the services bundle to the routes. Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from functools import partial

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI
from pythonjsonlogger.core import RESERVED_ATTRS

from countersign.agent.models import check_model
from countersign.agent.sandbox import Sandbox, SandboxUnavailable, find_sandbox
from countersign.agent.tools import ToolLimits
from countersign.api.errors import install_error_handlers
from countersign.api.limits import BodyLimitMiddleware
from countersign.api.oauth import (
    OAuthProviders,
    OAuthSessionMiddleware,
    session_https_only,
    session_secret,
)
from countersign.api.observability import Metrics, ObservabilityMiddleware
from countersign.api.ratelimit import RateLimits
from countersign.api.routes import (
    agents,
    api_keys,
    approvals,
    auth,
    me,
    messages,
    oauth,
    ops,
    runs,
    sessions,
    tools,
)
from countersign.api.web import mount_web_console
from countersign.broker import LocalBroker, PostgresBroker
from countersign.config import Profile, Settings
from countersign.db.doctor import readiness, startup_gate
from countersign.db.engine import (
    create_engine,
    create_session_factory,
    parsed_url,
    pool_status,
)
from countersign.db.uow import unit_of_work_factory
from countersign.domain.errors import ConfigError, InvalidInput
from countersign.domain.models import SystemClock
from countersign.services import ServiceDeps
from countersign.services.agents import ensure_default_agent, model_options
from countersign.services.executor import Executor, ExecutorOptions, executor_name
from countersign.services.feed import FEED_LOOP, FeedHub
from countersign.services.follow import FOLLOW_LOOP, follow_loop
from countersign.services.retention import prune_older_than
from countersign.services.tools import load_tool_plugins, open_mcp_hub, use_mcp_hub
from countersign.supervisor import Loop, Shutdown, Supervisor

logger = logging.getLogger("countersign")


def create_app(settings: Settings, *, shutdown: Shutdown | None = None) -> FastAPI:
    """The Countersign ASGI application for these settings; ConfigError if they cannot work.

    ``shutdown``: set by the server's signal handler (``countersign serve``); with it, a stop
    signal stops claiming runs at once, before the connections have closed.
    """
    check_settings(settings)
    sandbox = shell_sandbox(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await startup_gate(settings)
        engine = create_engine(settings)
        try:
            broker = (
                LocalBroker()
                if settings.is_sqlite
                else PostgresBroker(settings.database_url.replace("+asyncpg", "", 1))
            )
            services = ServiceDeps(
                uow_factory=unit_of_work_factory(
                    create_session_factory(engine), is_sqlite=settings.is_sqlite
                ),
                clock=SystemClock(),
                settings=settings,
                broker=broker,
            )
            await ensure_default_agent(services)
            supervisor = Supervisor()
            executor = Executor(
                services,
                executor_options(settings, sandbox),
                name=executor_name(),
                supervisor=supervisor,
                shutdown=shutdown,
            )
            # Requests hand the runs they start to this process's executor.
            services = replace(services, executor=executor)
            try:
                # Before any run: an agent's MCP tools are known once the servers answer.
                use_mcp_hub(mcp)
                if mcp is not None:
                    await mcp.start()
                if isinstance(broker, PostgresBroker):
                    await broker.start(supervisor)
                await executor.start(single_process=settings.is_sqlite)
                supervisor.start(
                    FOLLOW_LOOP,
                    partial(follow_loop, services, every=settings.executor_poll_seconds),
                    stale_after=max(10.0, 10 * settings.executor_poll_seconds),
                )
                if settings.prune_older_than is not None:
                    supervisor.start(
                        PRUNE_LOOP, partial(prune_daily, services, settings.prune_older_than)
                    )
                feeds = FeedHub(services)
                supervisor.start(FEED_LOOP, feeds.run)
                app.state.feeds = feeds
                app.state.services = services
                app.state.supervisor = supervisor
                app.state.readiness = partial(ready_reason, supervisor, partial(readiness, engine))
                metrics.watch_pool(partial(pool_status, engine))
                metrics.watch_executor(lambda: executor.executing)
                if metrics.multiprocess:
                    supervisor.start(METRICS_LOOP, metrics.keep_written)
                logger.info("countersign ready", extra={"profile": settings.profile.value})
                yield
            finally:
                # The executor first (no new claims, then its turns within the grace, then
                # its writer), then the other loops, then the connections.
                await executor.stop(grace=settings.shutdown_grace_seconds)
                await supervisor.stop()
                if mcp is not None:
                    await mcp.stop()
                    use_mcp_hub(None)
                if isinstance(broker, PostgresBroker):
                    await broker.stop()
        finally:
            # Bounded: a connection stuck in its driver must not hold the stop up.
            try:
                await asyncio.wait_for(engine.dispose(), timeout=10)
            except TimeoutError:
                logger.warning("closing the database connections took too long; left behind")

    app = FastAPI(
        title="Countersign",
        version="0.1.0",
        summary="Agent conversations with streamed replies and durable human approvals.",
        lifespan=lifespan,
    )
    # The operator named these plugins: one that cannot be loaded stops the start (exit 2).
    load_tool_plugins(settings.plugins)
    # The MCP servers are connected by the lifespan; one that is down is not a reason to stop.
    mcp = open_mcp_hub(settings)
    if mcp is not None:
        metrics.watch_mcp(mcp)
    app.state.metrics = metrics
    app.state.rate_limits = RateLimits(settings)
    app.state.oauth_providers = OAuthProviders(
        settings.oauth_providers, require_https=settings.profile is Profile.PROD
    )
    install_error_handlers(app)
    for router in (
        auth.router,
        oauth.router,
        api_keys.router,
        agents.router,
        tools.router,
        sessions.router,
        messages.router,
        runs.router,
        approvals.router,
        approvals.inbox,
        me.router,
        ops.router,
    ):
        app.include_router(router)
    mount_web_console(app)
    # Added last runs first: the request id is set before the access log line is written, and
    # the body limit answers inside both, so its 413 is enveloped, counted and logged. The
    # OAuth session (only on the OAuth routes) is innermost: its cookie goes on error answers.
    app.add_middleware(
        OAuthSessionMiddleware,
        secret_key=session_secret(settings),
        https_only=session_https_only(settings),
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    app.add_middleware(
        CorrelationIdMiddleware, header_name="X-Request-ID", validator=is_acceptable_request_id
    )
    return app


async def ready_reason(
    supervisor: Supervisor, database_reason: Callable[[], Awaitable[str | None]]
) -> str | None:
    """Why the server is not ready (a background loop is gone or stuck, or the database is
    not usable), or None."""
    problems = supervisor.problems()
    if problems:
        return "; ".join(problems)
    return await database_reason()


PRUNE_LOOP = "prune"
METRICS_LOOP = "metrics"
PRUNE_EVERY_SECONDS = 24 * 3600.0


async def prune_daily(services: ServiceDeps, age: timedelta, loop: Loop) -> None:
    """Prune at start, then once a day (``COUNTERSIGN_PRUNE_OLDER_THAN``)."""
    while True:
        await prune_older_than(services, age)
        loop.working()
        await asyncio.sleep(PRUNE_EVERY_SECONDS)


def check_settings(settings: Settings) -> None:
    """The checks ``config`` cannot make itself (they need the agent package)."""
    try:
        check_model(settings.default_model, model_options(settings))
    except InvalidInput as error:
        reason = error.message[:1].lower() + error.message[1:]
        raise ConfigError(f"COUNTERSIGN_DEFAULT_MODEL cannot be used: {reason}") from None


def shell_sandbox(settings: Settings) -> Sandbox | None:
    """The ``shell`` tool's sandbox (``COUNTERSIGN_SANDBOX``), checked by starting one.

    ``auto`` in ``prod`` insists on it like ``bwrap`` does: a production server never runs
    commands without a sandbox unless told so (``none``)."""
    if settings.sandbox == "none":
        return None
    if settings.sandbox == "auto" and settings.profile is not Profile.PROD:
        return None
    try:
        # Made now: a folder the sandbox must cover has to exist when the sandbox is made.
        settings.workspace_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"COUNTERSIGN_WORKSPACE_ROOT cannot be made: {exc.strerror or exc}"
        ) from None
    try:
        return find_sandbox(
            required=True,
            memory_mb=settings.sandbox_memory_mb,
            cpu_seconds=settings.sandbox_cpu_seconds,
            hidden=server_folders(settings),
        )
    except SandboxUnavailable as exc:
        if settings.sandbox == "bwrap":
            raise ConfigError(f"COUNTERSIGN_SANDBOX=bwrap cannot be used: {exc}") from None
        raise ConfigError(
            f"the prod profile runs shell commands in a sandbox and there is none here: {exc}; "
            "make bwrap work, or set COUNTERSIGN_SANDBOX=none to run them without one"
        ) from None


def server_folders(settings: Settings) -> list[str]:
    """The folders of this server a sandboxed command must not see: the working directory
    (with its ``.env``), the workspaces and a SQLite database's folder."""
    folders = [os.getcwd(), str(settings.workspace_root)]
    url = parsed_url(settings)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folders.append(os.path.dirname(os.path.abspath(url.database)))
    return folders


def executor_options(settings: Settings, sandbox: Sandbox | None) -> ExecutorOptions:
    """How this server's executor carries out runs, from the settings."""
    return ExecutorOptions(
        concurrency=settings.executor_concurrency,
        max_attempts=settings.run_max_attempts,
        lease_seconds=settings.run_lease_seconds,
        poll_seconds=settings.executor_poll_seconds,
        flush_seconds=settings.event_flush_seconds,
        workspace_root=settings.workspace_root.resolve(),
        model_options=model_options(settings),
        tool_limits=ToolLimits(
            shell_timeout=settings.shell_timeout_seconds,
            output_max_chars=settings.tool_output_max_chars,
            shell_interpreter=settings.shell_interpreter,
            sandbox=sandbox,
        ),
    )


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def is_acceptable_request_id(value: str) -> bool:
    """An incoming X-Request-ID is kept when it is short and plain (no log injection)."""
    return _REQUEST_ID.fullmatch(value) is not None


def configure_logging(settings: Settings) -> None:
    """Logs to stderr, as text or JSON, each line with the request id when there is one."""
    formatter = (
        {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(levelname)s %(name)s %(message)s %(correlation_id)s",
            "timestamp": "time",
            "reserved_attrs": [*RESERVED_ATTRS, "color_message"],
            "rename_fields": {
                "levelname": "level",
                "name": "logger",
                "correlation_id": "request_id",
            },
        }
        if settings.log_format == "json"
        else {"format": "%(asctime)s %(levelname)-7s [%(correlation_id)s] %(name)s: %(message)s"}
    )
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {
                "correlation_id": {
                    "()": "asgi_correlation_id.CorrelationIdFilter",
                    "default_value": "-",
                }
            },
            "formatters": {"default": formatter},
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "formatter": "default",
                    "filters": ["correlation_id"],
                }
            },
            "root": {"handlers": ["stderr"], "level": settings.log_level},
            "loggers": {
                "uvicorn.access": {"level": "WARNING"},
                "sqlalchemy": {"level": "WARNING"},
                # Its debug lines carry every statement's parameters: hashes, emails, content.
                "aiosqlite": {"level": "WARNING"},
                "asyncpg": {"level": "WARNING"},
                "alembic": {"level": "WARNING"},
                # Authlib's debug lines carry PKCE verifiers; they must never be written.
                "authlib": {"level": "INFO"},
            },
        }
    )
