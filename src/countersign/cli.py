"""The ``countersign`` command: serve, db (upgrade|downgrade|current|check), user, apikey.

Exit codes: 0 fine; 1 a problem found (a failed check, a refused start); 2 bad usage or
configuration. Errors are one or a few lines, never a traceback.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer

from countersign.config import Settings, load_settings, parse_age
from countersign.db import doctor, migrations
from countersign.db.doctor import Report, Status, diagnose, startup_gate
from countersign.db.engine import safe_url
from countersign.domain.errors import (
    AlreadyExists,
    ConfigError,
    CountersignError,
    InvalidInput,
    StartupError,
)
from countersign.services.tools import list_tools, load_tool_plugins, open_mcp_hub, use_mcp_hub

if TYPE_CHECKING:
    import socket

    from countersign.services import ServiceDeps
    from countersign.services.retention import PruneReport
    from countersign.supervisor import Shutdown

# The web stack (app, uvicorn) and the services are imported inside the commands that use
# them: `db check` and a settings error then answer in about half the time, which probes,
# scripts and people waiting on a one-line error all notice.

T = TypeVar("T")

cli = typer.Typer(
    help="Countersign: a self-hosted server for AI-agent conversations.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_cli = typer.Typer(help="Migrate and diagnose the database.", no_args_is_help=True)
user_cli = typer.Typer(help="Manage users.", no_args_is_help=True)
apikey_cli = typer.Typer(help="Manage API keys.", no_args_is_help=True)
tools_cli = typer.Typer(help="The tools agents may be given.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(user_cli, name="user")
cli.add_typer(apikey_cli, name="apikey")
cli.add_typer(tools_cli, name="tools")


def main() -> None:
    """Entry point of the console script."""
    cli()


def _fail(message: str, *, hint: str = "", code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(code)


def _sentence(message: str) -> str:
    """Service errors are phrases ("email is not valid"); on a terminal they read as sentences."""
    message = message.strip()
    if not message.endswith((".", "!", "?")):
        message += "."
    return message[:1].upper() + message[1:]


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        raise _fail(exc.message, hint=exc.hint, code=2) from None


def _run(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; domain errors become one line and an exit code."""
    try:
        return asyncio.run(work)
    except ConfigError as exc:
        raise _fail(exc.message, hint=exc.hint, code=2) from None
    except StartupError as exc:
        raise _fail(exc.message, hint=exc.hint) from None
    except InvalidInput as exc:  # an argument or stdin value the command cannot take
        raise _fail(_sentence(exc.message), code=2) from None
    except CountersignError as exc:
        raise _fail(_sentence(exc.message)) from None


@asynccontextmanager
async def _services(settings: Settings) -> AsyncIterator[ServiceDeps]:
    from countersign.db.engine import create_engine, create_session_factory
    from countersign.db.uow import unit_of_work_factory
    from countersign.domain.models import SystemClock
    from countersign.services import ServiceDeps

    await startup_gate(settings)
    engine = create_engine(settings, pool_size=1)
    try:
        yield ServiceDeps(
            uow_factory=unit_of_work_factory(
                create_session_factory(engine), is_sqlite=settings.is_sqlite
            ),
            clock=SystemClock(),
            settings=settings,
        )
    finally:
        await engine.dispose()


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port to listen on (1-65535).")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Server processes sharing the port, each with its own executor (1-64).",
        ),
    ] = 1,
) -> None:
    """Start the server (dev: migrates first; prod: refuses an unmigrated database)."""
    settings = _settings(host=host, port=port)  # before the web stack's slow imports

    from countersign.app import configure_logging, create_app
    from countersign.supervisor import Shutdown

    configure_logging(settings)
    if workers > 1 and settings.is_sqlite:
        raise _fail(
            "--workers needs PostgreSQL: a SQLite file is served by one process.",
            hint="Leave --workers out, or set COUNTERSIGN_DATABASE_URL to a PostgreSQL.",
            code=2,
        )
    shutdown = Shutdown()
    try:
        application = create_app(settings, shutdown=shutdown)  # every setting checked first
    except ConfigError as exc:
        raise _fail(exc.message, hint=exc.hint, code=2) from None
    # Pass the gate here, before uvicorn, so a refusal is one sentence and exit code 1 (and,
    # with workers, dev migrates once, not in each of them).
    _run(startup_gate(settings))
    typer.echo(
        f"Countersign on http://{settings.host}:{settings.port} "
        f"({settings.profile.value}, {safe_url(settings)}"
        f"{f', {workers} workers' if workers > 1 else ''})",
        err=True,
    )
    if workers == 1:
        _serve_here(settings, shutdown, application)
        return
    del application
    from countersign.workers import serve_workers

    raise typer.Exit(serve_workers(settings, workers, _worker))


def _worker(host: str, port: int, sockets: list[socket.socket]) -> None:
    """One of ``serve --workers N``'s processes: the app on the port its parent bound."""
    from countersign.app import configure_logging, create_app
    from countersign.supervisor import Shutdown

    settings = _settings(host=host, port=port)
    configure_logging(settings)
    shutdown = Shutdown()
    _serve_here(settings, shutdown, create_app(settings, shutdown=shutdown), sockets=sockets)


def _serve_here(
    settings: Settings,
    shutdown: Shutdown,
    application: Any,
    *,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve ``application`` in this process until a stop signal; exit 0 when it stopped."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            shutdown.signal()  # at once: the executor claims nothing more
            # Ctrl+C is a stop like SIGTERM: a second one ends the grace (the executor's
            # urgent stop), it does not skip the shutdown that hands the runs back.
            super().handle_exit(signal.SIGTERM, frame)

    config = uvicorn.Config(
        application,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        # Streams end at the signal (sse-starlette); other requests get this long.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_seconds)),
    )
    # uvicorn raises the signal it handled again once it has stopped; a stop that went as
    # planned then exits with status 0, for SIGTERM and Ctrl+C alike.
    signal.signal(signal.SIGTERM, _stopped_cleanly)
    signal.signal(signal.SIGINT, _stopped_cleanly)
    # What exists now (the modules, the app, its routes and models: most of the heap) lives
    # as long as the process. Left out of the garbage collector's full passes, it is not
    # walked again at every one of them: under load those came every few seconds and took
    # tens of milliseconds each, on the event loop (bench/README.md).
    gc.collect()
    gc.freeze()
    Server(config).run(sockets=sockets)


def _stopped_cleanly(_sig: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


_RELATIVE_REVISION = re.compile(r"^[+-]\d+$")


def _revision_argument(revision: str) -> str:
    """The revision, if this version knows it; else exit 2 (bad usage) before connecting."""
    known = migrations.known_revisions()
    if (
        revision in {"head", "heads", "base"}
        or _RELATIVE_REVISION.match(revision)
        or (revision != "" and any(k.startswith(revision) for k in known))
    ):
        return revision
    raise _fail(
        f"Unknown revision {revision!r}: this version knows {', '.join(sorted(known))}.",
        hint="Give one of them, head, base, or a relative step such as -1.",
        code=2,
    )


def _migrated(settings: Settings, verb: str, done: doctor.Migration) -> str:
    head = migrations.head_revision()
    after = f"{done.after or 'base'}{' (head)' if done.after == head else ''}"
    if done.before == done.after:
        return f"{safe_url(settings)} is already at {after}; nothing to do."
    return f"{verb} {safe_url(settings)} from {done.before or 'base'} to {after}."


@db_cli.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Migrate the database up to REVISION (default: head)."""
    revision = _revision_argument(revision)
    settings = _settings()
    typer.echo(_migrated(settings, "Upgraded", _run(doctor.upgrade(settings, revision))))


@db_cli.command(
    "downgrade",
    # so that `db downgrade -1` reads -1 as the revision, not as an unknown option
    context_settings={"ignore_unknown_options": True},
)
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, e.g. -1 or base.")],
) -> None:
    """Migrate the database down to REVISION (base removes every table)."""
    revision = _revision_argument(revision)
    settings = _settings()
    typer.echo(_migrated(settings, "Downgraded", _run(doctor.downgrade(settings, revision))))


@db_cli.command("current")
def db_current() -> None:
    """Print the database's revision, this version's head, and how the two compare."""
    settings = _settings()
    current = _run(doctor.current_revision(settings))
    head = migrations.head_revision()
    if current is None:
        state = "not migrated (run `countersign db upgrade`)"
    elif current == head:
        state = "up to date"
    elif current not in migrations.known_revisions():
        state = "unknown to this version (a newer Countersign migrated it)"
    else:
        state = "behind (run `countersign db upgrade`)"
    typer.echo(
        f"database: {safe_url(settings)}\ncurrent: {current or 'none'}\nhead: {head}\n"
        f"state: {state}"
    )


@db_cli.command("check")
def db_check(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Diagnose the database: exit 0 when healthy, 1 when a check fails."""
    settings = _settings()
    report: Report = _run(diagnose(settings))
    if as_json:
        typer.echo(json.dumps(report.as_json(), indent=2))
    else:
        marks = {Status.OK: "ok  ", Status.FAIL: "FAIL", Status.SKIP: "skip"}
        for result in report.results:
            typer.echo(f"[{marks[result.status]}] {result.id}: {result.message}")
            if result.hint:
                typer.echo(f"       hint: {result.hint}")
    raise typer.Exit(0 if report.ok else 1)


@db_cli.command("prune")
def db_prune(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="Runs that ended longer ago than this (30d, 12h, 90m, 3600s) lose their "
            "text deltas; messages, tool calls, approvals and run records stay.",
        ),
    ],
) -> None:
    """Remove the text.delta events of runs that ended long ago, and print the sizes."""
    settings = _settings()
    try:
        age = parse_age(older_than)
    except ValueError as exc:
        raise _fail(f"--older-than {older_than!r} {exc}.", code=2) from None

    async def work() -> PruneReport:
        from countersign.services.retention import prune_older_than

        async with _services(settings) as services:
            return await prune_older_than(services, age)

    report = _run(work())
    typer.echo(
        f"removed {report.deltas} text delta(s) of {report.runs} run(s) that ended more than "
        f"{older_than} ago"
    )
    typer.echo(f"events: {report.events_before} rows before, {report.events_after} after")
    if report.bytes_before is not None and report.bytes_after is not None:
        what = "the events table" if not settings.is_sqlite else "the database file's used pages"
        typer.echo(
            f"size of {what}: {report.bytes_before} bytes before, {report.bytes_after} after"
        )
        if settings.is_sqlite:
            typer.echo("SQLite reuses the freed pages; VACUUM gives them back to the disk.")


@tools_cli.command("check")
def tools_check() -> None:
    """List every tool an agent may be given, one line each, after each MCP server and plugin:
    exit 0 when all are usable, 1 when one is not."""
    settings = _settings()  # a bad configuration stops here, in one sentence
    failed: list[str] = []
    loaded: list[str] = []
    for plugin in settings.plugins:
        try:
            load_tool_plugins([*loaded, plugin])
        except ConfigError as exc:
            failed.append(f"[FAIL] plugin {plugin}: {exc.message}")
        else:
            loaded.append(plugin)
    load_tool_plugins(loaded)
    try:
        hub = open_mcp_hub(settings)
    except ConfigError as exc:
        raise _fail(exc.message, hint=exc.hint) from None
    use_mcp_hub(hub)
    if hub is not None:
        asyncio.run(hub.check())
        for server in hub.servers.values():
            where = server.spec.command or _without_credentials(server.spec.url or "")
            if server.up:
                typer.echo(
                    f"[ok  ] MCP server {server.name} ({server.spec.transport} {where}): "
                    f"{len(server.tools)} tool(s)"
                )
            else:
                failed.append(
                    f"[FAIL] MCP server {server.name} ({server.spec.transport} {where}): "
                    f"not reachable: {server.error}"
                )
            failed.extend(f"[FAIL] MCP server {server.name}: {line}" for line in server.refused)
    for tool in list_tools():
        origin = tool.server or tool.plugin
        source = tool.source if origin is None else f"{tool.source} {origin}"
        typer.echo(f"[ok  ] {tool.name} ({source}, default {tool.default_policy.value})")
    for line in failed:
        typer.echo(line)
    raise typer.Exit(1 if failed else 0)


def _without_credentials(url: str) -> str:
    """The URL with no user, password, query or fragment (where credentials may hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@user_cli.command("create")
def user_create(
    email: Annotated[str, typer.Argument(help="The user's email.")],
) -> None:
    """Create a user; the password is read from a prompt, or from stdin when piped."""
    settings = _settings()
    if sys.stdin.isatty():
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise _fail(
                "No password arrived on standard input.",
                hint="Pipe it in, e.g. `printf '%s\\n' \"$PASSWORD\" | countersign user create "
                "EMAIL`, or run the command in a terminal to be prompted.",
            )

    async def work() -> str:
        from countersign.services.accounts import create_user

        async with _services(settings) as services:
            try:
                # The operator vouches for the address (a provider login may link to it).
                user = await create_user(
                    services, email=email, password=password, email_verified=True
                )
            except AlreadyExists:
                raise AlreadyExists(
                    f"a user with the email {email.strip()} already exists"
                ) from None
        return f"Created user {user.email} ({user.id})."

    typer.echo(_run(work()))


@apikey_cli.command("create")
def apikey_create(
    email: Annotated[str, typer.Argument(help="Email of the user the key acts for.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "cli",
) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    settings = _settings()

    async def work() -> str:
        from countersign.services.accounts import create_api_key

        async with _services(settings) as services:
            _key, secret = await create_api_key(services, email=email, name=name)
        return secret

    secret = _run(work())
    typer.echo(secret)
    typer.echo("Store this key now: it is not shown again.", err=True)
