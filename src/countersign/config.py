"""Settings: the only reader of the environment (``COUNTERSIGN_*`` variables and ``.env``).

``load_settings()`` turns every invalid value into a ``ConfigError`` whose message is one
sentence naming the variable, so that the CLI can print it and exit with code 2.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import limits
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from countersign.domain.errors import ConfigError

ENV_PREFIX = "COUNTERSIGN_"
DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///./countersign.db"
SECRET_KEY_MIN_LENGTH = 32
MAKE_A_KEY_HINT = "Generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"

_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
"""The values of ``ssl`` (asyncpg's name) and ``sslmode`` (libpq's) in a PostgreSQL URL."""

_SCHEMES = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


class Profile(StrEnum):
    """How strict start-up is: ``dev`` migrates by itself; ``prod`` refuses an unmigrated DB."""

    DEV = "dev"
    PROD = "prod"


class Settings(BaseSettings):
    """Everything an operator can set; each field is ``COUNTERSIGN_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    database_url: str = DEFAULT_SQLITE_URL
    """SQLAlchemy URL; ``postgresql://`` and ``sqlite:///`` are accepted and given async drivers."""
    profile: Profile = Profile.DEV
    secret_key: SecretStr | None = None
    """Required in ``prod``; signs cookies and CSRF tokens."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    default_model: str = "demo"
    open_registration: bool | None = None
    """Whether ``POST /auth/register`` is open; defaults to open in ``dev``, closed in ``prod``."""
    access_token_ttl_seconds: int = Field(default=604_800, ge=1, le=31_536_000)
    """How long a login's access token (and its cookie) stays valid; 7 days by default."""
    login_rate_limit: str = "10/minute"
    """Login attempts per client IP address (a rate such as ``10/minute``; ``;`` joins several)."""
    login_failure_rate_limit: str = "5/minute"
    """Failed logins per account email; further attempts for that email wait (429)."""
    register_rate_limit: str = "20/hour"
    """Registration attempts per client IP address, and per email."""

    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    db_pool_size: int = Field(default=10, ge=1, le=1000)
    db_max_overflow: int = Field(default=10, ge=0, le=1000)
    db_pool_timeout: float = Field(default=10.0, gt=0, le=600)
    """Seconds a request waits for a pooled connection before failing."""
    db_statement_timeout_ms: int = Field(default=30_000, ge=0, le=3_600_000)
    """PostgreSQL ``statement_timeout``; 0 disables it."""
    db_connect_timeout: float = Field(default=10.0, gt=0, le=600)
    sqlite_busy_timeout_ms: int = Field(default=5_000, ge=0, le=600_000)

    approval_ttl_seconds: int = Field(default=86_400, ge=1)
    """How long a pending approval waits before it expires (SPEC invariant 9)."""
    max_request_bytes: int = Field(default=1_048_576, ge=1_024)
    """Requests with a larger body are refused with 413."""

    openai_api_key: SecretStr | None = None
    """Key for ``openai:MODEL`` models (not needed with a local ``openai_base_url``)."""
    openai_base_url: str | None = None
    """An OpenAI-compatible server (Ollama, vLLM, llama.cpp) for ``openai:MODEL`` models."""
    model_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    """How long one model request may take before the run fails."""

    workspace_root: Path = Path("workspaces")
    """Each session's tools work in ``<workspace_root>/<session id>``."""
    shell_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    shell_interpreter: bool = False
    """Run ``shell`` commands through ``/bin/sh -c`` (pipes, globs) instead of plain argv."""
    tool_output_max_chars: int = Field(default=16_000, ge=100, le=10_000_000)

    executor_concurrency: int = Field(default=32, ge=1, le=1000)
    """Runs one server process carries out at the same time."""
    run_lease_seconds: float = Field(default=10.0, ge=1, le=600)
    """How long a run stays claimed without a heartbeat before another process may take it."""
    executor_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    """How often the executor looks for work it was not told about (runs of dead processes)."""
    event_flush_seconds: float = Field(default=0.05, ge=0, le=10)
    """Text deltas are committed in batches at most this far apart (a batch per 32 deltas)."""

    @field_validator("database_url")
    @classmethod
    def _normalise_database_url(cls, value: str) -> str:
        return normalise_database_url(value)

    @field_validator("login_rate_limit", "login_failure_rate_limit", "register_rate_limit")
    @classmethod
    def _parse_rate_limit(cls, value: str) -> str:
        try:
            rates = limits.parse_many(value)
        except ValueError:
            rates = []
        if not rates or any(rate.amount < 1 for rate in rates):
            raise ValueError(
                "is not a rate limit; use e.g. 10/minute, 5 per second or 10/minute;100/hour"
            )
        return value

    @model_validator(mode="after")
    def _prod_needs_secret(self) -> Settings:
        if self.profile is not Profile.PROD:
            return self
        if self.secret_key is None or not self.secret_key.get_secret_value().strip():
            raise ValueError(
                f"{ENV_PREFIX}SECRET_KEY is not set, and the prod profile needs one of at "
                f"least {SECRET_KEY_MIN_LENGTH} characters"
            )
        length = len(self.secret_key.get_secret_value())
        if length < SECRET_KEY_MIN_LENGTH:
            raise ValueError(
                f"{ENV_PREFIX}SECRET_KEY has {length} characters, and the prod profile needs "
                f"at least {SECRET_KEY_MIN_LENGTH}"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        """True when the database is an embedded SQLite file."""
        return self.database_url.startswith("sqlite")

    @property
    def registration_open(self) -> bool:
        """Open registration: explicit setting, else open in dev and closed in prod."""
        if self.open_registration is not None:
            return self.open_registration
        return self.profile is Profile.DEV


def normalise_database_url(value: str) -> str:
    """Give a database URL its async driver, or raise ValueError saying what is wrong."""
    value = value.strip()
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise ValueError(
            "is not a database URL; expected e.g. postgresql://user:password@host:5432/db "
            "or sqlite:///./countersign.db"
        )
    driver = _SCHEMES.get(scheme.lower())
    if driver is None:
        raise ValueError(f"uses the unsupported scheme {scheme!r}; use postgresql:// or sqlite:///")
    if driver.startswith("sqlite"):
        if not rest.startswith("/") or rest == "/":
            raise ValueError("needs a file path after sqlite:///, e.g. sqlite:///./countersign.db")
    else:
        try:
            parts = urlsplit(f"postgresql://{rest}")
        except ValueError:
            # urllib's message may quote the whole host part, password included.
            raise ValueError(
                "is malformed; check the host (an IPv6 address goes in [brackets]) and "
                "percent-encode special characters in the user name and password"
            ) from None
        try:
            port = parts.port
        except ValueError:
            if "@" not in parts.netloc:
                # Without "user:password@", what reads as a port may be a password cut short
                # by an unencoded / # or ?: never echo it.
                raise ValueError(
                    "has no valid port; use a port between 1 and 65535, and percent-encode "
                    "/ # ? in a password"
                ) from None
            raw_port = _raw_port(parts.netloc)
            if raw_port.isdigit():
                raise ValueError(f"has port {raw_port}; use a port between 1 and 65535") from None
            raise ValueError(f"has a port that is not a number ({raw_port!r})") from None
        if not parts.hostname and "host=" not in (parts.query or ""):
            raise ValueError("names no host, e.g. postgresql://user:password@localhost:5432/db")
        if port == 0:
            raise ValueError("has port 0; use a port between 1 and 65535")
        if parts.query:
            query = _postgres_query(parts.query)
            return urlunsplit(parts._replace(scheme=driver, query=query))
    return f"{driver}://{rest}"


def _postgres_query(query: str) -> str:
    """The URL's query for asyncpg: libpq's ``sslmode`` becomes ``ssl``; others are refused.

    asyncpg takes every query parameter as a keyword argument of ``connect()``, so an unknown
    one (``application_name``, say) would only fail later, as a traceback.
    """
    pairs: list[tuple[str, str]] = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in ("host", "ssl", "sslmode"):
            raise ValueError(
                f"has the query parameter {key!r}, which Countersign does not support; "
                "use only host and ssl (or sslmode)"
            )
        if key == "host":
            pairs.append((key, value))
            continue
        if value not in _SSL_MODES:
            raise ValueError(f"has {key}={value!r}; use one of {', '.join(_SSL_MODES)}")
        if any(name == "ssl" for name, _ in pairs):
            raise ValueError("gives ssl (or sslmode) more than once")
        pairs.append(("ssl", value))
    return urlencode(pairs)


def _raw_port(netloc: str) -> str:
    """The text after the host's colon (IPv6 hosts are in brackets), without parsing it."""
    host_port = netloc.rpartition("@")[2]
    if host_port.startswith("["):
        host_port = host_port.partition("]")[2]
    return host_port.partition(":")[2] if ":" in host_port else ""


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (and ``.env``), or raise ConfigError in one sentence."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        message = _describe(exc)
        hint = MAKE_A_KEY_HINT if f"{ENV_PREFIX}SECRET_KEY" in message else ""
        raise ConfigError(message, hint=hint) from None


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = [str(part) for part in error.get("loc", ())]
    message = str(error.get("msg", "is invalid"))
    message = message.removeprefix("Value error, ")
    if not location:
        return f"{message[:1].upper()}{message[1:]}."
    message = message[:1].lower() + message[1:]
    name = f"{ENV_PREFIX}{location[0].upper()}"
    value = error.get("input")
    hidden = "SECRET" in name or "DATABASE_URL" in name or isinstance(value, dict)
    shown = "" if hidden else f" (got {value!r})"
    if message.startswith(("is ", "uses ", "needs ", "names ", "has ")):
        return f"{name} {message}{shown}."
    return f"{name} is invalid: {message}{shown}."
