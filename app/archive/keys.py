"""The archive's keys. Master keys come from the vault in a file (archive_key_file): one url-safe base64
32-byte key per line, the first the primary. Each day's records are sealed with that day's data key
(AES-256-GCM), and each data key is stored wrapped by a master key (AES-256-GCM too): rotating the master
key re-wraps the data keys, never the records, and destroying a day's data key leaves its records unreadable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
_NONCE_BYTES = 12


class ArchiveKeyError(ValueError):
    """The key file cannot be read, or a sealed value does not open with the keys given."""


def generate_master_key() -> str:
    """A new master key, in the key file's format (what `python -m app archive keygen` prints)."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode()


def key_id(key: bytes) -> str:
    """A master key's name in the database and the metrics: the start of a SHA-256 of its text as keygen
    prints it (the deployment computes the same from the vault's text), which says nothing of the key."""
    return hashlib.sha256(b"pli-archive-master-key:" + base64.urlsafe_b64encode(key)).hexdigest()[:16]


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """nonce || AES-256-GCM(plaintext); `context` (authenticated, not stored) binds it to where it belongs."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def open_sealed(key: bytes, sealed: bytes, context: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], context)
    except InvalidTag as exc:
        raise ArchiveKeyError("a sealed value does not open: wrong key, or it was changed") from exc


@dataclass(frozen=True)
class MasterKeys:
    """The master keys by id, in the file's order: the first wraps new data keys, all of them unwrap."""

    keys: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_file(cls, path: Path) -> MasterKeys:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ArchiveKeyError(f"{path}: cannot read the archive key file: {exc}") from exc
        keys = []
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                key = base64.urlsafe_b64decode(text.encode())
            except (binascii.Error, ValueError) as exc:
                raise ArchiveKeyError(f"{path}:{number}: not url-safe base64") from exc
            if len(key) != KEY_BYTES:
                raise ArchiveKeyError(
                    f"{path}:{number}: a key is {KEY_BYTES} bytes, this one {len(key)} (make one with "
                    "`python -m app archive keygen`)"
                )
            keys.append((key_id(key), key))
        if not keys:
            raise ArchiveKeyError(f"{path}: holds no key (make one with `python -m app archive keygen`)")
        return cls(tuple(keys))

    @property
    def primary_id(self) -> str:
        return self.keys[0][0]

    def wrap(self, data_key: bytes, day: str) -> tuple[str, bytes]:
        kid, key = self.keys[0]
        return kid, seal(key, data_key, _data_key_context(day))

    def unwrap(self, kid: str, wrapped: bytes, day: str) -> bytes:
        for candidate, key in self.keys:
            if candidate == kid:
                return open_sealed(key, wrapped, _data_key_context(day))
        raise ArchiveKeyError(
            f"the data key of {day} is wrapped by master key {kid}, which the key file no longer holds"
        )


def _data_key_context(day: str) -> bytes:
    return f"pli-archive-data-key:{day}".encode()
