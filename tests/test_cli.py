"""The ``countersign`` command line, run as real subprocesses against real databases.

`serve` is started as a real server process on a free port of 127.0.0.1, probed over HTTP
until ready, and stopped by its PID. Every subprocess is bounded by a timeout; none may print
a traceback (``tests.support.cli.countersign`` and ``serving`` check that).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from countersign.config import normalise_database_url
from countersign.db import migrations
from tests.support.cli import Call, cli_env, countersign, countersign_all
from tests.support.databases import TestDatabase
from tests.support.mcp_server import McpHttpServer, stdio_settings
from tests.support.plugins import plugin_folder
from tests.support.postgres import free_port

SECRET_KEY = "cli-test-secret-key-0123456789-abcdefghijkl"
PASSWORD = "a long password"
READY_TIMEOUT = 60
"""Seconds a server may take from its start to answering /health/ready with 200."""
STOP_TIMEOUT = 15
"""Seconds a server may take to exit after SIGTERM."""
REFUSAL_TIMEOUT = 30
"""Seconds `serve` may take to refuse a database it cannot use."""


def prod_env(url: str) -> dict[str, str]:
    return cli_env(url, COUNTERSIGN_PROFILE="prod", COUNTERSIGN_SECRET_KEY=SECRET_KEY)


def password_of(url: str) -> str | None:
    return urlsplit(url).password


def assert_one_error(finished: subprocess.CompletedProcess[str]) -> str:
    """stderr is one `error: …` sentence (plus at most a `hint:` line); returns the sentence."""
    lines = finished.stderr.splitlines()
    assert 1 <= len(lines) <= 2, finished.stderr
    assert lines[0].startswith("error: "), lines
    assert lines[0].endswith("."), lines
    assert all(line.startswith("hint: ") for line in lines[1:]), lines
    return lines[0].removeprefix("error: ")


# --- a real server process -------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A `countersign serve` process this test started."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serving(
    env: dict[str, str], cwd: Path, *, port_from_env: bool = False, wait: bool = True
) -> Iterator[Server]:
    """Start `countersign serve` on a free port, wait until /health/ready says 200 (unless
    ``wait`` is false: then call ``wait_until_ready``), and stop it by its PID afterwards
    (SIGTERM, then SIGKILL if it does not exit in time)."""
    port = free_port()
    if port_from_env:
        env = {**env, "COUNTERSIGN_HOST": "127.0.0.1", "COUNTERSIGN_PORT": str(port)}
        options: list[str] = []
    else:
        options = ["--host", "127.0.0.1", "--port", str(port)]
    log = cwd / f"serve-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "countersign", "serve", *options],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = Server(process=process, port=port, log=log)
    try:
        if wait:
            wait_until_ready(server)
        yield server
    finally:
        _stop(server)
    assert "Traceback" not in server.output(), server.output()


def wait_until_ready(server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    with httpx.Client(base_url=server.base_url, timeout=5) as http:
        while True:
            code = server.process.poll()
            if code is not None:
                pytest.fail(f"serve exited with {code} before it was ready:\n{server.output()}")
            try:
                if http.get("/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"serve was not ready within {READY_TIMEOUT} s:\n{server.output()}")
            time.sleep(0.1)


def _stop(server: Server) -> None:
    process = server.process
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT)
        pytest.fail(f"serve did not stop within {STOP_TIMEOUT} s of SIGTERM:\n{server.output()}")
    # uvicorn shuts down gracefully and then re-raises the signal it caught.
    assert process.returncode in (0, -signal.SIGTERM), (process.returncode, server.output())


# --- serve: the start-up gate ----------------------------------------------------------


def test_serve_refuses_a_postgres_nothing_listens_on(tmp_path: Path) -> None:
    """A closed port: exit 1 within 30 s, one sentence naming host and port, no password; in
    prod and in dev alike (dev cannot migrate a database it cannot reach)."""
    db_port = free_port()
    url = f"postgresql://countersign:Unreachable-Secret@127.0.0.1:{db_port}/countersign"
    profiles = ("prod", "dev")
    started = time.monotonic()
    results = countersign_all(
        [
            Call(
                ("serve", "--port", str(free_port())),
                env=cli_env(url, COUNTERSIGN_PROFILE=profile, COUNTERSIGN_SECRET_KEY=SECRET_KEY),
                cwd=tmp_path,
                timeout=REFUSAL_TIMEOUT,
            )
            for profile in profiles
        ]
    )
    assert time.monotonic() - started < REFUSAL_TIMEOUT
    for profile, finished in zip(profiles, results, strict=True):
        assert finished.returncode == 1, (profile, finished.stderr)
        sentence = assert_one_error(finished)
        assert f"127.0.0.1:{db_port}" in sentence, (profile, sentence)
        output = finished.stdout + finished.stderr
        assert "Unreachable-Secret" not in output
        assert SECRET_KEY not in output
        assert "Countersign on http" not in output, "it must refuse before it listens"


@pytest.mark.slow
def test_prod_serve_refuses_an_unmigrated_database_until_it_is_upgraded(
    empty_database: TestDatabase, tmp_path: Path
) -> None:
    """prod never migrates by itself: `serve` exits 1 with the doctor's sentence and hint
    (the same as `db check` gives), creates nothing, and starts once `db upgrade` ran."""
    env = prod_env(empty_database.url)
    checked, refused = countersign_all(
        [
            Call(("db", "check", "--json"), env=env, cwd=tmp_path),
            Call(
                ("serve", "--port", str(free_port())),
                env=env,
                cwd=tmp_path,
                timeout=REFUSAL_TIMEOUT,
            ),
        ]
    )
    assert checked.returncode == 1, checked.stderr
    report = json.loads(checked.stdout)
    assert report["ok"] is False
    failure = next(check for check in report["checks"] if check["status"] == "fail")
    assert (failure["id"], failure["problem"]) == ("migrations.state", "not_migrated")

    assert refused.returncode == 1, refused.stderr
    assert refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"error: {failure['message']}",
        f"hint: {failure['hint']}",
    ]
    if empty_database.backend == "sqlite":
        assert not Path(empty_database.name).exists(), "a refused start must not create the file"

    upgraded = countersign("db", "upgrade", env=env, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    with serving(env, tmp_path) as server:
        ready = httpx.get(f"{server.base_url}/health/ready", timeout=5)
        assert ready.json() == {"status": "ok"}
    assert "(prod, " in server.output()


@pytest.mark.slow
def test_dev_serve_migrates_a_fresh_sqlite_file_and_serves(tmp_path: Path) -> None:
    """dev on a file that does not exist yet: creates and migrates it, then serves
    (host and port from COUNTERSIGN_HOST / COUNTERSIGN_PORT this time)."""
    path = tmp_path / "fresh.db"
    with serving(cli_env(f"sqlite:///{path}"), tmp_path, port_from_env=True) as server:
        live = httpx.get(f"{server.base_url}/health/live", timeout=5)
        assert live.status_code == 200
    assert f"Countersign on http://127.0.0.1:{server.port} (dev, " in server.output()
    connection = sqlite3.connect(path)
    try:
        (revision,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    finally:
        connection.close()
    assert revision == migrations.head_revision()


# --- db upgrade / current / downgrade / check ----------------------------------------------


def current_lines(finished: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """`db current`'s output, exit 0, as its four `name: value` lines."""
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert [line.partition(": ")[0] for line in lines] == ["database", "current", "head", "state"]
    return dict(line.partition(": ")[::2] for line in lines)


def test_upgrade_current_downgrade_check(empty_database: TestDatabase, tmp_path: Path) -> None:
    """An operator's round trip: `db upgrade`, `db current` at head, `db check --json`
    healthy, `db downgrade base`, `db current` not migrated; each step exit 0, and the
    database is named without its password."""
    env = cli_env(empty_database.url)
    head = migrations.head_revision()
    secret = password_of(empty_database.url)

    upgraded = countersign("db", "upgrade", env=env, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert re.fullmatch(rf"Upgraded \S+ from base to {head} \(head\)\.\n", upgraded.stdout)
    assert empty_database.name in upgraded.stdout
    if secret:
        assert secret not in upgraded.stdout + upgraded.stderr

    # Both only read.
    shown, healthy = countersign_all(
        [
            Call(("db", "current"), env=env, cwd=tmp_path),
            Call(("db", "check", "--json"), env=env, cwd=tmp_path),
        ]
    )
    after = current_lines(shown)
    assert (after["current"], after["head"], after["state"]) == (head, head, "up to date")
    assert empty_database.name in after["database"]
    if secret:
        assert secret not in after["database"]

    assert healthy.returncode == 0, healthy.stdout
    report = json.loads(healthy.stdout)
    assert report["ok"] is True
    assert {check["status"] for check in report["checks"]} == {"ok"}

    downgraded = countersign("db", "downgrade", "base", env=env, cwd=tmp_path)
    assert downgraded.returncode == 0, downgraded.stderr
    assert re.fullmatch(rf"Downgraded \S+ from {head} to base\.\n", downgraded.stdout)

    gone = current_lines(countersign("db", "current", env=env, cwd=tmp_path))
    assert (gone["current"], gone["head"]) == ("none", head)
    assert gone["state"] == "not migrated (run `countersign db upgrade`)"


# --- users and API keys ---------------------------------------------------------------


@pytest.mark.slow
def test_user_and_api_key_that_works(database: TestDatabase, tmp_path: Path) -> None:
    """`user create` reads the password from stdin; a second user with the same email (any
    case) is refused in one line; `apikey create` prints a `cs_…` key once, and that key
    authenticates against a real server."""
    env = cli_env(database.url)
    email = "operator@example.test"
    # The server boots while the commands run: it looks keys up per request.
    with serving(env, tmp_path, wait=False) as server:
        created = countersign("user", "create", email, env=env, cwd=tmp_path, stdin=f"{PASSWORD}\n")
        assert created.returncode == 0, created.stderr
        assert re.fullmatch(
            rf"Created user {re.escape(email)} \([0-9a-f-]{{36}}\)\.\n", created.stdout
        )
        assert PASSWORD not in created.stdout + created.stderr
        # The operator vouches for the address: a provider login with it may link here.
        assert asyncio.run(email_verified(database.url, email)) is True

        # Both need the user; neither needs the other.
        again, made = countersign_all(
            [
                Call(
                    ("user", "create", email.upper()),
                    env=env,
                    cwd=tmp_path,
                    stdin=f"{PASSWORD}\n",
                ),
                Call(("apikey", "create", email, "--name", "x"), env=env, cwd=tmp_path),
            ]
        )
        assert again.returncode == 1, again.stderr
        assert again.stdout == ""
        assert "already exists" in assert_one_error(again)

        assert made.returncode == 0, made.stderr
        assert re.fullmatch(r"cs_\S+\n", made.stdout), "only the key, on stdout, once"
        key = made.stdout.strip()
        assert key not in made.stderr
        assert "not shown again" in made.stderr

        wait_until_ready(server)
        with httpx.Client(base_url=server.base_url, timeout=5) as http:
            me = http.get("/api/v1/me", headers={"Authorization": f"Bearer {key}"})
            assert me.status_code == 200, me.text
            assert me.json()["email"] == email
            wrong = http.get("/api/v1/me", headers={"Authorization": f"Bearer {key}x"})
            assert wrong.status_code == 401


async def email_verified(database_url: str, email: str) -> bool:
    engine = create_async_engine(normalise_database_url(database_url))
    try:
        async with engine.connect() as connection:
            found = await connection.execute(
                text("SELECT email_verified FROM users WHERE email = :email"), {"email": email}
            )
            return bool(found.scalar_one())
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class Refusal:
    id: str
    args: tuple[str, ...]
    code: int
    says: str
    stdin: str = f"{PASSWORD}\n"


ACCOUNT_REFUSALS = [
    Refusal("invalid-email", ("user", "create", "not-an-email"), 2, "not a valid email"),
    Refusal("short-password", ("user", "create", "a@example.test"), 2, "at least", "short\n"),
    Refusal("no-password-on-stdin", ("user", "create", "b@example.test"), 1, "No password", ""),
    Refusal("apikey-unknown-email", ("apikey", "create", "nobody@example.test"), 1, "nobody"),
    Refusal("apikey-empty-name", ("apikey", "create", "c@example.test", "--name", " "), 2, "1 to"),
]


@pytest.mark.backends("sqlite")
def test_account_commands_refuse_in_one_sentence(database: TestDatabase, tmp_path: Path) -> None:
    """Bad arguments (exit 2) and problems found (exit 1): one sentence, nothing on stdout."""
    env = cli_env(database.url)
    results = countersign_all(
        [Call(case.args, env=env, cwd=tmp_path, stdin=case.stdin) for case in ACCOUNT_REFUSALS]
    )
    outcomes: dict[str, Any] = {}
    for case, finished in zip(ACCOUNT_REFUSALS, results, strict=True):
        sentence = assert_one_error(finished)
        outcomes[case.id] = (finished.returncode, case.says in sentence, finished.stdout)
    assert outcomes == {case.id: (case.code, True, "") for case in ACCOUNT_REFUSALS}


# --- bad usage ---------------------------------------------------------------------------

BAD_USAGE = {
    "unknown-command": ("frobnicate",),
    "port-not-a-number": ("serve", "--port", "abc"),
    "unknown-option": ("db", "check", "--jsn"),
    "downgrade-without-revision": ("db", "downgrade"),
    "unknown-revision": ("db", "upgrade", "nonsense"),
}


def test_bad_usage_exits_2_before_touching_the_database(tmp_path: Path) -> None:
    """Unknown commands and options, bad option values, missing arguments: exit 2 with a
    message on stderr, and the default database file is never created."""
    results = countersign_all(
        [Call(args, env=cli_env(), cwd=tmp_path, stdin="") for args in BAD_USAGE.values()]
    )
    codes = {name: finished.returncode for name, finished in zip(BAD_USAGE, results, strict=True)}
    assert codes == dict.fromkeys(BAD_USAGE, 2)
    for name, finished in zip(BAD_USAGE, results, strict=True):
        assert finished.stderr.strip(), name
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_tools_check_lists_every_tool_an_agent_may_be_given(tmp_path: Path) -> None:
    finished = countersign("tools", "check", env=cli_env(), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert lines == [
        "[ok  ] list_files (builtin, default auto)",
        "[ok  ] read_file (builtin, default auto)",
        "[ok  ] shell (builtin, default ask)",
        "[ok  ] write_file (builtin, default ask)",
    ]
    broken = countersign(
        "tools", "check", env=cli_env(COUNTERSIGN_PROFILE="nonsense"), cwd=tmp_path
    )
    assert broken.returncode == 2
    assert_one_error(broken)


def test_serve_refuses_a_named_plugin_it_cannot_load_in_one_sentence(tmp_path: Path) -> None:
    folder = plugin_folder(tmp_path / "site")
    url = f"sqlite:///{tmp_path / 'plugins.db'}"
    for plugins, named in (("broken", "'broken' could not be loaded"), ("absent", "not installed")):
        env = cli_env(url, COUNTERSIGN_PLUGINS=plugins, PYTHONPATH=str(folder))
        finished = countersign(
            "serve", "--port", str(free_port()), env=env, cwd=tmp_path, timeout=REFUSAL_TIMEOUT
        )
        assert finished.returncode == 2, finished.stderr
        assert named in assert_one_error(finished)


def test_tools_check_lists_plugin_tools_and_fails_on_a_broken_plugin(tmp_path: Path) -> None:
    folder = plugin_folder(tmp_path / "site")
    good = countersign(
        "tools",
        "check",
        env=cli_env(COUNTERSIGN_PLUGINS="greeter", PYTHONPATH=str(folder)),
        cwd=tmp_path,
    )
    assert good.returncode == 0, good.stderr
    assert "[ok  ] greet (plugin greeter, default ask)" in good.stdout.splitlines()
    assert "[ok  ] explode (plugin greeter, default ask)" in good.stdout.splitlines()
    assert "hidden" not in good.stdout  # installed, not named
    bad = countersign(
        "tools",
        "check",
        env=cli_env(COUNTERSIGN_PLUGINS="greeter,broken", PYTHONPATH=str(folder)),
        cwd=tmp_path,
    )
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[-1].startswith(
        "[FAIL] plugin broken: The plugin 'broken' could not be loaded"
    )


def test_tools_check_connects_to_each_mcp_server_and_fails_on_one_it_cannot_reach(
    tmp_path: Path,
) -> None:
    with McpHttpServer(token="t0ken") as remote:
        servers = {
            "local": stdio_settings(),
            "web": {"url": remote.url, "headers": {"Authorization": "Bearer t0ken"}},
        }
        good = countersign(
            "tools", "check", env=cli_env(COUNTERSIGN_MCP_SERVERS=json.dumps(servers)), cwd=tmp_path
        )
        assert good.returncode == 0, good.stdout + good.stderr
        lines = good.stdout.splitlines()
        assert any(
            line.startswith("[ok  ] MCP server local (stdio ") and line.endswith(": 8 tool(s)")
            for line in lines
        ), lines
        assert f"[ok  ] MCP server web (http {remote.url}): 8 tool(s)" in lines
        assert "[ok  ] local_add (mcp local, default ask)" in lines
        assert "[ok  ] web_echo (mcp web, default ask)" in lines

        servers["web"]["headers"] = {"Authorization": "Bearer wrong-t0ken"}
        servers["list"] = stdio_settings()  # its tool "files" clashes with list_files
        bad = countersign(
            "tools", "check", env=cli_env(COUNTERSIGN_MCP_SERVERS=json.dumps(servers)), cwd=tmp_path
        )
        assert bad.returncode == 1
        failures = [line for line in bad.stdout.splitlines() if line.startswith("[FAIL]")]
        assert len(failures) == 2, bad.stdout
        assert failures[0].startswith("[FAIL] MCP server web (http ")
        assert "not reachable: " in failures[0]
        assert failures[1] == (
            "[FAIL] MCP server list: the tool 'files' is left out: 'list_files' is taken"
        )
        assert "wrong-t0ken" not in bad.stdout + bad.stderr


@pytest.mark.parametrize(
    ("servers", "reason"),
    [
        ('{"a_b": {"command": "x"}}', "has the server name 'a_b'"),
        ('{"a": {"command": "x", "url": "http://h/mcp"}}', "needs either a command"),
        ('{"a": {}}', "needs either a command"),
        ('{"a": {"url": "ftp://h/mcp"}}', "not an http(s) URL"),
        ('{"a": {"command": "x", "timeout_seconds": 0}}', "greater than 0"),
        ("[1]", "is not a JSON object"),
        ("{nope", "is not valid JSON"),
        ('{"a": {"url": "http://h/mcp", "headers": {"X": ["tok3n-secret"]}}}', "at a.headers.X"),
        ('{"a": {"command": "x", "env": {"K": 7777777}}}', "at a.env.K"),
    ],
)
def test_a_bad_mcp_server_setting_is_one_sentence_and_exit_2(
    tmp_path: Path, servers: str, reason: str
) -> None:
    finished = countersign(
        "tools", "check", env=cli_env(COUNTERSIGN_MCP_SERVERS=servers), cwd=tmp_path
    )
    assert finished.returncode == 2, finished.stdout + finished.stderr
    message = assert_one_error(finished)
    assert "COUNTERSIGN_MCP_SERVERS" in message
    assert reason in message
    assert "tok3n-secret" not in finished.stdout + finished.stderr
    assert "7777777" not in finished.stdout + finished.stderr


def test_db_prune_prints_what_it_removed_and_the_sizes(tmp_path: Path) -> None:
    env = cli_env(f"sqlite:///{tmp_path / 'prune.db'}")
    assert countersign("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    finished = countersign("db", "prune", "--older-than", "30d", env=env, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert lines[0] == "removed 0 text delta(s) of 0 run(s) that ended more than 30d ago"
    assert lines[1] == "events: 0 rows before, 0 after"
    assert re.fullmatch(
        r"size of the database file's used pages: \d+ bytes before, \d+ after", lines[2]
    ), lines
    for bad in ("30", "thirty days", "-1d", "1y", ""):
        refused = countersign("db", "prune", "--older-than", bad, env=env, cwd=tmp_path)
        assert refused.returncode == 2, (bad, refused.stdout, refused.stderr)
        assert "is not an age" in assert_one_error(refused)
    missing = countersign("db", "prune", env=env, cwd=tmp_path)
    assert missing.returncode == 2


def test_a_bad_prune_age_setting_is_one_sentence_and_exit_2(tmp_path: Path) -> None:
    env = cli_env(COUNTERSIGN_PRUNE_OLDER_THAN="soon")
    finished = countersign("tools", "check", env=env, cwd=tmp_path)
    assert finished.returncode == 2, finished.stdout + finished.stderr
    message = assert_one_error(finished)
    assert message.startswith("COUNTERSIGN_PRUNE_OLDER_THAN is not an age")
