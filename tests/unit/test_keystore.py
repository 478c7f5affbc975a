"""The CCS key store: 0600 file, sealed keys, ACL both ways, clear errors."""

from __future__ import annotations

import os
import stat

import pytest

from fastpunch.ccs.keystore import KeyStore, KeyStoreError


def test_file_is_created_private(tmp_path):
    path = str(tmp_path / "keys.db")
    KeyStore(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_sealed_keys_never_rest_in_the_clear(tmp_path):
    path, master = str(tmp_path / "keys.db"), os.urandom(32)
    store = KeyStore(path, master)
    key = store.add_device("cam")
    store.close()
    assert key not in open(path, "rb").read()
    assert KeyStore(path, master).key_for("cam") == key
    with pytest.raises(KeyStoreError, match="master key"):
        KeyStore(path).key_for("cam")
    with pytest.raises(KeyStoreError, match="does not open"):
        KeyStore(path, os.urandom(32)).key_for("cam")


def test_a_sealed_key_cannot_be_moved_to_another_name(tmp_path):
    path, master = str(tmp_path / "keys.db"), os.urandom(32)
    store = KeyStore(path, master)
    store.add_device("cam")
    store.add_device("viewer")
    store.db.execute("UPDATE devices SET key = (SELECT key FROM devices WHERE name='cam') "
                     "WHERE name = 'viewer'")
    with pytest.raises(KeyStoreError):
        store.key_for("viewer")


def test_acl_is_symmetric_and_explicit():
    store = KeyStore(":memory:")
    store.add_device("cam", ["viewer"])
    store.add_device("viewer")
    store.add_device("other")
    assert store.may_reach("cam", "viewer") and store.may_reach("viewer", "cam")
    assert not store.may_reach("cam", "other") and not store.may_reach("other", "cam")
    assert store.key_for("nobody") is None
    assert store.devices() == ["cam", "other", "viewer"]


@pytest.mark.parametrize("name", ["", "a" * 65, "../x", "-lead", "sp ace", "nl\n"])
def test_bad_names(name):
    with pytest.raises(KeyStoreError):
        KeyStore(":memory:").add_device(name)


def test_master_key_size():
    with pytest.raises(KeyStoreError):
        KeyStore(":memory:", b"short")


# -- lifecycle: state, generations, the audit log, migration --------------------------------
import sqlite3

from fastpunch.ccs.keystore import UnknownDeviceError


def test_a_database_of_the_first_schema_is_migrated_in_place(tmp_path):
    path, master = str(tmp_path / "keys.db"), os.urandom(32)
    old = KeyStore(path, master)        # rows written by the first release's schema:
    old.db.executescript("DROP TABLE devices; DROP TABLE audit; CREATE TABLE devices "
                         "(name TEXT PRIMARY KEY, key BLOB NOT NULL, sealed INTEGER NOT NULL)")
    blob, sealed = old._seal("cam", b"k" * 32)
    old.db.execute("INSERT INTO devices VALUES ('cam', ?, ?)", (blob, sealed))
    old.db.execute("INSERT INTO acl VALUES ('cam', 'viewer'), ('viewer', 'cam')")
    old.close()
    store = KeyStore(path, master)
    cols = {r[1] for r in store.db.execute("PRAGMA table_info(devices)")}
    assert {"disabled", "generation", "created"} <= cols
    assert store.lookup("cam") == (b"k" * 32, False, 0)
    assert store.list_devices() == [{"name": "cam", "state": "enabled", "generation": 0,
                                     "created": None, "sealed": True}]
    store.add_device("viewer")
    assert store.may_reach("cam", "viewer")
    store.disable("cam")
    assert not store.may_reach("cam", "viewer")
    store.close()
    again = KeyStore(path, master)                    # migrated once; opening again is a no-op
    assert again.state("cam").disabled and [r.action for r in again.audit_since(0)] == \
        ["add", "disable"]


def test_every_change_is_audited_with_who_and_what(tmp_path):
    store = KeyStore(str(tmp_path / "keys.db"), actor="alice")
    store.add_device("cam", ["viewer"])
    store.add_device("viewer")
    store.disable("cam")
    store.disable("cam")
    store.enable("cam")
    key, row = store.rekey("cam")
    store.deny("cam", "viewer")
    store.allow("cam", "viewer")
    store.remove("viewer")
    rows = store.audit_since(0)
    assert [(r.action, r.device, r.other) for r in rows] == [
        ("add", "cam", None), ("acl-allow", "cam", "viewer"), ("add", "viewer", None),
        ("disable", "cam", None), ("disable", "cam", None), ("enable", "cam", None),
        ("rekey", "cam", None), ("acl-deny", "cam", "viewer"), ("acl-allow", "cam", "viewer"),
        ("remove", "viewer", None)]
    assert [r.seq for r in rows] == list(range(1, 11)) and store.audit_seq() == 10
    assert {r.actor for r in rows} == {"alice"} and rows[4].detail == "already disabled"
    assert rows[-1].detail == "2 ACL rows removed"
    assert [r.seq for r in store.audit_since(7)] == [8, 9, 10]
    assert [r.action for r in store.audit_since(0, "viewer")] == \
        ["acl-allow", "add", "acl-deny", "acl-allow", "remove"]
    assert all(rows[i].at <= rows[i + 1].at for i in range(len(rows) - 1))


def test_the_actor_is_the_os_user_by_default(tmp_path):
    import pwd

    store = KeyStore(":memory:")
    store.add_device("cam")
    assert store.audit_since(0)[0].actor.startswith(pwd.getpwuid(os.geteuid()).pw_name)


def test_state_lookup_and_generation():
    store = KeyStore(":memory:", os.urandom(32))
    key = store.add_device("cam")
    rec = store.lookup("cam")
    assert rec.key == key and not rec.disabled and rec.generation == store.audit_seq() == 1
    assert store.lookup("ghost") is None and store.state("ghost") is None
    store.disable("cam")
    assert store.lookup("cam").disabled and store.state("cam") == (True, 1)
    store.enable("cam")
    new, row = store.rekey("cam")
    assert len(new) == 32 and new != key and store.lookup("cam") == (new, False, row.seq)
    assert store.key_for("cam") == new
    # a removed name enrolled again never reuses a generation its old key had
    store.remove("cam")
    store.add_device("cam")
    assert store.lookup("cam").generation > row.seq


def test_lookup_of_an_unknown_name_reads_a_real_row_and_keeps_working():
    store = KeyStore(":memory:", os.urandom(32))
    assert store.lookup("ghost") is None                     # empty store: the constant row
    names = [store.add_device(f"d{i}") and f"d{i}" for i in range(5)]
    for _ in range(50):                                      # random rows, none mistaken
        assert store.lookup("ghost") is None and store.lookup("zzz") is None
    for name in names[2:]:                                   # the rows at the top removed
        store.remove(name)
    assert all(store.lookup("ghost") is None for _ in range(50))
    assert store.lookup("d1") is not None
    # a neighbour whose seal is broken fails its own login, not an unknown name's
    store.db.execute("UPDATE devices SET key = X'00' WHERE name = 'd0'")
    assert all(store.lookup("ghost") is None for _ in range(50))
    with pytest.raises(KeyStoreError):
        store.lookup("d0")


def test_may_reach_needs_both_enrolled_and_enabled():
    store = KeyStore(":memory:")
    store.add_device("cam", ["viewer"])
    assert not store.may_reach("cam", "viewer")              # viewer not enrolled yet
    store.add_device("viewer")
    assert store.may_reach("cam", "viewer") and store.may_reach("viewer", "cam")
    store.disable("viewer")
    assert not store.may_reach("cam", "viewer") and not store.may_reach("viewer", "cam")
    assert store.acl() == [{"a": "cam", "b": "viewer", "active": False}]
    store.enable("viewer")
    assert store.acl("viewer") == [{"a": "viewer", "b": "cam", "active": True}]
    store.deny("viewer", "cam")
    assert not store.may_reach("cam", "viewer") and store.acl() == []
    assert store.deny("viewer", "cam").detail == "was not allowed"
    store.allow("cam", "viewer")
    store.remove("cam")                                      # its ACL rows go with it
    assert store.db.execute("SELECT COUNT(*) FROM acl").fetchone()[0] == 0
    store.add_device("cam")
    assert not store.may_reach("cam", "viewer")              # a new device, no old rights
    with pytest.raises(KeyStoreError, match="itself"):
        store.allow("cam", "cam")
    with pytest.raises(KeyStoreError, match="device names"):
        store.allow("cam", "../x")


@pytest.mark.parametrize("verb", ["disable", "enable", "remove", "rekey", "show"])
def test_unknown_devices_are_a_clear_error(verb):
    store = KeyStore(":memory:")
    with pytest.raises(UnknownDeviceError, match="no device 'ghost'") as err:
        getattr(store, verb)("ghost")
    assert isinstance(err.value, LookupError) and err.value.name == "ghost"
    assert store.audit_seq() == 0                            # nothing half-done, nothing logged


class _FailingDB:
    """A connection whose statements matching ``fail`` raise (to break a
    transaction half-way)."""

    def __init__(self, db, fail: str) -> None:
        self.db, self.fail = db, fail

    def execute(self, sql, *args):
        if self.fail in sql:
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return self.db.execute(sql, *args)

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction


@pytest.mark.parametrize("verb,fail", [("disable", "INSERT INTO audit"),
                                       ("remove", "DELETE FROM acl"),
                                       ("rekey", "UPDATE devices"),
                                       ("deny", "INSERT INTO audit")])
def test_a_change_and_its_audit_row_commit_together_or_not_at_all(verb, fail):
    store = KeyStore(":memory:")
    key = store.add_device("cam", ["viewer"])
    store.add_device("viewer")
    before = (store.list_devices(), store.acl(), store.audit_seq(), store.key_for("cam"))
    real, store.db = store.db, _FailingDB(store.db, fail)
    with pytest.raises(sqlite3.OperationalError):
        getattr(store, verb)(*(["cam", "viewer"] if verb == "deny" else ["cam"]))
    store.db = real
    assert (store.list_devices(), store.acl(), store.audit_seq(), store.key_for("cam")) == before
    assert store.key_for("cam") == key and not real.in_transaction


def test_version_sees_commits_of_other_processes_and_its_own(tmp_path):
    path = str(tmp_path / "keys.db")
    server, admin = KeyStore(path), KeyStore(path)
    v0 = server.version()
    assert server.version() == v0                          # nothing happened: the same
    admin.add_device("cam")                                # another connection's commit
    v1 = server.version()
    assert v1 != v0 and server.audit_since(0)[0].action == "add"
    server.disable("cam")                                  # its own (data_version misses it)
    assert server.version() != v1
    server.close()
    admin.close()


def test_changes_nest_inside_a_callers_transaction():
    """A bulk enrolment (benchmarks/ccs_load.py) wraps many changes in one
    transaction: each change is a savepoint of it, and a failing one rolls
    back alone."""
    from fastpunch.ccs.keystore import KeyStore, KeyStoreError

    store = KeyStore(":memory:")
    store.db.execute("BEGIN")
    store.add_device("a")
    with pytest.raises(KeyStoreError):
        store.add_device("a")              # a duplicate: its savepoint rolls back
    store.add_device("b", ["a"])
    store.db.execute("COMMIT")
    assert store.devices() == ["a", "b"] and store.may_reach("b", "a")
    store.close()
