"""Who is asking: the principal every request carries from authentication on (quota, usage, logs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from app.auth.keys import KeyLimits, KeyRecord, KeyStore
from app.auth.tokens import TokenError, TokenService

ANONYMOUS_TENANT = "anonymous"


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant: str
    name: str
    via: Literal["api_key", "access_token", "none"]
    limits: KeyLimits = field(default_factory=KeyLimits)
    # The key's own expiry, which bounds the tokens issued for it.
    expires_at: int | None = None


# --insecure-no-auth: one unlimited caller.
ANONYMOUS = Principal(key_id="-", tenant=ANONYMOUS_TENANT, name="anonymous", via="none")


class AuthenticationError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _principal(record: KeyRecord, via: Literal["api_key", "access_token"]) -> Principal:
    return Principal(
        key_id=record.key_id,
        tenant=record.tenant,
        name=record.name,
        via=via,
        limits=record.limits,
        expires_at=record.expires_at,
    )


_REFUSED = {
    "revoked": ("revoked_api_key", "This API key has been revoked."),
    "expired": ("expired_api_key", "This API key has expired."),
}


class Authenticator:
    def __init__(self, keys: KeyStore, tokens: TokenService | None) -> None:
        self.keys = keys
        self.tokens = tokens

    def authenticate(self, credential: str, now: float) -> Principal:
        """The principal behind an API key (sk-pli-…) or an access token (a JWT issued for one)."""
        if credential.startswith("sk-pli-"):
            record, state = self.keys.verify(credential)
            if record is None or state is None:
                raise AuthenticationError("invalid_api_key", "Incorrect API key provided.")
            if state != "active":
                raise AuthenticationError(*_REFUSED[state])
            return _principal(record, "api_key")
        if self.tokens is None:
            raise AuthenticationError("invalid_api_key", "Incorrect API key provided.")
        try:
            claims = self.tokens.verify(credential)
        except TokenError as exc:
            raise AuthenticationError(exc.code, exc.message) from exc
        record = self.keys.lookup(claims.key_id)
        if record is None:
            raise AuthenticationError("invalid_token", "The access token's API key does not exist.")
        state = record.state(now)
        if state != "active":
            # A token lives no longer than its key.
            raise AuthenticationError(*_REFUSED[state])
        return _principal(record, "access_token")
