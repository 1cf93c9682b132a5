"""Settings: the only reader of the environment (``COUNTERSIGN_*`` variables and ``.env``).

``load_settings()`` turns every invalid value into a ``ConfigError`` whose message is one
sentence naming the variable, so that the CLI can print it and exit with code 2.
"""

from __future__ import annotations

import ipaddress
import json
import re
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import limits
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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


class OAuthProviderKind(StrEnum):
    """What a sign-in provider speaks: OpenID Connect, or one of the presets."""

    OIDC = "oidc"
    """Any OpenID Connect provider, configured by its discovery URL."""
    GOOGLE = "google"
    """Google: OpenID Connect with Google's discovery URL."""
    GITHUB = "github"
    """GitHub: OAuth 2 and its user API (``/user``, ``/user/emails``)."""
    KAKAO = "kakao"
    """Kakao: OAuth 2 and its user API (``/v2/user/me``); may give no email."""


OPENID_KINDS = frozenset({OAuthProviderKind.OIDC, OAuthProviderKind.GOOGLE})
"""The kinds that sign in with OpenID Connect (an ID token, a nonce, discovery)."""

GOOGLE_DISCOVERY_URL = "https://accounts.google.com/.well-known/openid-configuration"
GITHUB_AUTHORIZE_URL = "https://github.com/login/oauth/authorize"
GITHUB_TOKEN_URL = "https://github.com/login/oauth/access_token"  # noqa: S105 - a URL
GITHUB_API_URL = "https://api.github.com"
KAKAO_AUTHORIZE_URL = "https://kauth.kakao.com/oauth/authorize"
KAKAO_TOKEN_URL = "https://kauth.kakao.com/oauth/token"  # noqa: S105 - a URL
KAKAO_API_URL = "https://kapi.kakao.com"

_PRESETS: dict[OAuthProviderKind, dict[str, Any]] = {
    OAuthProviderKind.OIDC: {
        "discovery_url": None,
        "scopes": ("openid", "email", "profile"),
        "token_auth_method": "client_secret_basic",
    },
    OAuthProviderKind.GOOGLE: {
        "discovery_url": GOOGLE_DISCOVERY_URL,
        "scopes": ("openid", "email", "profile"),
        "token_auth_method": "client_secret_basic",
    },
    OAuthProviderKind.GITHUB: {
        "authorize_url": GITHUB_AUTHORIZE_URL,
        "token_url": GITHUB_TOKEN_URL,
        "api_url": GITHUB_API_URL,
        "scopes": ("read:user", "user:email"),
        "token_auth_method": "client_secret_post",
    },
    OAuthProviderKind.KAKAO: {
        "authorize_url": KAKAO_AUTHORIZE_URL,
        "token_url": KAKAO_TOKEN_URL,
        "api_url": KAKAO_API_URL,
        # No scope: Kakao asks for the consent items chosen in the app's settings.
        "scopes": (),
        "token_auth_method": "client_secret_post",
    },
}
"""The fields each kind uses, with their defaults (None: the operator must give a value)."""

_PROVIDER_URLS = ("discovery_url", "authorize_url", "token_url", "api_url")
PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
"""A provider's name: it appears in URLs and identifies its accounts (``identities.provider``).
No ``_``: the OAuth client keeps a login in progress under ``_state_<name>_<state>``, so a name
with ``_`` could read another provider's login."""


class OAuthProvider(BaseModel):
    """One sign-in provider of ``COUNTERSIGN_OAUTH_PROVIDERS``; its kind's preset fills the rest.

    Fields a kind does not use are refused (an ``oidc`` provider's endpoints come from its
    discovery document, so it takes no ``authorize_url``), so that a typo cannot pass silently.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: OAuthProviderKind
    client_id: str = Field(min_length=1, max_length=512)
    client_secret: SecretStr | None = None
    """Required, except for Kakao apps that turned client secrets off."""
    discovery_url: str | None = None
    """OpenID Connect kinds: the ``/.well-known/openid-configuration`` URL."""
    authorize_url: str | None = None
    """OAuth 2 kinds: where the browser is sent to sign in."""
    token_url: str | None = None
    """OAuth 2 kinds: where the authorization code is exchanged for a token."""
    api_url: str | None = None
    """OAuth 2 kinds: the base URL of the provider's user API."""
    scopes: tuple[str, ...] = ()
    """The scopes asked for; the kind's default when left out."""
    token_auth_method: Literal["client_secret_basic", "client_secret_post", "none"] = (
        "client_secret_basic"  # noqa: S105 - a method's name, not a secret
    )
    """How the client authenticates at the token endpoint; the kind's default when left out."""

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("kind") not in set(OAuthProviderKind):
            return data  # field validation says what is wrong
        kind = OAuthProviderKind(data["kind"])
        preset = _PRESETS[kind]
        for name in _PROVIDER_URLS:
            if data.get(name) is not None and name not in preset:
                used = (
                    "the endpoints come from discovery_url"
                    if kind in OPENID_KINDS
                    else "it uses authorize_url, token_url and api_url"
                )
                raise ValueError(f"{name} is not used by {kind.value} providers ({used})")
        filled = dict(data)
        for name, value in preset.items():
            if filled.get(name) is None:
                filled[name] = value
        if kind is OAuthProviderKind.KAKAO and filled.get("client_secret") is None:
            filled["token_auth_method"] = "none"  # noqa: S105 - a method's name
        return filled

    @model_validator(mode="after")
    def _check(self) -> OAuthProvider:
        if self.kind is OAuthProviderKind.OIDC and self.discovery_url is None:
            raise ValueError(
                "needs a discovery_url (the provider's /.well-known/openid-configuration URL)"
            )
        secret = self.client_secret
        if (secret is None or not secret.get_secret_value().strip()) and (
            self.kind is not OAuthProviderKind.KAKAO
        ):
            raise ValueError(f"needs a client_secret ({self.kind.value} providers need one)")
        for name in _PROVIDER_URLS:
            url = getattr(self, name)
            if url is not None and not _is_http_url(url):
                raise ValueError(f"{name} is not an http(s) URL")
        if self.kind in OPENID_KINDS and "openid" not in self.scopes:
            raise ValueError("has scopes without openid, which OpenID Connect needs")
        if any(not scope or any(char.isspace() for char in scope) for scope in self.scopes):
            raise ValueError("has an empty scope or one with spaces (give a list of scopes)")
        return self

    @property
    def is_openid(self) -> bool:
        """True for OpenID Connect kinds (ID token, nonce, discovery)."""
        return self.kind in OPENID_KINDS

    def urls(self) -> dict[str, str]:
        """The provider's configured URLs, by field name."""
        return {name: url for name in _PROVIDER_URLS if (url := getattr(self, name)) is not None}


_AGE = re.compile(r"(\d+)\s*([dhms])")
_AGE_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m`` or ``3600s`` as a duration; ValueError in words otherwise."""
    found = _AGE.fullmatch(text.strip().lower())
    if found is None:
        raise ValueError(
            "is not an age; use a whole number of days, hours, minutes or seconds: "
            "30d, 12h, 90m, 3600s"
        )
    amount, unit = int(found.group(1)), found.group(2)
    try:
        return timedelta(**{_AGE_UNITS[unit]: amount})
    except OverflowError:
        raise ValueError("is too long an age") from None


MCP_SERVER_NAME = re.compile(r"^[A-Za-z0-9-]{1,32}$")


class McpServerSettings(BaseModel):
    """How to reach one MCP server: a command (stdio) or a URL (streamable HTTP)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str | None = Field(default=None, min_length=1)
    """The program to start (stdio)."""
    args: tuple[str, ...] = ()
    env: dict[str, SecretStr] = Field(default_factory=dict)
    """The program's whole environment (the server's own is not passed on)."""
    url: str | None = None
    """The server's streamable HTTP endpoint, e.g. ``https://mcp.example.com/mcp``."""
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    """Sent with every request, e.g. ``{"Authorization": "Bearer …"}``; never logged."""
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    """How long one tool call may take."""

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSettings:
        if (self.command is None) == (self.url is None):
            raise ValueError("needs either a command (stdio) or a url (streamable HTTP)")
        if self.url is not None and not _is_http_url(self.url):
            raise ValueError("has a url that is not an http(s) URL")
        if self.url is not None and (self.args or self.env):
            raise ValueError("has args or env, which only a command uses")
        if self.command is not None and self.headers:
            raise ValueError("has headers, which only a url uses")
        return self


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
    anthropic_api_key: SecretStr | None = None
    """Key for ``anthropic:MODEL`` models (needs the ``anthropic`` extra)."""
    anthropic_base_url: str | None = None
    """Another address of the Anthropic Messages API (a proxy); Anthropic's own when unset."""
    google_api_key: SecretStr | None = None
    """Key for ``google:MODEL`` models, the Gemini API (needs the ``google`` extra)."""
    google_base_url: str | None = None
    """Another address of the Gemini API (a proxy); Google's own when unset."""
    model_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    """How long one model request may take before the run fails."""

    workspace_root: Path = Path("workspaces")
    """Each session's tools work in ``<workspace_root>/<session id>``."""
    shell_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    shell_interpreter: bool = False
    """Run ``shell`` commands through ``/bin/sh -c`` (pipes, globs) instead of plain argv."""
    sandbox: Literal["auto", "bwrap", "none"] = "auto"
    """``bwrap``: run ``shell`` commands under bubblewrap (refused at start-up when it cannot);
    ``none``: directly; ``auto``: under bubblewrap in ``prod`` when it works, else directly."""
    sandbox_memory_mb: int = Field(default=1024, ge=16, le=1_048_576)
    """Under the sandbox: the address space each process of a command may use."""
    sandbox_cpu_seconds: int = Field(default=60, ge=1, le=86_400)
    """Under the sandbox: the CPU time each process of a command may use."""
    tool_output_max_chars: int = Field(default=16_000, ge=100, le=10_000_000)

    executor_concurrency: int = Field(default=256, ge=1, le=10_000)
    """Runs one server process carries out at the same time (a run waiting on its model
    holds one; their leases are renewed together, one statement per round)."""
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=3600)
    """On SIGTERM: how long runs in progress may go on (a running tool finishes, a reply
    ends) before they are handed back to be taken over elsewhere or at the next start."""
    run_lease_seconds: float = Field(default=10.0, ge=1, le=600)
    """How long a run stays claimed without a heartbeat before another process may take it."""
    run_max_attempts: int = Field(default=5, ge=1, le=100)
    """A run is tried at most this many times (crashes, lost leases), then fails with a reason."""
    executor_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    """How often the executor looks for work it was not told about (runs of dead processes)."""
    event_flush_seconds: float = Field(default=0.05, ge=0, le=10)
    """Text deltas are committed in batches at most this far apart (a batch per 64 deltas)."""
    sse_heartbeat_seconds: float = Field(default=15.0, gt=0, le=300)
    """An event stream with nothing to send says so with a comment line this often."""
    feed_recheck_seconds: float = Field(default=30.0, gt=0, le=3600)
    """An open ``/me/events`` feed checks its credential again this often, and ends once the
    credential is no longer valid (logged out, expired, key deleted, account disabled)."""

    public_url: str | None = None
    """The server's address as browsers reach it (``https://chat.example.com``); OAuth redirect
    URIs are built from it. Unset: from each request's own URL."""
    oauth_providers: Annotated[dict[str, OAuthProvider], NoDecode] = Field(default_factory=dict)
    """Sign-in providers by name, as a JSON object:
    ``{"google": {"kind": "google", "client_id": "…", "client_secret": "…"}}``."""
    prune_older_than: Annotated[timedelta | None, NoDecode] = None
    """When set (e.g. ``30d``), the server removes the text deltas of runs that ended longer
    ago than this, once at start and then daily (``countersign db prune``)."""
    mcp_servers: Annotated[dict[str, McpServerSettings], NoDecode] = Field(default_factory=dict)
    """MCP servers whose tools agents may be given, as a JSON object by name:
    ``{"files": {"command": "…", "args": […], "env": {…}}, "web": {"url": "https://…/mcp",
    "headers": {…}}}``; a server's tool TOOL is named ``NAME_TOOL``."""
    plugins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Tool plugins to load (entry points of the group ``countersign.tools``), comma-separated;
    an installed plugin that is not named here is not loaded."""

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

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if not _is_http_url(value) or parts.query or parts.fragment:
            raise ValueError(
                "is not the server's base URL; use e.g. https://chat.example.com "
                "(no query or fragment)"
            )
        return value

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_plugins(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        if isinstance(value, list):
            return list(dict.fromkeys(value))  # a name given twice is loaded once
        return value

    @field_validator("prune_older_than", mode="before")
    @classmethod
    def _parse_prune_age(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_age(value) if value.strip() else None
        return value

    @field_validator("mcp_servers", mode="before")
    @classmethod
    def _parse_mcp_servers(cls, value: Any) -> Any:
        value = _json_object(value, what="server names")
        for name in value:
            if not isinstance(name, str) or MCP_SERVER_NAME.fullmatch(name) is None:
                raise ValueError(
                    f"has the server name {name!r}; a name is 1 to 32 letters, digits or -"
                )
        return value

    @field_validator("oauth_providers", mode="before")
    @classmethod
    def _parse_oauth_providers(cls, value: Any) -> Any:
        return _json_object(value, what="provider names")

    @field_validator("oauth_providers")
    @classmethod
    def _check_provider_names(cls, value: dict[str, OAuthProvider]) -> dict[str, OAuthProvider]:
        for name in value:
            if PROVIDER_NAME.fullmatch(name) is None:
                raise ValueError(
                    f"has the provider name {name!r}; a name is 1 to 32 lower-case letters, "
                    "digits or -, starting with a letter or digit"
                )
        return value

    @model_validator(mode="after")
    def _prod_needs_https_providers(self) -> Settings:
        if self.profile is not Profile.PROD:
            return self
        for name, provider in self.oauth_providers.items():
            for field, url in provider.urls().items():
                if urlsplit(url).scheme != "https" and not is_loopback_url(url):
                    raise ValueError(
                        f"{ENV_PREFIX}OAUTH_PROVIDERS has an http {field} for {name!r}, and "
                        "the prod profile needs https (except on this machine)"
                    )
        return self

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


def _json_object(value: Any, *, what: str) -> dict[Any, Any]:
    """A setting given as a JSON object (a string from the environment, or already a dict);
    an empty string is an empty object. ValueError in words otherwise."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except ValueError as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "decode error"
            raise ValueError(f"is not valid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise ValueError(f"is not a JSON object that maps {what} to their settings")
    return value


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def is_loopback_url(url: str) -> bool:
    """Whether a URL points at this machine (plain http is acceptable there, even in prod)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    # Provider settings carry client secrets: never echo them, nor any part of them.
    # MCP servers' headers, env and args carry tokens the same way; keys are keys.
    hidden = (
        "SECRET" in name
        or "DATABASE_URL" in name
        or "OAUTH" in name
        or "MCP_SERVERS" in name
        or "API_KEY" in name
        or isinstance(value, dict)
    )
    shown = "" if hidden else f" (got {value!r})"
    if len(location) > 1:
        # A value inside a structured setting, such as one provider's field.
        name = f"{name} at {'.'.join(location[1:])}"
    if message.startswith(("is ", "uses ", "needs ", "names ", "has ")):
        return f"{name} {message}{shown}."
    return f"{name} is invalid: {message}{shown}."
