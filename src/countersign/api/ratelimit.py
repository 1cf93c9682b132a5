"""Rate limits on logins and registrations: moving windows counted in this process's memory.

Login attempts (with a password, or a provider's callback) count per client address; failed
logins count per account email, so that guessing one account's password from many addresses
is slow too. Registrations count per client address and per email. Over a limit the answer
is 429 ``rate_limited`` with ``Retry-After``. Each server process counts on its own (the
database stays out of an attack's hot path), so several processes allow that many times the
configured rate.
"""

from __future__ import annotations

import math
import time

from fastapi import Request
from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from countersign.config import Settings
from countersign.domain.errors import RateLimited


class RateLimits:
    """The application's login and registration limits (one instance per application)."""

    def __init__(self, settings: Settings) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._login = parse_many(settings.login_rate_limit)
        self._login_failures = parse_many(settings.login_failure_rate_limit)
        self._register = parse_many(settings.register_rate_limit)

    async def login_attempt(self, *, client: str, email: str) -> None:
        """Count a login attempt; RateLimited if the client or the email is over its limit."""
        # The email's failures are only looked at here: a correct password costs nothing.
        await self._check(self._login_failures, "login-failures", _email_key(email))
        await self._hit(self._login, "login", client)

    async def provider_login_attempt(self, *, client: str) -> None:
        """Count a login through an OAuth/OIDC provider (its callback) against the client's
        login budget; RateLimited if the client is over it."""
        await self._hit(self._login, "login", client)

    async def login_failed(self, *, email: str) -> None:
        """Count a failed login against the email it tried."""
        for item in self._login_failures:
            await self._limiter.hit(item, "login-failures", _email_key(email))

    async def registration_attempt(self, *, client: str, email: str) -> None:
        """Count a registration attempt; RateLimited if the client or the email is over."""
        await self._hit(self._register, "register", client)
        await self._hit(self._register, "register-email", _email_key(email))

    async def _hit(self, items: list[RateLimitItem], namespace: str, key: str) -> None:
        for item in items:
            if not await self._limiter.hit(item, namespace, key):
                raise await self._refusal(item, namespace, key)

    async def _check(self, items: list[RateLimitItem], namespace: str, key: str) -> None:
        for item in items:
            if not await self._limiter.test(item, namespace, key):
                raise await self._refusal(item, namespace, key)

    async def _refusal(self, item: RateLimitItem, namespace: str, key: str) -> RateLimited:
        stats = await self._limiter.get_window_stats(item, namespace, key)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        return RateLimited(
            f"too many attempts; try again in {retry_after} seconds", retry_after=retry_after
        )


def _email_key(email: str) -> str:
    # Not validated: a malformed email is counted like any other string that was tried.
    return email.strip().lower()[:320]


def client_address(request: Request) -> str:
    """The client's address: the peer, or what a trusted proxy said (uvicorn --proxy-headers)."""
    return request.client.host if request.client is not None else "unknown"


def get_rate_limits(request: Request) -> RateLimits:
    """The application's RateLimits."""
    limits: RateLimits = request.app.state.rate_limits
    return limits
