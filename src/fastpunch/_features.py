"""Probe, before a crafted punch relies on them, every kernel feature it
needs, so a device on an odd kernel learns what is missing up front (and
announces that it cannot craft segments) instead of failing mid-handshake
or, for nf_tables, being killed by libnftables' exit():

* raw IPv4 sockets (CAP_NET_RAW; some containers forbid them outright);
* SO_MARK on them, which exempts our own RSTs from suppression (CAP_NET_ADMIN);
* TCP_REPAIR, the hand-off to a kernel socket (CAP_NET_ADMIN; in every
  kernel since 3.5, but a sandbox or an LSM may refuse it);
* the netfilter netlink socket libnftables opens (nf_tables).

A missing privilege is :class:`InsufficientPrivilegeError`, a missing feature
:class:`KernelFeatureMissing`, each naming it; nothing here exits."""

from __future__ import annotations

import errno
import os
import socket

from fastpunch import _caps
from fastpunch.errors import InsufficientPrivilegeError, KernelFeatureMissing

__all__ = ["require_crafted", "probe_raw", "probe_mark", "probe_repair"]

_TCP_REPAIR = 19
_SO_MARK = getattr(socket, "SO_MARK", 36)
_DENIED = (errno.EPERM, errno.EACCES)
# what a kernel (or a sandbox standing in for one) answers for a feature it
# does not offer; anything else (EMFILE, ENOBUFS, ENOMEM...) is a passing
# condition, raised as the OSError it is, and not taken for a missing feature
_ABSENT = (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT,
           errno.ENOPROTOOPT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def probe_raw() -> None:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP).close()
    except OSError as exc:
        if exc.errno in _DENIED:
            raise InsufficientPrivilegeError("CAP_NET_RAW", "raw sockets") from exc
        if exc.errno not in _ABSENT:
            raise
        raise KernelFeatureMissing(
            "raw sockets", f"socket(AF_INET, SOCK_RAW, IPPROTO_TCP) failed: {exc.strerror}") from exc


def _setsockopt(level: int, option: str, number: int, value: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(level, number, value)
        except OSError as exc:
            if exc.errno in _DENIED:
                raise InsufficientPrivilegeError("CAP_NET_ADMIN", option) from exc
            if exc.errno not in _ABSENT:
                raise
            raise KernelFeatureMissing(
                option, f"this kernel refuses it ({exc.strerror}): crafted flows cannot "
                        "be handed to the kernel or marked") from exc


def probe_mark() -> None:
    _setsockopt(socket.SOL_SOCKET, "SO_MARK", _SO_MARK, 1)


def probe_repair() -> None:
    # (on a socket that was never connected: repair mode is then a no-op to leave)
    _setsockopt(socket.SOL_TCP, "TCP_REPAIR", _TCP_REPAIR, 1)


_passed: set = set()        # (pid, network namespace inode) where every probe passed


def require_crafted() -> None:
    """Everything a crafted punch needs, or the first thing missing, named.
    Once it all passed in a namespace it is not probed again there (this
    runs before every crafted punch, on its critical path)."""
    from fastpunch import netfilter

    key = (os.getpid(), os.stat("/proc/thread-self/ns/net").st_ino)
    if key in _passed:
        return
    _caps.require("crafted handshake and kernel hand-off", _caps.CAP_NET_RAW, _caps.CAP_NET_ADMIN)
    probe_raw()
    probe_mark()
    probe_repair()
    netfilter.probe_nfnetlink()       # libnftables would exit() the process instead
    _passed.add(key)
