"""Secure aggregation, device identities: who may take part, and proof that a message came from them.

Against a malicious server, the server must not be the one who says which public keys belong to
which client. Each device holds an Ed25519 signing key (made by `fedge certs create`, next to its
TLS certificate) and every client gets the roster of device public keys out of band (a file from
the same command, shipped with the app). Clients sign their key advertisement (bound to the round,
its parameters and their client id) and the survivor set they were told about; peers check both
against the roster, so a server that substitutes, injects or replays keys, or tells clients
different survivor sets, is caught before any unmasking share leaves a client (Bonawitz et al.
2017, section 4, "malicious server": signed advertisements and the consistency check).

Layout added by `create_device_signing_keys(out_dir, devices)`:

    devices/<id>.sign.key     the device's Ed25519 signing key (PEM, mode 0600)
    secagg-roster.json        {"devices": {"<id>": "<hex raw public key>"}}, public, ship to clients
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedge.protocol.secagg_config import SecAggConfig, SecAggError

ROSTER_FILE = "secagg-roster.json"
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
        raise SecAggError(f"invalid device id {device_id!r}")
    return device_id


@dataclass(frozen=True)
class DeviceIdentity:
    """This device's name and signing key (never leaves the device)."""

    device_id: str
    signing_key: Ed25519PrivateKey

    @classmethod
    def generate(cls, device_id: str) -> DeviceIdentity:
        return cls(_check_device_id(device_id), Ed25519PrivateKey.generate())

    def public_bytes(self) -> bytes:
        return self.signing_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message)


@dataclass(frozen=True)
class DeviceRoster:
    """The device public keys a client trusts, known out of band (never taken from the server)."""

    keys: Mapping[str, bytes]  # device id -> raw Ed25519 public key (32 bytes)

    @classmethod
    def of(cls, identities: Iterable[DeviceIdentity]) -> DeviceRoster:
        return cls({i.device_id: i.public_bytes() for i in identities})

    def verify(self, device_id: str, message: bytes, signature: bytes, what: str) -> None:
        raw = self.keys.get(device_id)
        if raw is None:
            raise SecAggError(f"{what}: device {device_id!r} is not in this client's roster (injected?)")
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
        except (InvalidSignature, ValueError) as exc:
            raise SecAggError(f"{what}: signature of device {device_id!r} does not verify "
                              "(substituted or tampered by the server?)") from exc

    def to_json(self) -> str:
        return json.dumps({"devices": {d: k.hex() for d, k in sorted(self.keys.items())}}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> DeviceRoster:
        try:
            devices = json.loads(text)["devices"]
            keys = {_check_device_id(str(d)): bytes.fromhex(k) for d, k in devices.items()}
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise SecAggError(f"malformed device roster: {exc}") from exc
        if any(len(k) != 32 for k in keys.values()):
            raise SecAggError("malformed device roster: Ed25519 public keys are 32 bytes")
        return cls(keys)


def config_digest(config: SecAggConfig) -> bytes:
    """SHA-256 of the round's parameters: signed with every advertisement, so all saw the same t."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).digest()


def advertisement_message(config: SecAggConfig, client_id: int, device_id: str, cipher_pk: bytes,
                          mask_pk: bytes) -> bytes:
    return (b"fedge-secagg/v1/advertise" + config_digest(config) + struct.pack(">Q", client_id)
            + device_id.encode() + b"\x00" + cipher_pk + mask_pk)


def survivors_message(config: SecAggConfig, survivors: Sequence[int]) -> bytes:
    ids = sorted(survivors)
    return b"fedge-secagg/v1/survivors" + config_digest(config) + struct.pack(f">{len(ids)}Q", *ids)


# ----------------------------------------------------------------------------------------------
# files


def device_signing_key_path(out_dir: str | Path, device_id: str) -> Path:
    return Path(out_dir) / "devices" / f"{_check_device_id(device_id)}.sign.key"


def create_device_signing_keys(out_dir: str | Path, devices: Iterable[str], overwrite: bool = False) -> Path:
    """Make (or keep) one Ed25519 signing key per device and write the roster of their public keys."""
    out = Path(out_dir)
    (out / "devices").mkdir(parents=True, exist_ok=True)
    roster_path = out / ROSTER_FILE
    keys = dict(load_roster(roster_path).keys) if roster_path.exists() and not overwrite else {}
    for device_id in devices:
        path = device_signing_key_path(out, device_id)
        if path.exists() and not overwrite:
            identity = load_device_identity(out, device_id)
        else:
            identity = DeviceIdentity.generate(device_id)
            pem = identity.signing_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        keys[device_id] = identity.public_bytes()
    roster_path.write_text(DeviceRoster(keys).to_json())
    return roster_path


def load_device_identity(keys_dir: str | Path, device_id: str) -> DeviceIdentity:
    path = device_signing_key_path(keys_dir, device_id)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise SecAggError(f"cannot load the signing key of device {device_id!r} from {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SecAggError(f"{path} is not an Ed25519 key")
    return DeviceIdentity(device_id, key)


def load_roster(path: str | Path) -> DeviceRoster:
    try:
        return DeviceRoster.from_json(Path(path).read_text())
    except OSError as exc:
        raise SecAggError(f"cannot read the device roster {path}: {exc}") from exc
