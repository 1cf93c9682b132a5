"""Configuration: every bad value stops the CLI with one sentence naming the variable (exit 2).

The command-line cases run the real ``python -m countersign`` in subprocesses (side by side,
they are independent); the rest call ``load_settings`` directly. Nothing is mocked: the only
things changed are the environment, the working directory and its ``.env`` file.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from countersign.config import (
    DEFAULT_SQLITE_URL,
    SECRET_KEY_MIN_LENGTH,
    Profile,
    Settings,
    load_settings,
    normalise_database_url,
)
from countersign.db import migrations
from countersign.domain.errors import ConfigError
from tests.support.cli import Call, cli_env, countersign, countersign_all

GOOD_SECRET = "k" * SECRET_KEY_MIN_LENGTH


# --- bad values on the command line --------------------------------------------------------


@dataclass(frozen=True)
class BadValue:
    """A configuration the CLI must refuse: which variable it must name, what it must hide."""

    id: str
    env: dict[str, str]
    variable: str
    command: tuple[str, ...] = ("db", "current")
    secret: str | None = None
    """A password or key that must not appear in the output."""
    dotenv: str | None = None
    """Contents of a ``.env`` file in the working directory."""


PG = "postgresql://countersign"
BAD_VALUES = [
    BadValue("profile-staging", {"COUNTERSIGN_PROFILE": "staging"}, "COUNTERSIGN_PROFILE"),
    BadValue(
        "url-not-a-url", {"COUNTERSIGN_DATABASE_URL": "not-a-url"}, "COUNTERSIGN_DATABASE_URL"
    ),
    BadValue(
        "url-mysql",
        {"COUNTERSIGN_DATABASE_URL": "mysql://countersign:mysql-Secret-1@db.example.com/cs"},
        "COUNTERSIGN_DATABASE_URL",
        secret="mysql-Secret-1",
    ),
    BadValue(
        "url-port-out-of-range",
        {"COUNTERSIGN_DATABASE_URL": f"{PG}:pg-Secret-2@db.example.com:99999/cs"},
        "COUNTERSIGN_DATABASE_URL",
        secret="pg-Secret-2",
    ),
    BadValue(
        # asyncpg would take it as a keyword argument of connect() and fail with a traceback.
        "url-unsupported-query-parameter",
        {"COUNTERSIGN_DATABASE_URL": f"{PG}:pg-Secret-3@127.0.0.1:1/cs?application_name=x"},
        "COUNTERSIGN_DATABASE_URL",
        command=("db", "check"),
        secret="pg-Secret-3",
    ),
    BadValue("port-zero", {"COUNTERSIGN_PORT": "0"}, "COUNTERSIGN_PORT", command=("serve",)),
    BadValue("port-70000", {"COUNTERSIGN_PORT": "70000"}, "COUNTERSIGN_PORT", command=("serve",)),
    BadValue("port-abc", {"COUNTERSIGN_PORT": "abc"}, "COUNTERSIGN_PORT", command=("serve",)),
    BadValue(
        "prod-without-secret-key",
        {"COUNTERSIGN_PROFILE": "prod"},
        "COUNTERSIGN_SECRET_KEY",
        command=("serve",),
    ),
    BadValue(
        "prod-with-short-secret-key",
        {"COUNTERSIGN_PROFILE": "prod", "COUNTERSIGN_SECRET_KEY": "short-Secret-4"},
        "COUNTERSIGN_SECRET_KEY",
        command=("serve",),
        secret="short-Secret-4",
    ),
    BadValue(
        "default-model-unknown",
        {"COUNTERSIGN_DEFAULT_MODEL": "gpt 4"},
        "COUNTERSIGN_DEFAULT_MODEL",
        command=("serve",),
    ),
    # A default model the server cannot use (its provider's key is not set) stops serve too.
    BadValue(
        "default-model-openai-without-key",
        {"COUNTERSIGN_DEFAULT_MODEL": "openai:gpt-4o"},
        "COUNTERSIGN_DEFAULT_MODEL",
        command=("serve",),
    ),
    BadValue(
        "default-model-anthropic-without-key",
        {"COUNTERSIGN_DEFAULT_MODEL": "anthropic:claude-sonnet-4-5"},
        "COUNTERSIGN_DEFAULT_MODEL",
        command=("serve",),
    ),
    BadValue(
        "default-model-google-without-key",
        {
            "COUNTERSIGN_DEFAULT_MODEL": "google:gemini-2.5-flash",
            "COUNTERSIGN_ANTHROPIC_API_KEY": "anthropic-Secret-5",
        },
        "COUNTERSIGN_DEFAULT_MODEL",
        command=("serve",),
        secret="anthropic-Secret-5",
    ),
    BadValue(
        "bad-value-in-dotenv",
        {},
        "COUNTERSIGN_PORT",
        command=("serve",),
        dotenv="COUNTERSIGN_PORT=eighty\n",
    ),
]


@pytest.fixture(scope="module")
def bad_value_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Every bad configuration run once, side by side, each in an empty folder of its own."""
    folders = {case.id: tmp_path_factory.mktemp(case.id) for case in BAD_VALUES}
    for case in BAD_VALUES:
        if case.dotenv is not None:
            (folders[case.id] / ".env").write_text(case.dotenv)
    calls = [
        Call(case.command, env=cli_env(**case.env), cwd=folders[case.id]) for case in BAD_VALUES
    ]
    results = countersign_all(calls, check=False)  # each test checks its own result
    return {
        case.id: (finished, folders[case.id])
        for case, finished in zip(BAD_VALUES, results, strict=True)
    }


@pytest.mark.parametrize("case", BAD_VALUES, ids=[case.id for case in BAD_VALUES])
def test_bad_value_stops_with_one_sentence_naming_the_variable(
    case: BadValue, bad_value_runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]]
) -> None:
    """Exit 2; stderr is `error: <VARIABLE> …` in one sentence (and maybe a hint); no secret."""
    finished, folder = bad_value_runs[case.id]
    assert "Traceback" not in finished.stdout + finished.stderr, finished.stderr
    assert finished.returncode == 2, (finished.stdout, finished.stderr)
    assert finished.stdout == ""
    lines = finished.stderr.splitlines()
    assert lines, "the refusal must say why"
    error = lines[0]
    assert error.startswith(f"error: {case.variable} "), error
    assert error.endswith("."), error
    sentence = error.removeprefix("error: ").replace("e.g.", "eg")
    assert ". " not in sentence, f"more than one sentence: {error}"
    assert all(line.startswith("hint: ") for line in lines[1:]), lines
    assert len(lines) <= 2, lines
    if case.secret is not None:
        assert case.secret not in finished.stdout + finished.stderr
    created = sorted(path.name for path in folder.iterdir() if path.name != ".env")
    assert created == [], "a refused configuration must not touch any database"


# --- where settings come from: defaults, .env, the environment ---------------------------


def test_default_database_is_a_sqlite_file_in_the_working_directory(tmp_path: Path) -> None:
    """No URL anywhere: `db upgrade` creates and migrates ./countersign.db, and only that."""
    upgraded = countersign("db", "upgrade", env=cli_env(), cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "countersign.db").is_file()
    assert f"to {migrations.head_revision()} (head)" in upgraded.stdout


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    """COUNTERSIGN_DATABASE_URL from ./.env decides which file `db upgrade` creates."""
    (tmp_path / ".env").write_text("COUNTERSIGN_DATABASE_URL=sqlite:///./from-dotenv.db\n")
    upgraded = countersign("db", "upgrade", env=cli_env(), cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "from-dotenv.db").is_file()
    assert not (tmp_path / "countersign.db").exists()
    assert "from-dotenv.db" in upgraded.stdout


def test_environment_beats_dotenv(tmp_path: Path) -> None:
    """A variable set in the environment wins over the same one in ./.env."""
    (tmp_path / ".env").write_text("COUNTERSIGN_DATABASE_URL=sqlite:///./from-dotenv.db\n")
    env = cli_env("sqlite:///./from-env.db")
    upgraded = countersign("db", "upgrade", env=env, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "from-env.db").is_file()
    assert not (tmp_path / "from-dotenv.db").exists()


# --- Settings and load_settings, in this process ------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No COUNTERSIGN_* variables, and an empty working directory (so no .env)."""
    for key in list(os.environ):
        if key.startswith("COUNTERSIGN_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch) -> None:
    """Nothing set: SQLite file ./countersign.db with its async driver, dev, 127.0.0.1:8000."""
    settings = load_settings()
    assert settings.database_url == DEFAULT_SQLITE_URL == "sqlite+aiosqlite:///./countersign.db"
    assert make_url(settings.database_url).database == "./countersign.db"
    assert settings.is_sqlite
    assert settings.profile is Profile.DEV
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.registration_open is True


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@db:5432/cs", "postgresql+asyncpg://u:p@db:5432/cs"),
        ("postgres://u:p@db/cs", "postgresql+asyncpg://u:p@db/cs"),
        ("PostgreSQL://u:p@db/cs", "postgresql+asyncpg://u:p@db/cs"),
        ("postgresql+asyncpg://u:p@db/cs", "postgresql+asyncpg://u:p@db/cs"),
        ("sqlite:///./cs.db", "sqlite+aiosqlite:///./cs.db"),
        ("sqlite:////var/lib/cs.db", "sqlite+aiosqlite:////var/lib/cs.db"),
        ("sqlite+aiosqlite:///cs.db", "sqlite+aiosqlite:///cs.db"),
        ("  sqlite:///cs.db\n", "sqlite+aiosqlite:///cs.db"),
    ],
    ids=lambda value: f"<{value.strip()}>",  # "[sqlite…" and "[postgres…" name backends here
)
def test_database_url_gets_its_async_driver(
    clean_env: pytest.MonkeyPatch, given: str, expected: str
) -> None:
    """From the environment, as an operator writes it, to the URL SQLAlchemy gets."""
    clean_env.setenv("COUNTERSIGN_DATABASE_URL", given)
    settings = load_settings()
    assert settings.database_url == expected
    assert settings.is_sqlite == expected.startswith("sqlite")


def test_libpq_sslmode_becomes_asyncpg_ssl() -> None:
    """`?sslmode=require` (what managed PostgreSQL hands out) is asyncpg's `ssl`; the
    percent-encoded password survives the rewrite."""
    url = make_url(normalise_database_url("postgresql://u:p%40ss%2Fw@db/cs?sslmode=require"))
    assert url.drivername == "postgresql+asyncpg"
    assert dict(url.query) == {"ssl": "require"}
    assert url.password == "p@ss/w"
    assert (url.host, url.database) == ("db", "cs")
    socket = make_url(normalise_database_url("postgresql://u@/cs?host=/run/postgresql"))
    assert dict(socket.query) == {"host": "/run/postgresql"}


@pytest.mark.parametrize(
    ("url", "secret", "says"),
    [
        ("postgresql://u:pa55#word@db/cs", "pa55", "percent-encode"),
        ("postgresql://u:pa55/word@db/cs", "pa55", "percent-encode"),
        ("postgresql://u:123456?x@db/cs", "123456", "percent-encode"),
        ("postgresql://u:s3cr\uff20t@db/cs", "s3cr", "malformed"),
        ("postgresql://u:Secret-5@db:99999/cs", "Secret-5", "99999"),
        ("postgresql://u:Secret-6@db:http/cs", "Secret-6", "not a number"),
        ("postgresql://u:Secret-7@/cs", "Secret-7", "names no host"),
        ("postgresql://u:Secret-8@db/cs?sslmode=maybe", "Secret-8", "sslmode='maybe'"),
        ("postgresql://u:Secret-9@db/cs?connect_timeout=5", "Secret-9", "'connect_timeout'"),
        ("mysql://u:Secret-10@db/cs", "Secret-10", "unsupported scheme 'mysql'"),
    ],
    ids=lambda value: f"<{value}>",
)
def test_bad_database_url_is_named_without_its_password(
    clean_env: pytest.MonkeyPatch, url: str, secret: str, says: str
) -> None:
    """One sentence naming COUNTERSIGN_DATABASE_URL and the problem, never the password."""
    clean_env.setenv("COUNTERSIGN_DATABASE_URL", url)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = raised.value.message
    assert message.startswith("COUNTERSIGN_DATABASE_URL "), message
    assert says in message
    assert secret not in str(raised.value)
    assert message.endswith(".")


def test_prod_secret_key_length_boundary(clean_env: pytest.MonkeyPatch) -> None:
    """prod takes a key of exactly the minimum length, refuses one character less, and never
    shows the key (not in the error, not in the settings' repr)."""
    clean_env.setenv("COUNTERSIGN_PROFILE", "prod")
    short = "s" * (SECRET_KEY_MIN_LENGTH - 1)
    clean_env.setenv("COUNTERSIGN_SECRET_KEY", short)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert raised.value.message.startswith("COUNTERSIGN_SECRET_KEY ")
    assert str(SECRET_KEY_MIN_LENGTH) in raised.value.message
    assert "secrets" in raised.value.hint, "the hint says how to make a key"
    assert short not in str(raised.value)

    clean_env.setenv("COUNTERSIGN_SECRET_KEY", GOOD_SECRET)
    settings = load_settings()
    assert settings.profile is Profile.PROD
    assert settings.registration_open is False
    assert GOOD_SECRET not in repr(settings)


def test_prod_refuses_a_blank_secret_key(clean_env: pytest.MonkeyPatch) -> None:
    """Spaces are no key: the same sentence as a missing one."""
    clean_env.setenv("COUNTERSIGN_PROFILE", "prod")
    clean_env.setenv("COUNTERSIGN_SECRET_KEY", " " * (SECRET_KEY_MIN_LENGTH + 5))
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert raised.value.message.startswith("COUNTERSIGN_SECRET_KEY is not set")


def test_overrides_beat_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    """`serve --host/--port` reach load_settings as overrides and win over the variables."""
    clean_env.setenv("COUNTERSIGN_PORT", "9000")
    clean_env.setenv("COUNTERSIGN_HOST", "0.0.0.0")  # noqa: S104 (a value, nothing binds)
    settings = load_settings(port=9100, host="127.0.0.2")
    assert (settings.host, settings.port) == ("127.0.0.2", 9100)
    assert isinstance(settings, Settings)
