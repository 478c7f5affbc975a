"""nftables rules as data, applied atomically through libnftables (ctypes).

Every ruleset fastpunch installs lives in a table it owns, named
``fastpunch_<pid>_<n>`` so a crashed process's tables can be found and swept
(:func:`sweep_stale`). A table is written in one libnftables transaction
(``add table; delete table; table {...}``) so it appears whole or not at all.

The rule the engine needs most: keep the local kernel from answering a crafted
flow with RSTs. An *input* drop would also hide the peer's packets from our raw
socket (LOCAL_IN runs before raw delivery), so the kernel's RSTs are dropped in
the *output* hook, scoped to the flow's exact ports and peer.
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import json
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

# SO_MARK carried by the engine's own segments: RST suppression must not drop
# the RSTs we craft on purpose.
from fastpunch._engine import ENGINE_MARK
from fastpunch._proc import pid_alive
from fastpunch.errors import InsufficientPrivilegeError, KernelFeatureMissing, NetfilterError

__all__ = [
    "Nftables",
    "Chain",
    "Table",
    "RstSuppression",
    "ScopedTable",
    "suppress_rsts",
    "spoof_rewrite",
    "sweep_stale",
    "TABLE_PREFIX",
]

TABLE_PREFIX = "fastpunch_"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")

_NFT_CTX_OUTPUT_JSON = 1 << 4
_LIB_NAMES = ("libnftables.so.1", "libnftables.so")

# libnftables through ctypes: ten calls with plain C types need no binding
# generator, and ctypes is in every CPython (cffi, used before, cost a
# dependency with pycparser and had no armv7 wheel on the index).
# (name, result type, argument types)
_SIGNATURES = (
    ("nft_ctx_new", ctypes.c_void_p, (ctypes.c_uint32,)),
    ("nft_ctx_free", None, (ctypes.c_void_p,)),
    ("nft_ctx_buffer_output", ctypes.c_int, (ctypes.c_void_p,)),
    ("nft_ctx_get_output_buffer", ctypes.c_char_p, (ctypes.c_void_p,)),
    ("nft_ctx_buffer_error", ctypes.c_int, (ctypes.c_void_p,)),
    ("nft_ctx_get_error_buffer", ctypes.c_char_p, (ctypes.c_void_p,)),
    ("nft_ctx_output_get_flags", ctypes.c_uint, (ctypes.c_void_p,)),
    ("nft_ctx_output_set_flags", None, (ctypes.c_void_p, ctypes.c_uint)),
    ("nft_run_cmd_from_buffer", ctypes.c_int, (ctypes.c_void_p, ctypes.c_char_p)),
)

_lib_lock = threading.Lock()
_lib = None


def _load():
    """The loaded libnftables (KernelFeatureMissing if it is not installed
    or lacks a call fastpunch uses)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            last: Optional[Exception] = None
            for name in _LIB_NAMES:
                try:
                    lib = ctypes.CDLL(name)
                    for fn, restype, argtypes in _SIGNATURES:
                        f = getattr(lib, fn)
                        f.restype, f.argtypes = restype, argtypes
                except (OSError, AttributeError) as exc:
                    last = exc
                    continue
                _lib = lib
                break
            else:
                raise KernelFeatureMissing(
                    "libnftables",
                    "install it (Debian/Ubuntu: apt-get install libnftables1 nftables; "
                    f"Alpine: apk add nftables-libs); loader said: {last}",
                )
    return _lib


# Freeing a context closes its netlink socket, which waits for an RCU grace
# period: 17-28 ms measured, against well under 1 ms for the command itself.
# A punch applies a table before its slot and removes it after the handshake,
# both on the critical path; so contexts are freed by a daemon thread instead.
_reaper_lock = threading.Lock()
_to_free: list = []
_reaper_wakeup = threading.Event()
_reaper: Optional[threading.Thread] = None


def _reap() -> None:
    while True:
        _reaper_wakeup.wait()
        with _reaper_lock:
            batch, _to_free[:] = list(_to_free), []
            _reaper_wakeup.clear()
        for ctx in batch:
            _lib.nft_ctx_free(ctx)


def _free_later(ctx) -> None:
    global _reaper
    with _reaper_lock:
        _to_free.append(ctx)
        if _reaper is None or not _reaper.is_alive():      # (a forked child has none)
            _reaper = threading.Thread(target=_reap, daemon=True, name="fastpunch-nft-free")
            _reaper.start()
        _reaper_wakeup.set()


_NETLINK_NETFILTER = 12
_nfnetlink_ok: set = set()          # network namespaces (inode) where the probe passed


def probe_nfnetlink() -> None:
    """Raise KernelFeatureMissing unless this thread can open the netfilter
    netlink socket libnftables needs.

    libnftables does not return an error when it cannot open that socket: it
    prints ``mnl.c:60: Unable to initialize Netlink socket`` and calls
    ``exit(3)`` inside the library, killing the whole process (seen on a
    vendor kernel without nf_tables: the device died mid-connect, its peer
    waited 38 s). So the socket is opened here first, exactly as
    ``mnl_socket_open`` would (socket + bind, in the calling thread's network
    namespace), and only a process that could is let into the library.

    Once per network namespace: closing a netlink socket waits for an RCU
    grace period (7-25 ms measured), which every nftables command paid
    while this probe ran each time."""
    ns = os.stat("/proc/thread-self/ns/net").st_ino
    if ns in _nfnetlink_ok:
        return
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           _NETLINK_NETFILTER) as s:
            s.bind((0, 0))
    except OSError as exc:
        raise KernelFeatureMissing(
            "nf_tables", f"this kernel offers no netfilter netlink socket ({exc.strerror}): "
            "it lacks CONFIG_NETFILTER_NETLINK / CONFIG_NF_TABLES, or a sandbox forbids it; "
            "crafted strategies cannot keep the kernel from resetting their flows") from exc
    _nfnetlink_ok.add(ns)


# Contexts are kept, one per network namespace (its netlink socket belongs to
# the namespace it was made in), the most recently used few: making one and
# freeing one costs a netlink socket each, and a netlink socket's close
# waits for an RCU grace period (7-25 ms measured) during which the next
# context's bind waited too; a command on a kept context takes 0.2-0.6 ms.
# Few, because a kept context also keeps its namespace alive.
KEPT_CONTEXTS = 4
_contexts: "OrderedDict" = None        # netns inode -> [ctx, lock, usable]
_contexts_lock = threading.Lock()


_contexts_pid = 0


def _context(lib) -> list:
    global _contexts, _contexts_pid
    ns = os.stat("/proc/thread-self/ns/net").st_ino
    with _contexts_lock:
        if _contexts is None or _contexts_pid != os.getpid():
            # (a forked child must not share its parent's netlink sockets)
            from collections import OrderedDict

            _contexts, _contexts_pid = OrderedDict(), os.getpid()
        entry = _contexts.get(ns)
        if entry is not None:
            _contexts.move_to_end(ns)
            return entry
        probe_nfnetlink()       # libnftables would exit() the process instead
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise NetfilterError("libnftables could not create a context")
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        entry = _contexts[ns] = [ctx, threading.Lock(), True]
        while len(_contexts) > KEPT_CONTEXTS:
            _, old = _contexts.popitem(last=False)
            with old[1]:                    # (none of its commands is running)
                old[2] = False              # a thread that got it before: take another
                _free_later(old[0])
        return entry


class Nftables:
    """A thin libnftables handle. :meth:`run` applies in the network
    namespace of the calling thread at call time, on that namespace's kept
    context (``_context``)."""

    def run(self, commands: str, *, json_output: bool = False) -> str:
        lib = _load()
        while True:
            ctx, lock, _ = entry = _context(lib)
            lock.acquire()
            if entry[2]:
                break
            lock.release()             # evicted (freed) since we got it
        try:
            flags = lib.nft_ctx_output_get_flags(ctx)
            lib.nft_ctx_output_set_flags(ctx, (flags | _NFT_CTX_OUTPUT_JSON) if json_output
                                         else (flags & ~_NFT_CTX_OUTPUT_JSON))
            rc = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        finally:
            lock.release()
        if rc != 0:
            if "Operation not permitted" in err or "Permission denied" in err:
                raise InsufficientPrivilegeError("CAP_NET_ADMIN", "changing nftables rules")
            if "Could not process rule: No such file or directory" in err and "hook" in commands:
                raise KernelFeatureMissing("nf_tables", "the kernel lacks CONFIG_NF_TABLES")
            raise NetfilterError("nftables refused the ruleset", err)
        return out

    def tables(self, family: str = "ip") -> list[str]:
        """Names of the tables of one family in the current namespace."""
        data = json.loads(self.run(f"list tables {family}", json_output=True) or "{}")
        return [
            item["table"]["name"]
            for item in data.get("nftables", [])
            if "table" in item and item["table"].get("family") == family
        ]


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"not a usable nftables name: {name!r}")
    return name


@dataclass(frozen=True)
class Chain:
    """A base chain: hook, priority, policy and rules (each an nft rule text)."""

    name: str
    hook: str
    rules: Sequence[str] = ()
    type: str = "filter"
    priority: int = 0
    policy: str = "accept"
    device: Optional[str] = None   # netdev family ingress/egress hooks

    def render(self) -> str:
        _check_name(self.name)
        device = ""
        if self.device is not None:
            if not re.match(r"^[A-Za-z0-9_.-]{1,15}$", self.device):
                raise ValueError(f"not an interface name: {self.device!r}")
            device = f' device "{self.device}"'
        head = (f"type {self.type} hook {self.hook}{device} priority {self.priority}; "
                f"policy {self.policy};")
        body = "".join(f" {rule};" for rule in self.rules)
        return f"chain {self.name} {{ {head}{body} }}"

    def as_dict(self) -> dict:
        return {
            "name": self.name, "hook": self.hook, "rules": list(self.rules), "type": self.type,
            "priority": self.priority, "policy": self.policy, "device": self.device,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Chain":
        return cls(**{**d, "rules": tuple(d.get("rules", ()))})


@dataclass(frozen=True)
class Table:
    """A table we own, rendered as readable nft text and applied atomically."""

    name: str
    chains: Sequence[Chain] = field(default_factory=tuple)
    family: str = "ip"
    regular_chains: Sequence[str] = ()      # empty non-base chains (jump targets)

    def render(self) -> str:
        _check_name(self.name)
        parts = [c.render() for c in self.chains]
        parts += [f"chain {_check_name(name)} {{ }}" for name in self.regular_chains]
        chains = "; ".join(parts)
        return f"table {self.family} {self.name} {{ {chains}{';' if chains else ''} }}"

    def apply_commands(self) -> str:
        # add+delete first: replaces an older table of the same name in the
        # same transaction, and is harmless when there is none.
        return (
            f"add table {self.family} {self.name}\n"
            f"delete table {self.family} {self.name}\n"
            f"{self.render()}\n"
        )

    def delete_commands(self) -> str:
        # idempotent: add then delete never fails on a missing table
        return f"add table {self.family} {self.name}\ndelete table {self.family} {self.name}\n"

    def as_dict(self) -> dict:
        return {"name": self.name, "family": self.family,
                "chains": [c.as_dict() for c in self.chains],
                "regular_chains": list(self.regular_chains)}

    @classmethod
    def from_dict(cls, d: dict) -> "Table":
        return cls(d["name"], tuple(Chain.from_dict(c) for c in d["chains"]), d.get("family", "ip"),
                   tuple(d.get("regular_chains", ())))


@dataclass(frozen=True)
class RstSuppression:
    """Drop the local kernel's RSTs for one crafted flow: from ``local_port``
    to ``peer``:``peer_port`` (either may be None for "any"). Segments carrying
    ``exempt_mark`` (the engine's RawSender mark) pass."""

    local_port: int
    peer: Optional[str] = None
    peer_port: Optional[int] = None
    exempt_mark: Optional[int] = ENGINE_MARK

    @property
    def version(self) -> Optional[int]:
        """4 or 6: the peer's IP version; None when any peer is meant."""
        if self.peer is None:
            return None
        import ipaddress

        return ipaddress.ip_address(self.peer).version

    def rule(self) -> str:
        if not 0 < self.local_port < 65536:
            raise ValueError("local_port must be 1..65535")
        parts = []
        if self.peer is not None:
            import ipaddress

            peer = ipaddress.ip_address(self.peer)
            parts.append(f"{'ip6' if peer.version == 6 else 'ip'} daddr {peer}")
        parts.append(f"tcp sport {self.local_port}")
        if self.peer_port is not None:
            if not 0 < self.peer_port < 65536:
                raise ValueError("peer_port must be 1..65535")
            parts.append(f"tcp dport {self.peer_port}")
        parts.append("tcp flags & rst == rst")
        if self.exempt_mark is not None:
            parts.append(f"meta mark != {self.exempt_mark:#x}")
        parts.append("counter drop")
        return " ".join(parts)


_counter = itertools.count()
_CLONE_NEWNET = 0x40000000


def _in_netns(fd: int, fn):
    """``fn()`` in the network namespace ``fd`` refers to: here when the
    calling thread is already in it, else on a short-lived thread that
    enters it (setns changes only the calling thread's namespace)."""
    if os.fstat(fd).st_ino == os.stat("/proc/thread-self/ns/net").st_ino:
        return fn()
    import ctypes

    outcome: list = []

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            outcome.append((True, fn()))
        except BaseException as exc:        # re-raised on the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=body, name="fastpunch-netns")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def pid_namespace() -> int:
    """The inode of this process's PID namespace (0 if unknown): a pid means
    something only inside its namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def owned_table_name(tag: str = "t") -> str:
    """A fresh table name carrying this process's pid and PID namespace (for
    the stale sweep): ``fastpunch_<pid>_ns<inode>_<tag><n>``."""
    _check_name(tag)
    return f"{TABLE_PREFIX}{os.getpid()}_ns{pid_namespace()}_{tag}{next(_counter)}"


class ScopedTable:
    """Context manager: the table exists inside the block and is gone after it,
    whatever happens (exceptions, cancellation). Removal is idempotent."""

    def __init__(self, table: Table, nft: Optional[Nftables] = None) -> None:
        self.table = table
        self.nft = nft or Nftables()
        self.applied = False
        self._netns: Optional[int] = None      # fd of the namespace it was applied in

    def apply(self) -> "ScopedTable":
        self.nft.run(self.table.apply_commands())
        self.applied = True
        self._netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        _live.add(self)
        return self

    def remove(self) -> None:
        """Delete the table, from whichever thread (and so network
        namespace) calls: the deletion runs in the namespace it was made in."""
        if not self.applied:
            return
        self.applied = False
        _live.discard(self)
        fd, self._netns = self._netns, None
        try:
            _in_netns(fd, lambda: self.nft.run(self.table.delete_commands()))
        finally:
            os.close(fd)

    def __enter__(self) -> "ScopedTable":
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.remove()


# Tables applied and not yet removed: removed when the process exits
# normally (one killed leaves them to sweep_stale, by the pid in their name).
_live: set = set()


@atexit.register
def _remove_live() -> None:
    for table in list(_live):
        try:
            table.remove()
        except Exception:        # exiting: nothing to tell anyone
            pass


def suppress_rsts(rules: Iterable[RstSuppression], nft: Optional[Nftables] = None, *,
                  both: bool = False) -> ScopedTable:
    """A scoped table dropping the kernel's RSTs for the given flows: an
    ``ip`` table for IPv4 peers (and rules for any peer), ``ip6`` for IPv6
    peers, ``inet`` (both) when they are mixed or ``both`` is asked for (a
    rule for any peer that must hold over IPv6 too)."""
    rules = list(rules)
    versions = {r.version for r in rules}
    family = "inet" if both or {4, 6} <= versions or (6 in versions and None in versions) \
        else "ip6" if versions == {6} else "ip"
    table = Table(
        owned_table_name("rst"),
        (Chain("out", "output", tuple(r.rule() for r in rules)),), family,
    )
    return ScopedTable(table, nft)


def spoof_rewrite(local_port: int, peer: str, peer_port: int, ccs: str,
                  nft: Optional[Nftables] = None) -> ScopedTable:
    """The host side of the ``spoof`` strategy, for one flow: our segments
    to ``peer``:``peer_port`` leave with the CCS's address as source, and the
    peer's segments, which arrive with the CCS's address as source, are
    given the peer's address back before anything else sees them (the raw
    receiver, the TCP stack). Stateless rewrites (nft fixes the IP and TCP
    checksums) ahead of conntrack (priority raw, notrack), so the kernel
    socket handed the flow talks to ``peer`` as usual. The table must live
    as long as the connection."""
    import ipaddress

    peer_ip, ccs_ip = ipaddress.IPv4Address(peer), ipaddress.IPv4Address(ccs)
    for port in (local_port, peer_port):
        if not 0 < port < 65536:
            raise ValueError("ports must be 1..65535")
    table = Table(owned_table_name("spoof"), (
        Chain("inbound", "prerouting", (
            f"ip saddr {ccs_ip} tcp sport {peer_port} tcp dport {local_port} "
            f"ip saddr set {peer_ip} notrack counter",), priority=-300),
        Chain("outbound", "output", (
            f"ip daddr {peer_ip} tcp sport {local_port} tcp dport {peer_port} "
            f"ip saddr set {ccs_ip} notrack counter",), priority=-300),
    ))
    return ScopedTable(table, nft)


def sweep_stale(nft: Optional[Nftables] = None, family: Optional[str] = None, *,
                unmarked: bool = True) -> list[str]:
    """Delete tables left by fastpunch processes that no longer exist.
    Returns the names removed.

    Only tables of this PID namespace are judged: containers that share a
    network namespace but not a PID namespace (host networking, a pod's
    sidecars) see each other's tables, and a pid of theirs that is not
    running here may well be running there. ``unmarked``: also tables named
    without a namespace (by earlier versions), as the ``fastpunch sweep``
    command does; the sweeps a device runs on its own leave those."""
    nft = nft or Nftables()
    removed = []
    here = pid_namespace()
    pattern = re.compile(rf"^{TABLE_PREFIX}(\d+)_(?:ns(\d+)_)?")
    for fam in (family,) if family else ("ip", "ip6", "inet"):
        for name in nft.tables(fam):
            m = pattern.match(name)
            if not m:
                continue
            ns = m.group(2)
            if ns is None and not unmarked or ns is not None and int(ns) != here:
                continue
            if not pid_alive(int(m.group(1))):
                nft.run(Table(name, family=fam).delete_commands())
                removed.append(name)
    return removed
