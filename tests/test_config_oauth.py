"""Sign-in provider settings: presets, overrides, and one clear sentence for every bad value.

``COUNTERSIGN_OAUTH_PROVIDERS`` is JSON with client secrets in it: no refusal may echo it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from countersign.config import (
    GITHUB_API_URL,
    GITHUB_AUTHORIZE_URL,
    GITHUB_TOKEN_URL,
    GOOGLE_DISCOVERY_URL,
    KAKAO_API_URL,
    KAKAO_AUTHORIZE_URL,
    KAKAO_TOKEN_URL,
    OAuthProviderKind,
    load_settings,
)
from countersign.domain.errors import ConfigError
from tests.support.cli import Call, cli_env, countersign_all

SECRET = "client-Secret-0042"
VARIABLE = "COUNTERSIGN_OAUTH_PROVIDERS"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No COUNTERSIGN_* variables, and an empty working directory (so no .env)."""
    for key in list(os.environ):
        if key.startswith("COUNTERSIGN_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def providers_env(clean_env: pytest.MonkeyPatch, value: Any) -> None:
    clean_env.setenv(VARIABLE, value if isinstance(value, str) else json.dumps(value))


def test_no_providers_by_default(clean_env: pytest.MonkeyPatch) -> None:
    assert load_settings().oauth_providers == {}
    assert load_settings().public_url is None


def test_presets_fill_in_the_endpoints_scopes_and_client_authentication(
    clean_env: pytest.MonkeyPatch,
) -> None:
    providers_env(
        clean_env,
        {
            "google": {"kind": "google", "client_id": "g", "client_secret": SECRET},
            "github": {"kind": "github", "client_id": "h", "client_secret": SECRET},
            "kakao": {"kind": "kakao", "client_id": "k", "client_secret": SECRET},
            "kakao-public": {"kind": "kakao", "client_id": "k2"},
            "corp": {
                "kind": "oidc",
                "client_id": "c",
                "client_secret": SECRET,
                "discovery_url": "https://idp.example/.well-known/openid-configuration",
            },
        },
    )
    settings = load_settings()
    found = settings.oauth_providers
    google, github, kakao = found["google"], found["github"], found["kakao"]
    assert google.kind is OAuthProviderKind.GOOGLE
    assert google.urls() == {"discovery_url": GOOGLE_DISCOVERY_URL}
    assert google.scopes == ("openid", "email", "profile")
    assert google.is_openid
    assert github.urls() == {
        "authorize_url": GITHUB_AUTHORIZE_URL,
        "token_url": GITHUB_TOKEN_URL,
        "api_url": GITHUB_API_URL,
    }
    assert github.scopes == ("read:user", "user:email")
    assert github.token_auth_method == "client_secret_post"
    assert not github.is_openid
    assert kakao.urls() == {
        "authorize_url": KAKAO_AUTHORIZE_URL,
        "token_url": KAKAO_TOKEN_URL,
        "api_url": KAKAO_API_URL,
    }
    assert kakao.scopes == ()
    assert kakao.token_auth_method == "client_secret_post"
    assert found["kakao-public"].token_auth_method == "none"  # a Kakao app without a secret
    assert found["corp"].scopes == ("openid", "email", "profile")
    assert found["corp"].token_auth_method == "client_secret_basic"
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())


def test_a_preset_can_be_pointed_elsewhere(clean_env: pytest.MonkeyPatch) -> None:
    """Endpoints and scopes given for a provider win over its preset (GitHub Enterprise, say)."""
    providers_env(
        clean_env,
        {
            "ghe": {
                "kind": "github",
                "client_id": "h",
                "client_secret": SECRET,
                "authorize_url": "https://ghe.example/login/oauth/authorize",
                "token_url": "https://ghe.example/login/oauth/access_token",
                "api_url": "https://ghe.example/api/v3",
                "scopes": ["user:email"],
            }
        },
    )
    ghe = load_settings().oauth_providers["ghe"]
    assert ghe.api_url == "https://ghe.example/api/v3"
    assert ghe.authorize_url == "https://ghe.example/login/oauth/authorize"
    assert ghe.scopes == ("user:email",)


def _google(**fields: Any) -> dict[str, Any]:
    return {"google": {"kind": "google", "client_id": "g", "client_secret": SECRET, **fields}}


BAD = [
    pytest.param('{"google": {"kind": "google",', "is not valid JSON", id="not-json"),
    pytest.param([SECRET], "is not a JSON object", id="a-list"),
    pytest.param(
        {"google": {"kind": "saml", "client_id": "g", "client_secret": SECRET}},
        "at google.kind is invalid: input should be 'oidc', 'google', 'github' or 'kakao'",
        id="unknown-kind",
    ),
    pytest.param(
        {"google": {"kind": "google", "client_secret": SECRET}},
        "at google.client_id is invalid: field required",
        id="no-client-id",
    ),
    pytest.param(
        {"google": {"kind": "google", "client_id": "g"}},
        "at google needs a client_secret",
        id="no-secret",
    ),
    pytest.param(
        {"corp": {"kind": "oidc", "client_id": "c", "client_secret": SECRET}},
        "at corp needs a discovery_url",
        id="oidc-without-discovery",
    ),
    pytest.param(
        _google(authorize_url="https://elsewhere.example/authorize"),
        "authorize_url is not used by google providers",
        id="field-of-another-kind",
    ),
    pytest.param(_google(client_secrte=SECRET), "at google.client_secrte", id="typo"),
    pytest.param(_google(scopes=["email"]), "without openid", id="oidc-without-openid"),
    pytest.param(_google(discovery_url="ftp://x"), "is not an http(s) URL", id="not-http"),
    pytest.param(
        {"Google Login": {"kind": "google", "client_id": "g", "client_secret": SECRET}},
        "has the provider name 'Google Login'",
        id="bad-name",
    ),
    pytest.param(
        {"corp_x": {"kind": "google", "client_id": "g", "client_secret": SECRET}},
        "has the provider name 'corp_x'",
        id="underscore-in-name",
    ),
]


@pytest.mark.parametrize(("value", "says"), BAD)
def test_a_bad_provider_setting_is_one_sentence_without_the_secret(
    clean_env: pytest.MonkeyPatch, value: Any, says: str
) -> None:
    providers_env(clean_env, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = raised.value.message
    assert message.startswith(f"{VARIABLE} "), message
    assert says in message, message
    assert message.endswith(".")
    assert ". " not in message, message
    assert SECRET not in str(raised.value)


def test_prod_needs_https_providers_except_on_this_machine(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("COUNTERSIGN_PROFILE", "prod")
    clean_env.setenv("COUNTERSIGN_SECRET_KEY", "k" * 40)
    providers_env(clean_env, _google(discovery_url="http://idp.example/.well-known/x"))
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert raised.value.message.startswith(f"{VARIABLE} has an http discovery_url for 'google'")
    providers_env(clean_env, _google(discovery_url="http://127.0.0.1:9/.well-known/x"))
    assert "google" in load_settings().oauth_providers


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://chat.example.com/", "https://chat.example.com"),
        ("http://127.0.0.1:8000/countersign", "http://127.0.0.1:8000/countersign"),
        ("", None),
    ],
)
def test_public_url(clean_env: pytest.MonkeyPatch, given: str, expected: str | None) -> None:
    clean_env.setenv("COUNTERSIGN_PUBLIC_URL", given)
    assert load_settings().public_url == expected


@pytest.mark.parametrize("given", ["chat.example.com", "ftp://x", "https://x.example/?a=1"])
def test_a_bad_public_url_is_refused(clean_env: pytest.MonkeyPatch, given: str) -> None:
    clean_env.setenv("COUNTERSIGN_PUBLIC_URL", given)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert raised.value.message.startswith("COUNTERSIGN_PUBLIC_URL is not the server's base URL")


def test_the_cli_refuses_bad_providers_with_exit_2(tmp_path: Path) -> None:
    """`serve` stops before anything starts: exit 2, one sentence naming the variable, and
    nothing of the JSON (secrets included) in the output."""
    values = [
        '{"google": {"kind": "google", "client_secret": "' + SECRET + '"',
        json.dumps({"google": {"kind": "google", "client_id": "g", "secret": SECRET}}),
    ]
    folders = [tmp_path / f"case{index}" for index in range(len(values))]
    for folder in folders:
        folder.mkdir()
    calls = [
        Call(("serve",), env=cli_env(**{VARIABLE: value}), cwd=folder)
        for value, folder in zip(values, folders, strict=True)
    ]
    for finished in countersign_all(calls, check=False):
        output = finished.stdout + finished.stderr
        assert "Traceback" not in output, output
        assert finished.returncode == 2, output
        lines = finished.stderr.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: {VARIABLE} "), lines
        assert lines[0].endswith(".")
        assert SECRET not in output
