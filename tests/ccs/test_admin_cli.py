"""`fastpunch ccs devices ...`, `ccs acl ...`, `ccs audit` and the key
file writer, through the real entry point (in process: fastpunch.cli.main):
JSON out, an audit line per change on stderr, exit code 1 with a clear
message for every bad input, secrets never on stdout when a file is given."""

from __future__ import annotations

import json
import os
import pwd
import stat

import pytest

from fastpunch.ccs.keystore import KeyStore
from fastpunch.cli import main


@pytest.fixture
def run(capsys):
    def run(*argv, code=0):
        rc = main(list(argv))
        out, err = capsys.readouterr()
        assert rc == code, (rc, out, err)
        return [json.loads(line) for line in out.splitlines()], err
    return run


@pytest.fixture
def deploy(tmp_path, run):
    d = str(tmp_path / "ccs")
    run("ccs", "init", "--dir", d, "--sealed")
    run("ccs", "add-device", "cam", "--may-reach", "viewer", "--dir", d)
    run("ccs", "add-device", "viewer", "--dir", d)
    return d


def audit_lines(err: str) -> list:
    return [json.loads(line) for line in err.splitlines() if line.startswith('{"event": "audit"')]


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def store_of(d) -> KeyStore:
    with open(os.path.join(d, "master.key")) as f:
        return KeyStore(os.path.join(d, "keys.db"), bytes.fromhex(f.read().strip()))


def test_devices_list_and_show(deploy, run):
    out, err = run("ccs", "devices", "list", "--dir", deploy)
    assert [(d["name"], d["state"], d["sealed"]) for d in out] == \
        [("cam", "enabled", True), ("viewer", "enabled", True)]
    assert all(d["created"].endswith("+00:00") and d["generation"] > 0 for d in out)
    assert err == ""                                        # reading is no change
    (shown,), _ = run("ccs", "devices", "show", "cam", "--dir", deploy)
    assert shown["may_reach"] == ["viewer"] and shown["last_change"]["action"] == "acl-allow"
    assert "key" not in shown and "key" not in out[0]        # never a key


def test_disable_enable_remove_print_the_state_and_an_audit_line(deploy, run):
    (out,), err = run("ccs", "devices", "disable", "cam", "--dir", deploy)
    assert out["name"] == "cam" and out["state"] == "disabled"
    (audit,) = audit_lines(err)
    assert (audit["action"], audit["device"]) == ("disable", "cam")
    assert audit["actor"].startswith(pwd.getpwuid(os.geteuid()).pw_name)
    (out,), err = run("ccs", "devices", "enable", "cam", "--dir", deploy)
    assert out["state"] == "enabled" and audit_lines(err)[0]["action"] == "enable"
    (out,), err = run("ccs", "devices", "remove", "cam", "--dir", deploy)
    assert out == {"name": "cam", "state": "removed", "detail": "2 ACL rows removed"}
    assert audit_lines(err)[0]["action"] == "remove"
    out, _ = run("ccs", "devices", "list", "--dir", deploy)
    assert [d["name"] for d in out] == ["viewer"]


def test_rekey_prints_new_credentials_or_writes_them_only(deploy, run, tmp_path):
    store = store_of(deploy)
    old = store.key_for("cam")
    (out,), err = run("ccs", "devices", "rekey", "cam", "--dir", deploy)
    new = bytes.fromhex(out["key"])
    assert len(new) == 32 and new != old and store.key_for("cam") == new
    assert out["ca"] == os.path.join(deploy, "ca.pem") and out["generation"] == \
        store.lookup("cam").generation
    assert audit_lines(err)[0]["action"] == "rekey"
    assert new not in open(os.path.join(deploy, "keys.db"), "rb").read()       # still sealed
    key_file = tmp_path / "cam.json"
    (out,), err = run("ccs", "devices", "rekey", "cam", "--dir", deploy, "--key-file", str(key_file))
    creds = json.loads(key_file.read_text())
    assert out == {"name": "cam", "key_file": str(key_file), "generation": out["generation"]}
    assert creds["key"] not in json.dumps(out) + err and mode(key_file) == 0o600
    assert store.key_for("cam") == bytes.fromhex(creds["key"])
    store.close()


def test_add_device_with_a_key_file_keeps_the_key_off_stdout(deploy, run, tmp_path):
    key_file = tmp_path / "cam2.json"
    (out,), err = run("ccs", "add-device", "cam2", "--dir", deploy, "--key-file", str(key_file))
    assert out == {"name": "cam2", "key_file": str(key_file)}
    creds = json.loads(key_file.read_text())
    assert creds["key"] not in err and audit_lines(err)[0]["action"] == "add"
    (out,), _ = run("ccs", "add-device", "cam3", "--dir", deploy)           # no file: printed
    assert len(bytes.fromhex(out["key"])) == 32


@pytest.mark.parametrize("command", [["ccs", "add-device", "cam9"],
                                     ["ccs", "devices", "rekey", "cam"]])
def test_a_world_readable_key_file_is_made_private_before_the_secret(deploy, run, tmp_path,
                                                                     command):
    key_file = tmp_path / "creds.json"
    key_file.write_text("old, public\n")
    os.chmod(key_file, 0o644)
    run(*command, "--dir", deploy, "--key-file", str(key_file))
    assert mode(key_file) == 0o600 and json.loads(key_file.read_text())["key"]


@pytest.mark.parametrize("command", [["ccs", "add-device", "cam9"],
                                     ["ccs", "devices", "rekey", "cam"]])
def test_a_key_file_that_is_a_symlink_is_refused(deploy, run, tmp_path, command):
    target = tmp_path / "elsewhere"
    target.write_text("not yours\n")
    os.chmod(target, 0o644)
    link = tmp_path / "creds.json"
    link.symlink_to(target)
    _, err = run(*command, "--dir", deploy, "--key-file", str(link), code=1)
    assert "symbolic link" in err and "Traceback" not in err
    assert target.read_text() == "not yours\n" and mode(target) == 0o644


@pytest.mark.parametrize("command", [["ccs", "add-device", "cam9"],
                                     ["ccs", "devices", "rekey", "cam"]])
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_key_file_that_cannot_take_the_secret_fails_before_any_change(deploy, run, tmp_path,
                                                                        command, kind):
    path = tmp_path / "creds"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)                  # (no reader: a plain open would hang)
    store = store_of(deploy)
    before = (store.audit_seq(), store.key_for("cam"))
    _, err = run(*command, "--dir", deploy, "--key-file", str(path), code=1)
    assert err.startswith("fastpunch: ") and "Traceback" not in err
    assert (store.audit_seq(), store.key_for("cam")) == before      # the old key still works
    assert store.state("cam9") is None
    store.close()


def test_a_failed_change_leaves_no_key_file(deploy, run, tmp_path):
    key_file = tmp_path / "cam.json"
    _, err = run("ccs", "add-device", "cam", "--dir", deploy, "--key-file", str(key_file), code=1)
    assert "already exists" in err and not key_file.exists()
    key_file.write_text("cam's real credentials\n")            # an existing file: kept as it was
    run("ccs", "add-device", "cam", "--dir", deploy, "--key-file", str(key_file), code=1)
    assert key_file.read_text() == "cam's real credentials\n"


def test_acl_allow_deny_list(deploy, run):
    run("ccs", "add-device", "other", "--dir", deploy)
    (out,), err = run("ccs", "acl", "allow", "other", "viewer", "--dir", deploy)
    assert out == {"a": "other", "b": "viewer", "allowed": True, "active": True}
    assert (audit_lines(err)[0]["action"], audit_lines(err)[0]["other"]) == ("acl-allow", "viewer")
    out, _ = run("ccs", "acl", "list", "--dir", deploy)
    assert out == [{"a": "cam", "b": "viewer", "active": True},
                   {"a": "other", "b": "viewer", "active": True}]
    out, _ = run("ccs", "acl", "list", "viewer", "--dir", deploy)
    assert [p["b"] for p in out] == ["cam", "other"]
    (out,), err = run("ccs", "acl", "deny", "viewer", "cam", "--dir", deploy)
    assert out == {"a": "viewer", "b": "cam", "allowed": False, "detail": None}
    assert audit_lines(err)[0]["action"] == "acl-deny"
    (out,), _ = run("ccs", "acl", "deny", "viewer", "cam", "--dir", deploy)
    assert out["detail"] == "was not allowed"
    run("ccs", "devices", "disable", "other", "--dir", deploy)
    out, _ = run("ccs", "acl", "list", "--dir", deploy)
    assert out == [{"a": "other", "b": "viewer", "active": False}]          # in force: no
    # the old spelling still works, and is audited too
    out, err = run("ccs", "allow", "cam", "viewer", "--dir", deploy)
    assert out == [] and audit_lines(err)[0]["action"] == "acl-allow"
    assert store_of(deploy).may_reach("cam", "viewer")


def test_audit_lists_every_change(deploy, run):
    run("ccs", "devices", "disable", "cam", "--dir", deploy)
    out, _ = run("ccs", "audit", "--dir", deploy)
    assert [(r["seq"], r["action"], r["device"]) for r in out] == [
        (1, "add", "cam"), (2, "acl-allow", "cam"), (3, "add", "viewer"), (4, "disable", "cam")]
    out, _ = run("ccs", "audit", "--since", "2", "--dir", deploy)
    assert [r["seq"] for r in out] == [3, 4]
    out, _ = run("ccs", "audit", "--device", "viewer", "--dir", deploy)
    assert [r["action"] for r in out] == ["acl-allow", "add"]


@pytest.mark.parametrize("argv", [
    ["devices", "show", "ghost"], ["devices", "disable", "ghost"], ["devices", "enable", "ghost"],
    ["devices", "remove", "ghost"], ["devices", "rekey", "ghost"], ["acl", "allow", "cam", "ghost"],
    ["acl", "allow", "ghost", "cam"], ["acl", "deny", "cam", "ghost"], ["acl", "list", "ghost"],
    ["allow", "cam", "ghost"], ["devices", "disable", "../etc"]])
def test_unknown_devices_are_a_clear_error_and_change_nothing(deploy, run, argv):
    before, _ = run("ccs", "audit", "--dir", deploy)
    out, err = run("ccs", *argv, "--dir", deploy, code=1)
    assert out == [] and err.startswith("fastpunch: no device ") and "Traceback" not in err
    assert "fastpunch ccs add-device" in err
    after, _ = run("ccs", "audit", "--dir", deploy)
    assert after == before


def test_other_bad_input(deploy, run, tmp_path):
    _, err = run("ccs", "acl", "allow", "cam", "cam", "--dir", deploy, code=1)
    assert "itself" in err
    _, err = run("ccs", "devices", "list", "--dir", str(tmp_path / "none"), code=1)
    assert "fastpunch ccs init" in err
    _, err = run("ccs", "devices", "rekey", "ghost", "--dir", deploy, "--key-file",
                 str(tmp_path / "ghost.json"), code=1)
    assert not (tmp_path / "ghost.json").exists()            # nothing written for nobody
    for argv in (["devices"], ["devices", "show"], ["devices", "frobnicate", "cam"],
                 ["acl", "allow", "cam"], ["audit", "--since", "x"]):
        with pytest.raises(SystemExit) as usage:             # argparse: usage, exit 2
            main(["ccs", *argv, "--dir", deploy])
        assert usage.value.code == 2


def test_the_same_key_on_every_node_with_key_from(tmp_path, run):
    """Each node has its own keys.db: the first node makes the key, the
    others take it from its credentials (add-device and rekey alike)."""
    nodes = [str(tmp_path / f"node{i}") for i in (1, 2)]
    for d in nodes:
        run("ccs", "init", "--dir", d)
    first = tmp_path / "cam.json"
    run("ccs", "add-device", "cam", "--dir", nodes[0], "--key-file", str(first))
    (out,), _ = run("ccs", "add-device", "cam", "--dir", nodes[1], "--key-from", str(first))
    assert out == {"name": "cam", "key_from": str(first)}                # not printed again

    def keys() -> list:
        out = []
        for d in nodes:
            store = KeyStore(os.path.join(d, "keys.db"))
            out.append(store.key_for("cam"))
            store.close()
        return out

    assert keys()[0] == keys()[1] == bytes.fromhex(json.loads(first.read_text())["key"])
    new = tmp_path / "cam-new.json"
    run("ccs", "devices", "rekey", "cam", "--dir", nodes[0], "--key-file", str(new))
    (out,), _ = run("ccs", "devices", "rekey", "cam", "--dir", nodes[1], "--key-from", str(new))
    assert out["key_from"] == str(new) and "key" not in out
    assert keys()[0] == keys()[1] == bytes.fromhex(json.loads(new.read_text())["key"])
    # someone else's credentials, a key of the wrong size, no file: refused, nothing changed
    run("ccs", "add-device", "viewer", "--dir", nodes[0], "--key-file", str(tmp_path / "v.json"))
    (tmp_path / "short.key").write_text("abcd\n")
    for path, says in ((tmp_path / "v.json", "credentials of 'viewer'"),
                       (tmp_path / "short.key", "32 bytes"),
                       (tmp_path / "none.json", "No such file")):
        before = keys()
        _, err = run("ccs", "devices", "rekey", "cam", "--dir", nodes[1], "--key-from", str(path),
                     code=1)
        assert says in err and keys() == before
        _, err = run("ccs", "add-device", "cam2", "--dir", nodes[1], "--key-from", str(path),
                     code=1)
        assert says in err
