"""A private CA and the CCS's server certificate for one deployment.

``fastpunch ccs init DIR`` writes ca.pem (devices pin it), ca.key (or
wherever ``--ca-key-out`` says: ``ccs serve`` never reads it), server.pem
and server.key (both keys 0600). ECDSA P-256, 10-year CA, 2-year server
certificate with the given DNS names and IP addresses.
``fastpunch ccs renew-cert`` (``renew``) issues a new server key and
certificate from the CA, replacing the old ones atomically; a running
``ccs serve`` takes them on SIGHUP (``reload_server_context``).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import ipaddress
import os
import re
import stat
from typing import Iterator, Optional, Sequence

from fastpunch import credentials as _credentials
from fastpunch.errors import FastpunchError

SERVER_DAYS = 730
CA_DAYS = 3650
_DNS_RE = re.compile(r"(?=.{1,253}$)(\*\.)?[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?")


class PKIError(FastpunchError):
    """A certificate or key file is missing, unreadable, or not what it should be."""


def _open_exact(path: str, mode: int, exclusive: bool = False) -> int:
    """A file descriptor for writing ``path`` with exactly ``mode``.

    O_NOFOLLOW: a symbolic link planted at ``path`` is refused, never
    written through. O_CREAT's mode only applies to a file it creates, so an
    existing file (a world-readable key from a careless copy) is fchmod'ed
    to ``mode`` before it is truncated and before a byte is written."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    if exclusive:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PKIError(f"{path} is a symbolic link: not writing a key or certificate "
                           "through it") from None
        if exc.errno == errno.EEXIST:
            raise PKIError(f"{path} exists: not overwriting it") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PKIError(f"{path} is not a regular file")
        os.fchmod(fd, mode)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write(path: str, data: bytes, mode: int, exclusive: bool = False) -> None:
    fd = _open_exact(path, mode, exclusive)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` by a file holding ``data``, mode ``mode``, in one
    rename: a reader (a reloading server) sees the old file or the new one,
    never half of one. The new file keeps the old one's owner and group
    where we may set them (root renewing a key the service user reads)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        old = os.lstat(path)
    except FileNotFoundError:
        old = None
    fd = _open_exact(tmp, mode, exclusive=True)
    try:
        with os.fdopen(fd, "wb") as f:
            if old is not None and stat.S_ISREG(old.st_mode):
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _check_names(names: Sequence[str], addresses: Sequence[str]) -> list:
    for name in names:
        if not isinstance(name, str) or not _DNS_RE.fullmatch(name):
            raise PKIError(f"not a DNS name: {name!r}")
    out = []
    for a in addresses:
        try:
            out.append(ipaddress.ip_address(a))
        except ValueError:
            raise PKIError(f"not an IP address: {a!r}") from None
    if not names and not out:
        raise PKIError("a server certificate needs at least one DNS name or IP address")
    return out


def _not_after(cert) -> datetime.datetime:
    value = getattr(cert, "not_valid_after_utc", None)
    return value if value is not None else cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def _server_cert(ca_name, ca_key, key, names: Sequence[str], addresses: Sequence,
                 now: datetime.datetime, not_after: datetime.datetime):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(a) for a in addresses]
    common = (list(names) or [str(a) for a in addresses] or ["ccs"])[0]
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))


def init(directory: str, names: Sequence[str] = ("localhost",),
         addresses: Sequence[str] = ("127.0.0.1",), ca_key_path: Optional[str] = None) -> dict:
    """A new deployment in ``directory``; the CA key goes to ``ca_key_path``
    (never overwritten) if given, else ``directory``/ca.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ips = _check_names(names, addresses)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastpunch CCS private CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _server_cert(ca_name, ca_key, key, names, ips, now,
                        now + datetime.timedelta(days=SERVER_DAYS))
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    paths = {k: os.path.join(directory, f) for k, f in
             (("ca", "ca.pem"), ("ca_key", "ca.key"), ("cert", "server.pem"), ("key", "server.key"))}
    if ca_key_path is not None:
        paths["ca_key"] = ca_key_path
    # the CA key first, and only if its place is free: a lost CA key cannot
    # be had back, and every device pins the CA
    _write(paths["ca_key"], ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600,
           exclusive=ca_key_path is not None)
    _write(paths["ca"], ca.public_bytes(pem), 0o644)
    _write(paths["key"], key.private_bytes(pem, pkcs8, serialization.NoEncryption()), 0o600)
    _write(paths["cert"], cert.public_bytes(pem), 0o644)
    return paths


def _read(path: str, what: str, hint: str = "") -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise PKIError(f"no {what} at {path}{hint}") from None
    except PermissionError:
        raise PKIError(f"{what} {path} is not readable (permission denied)") from None
    except IsADirectoryError:
        raise PKIError(f"{what} {path} is a directory") from None


def names_of(cert) -> tuple:
    """(DNS names, IP addresses as text) of a certificate's subjectAltName."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (list(san.get_values_for_type(x509.DNSName)),
            [str(a) for a in san.get_values_for_type(x509.IPAddress)])


def renew(directory: str, ca_key_path: Optional[str] = None,
          names: Optional[Sequence[str]] = None, addresses: Optional[Sequence[str]] = None,
          days: int = SERVER_DAYS) -> dict:
    """A new server key and certificate signed by the deployment's CA
    (``directory``/ca.pem, its key at ``ca_key_path`` or ``directory``/ca.key),
    for ``names``/``addresses``, each defaulting to the current
    certificate's. server.key, then server.pem, are replaced atomically."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_file = os.path.join(directory, "ca.pem")
    ca_key_path = ca_key_path or os.path.join(directory, "ca.key")
    try:
        ca = x509.load_pem_x509_certificate(_read(ca_file, "CA certificate",
                                                  ": is this a deployment directory?"))
    except ValueError as exc:
        raise PKIError(f"{ca_file} is not a PEM certificate: {exc}") from None
    try:
        ca_key = serialization.load_pem_private_key(
            _read(ca_key_path, "CA key", " (give --ca-key PATH: where `ccs init --ca-key-out` "
                                         "put it)"), password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{ca_key_path} is not an unencrypted PEM private key: {exc}") from None
    pub = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if ca_key.public_key().public_bytes(*pub) != ca.public_key().public_bytes(*pub):
        raise PKIError(f"{ca_key_path} is not the key of {ca_file}: devices would not trust "
                       "what it signs")
    old_names: list = []
    old_ips: list = []
    cert_path = os.path.join(directory, "server.pem")
    if os.path.exists(cert_path):
        try:
            old_names, old_ips = names_of(x509.load_pem_x509_certificate(
                _read(cert_path, "server certificate")))
        except ValueError as exc:
            if names is None or addresses is None:
                raise PKIError(f"{cert_path} is not a PEM certificate ({exc}): give --name "
                               "and --ip for the new one") from None
    names = list(old_names if names is None else names)
    addresses = list(old_ips if addresses is None else addresses)
    ips = _check_names(names, addresses)
    if not 1 <= days <= 3650:
        raise PKIError(f"--days must be 1-3650, not {days}")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_until = _not_after(ca)
    if ca_until <= now:
        raise PKIError(f"the CA certificate {ca_file} expired on {ca_until:%Y-%m-%d}")
    # no server certificate outlives its CA
    not_after = min(now + datetime.timedelta(days=days), ca_until)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _server_cert(ca.subject, ca_key, key, names, ips, now, not_after)
    pem = serialization.Encoding.PEM
    key_path = os.path.join(directory, "server.key")
    _write_atomic(key_path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), 0o600)
    _write_atomic(cert_path, cert.public_bytes(pem), 0o644)
    return {"cert": cert_path, "key": key_path, "names": names, "ips": [str(a) for a in ips],
            "serial": format(cert.serial_number, "x"), "not_after": not_after.isoformat()}


def server_context(directory: str):
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cert, key = os.path.join(directory, "server.pem"), os.path.join(directory, "server.key")
    for path, what in ((cert, "server certificate"), (key, "server key")):
        if not os.path.exists(path):
            raise PKIError(f"no {what} at {path} (`fastpunch ccs init` or `ccs renew-cert` "
                           "writes one)")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise PKIError(f"{cert} with {key}: {exc}") from None
    return ctx


@contextlib.contextmanager
def _snapshot(*blobs: bytes) -> Iterator[list]:
    """Paths that read back exactly ``blobs`` (anonymous memory files), so
    what is checked is what is loaded even if the files change meanwhile."""
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        raise OSError(errno.ENOSYS, "no memfd_create")
    fds = []
    try:
        for blob in blobs:
            fd = os.memfd_create("fastpunch-pem", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, blob)
        yield [f"/proc/self/fd/{fd}" for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)


def reload_server_context(ctx, directory: str) -> dict:
    """Load server.pem/server.key into the live ``ctx``: handshakes from now
    on present them, connections already up keep theirs. The files are read
    once and the pair is tried on a scratch context first, so a bad pair
    (or one replaced halfway) raises PKIError and leaves ``ctx`` as it was
    (OpenSSL would otherwise have taken the new certificate and dropped the
    old key). Returns the new certificate's serial, expiry and names."""
    import ssl

    from cryptography import x509

    cert_path = os.path.join(directory, "server.pem")
    key_path = os.path.join(directory, "server.key")
    cert_pem = _read(cert_path, "server certificate")
    key_pem = _read(key_path, "server key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise PKIError(f"{cert_path} is not a PEM certificate: {exc}") from None

    def load(target, cpath: str, kpath: str) -> None:
        try:
            target.load_cert_chain(cpath, kpath)
        except (ssl.SSLError, OSError) as exc:
            raise PKIError(f"{cert_path} with {key_path}: {exc}") from None

    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        with _snapshot(cert_pem, key_pem) as (cpath, kpath):
            load(scratch, cpath, kpath)
            load(ctx, cpath, kpath)
    except OSError as exc:                    # no memfd: the files themselves
        if exc.errno != errno.ENOSYS:
            raise
        load(scratch, cert_path, key_path)
        load(ctx, cert_path, key_path)
    names, ips = names_of(cert)
    return {"serial": format(cert.serial_number, "x"), "not_after": _not_after(cert).isoformat(),
            "names": names, "ips": ips}


#: the device's TLS context lives in fastpunch.credentials (a device's process
#: need not load this module to dial); kept here for callers of the old place
client_context = _credentials.client_context
