"""The encrypted conversation archive (opt-in): keys in app/archive/keys.py, records in store.py."""

from app.archive.keys import ArchiveKeyError, MasterKeys, generate_master_key
from app.archive.store import Archive, Conversation, purge, read, record_export, rewrap

__all__ = [
    "Archive",
    "ArchiveKeyError",
    "Conversation",
    "MasterKeys",
    "generate_master_key",
    "purge",
    "read",
    "record_export",
    "rewrap",
]
