"""A device install's processes (no cryptography): the libcrypto backend
of fastpunch._aead in a process of its own (FASTPUNCH_AEAD is read once,
at the first handshake), which shares one channel with a cryptography end
and passes the channel's whole unit suite; a command that needs an extra
names it. (Spawns sys.executable: not under qemu-user, scripts/cross-check.)"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys

import pytest

from fastpunch import _aead

pytest.importorskip("cryptography")
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_the_channel_suite_passes_on_libcrypto():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/unit/test_channel.py", "tests/unit/test_session.py"],
                       cwd=ROOT, env={**os.environ, _aead.ENV: "libcrypto"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


CHILD = r"""
import hashlib, os, socket, sys
from fastpunch.channel import SecureSocket
from fastpunch.proto import channel
assert channel.aead_backend()[0] == "libcrypto", channel.aead_backend()
s = SecureSocket(socket.socket(fileno=int(sys.argv[1])), "responder", bytes(range(32)),
                 cipher=channel.Cipher[sys.argv[2]])
got, h = 0, hashlib.sha256()
while got < 3 << 20:
    data = s.recv(1 << 20)
    h.update(data)
    got += len(data)
s.sendall(h.digest() + b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest()
                               for i in range(8192)))
s.close()
"""


@pytest.mark.parametrize("cipher", ["AES_256_GCM", "CHACHA20_POLY1305"])
def test_a_libcrypto_end_and_a_cryptography_end_share_a_channel(cipher):
    from fastpunch.channel import SecureSocket
    from fastpunch.proto import channel

    if channel.aead_backend()[0] != "cryptography":
        pytest.skip("this process runs on libcrypto too (FASTPUNCH_AEAD)")
    a, b = socket.socketpair()
    env = {**os.environ, _aead.ENV: "libcrypto"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(b.fileno()), cipher],
                             pass_fds=(b.fileno(),), env=env)
    b.close()
    try:
        s = SecureSocket(a, "initiator", bytes(range(32)), cipher=channel.Cipher[cipher])
        assert s.cipher is channel.Cipher[cipher]
        payload = os.urandom(3 << 20)
        s.sendall(payload)
        want = hashlib.sha256(payload).digest() + b"".join(
            hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(8192))
        got = b""
        a.settimeout(30)
        while len(got) < len(want):
            data = s.recv(1 << 20)
            assert data, "the libcrypto end closed early"
            got += data
        assert got == want
        assert child.wait(30) == 0
    finally:
        child.kill()
        a.close()


def test_a_command_that_needs_an_extra_names_it_on_a_device_install(tmp_path):
    # a device install has no cryptography: `ccs init` (a CA) says which
    # extra brings it, no traceback; device commands never need it
    code = ("import sys\nsys.modules['cryptography'] = None\n"
            "from fastpunch.cli import main\nsys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "ccs", "init", "--dir", str(tmp_path / "c"),
                        "--ip", "192.0.2.1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "pip install 'fastpunch[ccs]'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-c", code, "camera", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--source" in r.stdout, r.stderr


MAPS_CHILD = r"""
import _ssl, ctypes, sys
from fastpunch import _aead

def libcryptos():
    return {line.split(None, 5)[5].strip() for line in open("/proc/self/maps")
            if len(line.split(None, 5)) == 6 and "libcrypto" in line}

before = libcryptos()                 # what ssl mapped; fastpunch has loaded nothing yet
assert _aead._lib is None          # nothing loaded it yet
lib = _aead._load()
assert ctypes.cast(lib.EVP_aes_256_gcm, ctypes.c_void_p).value
after = libcryptos()
print(sorted(before), sorted(after))
sys.exit(0 if after == before and before else 1)
"""


def test_loading_the_backend_maps_no_second_libcrypto():
    """In a fresh process (the first load is what is checked): the libcrypto
    mappings after fastpunch._aead loads its EVP functions are those Python's
    ssl had mapped before."""
    r = subprocess.run([sys.executable, "-c", MAPS_CHILD], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
