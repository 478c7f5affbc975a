"""Device authentication: HMAC-SHA256 challenge-response over both nonces.

The client proves knowledge of its per-device key over (name, server nonce,
client nonce); the server answers with its own proof over the same values
under a different label, so a device also knows it reached a CCS holding its
key. A fresh server nonce per connection makes every recorded response
useless later (no replay); the client nonce stops a rogue server from
collecting proofs for nonces of its choosing.
"""

from __future__ import annotations

import hashlib
import hmac

KEY_BYTES = 32
NONCE_BYTES = 32
_CLIENT = b"fastpunch-ccs-auth-v1 client"
_SERVER = b"fastpunch-ccs-auth-v1 server"


def _mac(label: bytes, key: bytes, name: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    encoded = name.encode("utf-8")
    msg = b"".join((label, len(encoded).to_bytes(2, "big"), encoded, server_nonce, client_nonce))
    return hmac.new(key, msg, hashlib.sha256).digest()


def client_proof(key: bytes, name: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return _mac(_CLIENT, key, name, server_nonce, client_nonce)


def server_proof(key: bytes, name: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return _mac(_SERVER, key, name, server_nonce, client_nonce)


def verify(expected: bytes, given: bytes) -> bool:
    return hmac.compare_digest(expected, given)
