"""A real local OAuth 2 / OpenID Connect provider for tests, served by uvicorn on 127.0.0.1.

It speaks three dialects at once, on one port:

- OpenID Connect: ``/.well-known/openid-configuration``, ``/authorize``, ``/token``,
  ``/userinfo`` and ``/jwks``; ID tokens are RS256 JWTs signed with a key it generates;
- GitHub-like: ``/login/oauth/authorize``, ``/login/oauth/access_token``, ``/user``,
  ``/user/emails`` (token errors come back as 200 with an ``error`` field, as GitHub does);
- Kakao-like: ``/oauth/authorize``, ``/oauth/token``, ``/v2/user/me``.

Authorization consents at once: it remembers what was asked (client id, redirect URI, scope,
nonce, PKCE challenge) and redirects straight back to the redirect URI with a one-time code and
the state. The token endpoints check the client's credentials, the redirect URI and the PKCE
verifier, and answer ``invalid_grant`` to a code that was used before::

    with FakeIdP() as idp:
        idp.user = FakeUser(email="ann@example.test")
        idp.id_token_fault = "expired"          # the next ID tokens are expired
        ...
        assert idp.token_requests[0].form["code_verifier"]

Knobs (all take effect from the next request on): ``user``, ``issuer``, ``authorize_error``,
``token_error``, ``id_token_fault`` (``expired``, ``wrong_key``, ``wrong_nonce``,
``wrong_audience``, ``wrong_issuer``) and ``api_status`` (userinfo, ``/user``, ``/user/emails``
and ``/v2/user/me`` answer this status instead of 200).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import random
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

import uvicorn
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

START_TIMEOUT = 10.0
"""Seconds the server may take to start listening."""
STOP_TIMEOUT = 10.0
"""Seconds ``stop()`` waits for the server thread."""
KEY_ID = "fake-idp-key-1"

Dialect = Literal["oidc", "github", "kakao"]
IdTokenFault = Literal["expired", "wrong_key", "wrong_nonce", "wrong_audience", "wrong_issuer"]


@functools.cache
def signing_keys() -> tuple[RSAKey, RSAKey]:
    """The provider's key and an impostor's key with the same ``kid`` (made once per run)."""
    params = {"kid": KEY_ID, "use": "sig", "alg": "RS256"}
    return (
        RSAKey.generate_key(2048, parameters=params, private=True),
        RSAKey.generate_key(2048, parameters=params, private=True),
    )


def s256(verifier: str) -> str:
    """The PKCE S256 challenge of a code verifier."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass
class FakeUser:
    """The person who signs in at the provider."""

    subject: str = field(default_factory=lambda: f"sub-{uuid.uuid4().hex}")
    """The OpenID Connect ``sub``."""
    number: int = field(default_factory=lambda: random.randint(10**8, 10**12))
    """The numeric user id of the GitHub and Kakao dialects."""
    email: str | None = None
    email_verified: bool = True
    github_emails: list[dict[str, Any]] | None = None
    """``/user/emails``; by default the email (if any) as the primary one."""

    def claims(self) -> dict[str, Any]:
        """Userinfo claims (and the ID token's, besides the registered ones)."""
        claims: dict[str, Any] = {"sub": self.subject, "name": "Test Person"}
        if self.email is not None:
            claims.update(email=self.email, email_verified=self.email_verified)
        return claims

    def github_user(self) -> dict[str, Any]:
        return {"id": self.number, "login": f"user{self.number}", "email": None}

    def github_email_list(self) -> list[dict[str, Any]]:
        if self.github_emails is not None:
            return self.github_emails
        if self.email is None:
            return []
        return [
            {
                "email": self.email,
                "primary": True,
                "verified": self.email_verified,
                "visibility": "private",
            }
        ]

    def kakao_me(self) -> dict[str, Any]:
        account: dict[str, Any] = {"has_email": self.email is not None}
        if self.email is None:
            account["email_needs_agreement"] = True
        else:
            account.update(
                email=self.email,
                email_needs_agreement=False,
                is_email_valid=True,
                is_email_verified=self.email_verified,
            )
        return {"id": self.number, "connected_at": "2024-01-01T00:00:00Z", "kakao_account": account}


@dataclass(frozen=True)
class Grant:
    """What an authorization request asked for; a code stands for it."""

    dialect: Dialect
    client_id: str
    redirect_uri: str
    scope: str
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    user: FakeUser


@dataclass(frozen=True)
class TokenRequest:
    """One request to a token endpoint."""

    path: str
    form: dict[str, str]
    basic_auth: bool
    """True when the client authenticated with HTTP Basic (client_secret_basic)."""


class FakeIdP:
    """The fake provider: a context manager that serves it on 127.0.0.1 and stops it on exit."""

    def __init__(self) -> None:
        self.client_id = "countersign-test"
        self.client_secret = f"fake-idp-secret-{secrets.token_hex(8)}"
        self.user = FakeUser()
        self.issuer: str | None = None
        """The ``iss`` of discovery and ID tokens; None: the base URL."""
        self.authorize_error: str | None = None
        self.token_error: str | None = None
        self.id_token_fault: IdTokenFault | None = None
        self.api_status = 200
        self.discovery_overrides: dict[str, Any] = {}
        """Fields of the discovery document to answer differently (a misconfigured provider)."""
        self.jwks_override: Any = None
        """When set, what ``/jwks`` answers instead of the key set (a broken provider)."""
        self.authorize_requests: list[dict[str, str]] = []
        self.token_requests: list[TokenRequest] = []
        self.issued: list[str] = []
        """Every code, access token and ID token handed out (none may appear in a log)."""
        self._grants: dict[str, Grant] = {}
        self._used_codes: set[str] = set()
        self._tokens: dict[str, Grant] = {}
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    # --- addresses -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        if not self.port:
            raise RuntimeError("the fake IdP is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def discovery_url(self) -> str:
        return f"{self.base_url}/.well-known/openid-configuration"

    def provider(self, kind: str, **overrides: Any) -> dict[str, Any]:
        """A ``COUNTERSIGN_OAUTH_PROVIDERS`` entry of this kind that points at this server."""
        entry: dict[str, Any] = {
            "kind": kind,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
        }
        if kind in ("oidc", "google"):
            entry["discovery_url"] = self.discovery_url
        elif kind == "github":
            entry.update(
                authorize_url=f"{self.base_url}/login/oauth/authorize",
                token_url=f"{self.base_url}/login/oauth/access_token",
                api_url=self.base_url,
            )
        elif kind == "kakao":
            entry.update(
                authorize_url=f"{self.base_url}/oauth/authorize",
                token_url=f"{self.base_url}/oauth/token",
                api_url=self.base_url,
            )
        entry.update(overrides)
        return entry

    # --- life ------------------------------------------------------------------------------

    def start(self) -> FakeIdP:
        """Serve on a free port of 127.0.0.1 (bound before uvicorn starts: no race)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self._app(),
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-idp", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the fake IdP did not start within {START_TIMEOUT} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving and wait (bounded) for the server thread."""
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():  # pragma: no cover - would mean uvicorn ignored should_exit
                raise RuntimeError(f"the fake IdP did not stop within {STOP_TIMEOUT} s")
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> FakeIdP:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the ASGI app ----------------------------------------------------------------------

    def _app(self) -> Starlette:
        def authorize(dialect: Dialect) -> Any:
            async def endpoint(request: Request) -> Response:
                return self._authorize(request, dialect)

            return endpoint

        def token(dialect: Dialect) -> Any:
            async def endpoint(request: Request) -> Response:
                return await self._token(request, dialect)

            return endpoint

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self._discovery),
                Route("/jwks", self._jwks),
                Route("/authorize", authorize("oidc")),
                Route("/token", token("oidc"), methods=["POST"]),
                Route("/userinfo", self._userinfo),
                Route("/login/oauth/authorize", authorize("github")),
                Route("/login/oauth/access_token", token("github"), methods=["POST"]),
                Route("/user", self._github_user),
                Route("/user/emails", self._github_emails),
                Route("/oauth/authorize", authorize("kakao")),
                Route("/oauth/token", token("kakao"), methods=["POST"]),
                Route("/v2/user/me", self._kakao_me),
            ]
        )

    def _issuer(self) -> str:
        return self.issuer or self.base_url

    async def _discovery(self, request: Request) -> Response:
        base = self.base_url
        return JSONResponse(
            {
                "issuer": self._issuer(),
                "authorization_endpoint": f"{base}/authorize",
                "token_endpoint": f"{base}/token",
                "userinfo_endpoint": f"{base}/userinfo",
                "jwks_uri": f"{base}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                ],
                **self.discovery_overrides,
            }
        )

    async def _jwks(self, request: Request) -> Response:
        if self.jwks_override is not None:
            return JSONResponse(self.jwks_override)
        key, _impostor = signing_keys()
        return JSONResponse({"keys": [key.as_dict(private=False)]})

    def _authorize(self, request: Request, dialect: Dialect) -> Response:
        params = dict(request.query_params)
        with self._lock:
            self.authorize_requests.append(params)
            error = self.authorize_error
            user = replace(self.user)
        redirect_uri = params.get("redirect_uri", "")
        if params.get("client_id") != self.client_id or not redirect_uri:
            return PlainTextResponse("unknown client or no redirect_uri", status_code=400)
        if params.get("response_type") != "code":
            return PlainTextResponse("only response_type=code", status_code=400)
        back: dict[str, str] = {}
        if error is not None:
            back["error"] = error
        else:
            code = secrets.token_urlsafe(24)
            grant = Grant(
                dialect=dialect,
                client_id=params["client_id"],
                redirect_uri=redirect_uri,
                scope=params.get("scope", ""),
                nonce=params.get("nonce"),
                code_challenge=params.get("code_challenge"),
                code_challenge_method=params.get("code_challenge_method"),
                user=user,
            )
            with self._lock:
                self._grants[code] = grant
                self.issued.append(code)
            back["code"] = code
        if "state" in params:
            back["state"] = params["state"]
        separator = "&" if "?" in redirect_uri else "?"
        return RedirectResponse(f"{redirect_uri}{separator}{urlencode(back)}", status_code=302)

    async def _token(self, request: Request, dialect: Dialect) -> Response:
        # Parsed by hand: Starlette's form parser needs python-multipart.
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        authorization = request.headers.get("authorization", "")
        basic = authorization.lower().startswith("basic ")
        with self._lock:
            self.token_requests.append(TokenRequest(request.url.path, form, basic))
            forced_error = self.token_error
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        if basic:
            decoded = base64.b64decode(authorization[6:]).decode()
            client_id, _, client_secret = decoded.partition(":")
        if client_id != self.client_id or client_secret != self.client_secret:
            return self._token_error(dialect, "invalid_client", "bad client credentials", 401)
        if forced_error is not None:
            return self._token_error(dialect, forced_error, "the token endpoint was told to fail")
        if form.get("grant_type") != "authorization_code":
            return self._token_error(dialect, "unsupported_grant_type", "authorization_code only")
        code = form.get("code", "")
        with self._lock:
            grant = self._grants.get(code)
            replayed = code in self._used_codes
            self._used_codes.add(code)  # one use, even when the request fails below
        if grant is None or replayed:
            return self._token_error(dialect, "invalid_grant", "unknown or used code")
        if form.get("redirect_uri") != grant.redirect_uri:
            return self._token_error(dialect, "invalid_grant", "redirect_uri does not match")
        if grant.code_challenge is not None:
            verifier = form.get("code_verifier", "")
            if grant.code_challenge_method != "S256" or s256(verifier) != grant.code_challenge:
                return self._token_error(dialect, "invalid_grant", "PKCE verification failed")
        access_token = secrets.token_urlsafe(32)
        body: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "bearer",
            "scope": grant.scope,
        }
        if dialect != "github":
            body["expires_in"] = 3600
        if dialect == "oidc" and "openid" in grant.scope.split():
            body["id_token"] = self._id_token(grant)
        with self._lock:
            self._tokens[access_token] = grant
            self.issued.append(access_token)
            if "id_token" in body:
                self.issued.append(body["id_token"])
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    def _token_error(
        self, dialect: Dialect, error: str, description: str, status: int = 400
    ) -> Response:
        body = {"error": error, "error_description": description}
        if dialect == "github":
            return JSONResponse(body)  # GitHub answers 200 with an error field
        return JSONResponse(body, status_code=status)

    def _id_token(self, grant: Grant) -> str:
        key, impostor = signing_keys()
        fault = self.id_token_fault
        now = int(time.time())
        claims: dict[str, Any] = {
            **grant.user.claims(),
            "iss": self._issuer(),
            "aud": grant.client_id,
            "iat": now,
            "exp": now + 300,
        }
        if grant.nonce is not None:
            claims["nonce"] = grant.nonce
        if fault == "expired":
            claims.update(iat=now - 7200, exp=now - 3600)
        elif fault == "wrong_nonce":
            claims["nonce"] = "not-the-nonce-of-this-login"
        elif fault == "wrong_audience":
            claims["aud"] = "some-other-client"
        elif fault == "wrong_issuer":
            claims["iss"] = "https://impostor.example"
        signer = impostor if fault == "wrong_key" else key
        return jwt.encode({"alg": "RS256", "kid": KEY_ID}, claims, signer)

    def _bearer_grant(self, request: Request) -> Grant | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        with self._lock:
            return self._tokens.get(token)

    def _api(self, request: Request, answer: Any) -> Response:
        grant = self._bearer_grant(request)
        if grant is None:
            return JSONResponse({"message": "Bad credentials"}, status_code=401)
        if self.api_status != 200:
            return JSONResponse(
                {"message": "the API was told to fail"}, status_code=self.api_status
            )
        return JSONResponse(answer(grant.user))

    async def _userinfo(self, request: Request) -> Response:
        return self._api(request, FakeUser.claims)

    async def _github_user(self, request: Request) -> Response:
        return self._api(request, FakeUser.github_user)

    async def _github_emails(self, request: Request) -> Response:
        return self._api(request, FakeUser.github_email_list)

    async def _kakao_me(self, request: Request) -> Response:
        return self._api(request, FakeUser.kakao_me)
