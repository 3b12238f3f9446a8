"""Ed25519 signatures on published adapters; edges verify before loading.

The cloud signs what an edge will load: the exact bytes of each adapter file (the safetensors
weights and the peft config) and a metadata dict (adapter version, base model, round, ...). The
signed message is a domain tag plus the SHA-256 of the canonical JSON of
{"files": {name: sha256}, "metadata": {...}}, so renaming, swapping or editing any file, or changing
the metadata, breaks the signature.

`load_verified_adapter` reads each file ONCE into memory, verifies those bytes and deserialises the
same bytes: there is no window in which a file could be swapped between check and use.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_FILE = "adapter.sig.json"
DEFAULT_SIGNED_FILES = ("adapter_model.safetensors", "adapter_config.json")
_DOMAIN = b"fedge-adapter-signature/v1\n"


class AdapterSignatureError(RuntimeError):
    """An adapter is unsigned, tampered with, or signed by a key we do not trust: do not load it."""


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_signing_key(key: Ed25519PrivateKey, private_path: str | Path, public_path: str | Path) -> None:
    private_path, public_path = Path(private_path), Path(public_path)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise AdapterSignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path_or_pem: str | Path | bytes) -> Ed25519PublicKey:
    pem = path_or_pem if isinstance(path_or_pem, bytes) else Path(path_or_pem).read_bytes()
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise AdapterSignatureError("the trusted adapter key is not an Ed25519 public key")
    return key


def public_key_fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _message(file_digests: Mapping[str, str], metadata: Mapping[str, Any]) -> bytes:
    try:
        canonical = json.dumps({"files": dict(file_digests), "metadata": dict(metadata)}, sort_keys=True,
                               separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"adapter metadata must be plain JSON (str/int/float/bool/list/dict): {exc}") from exc
    return _DOMAIN + hashlib.sha256(canonical.encode()).digest()


@dataclass(frozen=True)
class AdapterSignature:
    files: dict[str, str]  # file name -> sha256 hex
    metadata: dict[str, Any]
    signature: bytes
    key_fingerprint: str

    def to_json(self) -> str:
        return json.dumps({"files": self.files, "metadata": self.metadata, "key": self.key_fingerprint,
                           "signature": base64.b64encode(self.signature).decode()}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterSignature:
        try:
            data = json.loads(text)
            return cls(files=dict(data["files"]), metadata=dict(data["metadata"]),
                       signature=base64.b64decode(data["signature"], validate=True), key_fingerprint=str(data["key"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterSignatureError(f"malformed adapter signature file: {exc}") from exc


def sign_blobs(blobs: Mapping[str, bytes], metadata: Mapping[str, Any], key: Ed25519PrivateKey) -> AdapterSignature:
    """Sign named byte strings (e.g. the safetensors bytes and the config) together with `metadata`."""
    if not blobs:
        raise ValueError("nothing to sign")
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(blobs.items())}
    signature = key.sign(_message(digests, metadata))
    return AdapterSignature(digests, dict(metadata), signature, public_key_fingerprint(key.public_key()))


def verify_blobs(blobs: Mapping[str, bytes], signature: AdapterSignature | None, trusted: Ed25519PublicKey) -> dict:
    """Check `blobs` against `signature` under the trusted key; returns the signed metadata."""
    if signature is None:
        raise AdapterSignatureError("adapter is unsigned: refusing to load it")
    if set(blobs) != set(signature.files):
        raise AdapterSignatureError(
            f"signed files {sorted(signature.files)} differ from the files given {sorted(blobs)}")
    for name, data in blobs.items():
        if hashlib.sha256(data).hexdigest() != signature.files[name]:
            raise AdapterSignatureError(f"{name} was modified after signing: refusing to load it")
    try:
        trusted.verify(signature.signature, _message(signature.files, signature.metadata))
    except InvalidSignature as exc:
        raise AdapterSignatureError("adapter signature is invalid (tampered metadata or an untrusted signer)") from exc
    return dict(signature.metadata)


def sign_adapter_dir(adapter_dir: str | Path, key: Ed25519PrivateKey, metadata: Mapping[str, Any] | None = None,
                     files: tuple[str, ...] = DEFAULT_SIGNED_FILES) -> Path:
    """Sign a peft adapter directory (as written by save_pretrained); writes adapter.sig.json into it."""
    adapter_dir = Path(adapter_dir)
    missing = [f for f in files if not (adapter_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot sign {adapter_dir}: missing {missing}")
    signature = sign_blobs({f: (adapter_dir / f).read_bytes() for f in files}, metadata or {}, key)
    out = adapter_dir / SIGNATURE_FILE
    out.write_text(signature.to_json())
    return out


def read_verified_files(adapter_dir: str | Path, trusted: Ed25519PublicKey) -> tuple[dict[str, bytes], dict]:
    """Read the signed files of `adapter_dir` into memory and verify them; returns (bytes by name, metadata)."""
    adapter_dir = Path(adapter_dir)
    sig_path = adapter_dir / SIGNATURE_FILE
    if not sig_path.is_file():
        raise AdapterSignatureError(f"{adapter_dir} has no {SIGNATURE_FILE}: unsigned adapters are refused")
    signature = AdapterSignature.from_json(sig_path.read_text())
    blobs = {}
    for name in signature.files:
        if Path(name).name != name:
            raise AdapterSignatureError(f"signed file name {name!r} is not a plain file name")
        path = adapter_dir / name
        if not path.is_file():
            raise AdapterSignatureError(f"signed file {name} is missing from {adapter_dir}")
        blobs[name] = path.read_bytes()
    return blobs, verify_blobs(blobs, signature, trusted)


def load_verified_adapter(adapter_dir: str | Path, trusted: Ed25519PublicKey):
    """The adapter's state dict (torch tensors), config dict and signed metadata, verified before parsing."""
    from safetensors.torch import load as load_safetensors

    blobs, metadata = read_verified_files(adapter_dir, trusted)
    weights_name = next((n for n in blobs if n.endswith(".safetensors")), None)
    if weights_name is None:
        raise AdapterSignatureError("the signature covers no safetensors weights")
    config = json.loads(blobs["adapter_config.json"]) if "adapter_config.json" in blobs else {}
    return load_safetensors(blobs[weights_name]), config, metadata
