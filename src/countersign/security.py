"""Secrets: argon2 password hashes, opaque access tokens and API keys stored only as hashes.

An API key looks like ``cs_<prefix>_<secret>``. The prefix is public (it is shown in lists and
finds the key's row); the whole key is hashed with SHA-256 (it is long and random, so a slow
hash adds nothing) and compared in constant time. An access token is 32 random bytes
(URL-safe base64), found by its SHA-256 hash.

The CSRF token of a cookie login is an HMAC of its access token, so it cannot be made without
the token, and the server needs no state (or secret key) to check it.

``common_passwords.txt`` holds the 1,000 most common passwords of at least 10 characters, in
order, taken from the ``passwords`` frequency list of zxcvbn 4.5.0 (MIT licence), which was
compiled from leaked password sets. Shorter passwords are refused by length already.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from importlib import resources

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

API_KEY_MARK = "cs"
_PREFIX_BYTES = 6
_SECRET_BYTES = 32
_ACCESS_TOKEN_BYTES = 32
_CSRF_CONTEXT = b"countersign csrf token v1"

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    """An argon2id hash of the password."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True if the password matches the hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def dummy_password_hash() -> str:
    """A hash no password is known for: verifying against it costs what a real check costs.

    Logins for unknown users verify against it, so that they take as long as a wrong password.
    """
    return hash_password(secrets.token_urlsafe(32))


@functools.cache
def _common_passwords() -> frozenset[str]:
    text = resources.files("countersign").joinpath("common_passwords.txt").read_text("utf-8")
    return frozenset(line for line in text.splitlines() if line)


def is_common_password(password: str) -> bool:
    """True if the password (in any letter case) is one of the most common ones."""
    return password.lower() in _common_passwords()


def new_access_token() -> str:
    """A random opaque access token."""
    return secrets.token_urlsafe(_ACCESS_TOKEN_BYTES)


def csrf_token(access_token: str) -> str:
    """The CSRF token that goes with a cookie login's access token."""
    digest = hmac.new(access_token.encode(), _CSRF_CONTEXT, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def csrf_matches(presented: str, access_token: str) -> bool:
    """Constant-time check of a presented CSRF token against the one the access token makes."""
    return hmac.compare_digest(presented.encode(), csrf_token(access_token).encode())


@dataclass(frozen=True, slots=True)
class NewApiKey:
    """A freshly made key: ``key`` is shown once, only ``key_hash`` is stored."""

    key: str
    prefix: str
    key_hash: str


def new_api_key() -> NewApiKey:
    """Make a random API key."""
    prefix = secrets.token_hex(_PREFIX_BYTES)
    key = f"{API_KEY_MARK}_{prefix}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    return NewApiKey(key=key, prefix=prefix, key_hash=hash_token(key))


def api_key_prefix(key: str) -> str | None:
    """The public prefix of something shaped like an API key, or None."""
    mark, sep, rest = key.partition("_")
    prefix, sep2, secret = rest.partition("_")
    if mark != API_KEY_MARK or not sep or not sep2 or not secret:
        return None
    if len(prefix) != _PREFIX_BYTES * 2:
        return None
    return prefix


def hash_token(token: str) -> str:
    """The stored form of a high-entropy token or key."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    return hmac.compare_digest(hash_token(token), stored_hash)
