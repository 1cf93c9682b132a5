"""The one error tree: driver errors become these in ``db/``; ``api/errors.py`` maps them to HTTP.

::

    CountersignError
    ├── NotFound                  a resource is missing or not the caller's (404)
    ├── Conflict                  the request clashes with the current state (409)
    │   ├── AlreadyExists         a unique value is taken (409)
    │   ├── RunActive             the session already has an active run (409)
    │   └── AlreadyDecided        the approval was decided before (409)
    ├── InvalidInput              the request is well-formed but not acceptable (422)
    │   └── IdempotencyKeyReused  an Idempotency-Key came back with another body (422)
    ├── Unauthenticated           no or bad credentials (401)
    ├── Forbidden                 the request is understood but refused (403)
    │   └── CsrfFailed            a cookie-authenticated request without its CSRF token (403)
    ├── RateLimited               too many attempts; ``retry_after`` seconds to wait (429)
    ├── OAuthFailed               a sign-in through an OAuth/OIDC provider went wrong (400)
    ├── ProviderUnavailable       the sign-in provider cannot be reached (502)
    ├── Unavailable               the database is busy or unreachable right now (503)
    ├── LeaseLost                 an executor's write found the run no longer its own
    └── StartupError              the server cannot start; one sentence and a hint
        └── ConfigError           a setting is invalid (CLI exit code 2)
"""

from __future__ import annotations


class CountersignError(Exception):
    """Base of every error Countersign raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, detail: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class NotFound(CountersignError):
    """The resource does not exist, or belongs to someone else (the two look the same)."""

    code = "not_found"


class Conflict(CountersignError):
    """The request is valid but clashes with the current state."""

    code = "conflict"


class AlreadyExists(Conflict):
    """A value that must be unique is already taken."""

    code = "already_exists"


class RunActive(Conflict):
    """A session takes one run at a time; ``detail`` names the active run and its approval."""

    code = "run_active"


class AlreadyDecided(Conflict):
    """An approval can be decided once."""

    code = "already_decided"


class InvalidInput(CountersignError):
    """The request is well-formed but its content is not acceptable."""

    code = "invalid_input"


class IdempotencyKeyReused(InvalidInput):
    """The same Idempotency-Key was sent with a different request."""

    code = "idempotency_key_reused"


class Unauthenticated(CountersignError):
    """Credentials are missing, unknown, expired or revoked."""

    code = "unauthenticated"


class Forbidden(CountersignError):
    """The request is understood but refused (e.g. registration is closed)."""

    code = "forbidden"


class CsrfFailed(Forbidden):
    """A cookie-authenticated unsafe request did not carry the matching CSRF token."""

    code = "csrf_failed"


class RateLimited(CountersignError):
    """Too many attempts in a short time; ``retry_after`` is how many seconds to wait."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, detail={"retry_after": retry_after})
        self.retry_after = retry_after


class OAuthFailed(CountersignError):
    """A sign-in through a provider failed: state, code, ID token or profile were not good."""

    code = "oauth_failed"


class ProviderUnavailable(CountersignError):
    """The sign-in provider could not be reached (or did not answer in time)."""

    code = "provider_unavailable"


class Unavailable(CountersignError):
    """The database could not serve the request right now; retrying may work."""

    code = "unavailable"


class LeaseLost(CountersignError):
    """The run was taken over (or ended) while this executor worked on it; stop writing."""

    code = "lease_lost"


class StartupError(CountersignError):
    """Start-up cannot reach a working state; ``message`` is one sentence, ``hint`` what to do."""

    code = "startup_error"

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


class ConfigError(StartupError):
    """A setting is invalid; the message names the variable."""

    code = "config_error"
