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
