"""Per-device secret keys and the reachability ACL, in an embedded SQLite file.

The file is created 0600. With a master key (32 bytes), every device key is
sealed with AES-256-GCM (the device name as associated data, so a sealed key
cannot be moved to another name); without one, keys rest in the clear and
the file mode is the protection.
"""

from __future__ import annotations

import os
import re
import sqlite3
from typing import Iterable, Optional

from fastpunch.errors import FastpunchError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (name TEXT PRIMARY KEY, key BLOB NOT NULL, sealed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS acl (a TEXT NOT NULL, b TEXT NOT NULL, PRIMARY KEY (a, b));
"""


class KeyStoreError(FastpunchError):
    pass


class KeyStore:
    def __init__(self, path: str, master_key: Optional[bytes] = None) -> None:
        if master_key is not None and len(master_key) != 32:
            raise KeyStoreError("the master key must be 32 bytes")
        if path != ":memory:" and not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))   # 0600 before any write
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.executescript(_SCHEMA)
        self._aead = None
        if master_key is not None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(master_key)

    def close(self) -> None:
        self.db.close()

    def _seal(self, name: str, key: bytes) -> tuple[bytes, int]:
        if self._aead is None:
            return key, 0
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, key, name.encode()), 1

    def _unseal(self, name: str, blob: bytes, sealed: int) -> bytes:
        if not sealed:
            return blob
        if self._aead is None:
            raise KeyStoreError("the key store is sealed: give its master key")
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(blob[:12], blob[12:], name.encode())
        except InvalidTag:
            raise KeyStoreError(f"the sealed key of {name!r} does not open with this master key") from None

    def add_device(self, name: str, may_reach: Iterable[str] = (), key: Optional[bytes] = None) -> bytes:
        if not NAME_RE.fullmatch(name):
            raise KeyStoreError(f"device names are 1-64 of A-Z a-z 0-9 . _ -: {name!r}")
        key = key or os.urandom(32)
        blob, sealed = self._seal(name, key)
        try:
            self.db.execute("INSERT INTO devices VALUES (?, ?, ?)", (name, blob, sealed))
        except sqlite3.IntegrityError:
            raise KeyStoreError(f"device {name!r} already exists") from None
        for other in may_reach:
            self.allow(name, other)
        return key

    def key_for(self, name: str) -> Optional[bytes]:
        row = self.db.execute("SELECT key, sealed FROM devices WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._unseal(name, row[0], row[1])

    def allow(self, a: str, b: str) -> None:
        """a and b may rendezvous (in either direction)."""
        for x, y in ((a, b), (b, a)):
            self.db.execute("INSERT OR IGNORE INTO acl VALUES (?, ?)", (x, y))

    def may_reach(self, a: str, b: str) -> bool:
        return self.db.execute("SELECT 1 FROM acl WHERE a = ? AND b = ?", (a, b)).fetchone() is not None

    def devices(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM devices ORDER BY name")]
