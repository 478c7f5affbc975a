"""fastpunch._aead: the channel's AEADs on the process's own libcrypto
(a device install without ``cryptography``), against published vectors and
against ``cryptography`` as the oracle; forgeries fail; a libcrypto that is
missing is named; and both backends speak one channel."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings, strategies as st

from fastpunch import _aead
from fastpunch.errors import KernelFeatureMissing

crypto_aead = pytest.importorskip("cryptography.hazmat.primitives.ciphers.aead")
PAIRS = [(_aead.AESGCM, crypto_aead.AESGCM),
         (_aead.ChaCha20Poly1305, crypto_aead.ChaCha20Poly1305)]


def test_published_vectors():
    # AES-256-GCM: the GCM specification's test cases 13 and 14
    aes = _aead.AESGCM(bytes(32))
    assert aes.encrypt(bytes(12), b"", None).hex() == "530f8afbc74536b9a963b4f1c4cb738b"
    assert aes.encrypt(bytes(12), bytes(16), None).hex() == \
        "cea7403d4d606b6e074ec5d3baf39d18" + "d0d1c8a799996bf0265b98b5d48ab919"
    # ChaCha20-Poly1305: RFC 8439 section 2.8.2
    key = bytes(range(0x80, 0xa0))
    nonce = bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    text = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
            b"for the future, sunscreen would be it.")
    sealed = _aead.ChaCha20Poly1305(key).encrypt(nonce, text, aad)
    assert sealed[:16].hex() == "d31a8d34648e60db7b86afbc53ef7ec2"
    assert sealed[-16:].hex() == "1ae10b594f09e26a7e902ecbd0600691"
    assert _aead.ChaCha20Poly1305(key).decrypt(nonce, sealed, aad) == text
    # HKDF-SHA256: RFC 5869 test case 1
    okm = _aead.hkdf(bytes([0x0b] * 22), bytes(range(13)), bytes(range(0xf0, 0xfa)), 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), nonce=st.binary(min_size=12, max_size=12),
       data=st.binary(max_size=20000), aad=st.one_of(st.none(), st.binary(max_size=64)),
       which=st.sampled_from([0, 1]))
def test_the_same_bytes_as_cryptography(key, nonce, data, aad, which):
    ours, theirs = PAIRS[which][0](key), PAIRS[which][1](key)
    sealed = ours.encrypt(nonce, data, aad)
    assert sealed == theirs.encrypt(nonce, data, aad)
    assert ours.decrypt(nonce, sealed, aad) == data
    assert theirs.decrypt(nonce, sealed, aad) == data


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=2000), flip=st.integers(min_value=0),
       which=st.sampled_from([0, 1]), part=st.sampled_from(["body", "aad", "nonce"]))
def test_any_altered_bit_is_invalid_tag(data, flip, which, part):
    key, nonce, aad = os.urandom(32), os.urandom(12), b"header"
    a = PAIRS[which][0](key)
    sealed = a.encrypt(nonce, data, aad)

    def flipped(b: bytes) -> bytes:
        i = flip % (len(b) * 8)
        out = bytearray(b)
        out[i // 8] ^= 1 << (i % 8)
        return bytes(out)

    args = {"body": (nonce, flipped(sealed), aad), "aad": (nonce, sealed, flipped(aad)),
            "nonce": (flipped(nonce), sealed, aad)}[part]
    with pytest.raises(_aead.InvalidTag):
        a.decrypt(*args)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=20000), which=st.sampled_from([0, 1]),
       writable=st.booleans())
def test_in_place_sealing_and_opening_match_cryptography(data, which, writable):
    key, nonce, aad = os.urandom(32), os.urandom(12), b"hdr"
    ours, theirs = PAIRS[which][0](key), PAIRS[which][1](key)
    out = bytearray(len(data) + 16)
    src = memoryview(bytearray(data) if writable else data)
    assert ours.encrypt_into(nonce, src, memoryview(aad), memoryview(out)) == len(out)
    assert bytes(out) == theirs.encrypt(nonce, data, aad)
    back = bytearray(len(data))
    sealed = memoryview(out) if writable else bytes(out)
    assert ours.decrypt_into(nonce, sealed, aad, memoryview(back)) == len(data)
    assert bytes(back) == data
    if data:
        out[0] ^= 1
        with pytest.raises(_aead.InvalidTag):
            ours.decrypt_into(nonce, memoryview(out), aad, memoryview(back))
        assert back == bytearray(len(data))          # nothing unauthenticated left
    with pytest.raises(ValueError, match="buf"):
        ours.encrypt_into(nonce, data, aad, bytearray(len(data)))


def test_bad_arguments_are_refused():
    for cls, _ in PAIRS:
        with pytest.raises(ValueError, match="32-byte key"):
            cls(bytes(16))
        with pytest.raises(TypeError, match="key"):
            cls(32)                                   # not 32 zero bytes
        a = cls(bytes(32))
        with pytest.raises(ValueError, match="nonce"):
            a.encrypt(bytes(8), b"x", None)
        with pytest.raises(TypeError, match="nonce"):
            a.encrypt(12, b"x", None)                 # not twelve zero bytes
        with pytest.raises(_aead.InvalidTag):
            a.decrypt(bytes(12), b"short", None)      # shorter than a tag
        with pytest.raises(_aead.InvalidTag):
            a.decrypt(bytes(12), cls(bytes(range(32))).encrypt(bytes(12), b"x", None), None)
    with pytest.raises(ValueError, match="8160"):
        _aead.hkdf_expand(bytes(32), b"", 8161)


def test_the_backend_is_chosen_and_a_bad_choice_named(monkeypatch):
    assert _aead.select("libcrypto")[0] == "libcrypto"
    assert _aead.select("cryptography")[0] == "cryptography"
    monkeypatch.setenv(_aead.ENV, "libcrypto")
    name, aes, chacha, invalid = _aead.select()
    assert (name, aes, chacha, invalid) == ("libcrypto", _aead.AESGCM, _aead.ChaCha20Poly1305,
                                            (_aead.InvalidTag,))
    monkeypatch.setenv(_aead.ENV, "openssl-please")
    with pytest.raises(ValueError, match="FASTPUNCH_AEAD"):
        _aead.select()


def test_a_missing_libcrypto_is_named_not_a_crash(monkeypatch):
    monkeypatch.setattr(_aead, "_lib", None)
    monkeypatch.setattr(_aead, "libcrypto_path", lambda: None)
    with pytest.raises(KernelFeatureMissing) as err:
        _aead.select("libcrypto")
    assert err.value.feature == "libcrypto" and "OpenSSL" in str(err.value)
    monkeypatch.setattr(_aead, "libcrypto_path", lambda: "/nonexistent/libcrypto.so.3")
    with pytest.raises(KernelFeatureMissing, match="cannot load"):
        _aead.AESGCM(bytes(32))


def test_the_library_is_the_one_ssl_already_mapped():
    # the EVP functions resolve through Python's own _ssl: the libcrypto
    # the TLS link uses, already mapped, never a second copy
    import ctypes
    import _ssl

    path = _aead.libcrypto_path()
    assert path == getattr(_ssl, "__file__", path)
    assert path in open("/proc/self/maps").read()
    fn = ctypes.cast(_aead._load().EVP_aes_256_gcm, ctypes.c_void_p).value
    owner = [line.split(None, 5)[5] for line in open("/proc/self/maps")
             if len(line.split(None, 5)) == 6
             and int(line.split("-")[0], 16) <= fn < int(line.split()[0].split("-")[1], 16)]
    assert owner and ("libcrypto" in owner[0] or owner[0] == path), owner
    # (that loading maps no second libcrypto is checked in a fresh process,
    # whose maps are read before the first load: test_aead_processes.py)
