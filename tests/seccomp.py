"""Make a kernel feature unavailable to one process, as a kernel without it
would: a seccomp filter that fails the syscall that reaches the feature.

Used by tests that must show fastpunch tells why and carries on (never dies)
on vendor kernels without nf_tables: ``deny_nfnetlink()`` makes
``socket(AF_NETLINK, *, NETLINK_NETFILTER)`` fail with EPROTONOSUPPORT, what
a kernel without CONFIG_NETFILTER_NETLINK answers. The filter is
irreversible and inherited: install it in a child process only.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

# (audit arch, socket(2) syscall number) per machine
_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198), "armv7l": (0x40000028, 281)}
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_AF_NETLINK, _NETLINK_NETFILTER = 16, 12


def supported() -> bool:
    return platform.machine() in _ARCH


def deny_nfnetlink() -> None:
    arch, nr_socket = _ARCH[platform.machine()]
    # struct seccomp_data: nr @0, arch @4, ip @8, args[6] @16 (low words first)
    prog = [
        (_LD_W_ABS, 0, 0, 4), (_JEQ_K, 0, 7, arch),
        (_LD_W_ABS, 0, 0, 0), (_JEQ_K, 0, 5, nr_socket),
        (_LD_W_ABS, 0, 0, 16), (_JEQ_K, 0, 3, _AF_NETLINK),
        (_LD_W_ABS, 0, 0, 32), (_JEQ_K, 0, 1, _NETLINK_NETFILTER),
        (_RET_K, 0, 0, _RET_ERRNO | errno.EPROTONOSUPPORT),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
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
