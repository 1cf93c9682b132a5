"""The ``countersign`` command: serve, db (upgrade|downgrade|current|check), user, apikey.

Exit codes: 0 fine; 1 a problem found (a failed check, a refused start); 2 bad usage or
configuration. Errors are one or a few lines, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, TypeVar

import typer
import uvicorn

from countersign.app import configure_logging, create_app
from countersign.config import Settings, load_settings
from countersign.db import migrations
from countersign.db.doctor import Report, Status, create_check_engine, diagnose, startup_gate
from countersign.db.engine import create_engine, create_session_factory, safe_url
from countersign.db.uow import unit_of_work_factory
from countersign.domain.errors import ConfigError, CountersignError, StartupError
from countersign.domain.models import SystemClock
from countersign.services import ServiceDeps
from countersign.services.accounts import create_api_key, create_user

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
cli.add_typer(db_cli, name="db")
cli.add_typer(user_cli, name="user")
cli.add_typer(apikey_cli, name="apikey")


def main() -> None:
    """Entry point of the console script."""
    cli()


def _fail(message: str, *, hint: str = "", code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(code)


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        raise _fail(exc.message, code=2) from None


def _run(work: Awaitable[T]) -> T:
    """Run a coroutine; domain errors become one line and an exit code."""
    try:
        return asyncio.run(work)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise _fail(exc.message, hint=exc.hint, code=2) from None
    except StartupError as exc:
        raise _fail(exc.message, hint=exc.hint) from None
    except CountersignError as exc:
        raise _fail(exc.message) from None


@asynccontextmanager
async def _services(settings: Settings) -> AsyncIterator[ServiceDeps]:
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
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
) -> None:
    """Start the server (dev: migrates first; prod: refuses an unmigrated database)."""
    settings = _settings(host=host, port=port)
    configure_logging(settings)
    # Pass the gate here, before uvicorn, so a refusal is one sentence and exit code 1.
    _run(startup_gate(settings))
    typer.echo(
        f"Countersign on http://{settings.host}:{settings.port} "
        f"({settings.profile.value}, {safe_url(settings)})",
        err=True,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
    )


@db_cli.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Migrate the database up to REVISION (default: head)."""
    settings = _settings()
    _run(_migrate(settings, migrations.upgrade, revision))
    typer.echo(f"Database at {_run(_current(settings)) or 'base'} ({safe_url(settings)}).")


@db_cli.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, e.g. -1 or base.")],
) -> None:
    """Migrate the database down to REVISION."""
    settings = _settings()
    _run(_migrate(settings, migrations.downgrade, revision))
    typer.echo(f"Database at {_run(_current(settings)) or 'base'} ({safe_url(settings)}).")


@db_cli.command("current")
def db_current() -> None:
    """Print the database's revision and this version's head."""
    settings = _settings()
    current = _run(_current(settings))
    head = migrations.head_revision()
    state = "up to date" if current == head else "not migrated" if current is None else "behind"
    if current is not None and current not in migrations.known_revisions():
        state = "unknown to this version"
    typer.echo(f"current: {current or 'none'}\nhead: {head}\nstate: {state}")


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


@user_cli.command("create")
def user_create(
    email: Annotated[str, typer.Argument(help="The user's email.")],
) -> None:
    """Create a user; the password is read from a prompt, or from stdin when piped."""
    if sys.stdin.isatty():
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    settings = _settings()

    async def work() -> str:
        async with _services(settings) as services:
            user = await create_user(services, email=email, password=password)
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
        async with _services(settings) as services:
            _key, secret = await create_api_key(services, email=email, name=name)
        return secret

    secret = _run(work())
    typer.echo(secret)
    typer.echo("Store this key now: it is not shown again.", err=True)


async def _migrate(settings: Settings, step: Callable[..., Awaitable[None]], revision: str) -> None:
    engine = create_check_engine(settings)
    try:
        await _connect_or_explain(settings)
        await step(engine, revision)
    finally:
        await engine.dispose()


async def _current(settings: Settings) -> str | None:
    await _connect_or_explain(settings)
    engine = create_check_engine(settings)
    try:
        return await migrations.current_revision(engine)
    finally:
        await engine.dispose()


async def _connect_or_explain(settings: Settings) -> None:
    """Raise StartupError with the doctor's sentence if the database cannot be reached."""
    report = await diagnose(settings)
    for result in report.results:
        if (
            result.status is Status.FAIL
            and result.id != "migrations.state"
            and result.id != "privileges"
        ):
            raise StartupError(result.message, hint=result.hint)
