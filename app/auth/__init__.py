"""Who may call: API keys (app/auth/keys.py), access tokens issued for them (tokens.py), and the
principal both resolve to (principal.py)."""

from app.auth.keys import DeployedKey, KeyLimits, KeyRecord, KeyStore, generate_key, hash_key, key_id_of
from app.auth.principal import ANONYMOUS, AuthenticationError, Authenticator, Principal
from app.auth.tokens import KeyringError, TokenError, TokenService

__all__ = [
    "ANONYMOUS",
    "AuthenticationError",
    "Authenticator",
    "DeployedKey",
    "KeyLimits",
    "KeyRecord",
    "KeyStore",
    "KeyringError",
    "Principal",
    "TokenError",
    "TokenService",
    "generate_key",
    "hash_key",
    "key_id_of",
]
