"""Secrets: argon2 password hashes, and opaque API keys that are stored only as hashes.

An API key looks like ``cs_<prefix>_<secret>``. The prefix is public (it is shown in lists and
finds the key's row); the whole key is hashed with SHA-256 (it is long and random, so a slow
hash adds nothing) and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

API_KEY_MARK = "cs"
_PREFIX_BYTES = 6
_SECRET_BYTES = 32

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
