"""The secure channel's AEADs (AES-256-GCM, ChaCha20-Poly1305) and
HKDF-SHA256 on the interpreter's own OpenSSL, through ctypes.

Why not ``cryptography``: it carries its own statically linked OpenSSL
(15.6 MB installed; 8.5 MB more resident when it loads, in a fresh
interpreter) beside the libcrypto that Python's ``ssl`` module has already
mapped for the TLS link to the CCS. A device needs four primitives of it;
this module takes them from the libcrypto already in the process (looked up
through ``_ssl`` itself, so the same library, never a second copy), with
the EVP calls every OpenSSL since 1.1.0 has. ``cryptography`` stays the server's (X.509,
the key store) and the tests' oracle.

Contexts are made once per key and reused: a record costs one
re-initialisation with its nonce, one update for the associated data, one
for the payload, the final call and the tag. HKDF is RFC 5869 on
``hmac``/``hashlib`` (also OpenSSL underneath).

``decrypt`` and ``decrypt_into`` raise :class:`InvalidTag` when the tag
does not verify; the output is then discarded or zeroed, so no
unauthenticated byte leaves."""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import threading
from typing import Optional

from fastpunch.errors import KernelFeatureMissing

__all__ = ["InvalidTag", "AESGCM", "ChaCha20Poly1305", "hkdf", "hkdf_expand", "libcrypto_path"]

TAG = 16
NONCE = 12
KEY = 32
# EVP_CIPHER_CTX_ctrl codes (openssl/evp.h; the AEAD names are aliases of the GCM ones)
_CTRL_AEAD_SET_IVLEN = 0x9
_CTRL_AEAD_GET_TAG = 0x10
_CTRL_AEAD_SET_TAG = 0x11


class InvalidTag(Exception):
    """The record's authentication tag does not verify: forged, corrupted,
    or sealed under another key or nonce."""


MAX_LEN = 2 ** 31 - 1 - TAG       # what EVP's int lengths hold


def libcrypto_path() -> Optional[str]:
    """Where the EVP functions come from: Python's ``_ssl`` extension itself
    (a lookup through it finds the libcrypto it links, the very copy the TLS
    link uses, or OpenSSL linked into it), else the first libcrypto mapped
    in this process, else the system's."""
    try:
        import _ssl
    except ImportError:
        raise KernelFeatureMissing("libcrypto", "this Python has no ssl module (the TLS "
                                                "link to the CCS needs it too)") from None
    import importlib.machinery

    path = getattr(_ssl, "__file__", None)
    if path and path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        return path
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.rstrip("\n").split(None, 5)
                if len(fields) < 6:
                    continue
                base = os.path.basename(fields[5])
                if base.startswith(("libcrypto.so", "libcrypto-")):
                    return fields[5]
    except OSError:
        pass
    import ctypes.util

    return ctypes.util.find_library("crypto")


_lib = None
_lock = threading.Lock()


def _load():
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        path = libcrypto_path()
        if path is None:
            raise KernelFeatureMissing("libcrypto", "none found (the one Python's ssl module "
                                                    "uses): the secure channel needs OpenSSL "
                                                    ">= 1.1.0")
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise KernelFeatureMissing("libcrypto", f"cannot load {path}: {exc}") from None
        P, I = ctypes.c_void_p, ctypes.c_int
        C = P        # buffers: bytes, or a ctypes array over a writable view
        IP = ctypes.POINTER(ctypes.c_int)
        for name, res, args in (
                ("EVP_CIPHER_CTX_new", P, ()),
                ("EVP_CIPHER_CTX_free", None, (P,)),
                ("EVP_CIPHER_CTX_ctrl", I, (P, I, I, P)),
                ("EVP_EncryptInit_ex", I, (P, P, P, C, C)),
                ("EVP_DecryptInit_ex", I, (P, P, P, C, C)),
                ("EVP_EncryptUpdate", I, (P, P, IP, C, I)),
                ("EVP_DecryptUpdate", I, (P, P, IP, C, I)),
                ("EVP_EncryptFinal_ex", I, (P, P, IP)),
                ("EVP_DecryptFinal_ex", I, (P, P, IP))):
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise KernelFeatureMissing("libcrypto", f"{path} has no {name}: the secure "
                                                        "channel needs OpenSSL >= 1.1.0") from None
            fn.restype, fn.argtypes = res, args
        _lib = lib
        return lib


class _Aead:
    """One key, two contexts (seal and open), reused record after record.
    Not for concurrent use of one direction from several threads: the
    channel seals under a lock, and its sending and receiving keys are
    separate objects."""

    _cipher_name = ""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise TypeError("key must be bytes")         # (bytes(32) would be 32 zeros)
        key = bytes(key)
        if len(key) != KEY:
            raise ValueError(f"{type(self).__name__} takes a {KEY}-byte key, not {len(key)}")
        lib = self._lib = _load()
        try:            # each cipher on its own: a libcrypto built without one keeps the other
            get = getattr(lib, self._cipher_name)
        except AttributeError:
            raise KernelFeatureMissing("libcrypto", f"it has no {self._cipher_name} (the "
                                                    "peer may offer the other cipher)") from None
        get.restype, get.argtypes = ctypes.c_void_p, ()
        cipher = get()
        self._enc = self._ctx(lib.EVP_EncryptInit_ex, cipher, key)
        self._dec = self._ctx(lib.EVP_DecryptInit_ex, cipher, key)
        # per direction: a sender and a receiver thread may share one key
        self._enc_len, self._dec_len = ctypes.c_int(), ctypes.c_int()
        self._enc_tag = ctypes.create_string_buffer(TAG)
        self._dec_scratch = ctypes.create_string_buffer(TAG)

    def _ctx(self, init, cipher, key: bytes):
        lib = self._lib
        ctx = lib.EVP_CIPHER_CTX_new()
        if not ctx:
            raise MemoryError("EVP_CIPHER_CTX_new")
        ok = (init(ctx, cipher, None, None, None) == 1
              and lib.EVP_CIPHER_CTX_ctrl(ctx, _CTRL_AEAD_SET_IVLEN, NONCE, None) == 1
              and init(ctx, None, None, key, None) == 1)
        if not ok:
            lib.EVP_CIPHER_CTX_free(ctx)
            raise ValueError(f"libcrypto refused the {self._cipher_name} key")
        return ctx

    def __del__(self) -> None:
        lib = getattr(self, "_lib", None)
        for name in ("_enc", "_dec"):
            ctx = getattr(self, name, None)
            if lib is not None and ctx:
                lib.EVP_CIPHER_CTX_free(ctx)

    def encrypt(self, nonce: bytes, data: bytes, aad: Optional[bytes]) -> bytes:
        """ciphertext || 16-byte tag."""
        nonce = _checked(nonce, data, aad)
        lib, ctx, outl, tag = self._lib, self._enc, ctypes.byref(self._enc_len), self._enc_tag
        data = bytes(data)           # (the same object for bytes; a copy of a view)
        aad = bytes(aad) if aad else None
        out = ctypes.create_string_buffer(len(data) + TAG)
        ok = lib.EVP_EncryptInit_ex(ctx, None, None, None, nonce) == 1
        if ok and aad:
            ok = lib.EVP_EncryptUpdate(ctx, None, outl, aad, len(aad)) == 1
        if ok and data:
            ok = lib.EVP_EncryptUpdate(ctx, out, outl, data, len(data)) == 1
        ok = ok and lib.EVP_EncryptFinal_ex(ctx, tag, outl) == 1 \
            and lib.EVP_CIPHER_CTX_ctrl(ctx, _CTRL_AEAD_GET_TAG, TAG, tag) == 1
        if not ok:
            raise RuntimeError(f"libcrypto failed to seal a record ({self._cipher_name})")
        ctypes.memmove(ctypes.addressof(out) + len(data), tag, TAG)
        return out.raw

    def decrypt(self, nonce: bytes, data: bytes, aad: Optional[bytes]) -> bytes:
        """The plaintext of ciphertext || tag, or InvalidTag."""
        nonce = _checked(nonce, data, aad)
        data = bytes(data)
        aad = bytes(aad) if aad else None
        n = len(data) - TAG
        if n < 0:
            raise InvalidTag()
        lib, ctx, outl = self._lib, self._dec, ctypes.byref(self._dec_len)
        out = ctypes.create_string_buffer(max(n, 1))
        ok = lib.EVP_DecryptInit_ex(ctx, None, None, None, nonce) == 1
        if ok and aad:
            ok = lib.EVP_DecryptUpdate(ctx, None, outl, aad, len(aad)) == 1
        if ok and n:
            ok = lib.EVP_DecryptUpdate(ctx, out, outl, data, n) == 1
        if not ok:
            raise RuntimeError(f"libcrypto failed to open a record ({self._cipher_name})")
        if lib.EVP_CIPHER_CTX_ctrl(ctx, _CTRL_AEAD_SET_TAG, TAG, data[n:]) != 1 \
                or lib.EVP_DecryptFinal_ex(ctx, self._dec_scratch, outl) != 1:
            raise InvalidTag()
        return out.raw[:n]


    # -- in place, as cryptography >= 45 names them: the channel seals and
    # opens runs of records straight into one output buffer
    def encrypt_into(self, nonce: bytes, data, aad: Optional[bytes], buf) -> int:
        """Seal ``data`` into the writable ``buf`` (len(data) + 16 bytes)."""
        n = len(data)
        nonce = _checked(nonce, data, aad)
        if len(buf) != n + TAG:
            raise ValueError("encrypt_into: buf must be len(data) + 16 bytes")
        lib, ctx, outl = self._lib, self._enc, ctypes.byref(self._enc_len)
        out = (ctypes.c_char * (n + TAG)).from_buffer(buf)
        ok = lib.EVP_EncryptInit_ex(ctx, None, None, None, nonce) == 1
        if ok and aad:
            ok = lib.EVP_EncryptUpdate(ctx, None, outl, _pointer(aad), len(aad)) == 1
        if ok and n:
            ok = lib.EVP_EncryptUpdate(ctx, out, outl, _pointer(data), n) == 1
        tag = ctypes.byref(out, n)
        ok = ok and lib.EVP_EncryptFinal_ex(ctx, tag, outl) == 1 \
            and lib.EVP_CIPHER_CTX_ctrl(ctx, _CTRL_AEAD_GET_TAG, TAG, tag) == 1
        if not ok:
            raise RuntimeError(f"libcrypto failed to seal a record ({self._cipher_name})")
        return n + TAG

    def decrypt_into(self, nonce: bytes, data, aad: Optional[bytes], buf) -> int:
        """Open ciphertext || tag into the writable ``buf`` (len(data) - 16
        bytes); InvalidTag leaves ``buf`` zeroed, never unauthenticated."""
        n = len(data) - TAG
        if n < 0:
            raise InvalidTag()
        nonce = _checked(nonce, data, aad)
        if len(buf) != n:
            raise ValueError("decrypt_into: buf must be len(data) - 16 bytes")
        lib, ctx, outl = self._lib, self._dec, ctypes.byref(self._dec_len)
        src = _pointer(data)
        out = (ctypes.c_char * n).from_buffer(buf) if n else None
        ok = lib.EVP_DecryptInit_ex(ctx, None, None, None, nonce) == 1
        if ok and aad:
            ok = lib.EVP_DecryptUpdate(ctx, None, outl, _pointer(aad), len(aad)) == 1
        if ok and n:
            ok = lib.EVP_DecryptUpdate(ctx, out, outl, src, n) == 1
        if not ok:
            if n:
                ctypes.memset(out, 0, n)
            raise RuntimeError(f"libcrypto failed to open a record ({self._cipher_name})")
        tag = bytes(memoryview(data)[n:])
        if lib.EVP_CIPHER_CTX_ctrl(ctx, _CTRL_AEAD_SET_TAG, TAG, tag) != 1 \
                or lib.EVP_DecryptFinal_ex(ctx, self._dec_scratch, outl) != 1:
            if n:
                ctypes.memset(out, 0, n)
            raise InvalidTag()
        return n


def _checked(nonce, data, aad) -> bytes:
    """The nonce as bytes; ValueError or OverflowError for what EVP's int
    lengths or the 12-byte nonce do not take."""
    if not isinstance(nonce, (bytes, bytearray, memoryview)):
        raise TypeError("nonce must be bytes")      # (bytes(12) would be twelve zeros)
    nonce = bytes(nonce)
    if len(nonce) != NONCE:
        raise ValueError(f"nonce must be {NONCE} bytes")
    if len(data) > MAX_LEN or (aad is not None and len(aad) > MAX_LEN):
        raise OverflowError("data and associated data must be under 2 GiB")
    return nonce


def _pointer(data):
    """What a const buffer argument takes: bytes as they are, a writable
    view without a copy, any other view copied."""
    if isinstance(data, bytes):
        return data
    view = memoryview(data)
    if not view.readonly and view.contiguous:
        return (ctypes.c_char * view.nbytes).from_buffer(view)
    return bytes(view)


class AESGCM(_Aead):
    _cipher_name = "EVP_aes_256_gcm"


class ChaCha20Poly1305(_Aead):
    _cipher_name = "EVP_chacha20_poly1305"


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-Expand with HMAC-SHA256."""
    if not 0 < length <= 255 * 32:
        raise ValueError("HKDF-SHA256 output is 1 to 8160 bytes")
    out, block, i = b"", b"", 0
    while len(out) < length:
        i += 1
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
    return out[:length]


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF (extract, then expand) with HMAC-SHA256."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    return hkdf_expand(prk, info, length)


BACKENDS = ("cryptography", "libcrypto")
ENV = "FASTPUNCH_AEAD"


def select(name: Optional[str] = None):
    """(backend name, AES-256-GCM class, ChaCha20-Poly1305 class, the
    InvalidTag exceptions to catch). ``name`` (else $FASTPUNCH_AEAD, else
    the first that imports): "cryptography" where it is installed (its
    per-record cost is lower: about 3 against 10-15 us for a 16 KiB record, both
    far above any WAN link; docs/benchmarks.md), "libcrypto" otherwise (a
    device install without it)."""
    name = name or os.environ.get(ENV) or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{ENV} must be one of {', '.join(BACKENDS)}, not {name!r}")
    if name in (None, "cryptography"):
        try:
            from cryptography.exceptions import InvalidTag as CryptographyInvalidTag
            from cryptography.hazmat.primitives.ciphers.aead import (
                AESGCM as CryptographyAESGCM, ChaCha20Poly1305 as CryptographyChaCha,
            )
        except ImportError:
            if name == "cryptography":
                raise
        else:
            return ("cryptography", CryptographyAESGCM, CryptographyChaCha,
                    (CryptographyInvalidTag, InvalidTag))
    _load()                      # a missing libcrypto is a KernelFeatureMissing now, not later
    return "libcrypto", AESGCM, ChaCha20Poly1305, (InvalidTag,)
