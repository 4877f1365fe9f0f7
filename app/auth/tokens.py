"""Short-lived access tokens (JWT, HS256) issued for an API key, and the keyring that signs them.

The keyring is a file (setting jwt_keyring_file) of signing keys, each in one of three states, so that
the signing key can be rotated with no failed request:

- staged: verifies tokens, signs none yet;
- primary: signs new tokens and verifies them (exactly one);
- retired: verifies the tokens it signed until `verify_until`, signs nothing.

Rotation (playbooks/rotate-jwt-keys.yml): stage the new key everywhere, make it primary and the old one
retired (verify_until at least the longest token lifetime later), then remove the old one. A staged key
verifies because the nodes cannot switch at the same instant: a token the first node to switch signs must
verify on a node that has not switched yet. The file is read again when it changes.
"""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import jwt
import yaml

ALGORITHM = "HS256"
# Claims every token must carry (`sub`: the key id, `tenant`: its tenant at issue).
REQUIRED_CLAIMS = ["exp", "iat", "aud", "iss", "sub", "tenant"]
# A token's exp is checked with this much tolerance for clocks that differ between nodes.
LEEWAY_S = 5
MIN_SECRET_BYTES = 32

KeyStateName = Literal["staged", "primary", "retired"]


class KeyringError(ValueError):
    """The keyring file is unusable; the message says why (never a secret)."""


class TokenError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class SigningKey:
    kid: str
    secret: bytes
    state: KeyStateName
    verify_until: float | None = None


@dataclass(frozen=True)
class Keyring:
    keys: Mapping[str, SigningKey]

    @property
    def primary(self) -> SigningKey:
        return next(key for key in self.keys.values() if key.state == "primary")


def _decode_secret(kid: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise KeyringError(f"key {kid}: secret must be a base64url string")
    try:
        secret = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError as exc:
        raise KeyringError(f"key {kid}: secret is not base64url") from exc
    if len(secret) < MIN_SECRET_BYTES:
        raise KeyringError(f"key {kid}: secret has {len(secret)} bytes, at least {MIN_SECRET_BYTES} are needed")
    return secret


def _timestamp(kid: str, value: object) -> float:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise KeyringError(f"key {kid}: verify_until {value!r} is not an ISO 8601 time") from exc
    else:
        raise KeyringError(f"key {kid}: a retired key needs verify_until (an ISO 8601 time)")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_keyring(data: object) -> Keyring:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeyringError("expected a mapping with a list `keys`")
    keys: dict[str, SigningKey] = {}
    for entry in data["keys"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str) or not entry["kid"]:
            raise KeyringError("every key needs a non-empty string `kid`")
        kid = entry["kid"]
        state = entry.get("state")
        if state not in ("staged", "primary", "retired"):
            raise KeyringError(f"key {kid}: state must be staged, primary or retired, not {state!r}")
        if kid in keys:
            raise KeyringError(f"key {kid} is listed twice")
        until = _timestamp(kid, entry.get("verify_until")) if state == "retired" else None
        keys[kid] = SigningKey(kid, _decode_secret(kid, entry.get("secret")), state, until)
    primaries = [key.kid for key in keys.values() if key.state == "primary"]
    if len(primaries) != 1:
        raise KeyringError(f"exactly one key must be primary, found {len(primaries)}")
    return Keyring(keys)


def load_keyring(path: Path) -> Keyring:
    try:
        return parse_keyring(yaml.safe_load(path.read_text(encoding="utf-8")))
    except OSError as exc:
        raise KeyringError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise KeyringError(f"{path} is not YAML/JSON") from exc


@dataclass(frozen=True)
class TokenClaims:
    key_id: str
    tenant: str
    expires_at: int


class TokenService:
    def __init__(
        self,
        keyring_file: Path,
        *,
        issuer: str,
        audience: str,
        ttl_s: int,
        max_ttl_s: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._file = keyring_file
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = min(ttl_s, max_ttl_s)
        self.max_ttl_s = max_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._keyring = self._reload()

    def keyring(self) -> Keyring:
        """The keyring as the file holds it now; a file made unusable keeps the last good one in use."""
        # An unusable file is reported by `check-config`; tokens keep working with the keys they were signed by.
        with contextlib.suppress(KeyringError):
            self._reload()
        return self._keyring

    def _reload(self) -> Keyring:
        stat = self._file.stat()
        seen = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if seen != self._seen:
                self._keyring = load_keyring(self._file)
                self._seen = seen
            return self._keyring

    def issue(self, key_id: str, tenant: str, expires_in: int | None, key_expires_at: int | None) -> tuple[str, int]:
        """A token and its lifetime in seconds: the requested one within the maximum, never past the key's
        own expiry."""
        now = int(self._clock())
        lifetime = min(expires_in or self.ttl_s, self.max_ttl_s)
        if key_expires_at is not None:
            lifetime = min(lifetime, key_expires_at - now)
        key = self.keyring().primary
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": key_id,
            "tenant": tenant,
            "iat": now,
            "exp": now + lifetime,
        }
        return jwt.encode(claims, key.secret, algorithm=ALGORITHM, headers={"kid": key.kid}), lifetime

    def verify(self, token: str) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise TokenError("invalid_token", "The access token is malformed.") from exc
        if header.get("alg") != ALGORITHM:
            raise TokenError("invalid_token_algorithm", f"Access tokens are signed with {ALGORITHM} only.")
        kid = header.get("kid")
        key = self.keyring().keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenError("unknown_token_key", "The access token names a signing key this server does not use.")
        now = self._clock()
        if key.state == "retired" and key.verify_until is not None and now > key.verify_until:
            raise TokenError("retired_token_key", "The access token's signing key has been retired; get a new token.")
        claims = self._decode(token, key.secret, now)
        if int(claims["exp"]) - int(claims["iat"]) > self.max_ttl_s:
            raise TokenError(
                "token_lifetime_too_long", f"The access token lives longer than the allowed {self.max_ttl_s} s."
            )
        return TokenClaims(key_id=str(claims["sub"]), tenant=str(claims["tenant"]), expires_at=int(claims["exp"]))

    def _decode(self, token: str, secret: bytes, now: float) -> dict[str, Any]:
        try:
            # PyJWT would read the clock itself: exp and iat are checked against this service's clock below.
            claims: dict[str, Any] = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_S,
                options={"require": REQUIRED_CLAIMS, "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidSignatureError as exc:
            raise TokenError("invalid_token_signature", "The access token's signature does not verify.") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError("invalid_token", f"The access token lacks the claim '{exc.claim}'.") from exc
        except jwt.InvalidTokenError as exc:
            raise TokenError("invalid_token", f"The access token is not valid here: {exc}.") from exc
        if not isinstance(claims["exp"], int) or not isinstance(claims["iat"], int):
            raise TokenError("invalid_token", "The access token's exp and iat must be integers.")
        if claims["iat"] > now + LEEWAY_S:
            raise TokenError("invalid_token", "The access token was issued in the future.")
        if now > claims["exp"] + LEEWAY_S:
            raise TokenError("expired_token", "The access token has expired; get a new one from /v1/auth/token.")
        return claims
