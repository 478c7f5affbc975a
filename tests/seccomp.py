"""Make a kernel feature unavailable to one process, as a kernel without it
would: a seccomp filter that fails the syscall that reaches the feature.

Used by tests that must show fastpunch tells why and carries on (never dies)
on vendor kernels without a feature. Each ``deny_*`` fails one call with the
errno such a kernel answers:

* ``deny_nfnetlink()``: ``socket(AF_NETLINK, *, NETLINK_NETFILTER)`` ->
  EPROTONOSUPPORT (no CONFIG_NETFILTER_NETLINK / nf_tables);
* ``deny_raw()``: ``socket(AF_INET, SOCK_RAW, *)`` -> EPERM (no CAP_NET_RAW,
  or a container that forbids raw sockets);
* ``deny_repair()``: ``setsockopt(*, SOL_TCP, TCP_REPAIR)`` -> ENOPROTOOPT
  (a kernel built without TCP repair);
* ``deny_mark()``: ``setsockopt(*, SOL_SOCKET, SO_MARK)`` -> ENOPROTOOPT.

The filter is irreversible and inherited: install it in a child process only.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import socket
import struct

# audit arch, socket(2) and setsockopt(2) syscall numbers per machine
_ARCH = {"x86_64": (0xC000003E, 41, 54), "aarch64": (0xC00000B7, 198, 208),
         "armv7l": (0x40000028, 281, 294)}
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_LD_W_ABS, _JEQ_K, _RET_K, _AND_K = 0x20, 0x15, 0x06, 0x54
_TYPE_MASK = 0xF                       # SOCK_RAW | SOCK_CLOEXEC...: the type is the low bits
_TCP_REPAIR, _SO_MARK = 19, 36


def supported() -> bool:
    return platform.machine() in _ARCH


def _deny(syscall: int, args: tuple, err: int) -> None:
    """Fail ``syscall`` with ``err`` where every (index, value[, mask]) of
    ``args`` matches; let everything else through."""
    arch = _ARCH[platform.machine()][0]
    # struct seccomp_data: nr @0, arch @4, ip @8, args[6] @16 (low words first)
    checks = []
    for arg in args:
        index, value, mask = (*arg, None) if len(arg) == 2 else arg
        checks.append([(_LD_W_ABS, 0, 0, 16 + 8 * index)] +
                      ([(_AND_K, 0, 0, mask)] if mask is not None else []) + [(_JEQ_K, 0, None, value)])
    prog = [(_LD_W_ABS, 0, 0, 4), (_JEQ_K, 0, None, arch),
            (_LD_W_ABS, 0, 0, 0), (_JEQ_K, 0, None, syscall)]
    for block in checks:
        prog.extend(block)
    prog.append((_RET_K, 0, 0, _RET_ERRNO | err))
    allow = len(prog)
    prog.append((_RET_K, 0, 0, _RET_ALLOW))
    # every "no match" jumps to the allow at the end
    prog = [(c, jt, allow - i - 1 if jf is None else jf, k) for i, (c, jt, jf, k) in enumerate(prog)]
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {errno.errorcode.get(err, err)}")


def deny_nfnetlink() -> None:
    _deny(_ARCH[platform.machine()][1], ((0, socket.AF_NETLINK), (2, 12)), errno.EPROTONOSUPPORT)


def deny_raw() -> None:
    _deny(_ARCH[platform.machine()][1], ((0, socket.AF_INET), (1, socket.SOCK_RAW, _TYPE_MASK)),
          errno.EPERM)


def deny_repair() -> None:
    _deny(_ARCH[platform.machine()][2], ((1, socket.SOL_TCP), (2, _TCP_REPAIR)), errno.ENOPROTOOPT)


def deny_mark() -> None:
    _deny(_ARCH[platform.machine()][2], ((1, socket.SOL_SOCKET), (2, _SO_MARK)), errno.ENOPROTOOPT)
