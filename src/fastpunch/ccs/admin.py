"""``fastpunch ccs devices ...``, ``fastpunch ccs acl ...`` and
``fastpunch ccs audit``: the device lifecycle from the command line.

Output is JSON on stdout: one object (a device's state, credentials, an ACL
pair), or JSON lines for lists. Every change also writes its audit row to
stderr as one JSON line (``{"event": "audit", ...}``, the shape a CCS node
logs when it applies it). A running node applies a change within its
watcher's poll (0.25 s): the device's session is cut with the change's
code, its relays and rendezvous end, its peers are told. Unknown devices are
an error (exit code 1) naming what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from fastpunch.ccs.cli import DEFAULT_DIR, _secret_file, _store, key_from
from fastpunch.ccs.keystore import KeyStore, UnknownDeviceError


def add_subparsers(cmds) -> None:
    """Register ``devices``, ``acl`` and ``audit`` under ``fastpunch ccs``."""
    devices = cmds.add_parser("devices", help="list, show, disable, enable, remove or rekey "
                                              "enrolled devices")
    dcmds = devices.add_subparsers(dest="devices_command", required=True)

    p = dcmds.add_parser("list", help="every device and its state (JSON lines)")
    _dir(p)
    p.set_defaults(func=cmd_list)

    p = dcmds.add_parser("show", help="one device: state, whom it may reach, its last change")
    p.add_argument("name")
    _dir(p)
    p.set_defaults(func=cmd_show)

    for verb, func, text in (
            ("disable", cmd_disable, "refuse the device's logins and cut its session (the key "
                                     "and ACL are kept for enable)"),
            ("enable", cmd_enable, "let a disabled device log in again"),
            ("remove", cmd_remove, "forget the device, its key and its ACL rows; cut its session")):
        p = dcmds.add_parser(verb, help=text)
        p.add_argument("name")
        _dir(p)
        p.set_defaults(func=func)

    p = dcmds.add_parser("rekey", help="give the device a new key (the old one stops working at "
                                       "once) and print its new credentials")
    p.add_argument("name")
    p.add_argument("--key-file", help="write the new credentials here (0600) instead of "
                                      "printing the key")
    p.add_argument("--key-from", metavar="FILE",
                   help="take the new key from these credentials (the rekey made on another "
                        "node) instead of making one")
    _dir(p)
    p.set_defaults(func=cmd_rekey)

    acl = cmds.add_parser("acl", help="which devices may rendezvous (both directions)")
    acmds = acl.add_subparsers(dest="acl_command", required=True)
    for verb, func, text in (("allow", cmd_acl_allow, "let two enrolled devices rendezvous"),
                             ("deny", cmd_acl_deny, "stop two devices meeting (what they have "
                                                    "under way ends)")):
        p = acmds.add_parser(verb, help=text)
        p.add_argument("a")
        p.add_argument("b")
        _dir(p)
        p.set_defaults(func=func)
    p = acmds.add_parser("list", help="the ACL pairs, of NAME if given (JSON lines)")
    p.add_argument("name", nargs="?")
    _dir(p)
    p.set_defaults(func=cmd_acl_list)

    p = cmds.add_parser("audit", help="the audit log: who changed what, when (JSON lines)")
    p.add_argument("--since", type=int, default=0, metavar="SEQ", help="rows after this one")
    p.add_argument("--device", metavar="NAME", help="rows about this device only")
    _dir(p)
    p.set_defaults(func=cmd_audit)


def _dir(p) -> None:
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"deployment directory (default {DEFAULT_DIR})")


def _out(obj) -> None:
    print(json.dumps(obj), flush=True)


def say_audit(store: KeyStore) -> None:
    """The audit rows of the change just made, one JSON line each on stderr."""
    for row in store.changes:
        print(json.dumps({"event": "audit", **row.as_dict()}), file=sys.stderr, flush=True)


def _run(args, change):
    """Open the store, ``change(store)``, say its audit rows, close."""
    store = _store(args)
    try:
        result = change(store)
        say_audit(store)
        return result
    finally:
        store.close()


# -- devices ------------------------------------------------------------------------
def cmd_list(args) -> int:
    for device in _run(args, KeyStore.list_devices):
        _out(device)
    return 0


def cmd_show(args) -> int:
    _out(_run(args, lambda store: store.show(args.name)))
    return 0


def cmd_disable(args) -> int:
    _out(_run(args, lambda store: (store.disable(args.name), store.show(args.name))[1]))
    return 0


def cmd_enable(args) -> int:
    _out(_run(args, lambda store: (store.enable(args.name), store.show(args.name))[1]))
    return 0


def cmd_remove(args) -> int:
    row = _run(args, lambda store: store.remove(args.name))
    _out({"name": args.name, "state": "removed", "detail": row.detail})
    return 0


def cmd_rekey(args) -> int:
    def change(store):
        _enrolled(store, args.name)        # (before a key file is made for nobody)
        given = key_from(args.key_from, args.name)
        # the file is ready before the key changes: a path that cannot take the
        # new key fails the command with the old key still in force
        with _secret_file(args.key_file) if args.key_file else contextlib.nullcontext() as write:
            key, row = store.rekey(args.name, given)
            creds = {"name": args.name, "key": key.hex(), "ca": os.path.join(args.dir, "ca.pem")}
            if write is not None:
                write(json.dumps(creds) + "\n")
                creds = {"name": args.name, "key_file": args.key_file}   # the key stays off stdout
            elif given is not None:
                creds = {"name": args.name, "key_from": args.key_from}   # (it is in that file)
        return {**creds, "generation": row.seq}

    _out(_run(args, change))
    return 0


# -- the ACL --------------------------------------------------------------------------
def _enrolled(store: KeyStore, *names: str) -> None:
    for name in names:
        if store.state(name) is None:
            raise UnknownDeviceError(name)


def cmd_acl_allow(args) -> int:
    def change(store):
        _enrolled(store, args.a, args.b)
        store.allow(args.a, args.b)
        return store.may_reach(args.a, args.b)

    _out({"a": args.a, "b": args.b, "allowed": True, "active": _run(args, change)})
    return 0


def cmd_acl_deny(args) -> int:
    def change(store):
        _enrolled(store, args.a, args.b)
        return store.deny(args.a, args.b)

    row = _run(args, change)
    _out({"a": args.a, "b": args.b, "allowed": False, "detail": row.detail})
    return 0


def cmd_acl_list(args) -> int:
    def read(store):
        if args.name is not None:
            _enrolled(store, args.name)
        return store.acl(args.name)

    for pair in _run(args, read):
        _out(pair)
    return 0


def cmd_audit(args) -> int:
    for row in _run(args, lambda store: store.audit_since(args.since, args.device)):
        _out(row.as_dict())
    return 0
