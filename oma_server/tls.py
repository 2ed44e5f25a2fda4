"""The OMA's TLS identity: the certificate and key its TLS listener serves, and the fingerprint VMAs pin.

Configured files (``tls_cert_file``/``tls_key_file``, PEM; the certificate file may carry the chain after
the server certificate) are checked before the server starts: readable, parseable, unencrypted key, key
matching the certificate. Without them the OMA generates a self-signed certificate once into the data
dir (``oma-tls.crt``, and ``oma-tls.key`` with mode 0600) and reuses it on every start, so the SHA-256
an operator pinned on the VMAs (docs/design/enrollment.md#transport) stays valid. The generated
certificate names this host, ``localhost``, 127.0.0.1, ::1 and the TLS listen host in its SANs, so clients
that verify it as their root (``OmaClient(tls_ca=…)``) also check the name they connect to.

Key material is never logged or shown: only the certificate's fingerprint is.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server_kit.private_files import write_private
from server_kit.settings import is_loopback as is_loopback  # the OMA's callers ask tls.is_loopback
from server_kit.settings import listen_host

log = logging.getLogger("oma_server.tls")

CERT_FILE_NAME = "oma-tls.crt"
KEY_FILE_NAME = "oma-tls.key"
# A pinned appliance certificate: replacing it means re-pinning every VMA, so it lives long.
GENERATED_VALIDITY = dt.timedelta(days=10 * 365)
_EXPIRY_WARNING = dt.timedelta(days=30)


class TlsConfigError(Exception):
    """The TLS certificate or key cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class TlsIdentity:
    cert_pem: bytes  # the certificate (and its chain, if the configured file has one)
    key_pem: bytes = field(repr=False)
    sha256: str  # lowercase hex of the server certificate's DER: what VMAs pin
    cert_path: Path
    key_path: Path
    generated: bool
    not_after: dt.datetime

    @property
    def fingerprint(self) -> str:
        """``AB:CD:…`` — the form ``openssl x509 -fingerprint -sha256`` prints (the VMA takes either)."""
        return ":".join(self.sha256[i:i + 2] for i in range(0, len(self.sha256), 2)).upper()


def load_identity(cert_file: str, key_file: str, data_dir: Path, listen: str) -> TlsIdentity:
    """The configured certificate and key, or the generated one in ``data_dir`` (created on first use)."""
    if bool(cert_file) != bool(key_file):
        raise TlsConfigError("TLS needs both a certificate file and a key file (OMA_TLS_CERT_FILE and "
                             "OMA_TLS_KEY_FILE), or neither for a generated self-signed certificate")
    if cert_file:
        cert_path, key_path = Path(cert_file).expanduser(), Path(key_file).expanduser()
        return _identity(_read(cert_path, "certificate"), _read(key_path, "key"), cert_path, key_path, False)
    cert_path, key_path = data_dir / CERT_FILE_NAME, data_dir / KEY_FILE_NAME
    if cert_path.exists() and key_path.exists():
        mode = key_path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("TLS key %s is readable by others (mode %04o); it should be 0600", key_path, mode)
        return _identity(_read(cert_path, "certificate"), _read(key_path, "key"), cert_path, key_path, True)
    if cert_path.exists() or key_path.exists():
        log.warning("only one of %s and %s exists; generating a new self-signed certificate "
                    "(VMAs that pinned the old one must be re-pinned)", cert_path, key_path)
    cert_pem, key_pem = generate_self_signed(_names(listen))
    key_path.parent.mkdir(parents=True, exist_ok=True)
    write_private(key_path, key_pem)
    write_private(cert_path, cert_pem, mode=0o644)
    identity = _identity(cert_pem, key_pem, cert_path, key_path, True)
    log.info("generated a self-signed TLS certificate %s (SHA-256 %s)", cert_path, identity.fingerprint)
    return identity


def generate_self_signed(names: list[str]) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 certificate for ``names`` (DNS names or IP addresses): (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    dns = [n for n in names if not _is_ip(n)]
    ips = [ipaddress.ip_address(n) for n in names if _is_ip(n)]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns or ["oma-server"])[0][:64]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OMA server (self-signed)")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + GENERATED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([*map(x509.DNSName, dns), *map(x509.IPAddress, ips)]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _names(listen: str) -> list[str]:
    """SANs of a generated certificate: this host's names, loopback, and the TLS listen host if specific."""
    names = []
    for name in (socket.gethostname(), "localhost", "127.0.0.1", "::1", listen_host(listen)):
        name = name.strip().rstrip(".")
        if not name or name.startswith("unix:") or name in names or not name.isascii():
            continue
        if _is_ip(name) and ipaddress.ip_address(name).is_unspecified:
            continue  # 0.0.0.0 / :: are not names a client connects to
        names.append(name)
    return names


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read the TLS {what} file {path}: {exc.strerror or exc}") from None


def _identity(cert_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path, generated: bool) -> TlsIdentity:
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TlsConfigError(f"the TLS certificate file {cert_path} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsConfigError(f"the TLS key file {key_path} is encrypted; give the key without a passphrase "
                             "(readable only by the OMA's user)") from None
    except ValueError:
        raise TlsConfigError(f"the TLS key file {key_path} holds no PEM private key") from None
    leaf = chain[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise TlsConfigError(f"the TLS key {key_path} does not belong to the certificate {cert_path} "
                             "(the first certificate of the file must be the server's)")
    not_after = leaf.not_valid_after_utc
    now = dt.datetime.now(dt.UTC)
    if not_after <= now:
        log.warning("the TLS certificate %s expired on %s: clients will refuse it", cert_path, not_after)
    elif not_after - now < _EXPIRY_WARNING:
        log.warning("the TLS certificate %s expires on %s", cert_path, not_after)
    sha256 = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    return TlsIdentity(cert_pem, key_pem, sha256, cert_path, key_path, generated, not_after)
