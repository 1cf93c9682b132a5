"""Signing in with OAuth 2 and OpenID Connect providers, through Authlib's Starlette client.

``OAuthProviders`` holds one Authlib client per provider of ``COUNTERSIGN_OAUTH_PROVIDERS``.
A login has two legs:

1. ``begin``: the provider's authorization URL, with a fresh ``state``, a ``nonce`` (OpenID
   Connect) and a PKCE ``code_challenge`` (S256). What the second leg needs (state, nonce,
   code verifier, redirect URI, where to go afterwards) stays in this browser's OAuth session:
   a cookie signed with itsdangerous, ``HttpOnly``, ``SameSite=Lax``, ``Secure`` in ``prod``,
   sent only to the OAuth routes, and good for 15 minutes.
2. ``finish``: the callback. The ``state`` must be one this browser started (each one is used
   once); the code is exchanged together with the PKCE verifier; an ID token is verified
   (signature against the provider's JWKS, issuer, audience, expiry, nonce); and the profile is
   read: OpenID Connect userinfo, GitHub ``/user`` and ``/user/emails``, Kakao
   ``/v2/user/me``.

Whatever a provider gets wrong is ``OAuthFailed`` (400); a provider that cannot be reached is
``ProviderUnavailable`` (502). Codes, tokens and secrets are never put in a message or a log.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx2
from authlib.integrations.base_client import OAuthError
from authlib.integrations.starlette_client import StarletteIntegration, StarletteOAuth2App
from joserfc.errors import (
    BadSignatureError,
    ClaimError,
    ExpiredTokenError,
    InvalidKeyIdError,
    JoseError,
)
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from countersign.api.routes import API_PREFIX
from countersign.config import (
    OAuthProvider,
    OAuthProviderKind,
    Profile,
    Settings,
    is_loopback_url,
)
from countersign.domain.errors import InvalidInput, NotFound, OAuthFailed, ProviderUnavailable
from countersign.services.identities import ProviderProfile

OAUTH_PREFIX = f"{API_PREFIX}/auth/oauth"
SESSION_COOKIE = "countersign_oauth"
SESSION_MAX_AGE = 15 * 60
"""Seconds a browser has to come back from the provider."""
HTTP_TIMEOUT = 10.0
"""Seconds one request to a provider may take."""
ID_TOKEN_LEEWAY = 60
"""Seconds of clock difference allowed when checking an ID token's times."""
NEXT_MAX_LENGTH = 2048

GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
"""Google's ID tokens carry either form (its documentation says so)."""
_SIGNING_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""ID tokens must be signed with a provider's published key: no ``none``, no shared secret."""
_METADATA_KEYS = frozenset(
    {
        "issuer",
        "authorization_endpoint",
        "token_endpoint",
        "userinfo_endpoint",
        "jwks_uri",
        "id_token_signing_alg_values_supported",
        "_loaded_at",
    }
)
"""What is kept of a discovery document. Authlib hands the rest to its HTTP client as options,
so a document could otherwise change how (or through what proxy) the client connects."""
_PLAIN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class OAuthSessionMiddleware:
    """Starlette's signed-cookie session (where Authlib keeps a login's state), for the OAuth
    routes only: other routes neither read nor set the cookie."""

    def __init__(self, app: ASGIApp, *, secret_key: str, https_only: bool) -> None:
        self.app = app
        self.session = SessionMiddleware(
            app,
            secret_key=secret_key,
            session_cookie=SESSION_COOKIE,
            max_age=SESSION_MAX_AGE,
            path=OAUTH_PREFIX,
            same_site="lax",  # the callback is a top-level GET from the provider's site
            https_only=https_only,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith(f"{OAUTH_PREFIX}/"):
            await self.session(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def session_secret(settings: Settings) -> str:
    """The OAuth session's signing key: derived from ``COUNTERSIGN_SECRET_KEY``, or (without
    one, in ``dev``) random for this process, so logins under way do not survive a restart."""
    if settings.secret_key is None or not settings.secret_key.get_secret_value().strip():
        return secrets.token_urlsafe(32)
    # A key of its own, so that this signature never means anything anywhere else.
    material = b"countersign oauth session\x00" + settings.secret_key.get_secret_value().encode()
    return hashlib.sha256(material).hexdigest()


def session_https_only(settings: Settings) -> bool:
    """The OAuth session cookie is ``Secure`` in ``prod`` (as the login cookies are)."""
    return settings.profile is Profile.PROD


def safe_next_path(value: str | None) -> str:
    """Where to go after a login: a path on this server; InvalidInput for anything else.

    ``//host``, ``/\\host``, ``https://host`` and the like would send the browser to another
    site (an open redirect), so they are refused.
    """
    if value is None or value == "":
        return "/"
    parts = urlsplit(value)
    if (
        len(value) > NEXT_MAX_LENGTH
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or parts.scheme
        or parts.netloc
        or any(ord(char) < 0x20 or ord(char) == 0x7F for char in value)
    ):
        raise InvalidInput(
            "next must be a path on this server, such as /sessions (not another site)"
        )
    return value


class OAuthProviders:
    """The configured sign-in providers, by name."""

    def __init__(self, providers: Mapping[str, OAuthProvider], *, require_https: bool) -> None:
        self._clients = {
            name: ProviderClient(name, config, require_https=require_https)
            for name, config in providers.items()
        }

    def get(self, name: str) -> ProviderClient:
        """The provider with this name; NotFound when none is configured."""
        client = self._clients.get(name)
        if client is None:
            raise NotFound(f"no sign-in provider named {name[:64]!r} is configured")
        return client


class ProviderClient:
    """One provider: its settings and its Authlib client (which caches discovery and keys)."""

    def __init__(self, name: str, config: OAuthProvider, *, require_https: bool) -> None:
        self.name = name
        self.config = config
        self.require_https = require_https
        """The prod profile: the endpoints a discovery document names must be https too."""
        client_kwargs: dict[str, Any] = {
            "code_challenge_method": "S256",
            "token_endpoint_auth_method": config.token_auth_method,
            "timeout": HTTP_TIMEOUT,
        }
        if config.scopes:
            client_kwargs["scope"] = " ".join(config.scopes)
        secret = config.client_secret
        self._app = StarletteOAuth2App(
            StarletteIntegration(name),
            name=name,
            client_id=config.client_id,
            client_secret=None if secret is None else secret.get_secret_value(),
            server_metadata_url=config.discovery_url if config.is_openid else None,
            authorize_url=config.authorize_url,
            access_token_url=config.token_url,
            client_kwargs=client_kwargs,
        )
        self._metadata_checked = False

    @property
    def label(self) -> str:
        """How messages name the provider."""
        return f"the sign-in provider {self.name!r}"

    async def begin(self, request: Request, *, redirect_uri: str, next_path: str) -> str:
        """The provider's authorization URL; the login's secrets go in the OAuth session."""
        await self._metadata()
        created = await self._app.create_authorization_url(redirect_uri)
        data: dict[str, str] = {
            "redirect_uri": redirect_uri,
            "code_verifier": str(created["code_verifier"]),
            "next": next_path,
        }
        if "nonce" in created:
            data["nonce"] = str(created["nonce"])
        await self._app.framework.set_state_data(request.session, created["state"], data)
        return str(created["url"])

    async def finish(self, request: Request) -> tuple[ProviderProfile, str]:
        """Check the callback, exchange its code and read the profile; and where to go next."""
        params = request.query_params
        state = params.get("state")
        data = None
        if state:
            data = await self._app.framework.get_state_data(request.session, state)
            # Used once, whatever happens next.
            await self._app.framework.clear_state_data(request.session, state)
        error = params.get("error")
        if error:
            raise OAuthFailed(f"{self.label} did not sign you in ({_plain(error)})")
        if not isinstance(data, dict):
            raise OAuthFailed(
                "the login's state is missing, used already, expired or from another browser; "
                "start the login again"
            )
        code = params.get("code")
        if not code:
            raise OAuthFailed(f"{self.label} sent no authorization code")
        token = await self._exchange(code, data)
        if self.config.is_openid:
            profile = await self._openid_profile(token, data)
        elif self.config.kind is OAuthProviderKind.GITHUB:
            profile = await self._github_profile(token)
        else:
            profile = await self._kakao_profile(token)
        try:
            next_path = safe_next_path(data.get("next"))
        except InvalidInput:
            next_path = "/"
        return profile, next_path

    async def _metadata(self) -> dict[str, Any]:
        """The OpenID configuration (fetched once, then kept); empty for OAuth 2 kinds."""
        if not self.config.is_openid:
            return {}
        where = f"{self.label} (its discovery URL)"
        try:
            metadata: dict[str, Any] = await self._app.load_server_metadata()
        except httpx2.HTTPStatusError as exc:
            raise ProviderUnavailable(
                f"{where} answered HTTP {exc.response.status_code}; try again later"
            ) from None
        except httpx2.HTTPError:
            raise ProviderUnavailable(f"could not reach {where}; try again later") from None
        except (ValueError, TypeError):
            self._app.server_metadata.clear()
            raise ProviderUnavailable(
                f"{where} did not answer with an OpenID configuration"
            ) from None
        if not self._metadata_checked:
            for key in [key for key in metadata if key not in _METADATA_KEYS]:
                del metadata[key]
            algorithms = metadata.get("id_token_signing_alg_values_supported")
            listed = algorithms if isinstance(algorithms, list) else []
            usable = [alg for alg in listed if alg in _SIGNING_ALGORITHMS]
            metadata["id_token_signing_alg_values_supported"] = usable or ["RS256"]
            needed = ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri")
            missing = [key for key in needed if not isinstance(metadata.get(key), str)]
            plain = [
                key
                for key in (*needed[1:], "userinfo_endpoint")
                if isinstance(metadata.get(key), str)
                and urlsplit(metadata[key]).scheme != "https"
                and not is_loopback_url(metadata[key])
            ]
            if self.require_https and plain and not missing:
                self._app.server_metadata.clear()
                raise ProviderUnavailable(
                    f"the OpenID configuration of {self.label} names plain-http endpoints "
                    f"({', '.join(plain)}); the prod profile needs https"
                )
            if missing:
                self._app.server_metadata.clear()  # look again at the next login
                raise ProviderUnavailable(
                    f"the OpenID configuration of {self.label} has no {', '.join(missing)}"
                )
            self._metadata_checked = True
        return metadata

    async def _exchange(self, code: str, data: dict[str, Any]) -> dict[str, Any]:
        """The provider's token for the code (sent with the PKCE verifier)."""
        await self._metadata()
        try:
            token: dict[str, Any] = await self._app.fetch_access_token(
                code=code,
                redirect_uri=data.get("redirect_uri"),
                code_verifier=data.get("code_verifier"),
            )
        except OAuthError as exc:
            raise OAuthFailed(
                f"{self.label} refused the authorization code ({_plain(exc.error)})"
            ) from None
        except httpx2.HTTPStatusError as exc:
            raise OAuthFailed(
                f"the token endpoint of {self.label} answered HTTP {exc.response.status_code}"
            ) from None
        except httpx2.HTTPError:
            raise ProviderUnavailable(
                f"could not reach the token endpoint of {self.label}; try again later"
            ) from None
        except ValueError:
            raise OAuthFailed(f"the token endpoint of {self.label} sent no token") from None
        if not isinstance(token.get("access_token"), str):
            raise OAuthFailed(f"the token endpoint of {self.label} sent no access token")
        return token

    async def _openid_profile(self, token: dict[str, Any], data: dict[str, Any]) -> ProviderProfile:
        metadata = await self._metadata()
        nonce = data.get("nonce")
        if not isinstance(token.get("id_token"), str) or not nonce:
            raise OAuthFailed(f"{self.label} sent no ID token")
        issuers = (
            list(GOOGLE_ISSUERS)
            if self.config.kind is OAuthProviderKind.GOOGLE
            else [metadata["issuer"]]
        )
        options = {
            "iss": {"essential": True, "values": issuers},
            "aud": {"essential": True, "values": [self.config.client_id]},
        }
        what = f"the ID token from {self.label}"
        try:
            claims: dict[str, Any] = await self._app.parse_id_token(
                token, nonce=nonce, claims_options=options, leeway=ID_TOKEN_LEEWAY
            )
        except ExpiredTokenError:
            raise OAuthFailed(f"{what} has expired") from None
        except (BadSignatureError, InvalidKeyIdError):
            # Fetch the keys again next time: the provider may have rotated or revoked some.
            self._app.server_metadata.pop("jwks", None)
            raise OAuthFailed(f"{what} is not signed by the provider's keys") from None
        except ClaimError as exc:
            raise OAuthFailed(f"{what} has a wrong or missing {exc.claim!r} claim") from None
        except JoseError as exc:
            self._app.server_metadata.pop("jwks", None)  # e.g. no usable key: fetch again
            raise OAuthFailed(f"{what} is not valid ({_plain(exc.error)})") from None
        except httpx2.HTTPStatusError as exc:
            raise OAuthFailed(
                f"the keys (JWKS) of {self.label} answered HTTP {exc.response.status_code}"
            ) from None
        except httpx2.HTTPError:
            raise ProviderUnavailable(
                f"could not reach the keys (JWKS) of {self.label}; try again later"
            ) from None
        except (ValueError, KeyError, TypeError):
            # E.g. a key set that is not one: read it again at the next login.
            self._app.server_metadata.pop("jwks", None)
            raise OAuthFailed(f"{what} could not be checked against the provider's keys") from None
        source = claims
        userinfo_url = metadata.get("userinfo_endpoint")
        if isinstance(userinfo_url, str):
            info = await self._get_json(token, userinfo_url, what=f"the userinfo of {self.label}")
            if not isinstance(info, dict) or info.get("sub") != claims.get("sub"):
                raise OAuthFailed(f"the userinfo of {self.label} is not about the signed-in user")
            if "email" in info:
                source = info
        return ProviderProfile(
            provider=self.name,
            subject=str(claims["sub"]),
            email=_string(source.get("email")),
            email_verified=_is_true(source.get("email_verified")),
        )

    async def _github_profile(self, token: dict[str, Any]) -> ProviderProfile:
        api = self._api_url()
        user = await self._get_json(token, f"{api}/user", what=f"the /user API of {self.label}")
        emails = await self._get_json(
            token, f"{api}/user/emails", what=f"the /user/emails API of {self.label}"
        )
        subject = _subject(user.get("id") if isinstance(user, dict) else None, self.label)
        primary = next(
            (
                entry["email"]
                for entry in (emails if isinstance(emails, list) else [])
                if isinstance(entry, dict)
                and entry.get("primary") is True
                and entry.get("verified") is True
                and isinstance(entry.get("email"), str)
            ),
            None,
        )
        if primary is None:
            raise OAuthFailed(
                f"{self.label} has no verified primary email for this account; verify it in "
                "GitHub's email settings, then log in again"
            )
        return ProviderProfile(
            provider=self.name, subject=subject, email=primary, email_verified=True
        )

    async def _kakao_profile(self, token: dict[str, Any]) -> ProviderProfile:
        me = await self._get_json(
            token, f"{self._api_url()}/v2/user/me", what=f"the /v2/user/me API of {self.label}"
        )
        me = me if isinstance(me, dict) else {}
        subject = _subject(me.get("id"), self.label)
        account = me.get("kakao_account")
        account = account if isinstance(account, dict) else {}
        verified = (
            account.get("is_email_valid") is True and account.get("is_email_verified") is True
        )
        return ProviderProfile(
            provider=self.name,
            subject=subject,
            email=_string(account.get("email")),
            email_verified=verified,
        )

    def _api_url(self) -> str:
        return (self.config.api_url or "").rstrip("/")

    async def _get_json(self, token: dict[str, Any], url: str, *, what: str) -> Any:
        """GET a provider API with the user's access token; its JSON, or OAuthFailed."""
        accept = (
            "application/vnd.github+json"
            if self.config.kind is OAuthProviderKind.GITHUB
            else "application/json"
        )
        try:
            response = await self._app.get(url, token=token, headers={"Accept": accept})
        except OAuthError as exc:
            raise OAuthFailed(f"{what} could not be called ({_plain(exc.error)})") from None
        except httpx2.HTTPError:
            raise ProviderUnavailable(f"could not reach {what}; try again later") from None
        if response.status_code != 200:
            raise OAuthFailed(f"{what} answered HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise OAuthFailed(f"{what} did not answer with JSON") from None


def _plain(value: object) -> str:
    """A provider's error code, shown only when it is a plain short word."""
    text = str(value or "")
    return text if _PLAIN.fullmatch(text) else "an unexpected error"


def _string(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _is_true(value: object) -> bool:
    """An ``email_verified`` claim: true, or the string "true" that some providers send."""
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _subject(value: object, label: str) -> str:
    """A provider's numeric or string user id, as text; OAuthFailed when there is none."""
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise OAuthFailed(f"{label} did not say which account signed in")
    return str(value)
