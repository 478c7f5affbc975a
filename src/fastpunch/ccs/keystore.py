"""Per-device secret keys, their lifecycle, the reachability ACL and an audit
log, in an embedded SQLite file.

The file is created 0600. With a master key (32 bytes), every device key is
sealed with AES-256-GCM (the device name as associated data, so a sealed key
cannot be moved to another name); without one, keys rest in the clear and
the file mode is the protection.

Each device has a state (enabled or ``disabled``), a ``generation`` (the
audit sequence number of the change that set its key: it grows with every
rekey and is never reused, even by a removed name enrolled again) and its
creation time. Every change (add, disable, enable, remove, rekey, ACL allow
and deny) commits in one transaction with its ``audit`` row: who ran it (the
OS user), when, what, to which device. A running CCS follows the audit log
(``fastpunch.ccs.lifecycle.Watcher``) and applies each change to the devices
connected at once. Databases made before the lifecycle columns existed are
migrated in place when opened.

``lookup`` (what a login reads) costs the same for a name nobody enrolled as
for an enrolled one, so a failed login's time does not tell which names exist
(``tests/unit/test_auth_timing.py``).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sqlite3
import time
from typing import Iterable, Iterator, NamedTuple, Optional

from fastpunch.errors import FastpunchError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (name TEXT PRIMARY KEY, key BLOB NOT NULL, sealed INTEGER NOT NULL,
                                    disabled INTEGER NOT NULL DEFAULT 0,
                                    generation INTEGER NOT NULL DEFAULT 0, created REAL);
CREATE TABLE IF NOT EXISTS acl (a TEXT NOT NULL, b TEXT NOT NULL, PRIMARY KEY (a, b));
CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
                                  actor TEXT NOT NULL, action TEXT NOT NULL, device TEXT NOT NULL,
                                  other TEXT, detail TEXT);
"""
# columns added to `devices` since the first release: (name, declaration); an
# older file gets them with ALTER TABLE when opened (created stays NULL: unknown)
_ADDED_COLUMNS = (("disabled", "INTEGER NOT NULL DEFAULT 0"),
                  ("generation", "INTEGER NOT NULL DEFAULT 0"),
                  ("created", "REAL"))
# the name (no device's: not a valid name) of the constant row _LOOKUP falls back on
_DUMMY_NAME = "\0unknown"
# An unknown name is answered with a real row, a random one (from rowid
# ?2 on): the same index seek, table seek, row (as cold in the cache) and
# unseal as a known name's, whichever the name. The index seek lands on the
# first name >= ?1 either way and reads its entry; which rowid to fetch is
# chosen by arithmetic, not a branch (a CASE, an IFNULL or a second UNION
# branch that only a miss runs each cost a miss or a hit ~1-4 % of a failed
# login, enough for a rank test to tell them apart). A name past the last
# one finds no index entry and takes ?2 by IFNULL: that seek is the cheaper
# one, by nanoseconds. With no row from ?2 on (an empty store, rows removed
# at the top), a constant.
_LOOKUP = ("SELECT * FROM (SELECT name, key, sealed, disabled, generation FROM devices "
           "WHERE rowid >= IFNULL((SELECT (name = ?1) * rowid + (name <> ?1) * ?2 FROM devices "
           "WHERE name >= ?1 ORDER BY name LIMIT 1), ?2) ORDER BY rowid LIMIT 1) "
           "UNION ALL SELECT ?3, ?4, ?5, 0, 0 LIMIT 1")


class KeyStoreError(FastpunchError):
    pass


class UnknownDeviceError(KeyStoreError, LookupError):
    """No device of that name is enrolled."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no device {name!r}: enroll it with `fastpunch ccs add-device`")
        self.name = name


class DeviceRecord(NamedTuple):
    """What the CCS needs to let a device in."""
    key: bytes
    disabled: bool
    generation: int


class DeviceState(NamedTuple):
    """A device's state without its key (cheap: nothing to unseal)."""
    disabled: bool
    generation: int


class AuditRow(NamedTuple):
    seq: int
    at: float
    actor: str
    action: str          # add | disable | enable | remove | rekey | acl-allow | acl-deny
    device: str
    other: Optional[str]  # the other device of an ACL change
    detail: Optional[str]

    def as_dict(self) -> dict:
        return {"seq": self.seq, "at": iso_time(self.at), "actor": self.actor,
                "action": self.action, "device": self.device, "other": self.other,
                "detail": self.detail}


def iso_time(t: Optional[float]) -> Optional[str]:
    import datetime

    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def os_user() -> str:
    """Who is running this: the OS user (and who became root through sudo)."""
    import pwd

    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid {uid}"
    sudo = os.environ.get("SUDO_USER")
    return f"{user} (sudo by {sudo})" if uid == 0 and sudo and sudo != user else user


class KeyStore:
    def __init__(self, path: str, master_key: Optional[bytes] = None,
                 actor: Optional[str] = None) -> None:
        if master_key is not None and len(master_key) != 32:
            raise KeyStoreError("the master key must be 32 bytes")
        if path != ":memory:" and not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))   # 0600 before any write
        self.path = path
        self.actor = actor   # None: the OS user, looked up at the first change
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._commits = 0    # commits through this connection (data_version misses them)
        self.changes: list[AuditRow] = []   # the audit rows of the last change made here
        self.db.executescript(_SCHEMA)
        self._migrate()
        self._aead = None
        self._dummy_blob = os.urandom(32)
        # an unknown name's lookup reads a random row up to this rowid (lookup)
        self._random = random.Random()
        self._last_rowid = 1
        self._lookups = 0
        if master_key is not None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(master_key)
            # (the constant row's key: an unknown name pays an unseal even then)
            self._dummy_blob, _ = self._seal(_DUMMY_NAME, os.urandom(32))

    def close(self) -> None:
        self.db.close()

    # -- transactions and the audit log ----------------------------------------------
    def _migrate(self) -> None:
        have = {r[1] for r in self.db.execute("PRAGMA table_info(devices)")}
        if all(col in have for col, _ in _ADDED_COLUMNS):
            return
        with self._write():             # re-read inside: another process may have migrated
            have = {r[1] for r in self.db.execute("PRAGMA table_info(devices)")}
            for col, decl in _ADDED_COLUMNS:
                if col not in have:
                    self.db.execute(f"ALTER TABLE devices ADD COLUMN {col} {decl}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One transaction: a change and its audit row commit together or not at all.
        Inside a caller's own transaction (a bulk enrolment), a savepoint of it."""
        if self.db.in_transaction:
            self.db.execute("SAVEPOINT keystore_change")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK TO keystore_change")
                self.db.execute("RELEASE keystore_change")
                raise
            self.db.execute("RELEASE keystore_change")
            return
        self.db.execute("BEGIN IMMEDIATE")
        self.changes = []
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self._commits += 1

    def _audit(self, action: str, device: str, other: Optional[str] = None,
               detail: Optional[str] = None) -> AuditRow:
        if self.actor is None:
            self.actor = os_user()
        at = time.time()
        cur = self.db.execute("INSERT INTO audit (at, actor, action, device, other, detail) "
                              "VALUES (?, ?, ?, ?, ?, ?)",
                              (at, self.actor, action, device, other, detail))
        row = AuditRow(cur.lastrowid, at, self.actor, action, device, other, detail)
        self.changes.append(row)
        return row

    def audit_seq(self) -> int:
        """The sequence number of the newest audit row (0: none yet)."""
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()[0]

    def audit_since(self, seq: int, device: Optional[str] = None) -> list[AuditRow]:
        """Audit rows after ``seq``, oldest first (of ``device``, if given)."""
        if device is None:
            rows = self.db.execute("SELECT * FROM audit WHERE seq > ? ORDER BY seq", (seq,))
        else:
            rows = self.db.execute("SELECT * FROM audit WHERE seq > ? AND (device = ? OR "
                                   "other = ?) ORDER BY seq", (seq, device, device))
        return [AuditRow(*r) for r in rows]

    def version(self) -> tuple:
        """Changes whenever anything was committed, by any process: the
        cheap check before reading the audit log. (SQLite's data_version
        counts other connections' commits; this one's are counted here.)"""
        return self.db.execute("PRAGMA data_version").fetchone()[0], self._commits

    # -- keys -------------------------------------------------------------------------
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
        except (InvalidTag, ValueError):        # (ValueError: a blob cut short)
            raise KeyStoreError(f"the sealed key of {name!r} does not open with this master key") from None

    def _check(self, name: str) -> None:
        """``name`` is enrolled (else UnknownDeviceError)."""
        if self.db.execute("SELECT 1 FROM devices WHERE name = ?", (name,)).fetchone() is None:
            raise UnknownDeviceError(name)

    def add_device(self, name: str, may_reach: Iterable[str] = (), key: Optional[bytes] = None) -> bytes:
        if not NAME_RE.fullmatch(name):
            raise KeyStoreError(f"device names are 1-64 of A-Z a-z 0-9 . _ -: {name!r}")
        may_reach = list(may_reach)
        for other in may_reach:
            if not NAME_RE.fullmatch(other):
                raise KeyStoreError(f"device names are 1-64 of A-Z a-z 0-9 . _ -: {other!r}")
        key = key or os.urandom(32)
        blob, sealed = self._seal(name, key)
        with self._write():
            row = self._audit("add", name, detail="sealed" if sealed else None)
            try:
                self.db.execute("INSERT INTO devices (name, key, sealed, disabled, generation, "
                                "created) VALUES (?, ?, ?, 0, ?, ?)",
                                (name, blob, sealed, row.seq, row.at))
            except sqlite3.IntegrityError:
                raise KeyStoreError(f"device {name!r} already exists") from None
            for other in may_reach:
                self._allow(name, other)
        return key

    def key_for(self, name: str) -> Optional[bytes]:
        row = self.db.execute("SELECT key, sealed FROM devices WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._unseal(name, row[0], row[1])

    def lookup(self, name: str) -> Optional[DeviceRecord]:
        """The device's key, state and generation, or None if there is no
        such device. An unknown name costs what an enrolled one does (the
        same query, a real row fetched and, in a sealed store, unsealed), so
        the time a login takes to fail tells nobody whether the name exists."""
        # one real row either way (finding none is microseconds faster): the
        # device's, else a random one (see _LOOKUP), up to the last rowid,
        # looked up again every so many lookups (whatever the names)
        self._lookups += 1
        if self._lookups % 256 == 1:
            self._last_rowid = max(1, self.db.execute(
                "SELECT COALESCE(MAX(rowid), 0) FROM devices").fetchone()[0])
        row_name, key, sealed, disabled, generation = self.db.execute(
            _LOOKUP, (name, self._random.randint(1, self._last_rowid), _DUMMY_NAME,
                      self._dummy_blob, int(self._aead is not None))).fetchone()
        if row_name == _DUMMY_NAME:     # no random row (an empty store, rows removed at the
            self._lookups = 0           # top since): look the last rowid up again next time
        try:
            key = self._unseal(row_name, key, sealed)
        except KeyStoreError:
            if row_name == name:
                raise
            key = b""                   # a neighbour's broken seal is not this login's
        record = DeviceRecord(key, bool(disabled), generation)
        return record if row_name == name else None

    def state(self, name: str) -> Optional[DeviceState]:
        row = self.db.execute("SELECT disabled, generation FROM devices WHERE name = ?",
                              (name,)).fetchone()
        return None if row is None else DeviceState(bool(row[0]), row[1])

    # -- lifecycle --------------------------------------------------------------------
    def disable(self, name: str) -> AuditRow:
        """The device may not log in (a connected one is cut by the CCS's
        watcher) nor be reached; its key and ACL are kept for enable()."""
        return self._set_disabled(name, True)

    def enable(self, name: str) -> AuditRow:
        return self._set_disabled(name, False)

    def _set_disabled(self, name: str, disabled: bool) -> AuditRow:
        with self._write():
            self._check(name)
            was = self.state(name).disabled
            self.db.execute("UPDATE devices SET disabled = ? WHERE name = ?", (int(disabled), name))
            return self._audit("disable" if disabled else "enable", name,
                               detail=("already " if was == disabled else "") +
                               ("disabled" if disabled else "enabled"))

    def remove(self, name: str) -> AuditRow:
        """Forget the device, its key and every ACL row naming it."""
        with self._write():
            self._check(name)
            self.db.execute("DELETE FROM devices WHERE name = ?", (name,))
            acl = self.db.execute("DELETE FROM acl WHERE a = ? OR b = ?", (name, name)).rowcount
            return self._audit("remove", name, detail=f"{acl} ACL rows removed")

    def rekey(self, name: str, key: Optional[bytes] = None) -> tuple[bytes, AuditRow]:
        """A new random 32-byte key for the device (the old one stops
        working at once: the CCS's watcher cuts a session it proved);
        returns (key, audit row)."""
        key = key or os.urandom(32)
        blob, sealed = self._seal(name, key)
        with self._write():
            self._check(name)
            row = self._audit("rekey", name, detail="sealed" if sealed else None)
            self.db.execute("UPDATE devices SET key = ?, sealed = ?, generation = ? WHERE name = ?",
                            (blob, sealed, row.seq, name))
        return key, row

    # -- the ACL ----------------------------------------------------------------------
    def _allow(self, a: str, b: str) -> AuditRow:
        if a == b:
            raise KeyStoreError(f"a device cannot be allowed to reach itself: {a!r}")
        for x, y in ((a, b), (b, a)):
            self.db.execute("INSERT OR IGNORE INTO acl VALUES (?, ?)", (x, y))
        return self._audit("acl-allow", a, b)

    def allow(self, a: str, b: str) -> AuditRow:
        """a and b may rendezvous (in either direction). Either may be
        enrolled later (``add-device --may-reach`` names a future device)."""
        for name in (a, b):
            if not NAME_RE.fullmatch(name):
                raise KeyStoreError(f"device names are 1-64 of A-Z a-z 0-9 . _ -: {name!r}")
        with self._write():
            return self._allow(a, b)

    def deny(self, a: str, b: str) -> AuditRow:
        """a and b may no longer rendezvous (either direction); the CCS's
        watcher ends what they have going."""
        with self._write():
            n = self.db.execute("DELETE FROM acl WHERE (a = ? AND b = ?) OR (a = ? AND b = ?)",
                                (a, b, b, a)).rowcount
            return self._audit("acl-deny", a, b, detail=None if n else "was not allowed")

    def may_reach(self, a: str, b: str) -> bool:
        """An ACL row, and both enrolled and enabled."""
        return self.db.execute(
            "SELECT 1 FROM acl JOIN devices x ON x.name = acl.a JOIN devices y ON y.name = acl.b "
            "WHERE acl.a = ? AND acl.b = ? AND x.disabled = 0 AND y.disabled = 0",
            (a, b)).fetchone() is not None

    def acl(self, name: Optional[str] = None) -> list[dict]:
        """ACL pairs (each once), with whether they are in force now (both
        enrolled and enabled); of ``name`` only if given (``name`` first)."""
        rows = self.db.execute(
            "SELECT a, b, (SELECT COUNT(*) FROM devices WHERE (name = a OR name = b) "
            "AND disabled = 0) FROM acl WHERE (? IS NULL AND a < b) OR a = ? ORDER BY a, b",
            (name, name))
        return [{"a": a, "b": b, "active": n == (1 if a == b else 2)} for a, b, n in rows]

    # -- reading ----------------------------------------------------------------------
    def devices(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM devices ORDER BY name")]

    def list_devices(self) -> list[dict]:
        """Every device with its state (no keys)."""
        rows = self.db.execute("SELECT name, disabled, generation, created, sealed FROM devices "
                               "ORDER BY name")
        return [{"name": n, "state": "disabled" if d else "enabled", "generation": g,
                 "created": iso_time(c), "sealed": bool(s)} for n, d, g, c, s in rows]

    def show(self, name: str) -> dict:
        """One device's state, whom it may reach, and its last change."""
        row = self.db.execute("SELECT name, disabled, generation, created, sealed FROM devices "
                              "WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownDeviceError(name)
        n, d, g, c, s = row
        last = self.db.execute("SELECT * FROM audit WHERE device = ? OR other = ? "
                               "ORDER BY seq DESC LIMIT 1", (name, name)).fetchone()
        return {"name": n, "state": "disabled" if d else "enabled", "generation": g,
                "created": iso_time(c), "sealed": bool(s),
                "may_reach": [p["b"] for p in self.acl(name)],
                "last_change": AuditRow(*last).as_dict() if last else None}
