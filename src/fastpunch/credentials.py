"""A device's credentials file, as ``fastpunch ccs add-device --key-file``
writes it: JSON ``{"name": ..., "key": HEX}``, or a bare hex key.

    name, key = fastpunch.read_credentials("camera-1.json", name="camera-1")
    dev = fastpunch.Device(ccs, "camera-1", key, ca_file="ca.pem")
"""

from __future__ import annotations

import json
from typing import Optional

from fastpunch.errors import FastpunchError

__all__ = ["read_credentials"]

MAX_SIZE = 64 * 1024            # a credentials file is under 200 bytes


def read_credentials(path: str, name: Optional[str] = None) -> tuple[Optional[str], bytes]:
    """(the name the file holds or None, the key). ``name``: the device
    these must belong to; a file holding another device's credentials is
    refused. Every failure is a FastpunchError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SIZE + 1)
    except OSError as exc:
        raise FastpunchError(f"{path}: cannot read the credentials: {exc.strerror}") from None
    if len(raw) > MAX_SIZE:
        raise FastpunchError(f"{path}: not a credentials file from `ccs add-device` "
                             f"(over {MAX_SIZE} bytes)")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise FastpunchError(f"{path}: not a credentials file from `ccs add-device`") from None
    holder: Optional[str] = None
    try:
        creds = json.loads(text)
    except ValueError:
        creds = None
    try:
        if isinstance(creds, dict):
            holder = creds.get("name")
            if holder is not None and not isinstance(holder, str):
                raise ValueError("name")
            key = bytes.fromhex(creds["key"])
        else:
            key = bytes.fromhex(text)
    except (ValueError, KeyError, TypeError):
        raise FastpunchError(f"{path}: not a credentials file from `ccs add-device`") from None
    if not key:
        raise FastpunchError(f"{path}: the credentials hold no key")
    if name is not None and holder is not None and holder != name:
        raise FastpunchError(f"{path} holds the credentials of {holder!r}, not {name!r}")
    return holder, key


def client_context(ca_file: str):
    """A device's TLS context for the CCS: TLS 1.3 only, trusting nothing
    but the deployment's own CA (pinning). Here, not in fastpunch.ccs.pki,
    so a device's process does not load the CA tooling (datetime, the
    certificate checks) to dial."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=ca_file)
    return ctx
