"""Access tokens: what is issued, and each way a token is refused, with its own code."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import jwt
import pytest

from app.auth import KeyringError, TokenError, TokenService
from app.auth.tokens import load_keyring
from tests.tenancy.support import Clock


def _secret() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


def _write(path: Path, *keys: dict[str, str]) -> None:
    path.write_text(json.dumps({"keys": list(keys)}))
    # The service notices a change by mtime and size; a rewrite within the same tick must count.
    os.utime(path, ns=(path.stat().st_mtime_ns + 1_000_000, path.stat().st_mtime_ns + 1_000_000))


def _service(path: Path, clock: Clock, max_ttl_s: int = 3600) -> TokenService:
    return TokenService(path, issuer="pli", audience="pli", ttl_s=900, max_ttl_s=max_ttl_s, clock=clock)


def _code(service: TokenService, token: str) -> str:
    with pytest.raises(TokenError) as refused:
        service.verify(token)
    return refused.value.code


@pytest.fixture
def ring(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    primary = {"kid": "k1", "secret": _secret(), "state": "primary"}
    path = tmp_path / "keyring.json"
    _write(path, primary)
    return path, primary


def test_a_token_is_issued_for_its_key_and_verifies(ring: tuple[Path, dict[str, str]]) -> None:
    clock = Clock()
    service = _service(ring[0], clock)
    token, lifetime = service.issue("key1", "team-a", None, None)
    assert lifetime == 900
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["kid"]) == ("HS256", "k1")
    claims = service.verify(token)
    assert (claims.key_id, claims.tenant, claims.expires_at) == ("key1", "team-a", int(clock.now) + 900)


def test_the_lifetime_is_bounded_by_the_maximum_and_the_keys_expiry(ring: tuple[Path, dict[str, str]]) -> None:
    clock = Clock()
    service = _service(ring[0], clock)
    assert service.issue("k", "t", 99_999, None)[1] == 3600
    assert service.issue("k", "t", 3000, int(clock.now) + 120)[1] == 120


def test_each_refusal_has_its_own_code(ring: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, primary = ring
    clock = Clock()
    service = _service(path, clock)
    secret = base64.urlsafe_b64decode(primary["secret"] + "==")
    now = int(clock.now)
    claims = {"iss": "pli", "aud": "pli", "sub": "k", "tenant": "t", "iat": now, "exp": now + 60}

    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": "k1"})
    assert _code(service, unsigned) == "invalid_token_algorithm"
    assert _code(service, jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "nope"})) == "unknown_token_key"
    forged = jwt.encode(claims, os.urandom(32), algorithm="HS256", headers={"kid": "k1"})
    assert _code(service, forged) == "invalid_token_signature"
    too_long = {**claims, "exp": now + 3601}
    assert _code(service, jwt.encode(too_long, secret, algorithm="HS256", headers={"kid": "k1"})) == (
        "token_lifetime_too_long"
    )
    no_audience = {key: value for key, value in claims.items() if key != "aud"}
    assert _code(service, jwt.encode(no_audience, secret, algorithm="HS256", headers={"kid": "k1"})) == "invalid_token"
    other_issuer = {**claims, "iss": "elsewhere"}
    assert _code(service, jwt.encode(other_issuer, secret, algorithm="HS256", headers={"kid": "k1"})) == (
        "invalid_token"
    )
    assert _code(service, "not.a.jwt") == "invalid_token"
    token, _ = service.issue("k", "t", 60, None)
    clock.now += 60 + 6
    assert _code(service, token) == "expired_token"


def test_an_rs256_token_is_refused_not_checked_against_the_hmac_secret(ring: tuple[Path, dict[str, str]]) -> None:
    """Algorithm confusion: a token saying RS256 must never be verified with the HS secret."""
    path, _ = ring
    service = _service(path, Clock())
    header = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": "k1"}).encode()).decode().rstrip("=")
    assert _code(service, f"{header}.e30.c2ln") == "invalid_token_algorithm"


def test_rotation_staged_then_primary_then_retired_fails_no_token(ring: tuple[Path, dict[str, str]]) -> None:
    path, first = ring
    clock = Clock(1_800_000_000)  # 2027-01-15T08:00:00Z
    service = _service(path, clock)
    old_token, _ = service.issue("k", "t", None, None)  # valid until 08:15
    second = {"kid": "k2", "secret": _secret(), "state": "staged"}
    _write(path, first, second)
    assert jwt.get_unverified_header(service.issue("k", "t", None, None)[0])["kid"] == "k1", "staged signs nothing"
    staged_signed = jwt.encode(
        {"iss": "pli", "aud": "pli", "sub": "k", "tenant": "t", "iat": int(clock.now), "exp": int(clock.now) + 60},
        base64.urlsafe_b64decode(second["secret"] + "=="),
        algorithm="HS256",
        headers={"kid": "k2"},
    )
    # Another node may already sign with it while this one has it staged.
    assert service.verify(staged_signed).key_id == "k", "a staged key verifies"

    _write(path, {**first, "state": "retired", "verify_until": "2027-01-15T08:05:00Z"}, {**second, "state": "primary"})
    clock.now += 100
    new_token, _ = service.issue("k", "t", None, None)
    assert jwt.get_unverified_header(new_token)["kid"] == "k2"
    assert service.verify(old_token).key_id == "k", "a token signed before the switch still verifies"
    assert service.verify(new_token).key_id == "k"

    clock.now = 1_800_000_400  # 08:06:40, past the retired key's verify_until, before old_token's exp
    assert _code(service, old_token) == "retired_token_key"
    assert service.verify(new_token).key_id == "k"


def test_a_broken_keyring_file_keeps_the_last_good_one(ring: tuple[Path, dict[str, str]]) -> None:
    path, _ = ring
    service = _service(path, Clock())
    token, _ = service.issue("k", "t", None, None)
    path.write_text("keys: [")
    assert service.verify(token).key_id == "k"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"keys": []}, "exactly one key must be primary"),
        ({"keys": [{"kid": "a", "secret": "c2hvcnQ", "state": "primary"}]}, "at least 32"),
        ({"keys": [{"kid": "a", "secret": "x" * 43, "state": "retired"}]}, "verify_until"),
        ({"keys": [{"kid": "a", "secret": "x" * 43, "state": "active"}]}, "staged, primary or retired"),
    ],
)
def test_an_unusable_keyring_says_why(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "ring.json"
    path.write_text(json.dumps(content))
    with pytest.raises(KeyringError, match=message):
        load_keyring(path)
