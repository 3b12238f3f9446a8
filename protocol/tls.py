"""Certificates, TLS / mutual-TLS credentials for gRPC, and device identity.

`create_certificates(out_dir, devices)` makes a private CA, a server certificate for the cloud
(localhost and 127.0.0.1 by default) and one client certificate per edge device whose subject
common name is the device id. With mutual TLS the server accepts only clients holding a certificate
from that CA, and `peer_device_id(context)` tells a servicer which device is calling: the identity is
the certificate, not something the client claims in a message.

Keys are ECDSA P-256 (supported by every TLS stack gRPC ships with). Private keys are written
unencrypted with mode 0600: they are meant for a deployment's secret store, not for the repository.

Layout written by `create_certificates`:

    ca.pem ca.key                       the certificate authority (keep ca.key offline)
    server.pem server.key               the cloud's TLS identity
    devices/<id>.pem devices/<id>.key   one per edge device, CN = device id
    adapter-signing.key adapter-signing.pub   Ed25519 key the cloud signs adapters with
    supernodes/<id>.key supernodes/<id>.pub   one per device: its Flower SuperNode authentication key

Flower's deployment engine uses the same directory: the SuperLink serves TLS with server.pem /
server.key (`--ssl-ca-certfile ca.pem`), SuperNodes and the `flwr` connection trust ca.pem
(`--root-certificates`, `root-certificates`), and a SuperNode proves which device it is with its
authentication key (`--auth-supernode-private-key supernodes/<id>.key`), whose public half the
operator registers (`flwr supernode register supernodes/<id>.pub`). Flower wants those keys as
ECDSA P-384 in OpenSSH format.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEVICE_OU = "fedge-device"


class CertificateError(ValueError):
    """Bad certificate input or a certificate directory that is missing pieces."""


@dataclass(frozen=True)
class CertPaths:
    """Where `create_certificates` put things."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def device_cert(self, device_id: str) -> Path:
        return self.root / "devices" / f"{device_id}.pem"

    def device_key(self, device_id: str) -> Path:
        return self.root / "devices" / f"{device_id}.key"

    def supernode_key(self, device_id: str) -> Path:
        return self.root / "supernodes" / f"{device_id}.key"

    def supernode_public_key(self, device_id: str) -> Path:
        return self.root / "supernodes" / f"{device_id}.pub"

    @property
    def signing_key(self) -> Path:
        return self.root / "adapter-signing.key"

    @property
    def signing_public_key(self) -> Path:
        return self.root / "adapter-signing.pub"


def check_device_id(device_id: str) -> str:
    if not DEVICE_ID_PATTERN.match(device_id):
        raise CertificateError(f"device id {device_id!r} must be 1-64 characters of letters, digits, '.', '_', '-' "
                               "starting with a letter or digit")
    return device_id


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge")]
    if unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
            .not_valid_after(now + dt.timedelta(days=days)))


def create_ca(common_name: str = "fedge CA", days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = _name(common_name)
    cert = (_builder(name, name, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert: x509.Certificate, subject: x509.Name, usage, san: list[x509.GeneralName], days: int):
    key = _new_key()
    builder = (_builder(subject, ca_cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def create_server_cert(ca_key, ca_cert: x509.Certificate, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
                       days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate valid for `hosts` (DNS names or IP addresses)."""
    if not hosts:
        raise CertificateError("a server certificate needs at least one host name or address")
    san: list[x509.GeneralName] = []
    for host in hosts:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            san.append(x509.DNSName(host))
    return _leaf(ca_key, ca_cert, _name(hosts[0], "fedge-cloud"), ExtendedKeyUsageOID.SERVER_AUTH, san, days)


def create_device_cert(ca_key, ca_cert: x509.Certificate, device_id: str,
                       days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS client certificate whose subject CN is the device id (and a URI SAN fedge://device/<id>)."""
    check_device_id(device_id)
    san = [x509.UniformResourceIdentifier(f"fedge://device/{device_id}")]
    return _leaf(ca_key, ca_cert, _name(device_id, DEVICE_OU), ExtendedKeyUsageOID.CLIENT_AUTH, san, days)


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def create_supernode_key(private_path: str | Path, public_path: str | Path) -> None:
    """A Flower SuperNode authentication key pair (ECDSA P-384, OpenSSH format)."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(Path(private_path), key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                 serialization.NoEncryption()), secret=True)
    _write(Path(public_path), key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                            serialization.PublicFormat.OpenSSH) + b"\n")


def load_ca(paths: CertPaths):
    if not paths.ca_cert.is_file() or not paths.ca_key.is_file():
        raise CertificateError(f"no CA in {paths.root} (run `fedge certs create --out {paths.root}` first)")
    cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    return key, cert


def create_certificates(out_dir: str | Path, devices: Iterable[str] = (),
                        hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 825,
                        overwrite: bool = False) -> CertPaths:
    """Create (or extend) a certificate directory: CA, server cert, device certs, adapter-signing key.

    An existing CA is reused (so new devices can be added later) unless `overwrite` is set; existing
    device certificates are kept.
    """
    from fedge.protocol.signing import generate_signing_key, save_signing_key

    devices = [check_device_id(d) for d in devices]
    if len(set(devices)) != len(devices):
        raise CertificateError("device ids must be distinct")
    paths = CertPaths(Path(out_dir))
    if paths.ca_cert.exists() and not overwrite:
        ca_key, ca_cert = load_ca(paths)
    else:
        ca_key, ca_cert = create_ca()
        _write(paths.ca_cert, _pem_cert(ca_cert))
        _write(paths.ca_key, _pem_key(ca_key), secret=True)
    if overwrite or not paths.server_cert.exists():
        key, cert = create_server_cert(ca_key, ca_cert, hosts, days)
        _write(paths.server_cert, _pem_cert(cert))
        _write(paths.server_key, _pem_key(key), secret=True)
    for device_id in devices:
        if paths.device_cert(device_id).exists() and not overwrite:
            continue
        key, cert = create_device_cert(ca_key, ca_cert, device_id, days)
        _write(paths.device_cert(device_id), _pem_cert(cert))
        _write(paths.device_key(device_id), _pem_key(key), secret=True)
    for device_id in devices:
        if overwrite or not paths.supernode_key(device_id).exists():
            create_supernode_key(paths.supernode_key(device_id), paths.supernode_public_key(device_id))
    if overwrite or not paths.signing_key.exists():
        save_signing_key(generate_signing_key(), paths.signing_key, paths.signing_public_key)
    return paths


# ----------------------------------------------------------------------------------------------
# gRPC credentials


def _read(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise CertificateError(f"{what} not found: {path}")
    return path.read_bytes()


def server_credentials(cert_dir: str | Path, require_client_auth: bool = True):
    """gRPC server credentials from a `create_certificates` directory.

    require_client_auth=True is mutual TLS: the handshake fails for a client without a certificate
    signed by the CA, so no handler ever sees an unidentified device.
    """
    import grpc

    paths = CertPaths(Path(cert_dir))
    return grpc.ssl_server_credentials(
        [(_read(paths.server_key, "server key"), _read(paths.server_cert, "server certificate"))],
        root_certificates=_read(paths.ca_cert, "CA certificate") if require_client_auth else None,
        require_client_auth=require_client_auth,
    )


def channel_credentials(ca_cert: str | Path, device_cert: str | Path | None = None,
                        device_key: str | Path | None = None):
    """gRPC channel credentials trusting only `ca_cert`, presenting a device certificate if given."""
    import grpc

    if (device_cert is None) != (device_key is None):
        raise CertificateError("give both the device certificate and its key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_cert, "CA certificate"),
        private_key=_read(device_key, "device key") if device_key else None,
        certificate_chain=_read(device_cert, "device certificate") if device_cert else None,
    )


def device_channel_credentials(cert_dir: str | Path, device_id: str):
    """Channel credentials for `device_id` from a `create_certificates` directory."""
    paths = CertPaths(Path(cert_dir))
    check_device_id(device_id)
    return channel_credentials(paths.ca_cert, paths.device_cert(device_id), paths.device_key(device_id))


def peer_device_id(context) -> str | None:
    """The device id (certificate CN) of the peer of a gRPC call, or None without a device certificate.

    The certificate itself is checked too: one CN, unit `fedge-device`, issued for client auth. The CA
    also signs the cloud's server certificate, which must never pass for a device."""
    auth = context.auth_context()
    names, pems = auth.get("x509_common_name") or [], auth.get("x509_pem_cert") or []
    if len(names) != 1 or len(pems) != 1:
        return None
    device_id = names[0].decode() if isinstance(names[0], bytes) else str(names[0])
    if not DEVICE_ID_PATTERN.match(device_id):
        return None
    try:
        cert = x509.load_pem_x509_certificate(pems[0] if isinstance(pems[0], bytes) else pems[0].encode())
        units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
        common = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    if units != [DEVICE_OU] or common != [device_id] or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        return None
    return device_id


def require_device(context, allowed: Iterable[str] | None = None) -> str:
    """The calling device's id; aborts the call if it has none or (with `allowed`) is not listed.

    mTLS already proves the CA issued the certificate; `allowed` is the revocation lever: a device
    removed from the list is refused even while its certificate is still valid.
    """
    import grpc

    device_id = peer_device_id(context)
    if device_id is None:
        _abort_sync(context, grpc.StatusCode.UNAUTHENTICATED, "no device certificate: mutual TLS is required")
    if allowed is not None and device_id not in set(allowed):
        _abort_sync(context, grpc.StatusCode.PERMISSION_DENIED, f"device {device_id!r} is not allowed")
    return device_id


class DeviceRefused(PermissionError):
    """A device check failed where the context could not abort the call itself."""


def _abort_sync(context, code, details: str) -> None:
    # a grpc.aio context's abort is a coroutine: called without await it does nothing, and the
    # handler would go on as if the device were allowed. Fail closed: refuse by raising instead.
    pending = context.abort(code, details)
    if hasattr(pending, "close"):
        pending.close()
    raise DeviceRefused(f"{code.name}: {details}")


class DeviceGate:
    """Who may call the serving path: a device certificate from the CA (mutual TLS) whose id is not
    revoked. Revocations are one device id per line in `revoked` (default `<tls_dir>/revoked.txt`),
    re-read when the file changes, so revoking needs no restart. Every failure refuses: no
    certificate, an unreadable revocation list, a listed id."""

    def __init__(self, tls_dir: str | Path, revoked: str | Path | None = None):
        self.revoked_path = Path(revoked) if revoked else Path(tls_dir) / "revoked.txt"
        self._stamp: tuple[int, int] | None = None
        self._revoked: frozenset[str] = frozenset()

    def revoked(self) -> frozenset[str]:
        """The revoked ids; raises OSError/ValueError when the list exists but cannot be read."""
        try:
            st = self.revoked_path.stat()
        except FileNotFoundError:
            return frozenset()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            text = self.revoked_path.read_text(encoding="utf-8")
            self._revoked = frozenset(line.strip() for line in text.splitlines() if line.strip()
                                      and not line.lstrip().startswith("#"))
            self._stamp = stamp
        return self._revoked

    async def require(self, context) -> str:
        """The calling device's id (for a grpc.aio servicer); aborts the call otherwise."""
        import grpc

        device_id = peer_device_id(context)
        if device_id is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no device certificate: mutual TLS is required")
        try:
            revoked = self.revoked()
        except (OSError, ValueError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"revocation list unreadable ({type(exc).__name__}); "
                                                             "refusing every device until it is fixed")
        if device_id in revoked:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"device {device_id!r} is revoked")
        return device_id
