"""Ed25519 signatures on published adapters; edges verify before loading.

The cloud signs what an edge will load: the exact bytes of each adapter file (the safetensors
weights and the peft config) and a metadata dict (adapter version, base model, round, ...). The
signed message is a domain tag plus the SHA-256 of the canonical JSON of
{"files": {name: sha256}, "metadata": {...}}, so renaming, swapping or editing any file, or changing
the metadata, breaks the signature.

`load_verified_adapter` reads each file ONCE into memory, verifies those bytes and deserialises the
same bytes: there is no window in which a file could be swapped between check and use. Files are
opened without following symlinks and read up to a size limit, so a signed name cannot point the
reader outside the adapter directory. `AdapterMetadata` is the signed metadata every published
version carries (version, sequence number, base model): the cloud registry and the edge both check
it against the name they load the version under, which is what stops an old signed adapter being
served as a newer one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
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
MAX_ADAPTER_FILE_BYTES = 256 << 20  # one signed file; LoRA adapters of the served models are far smaller
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class AdapterSignatureError(RuntimeError):
    """An adapter is unsigned, tampered with, or signed by a key we do not trust: do not load it."""


def check_plain_name(name: object, what: str) -> str:
    """`name` if it is a plain file or version name (no separators, no "..", no leading dot)."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise AdapterSignatureError(f"{what} {str(name)[:80]!r} is not a plain name ([A-Za-z0-9._-], no '..')")
    return name


@dataclass(frozen=True)
class AdapterMetadata:
    """What a published version's signature vouches for besides its bytes."""

    version: str
    sequence: int  # strictly increasing per registry: the order of publication
    base_model: str  # the model registry name (portable), never a local path
    base_model_fingerprint: str
    tokenizer_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "sequence": self.sequence, "base_model": self.base_model,
                "base_model_fingerprint": self.base_model_fingerprint,
                "tokenizer_fingerprint": self.tokenizer_fingerprint}

    @classmethod
    def from_signed(cls, metadata: Mapping[str, Any], expected_version: str) -> AdapterMetadata:
        """The signed metadata of a version loaded under the name `expected_version`; refuses a
        mismatch (an older signed adapter copied in under a newer name) and malformed fields."""
        version, sequence = metadata.get("version"), metadata.get("sequence")
        if version != expected_version:
            raise AdapterSignatureError(f"signed version {str(version)[:80]!r} is not {expected_version!r}: "
                                        "refusing an adapter relabelled as another version")
        if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
            raise AdapterSignatureError(f"version {expected_version!r}: signed sequence {sequence!r} "
                                        "is not a positive integer")
        base, fingerprint = metadata.get("base_model"), metadata.get("base_model_fingerprint")
        if not isinstance(base, str) or not base or not isinstance(fingerprint, str) or not fingerprint:
            raise AdapterSignatureError(f"version {expected_version!r}: signed metadata names no base model")
        return cls(version, sequence, base, fingerprint, str(metadata.get("tokenizer_fingerprint", "")))


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


def read_plain_file(path: Path, max_bytes: int = MAX_ADAPTER_FILE_BYTES) -> bytes:
    """A regular file's bytes, never through a symlink, at most `max_bytes`."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise AdapterSignatureError(f"{path.name} is missing from {path.parent}") from None
    except OSError as exc:  # ELOOP: the name is a symlink
        raise AdapterSignatureError(f"{path.name} in {path.parent} cannot be opened as a plain file "
                                    f"(a symlink?): {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise AdapterSignatureError(f"{path} is not a regular file")
        if info.st_size > max_bytes:
            raise AdapterSignatureError(f"{path} is {info.st_size} bytes, over the {max_bytes}-byte limit")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise AdapterSignatureError(f"{path} grew over the {max_bytes}-byte limit while being read")
    return data


def read_signed_dir(adapter_dir: str | Path, trusted: Ed25519PublicKey,
                    max_file_bytes: int = MAX_ADAPTER_FILE_BYTES) -> tuple[dict[str, bytes], dict]:
    """Every signed file of `adapter_dir` AND the signature file, read once and verified:
    (bytes by name, signature file included; signed metadata). Refuses a symlinked directory."""
    adapter_dir = Path(adapter_dir)
    if adapter_dir.is_symlink() or not adapter_dir.is_dir():
        raise AdapterSignatureError(f"{adapter_dir} is not a directory (or is a symlink): refused")
    if not (adapter_dir / SIGNATURE_FILE).exists() and not (adapter_dir / SIGNATURE_FILE).is_symlink():
        raise AdapterSignatureError(f"{adapter_dir} has no {SIGNATURE_FILE}: unsigned adapters are refused")
    sig_bytes = read_plain_file(adapter_dir / SIGNATURE_FILE, 1 << 20)
    signature = AdapterSignature.from_json(sig_bytes.decode("utf-8", errors="replace"))
    blobs = {}
    for name in signature.files:
        check_plain_name(name, "signed file name")
        if name == SIGNATURE_FILE:
            raise AdapterSignatureError(f"the signature cannot cover {SIGNATURE_FILE} itself")
        blobs[name] = read_plain_file(adapter_dir / name, max_file_bytes)
    metadata = verify_blobs(blobs, signature, trusted)
    blobs[SIGNATURE_FILE] = sig_bytes
    return blobs, metadata


def read_verified_files(adapter_dir: str | Path, trusted: Ed25519PublicKey) -> tuple[dict[str, bytes], dict]:
    """Read the signed files of `adapter_dir` into memory and verify them; returns (bytes by name, metadata)."""
    blobs, metadata = read_signed_dir(adapter_dir, trusted)
    blobs.pop(SIGNATURE_FILE)
    return blobs, metadata


def verify_received(blobs: Mapping[str, bytes], trusted: Ed25519PublicKey) -> dict:
    """Verify files received over the network (signature file included); returns the signed metadata."""
    if SIGNATURE_FILE not in blobs:
        raise AdapterSignatureError(f"the adapter came without {SIGNATURE_FILE}: unsigned adapters are refused")
    signature = AdapterSignature.from_json(blobs[SIGNATURE_FILE].decode("utf-8", errors="replace"))
    return verify_blobs({n: b for n, b in blobs.items() if n != SIGNATURE_FILE}, signature, trusted)


def load_verified_adapter(adapter_dir: str | Path, trusted: Ed25519PublicKey):
    """The adapter's state dict (torch tensors), config dict and signed metadata, verified before parsing."""
    blobs, metadata = read_verified_files(adapter_dir, trusted)
    state, config = parse_adapter_blobs(blobs)
    return state, config, metadata


def parse_adapter_blobs(blobs: Mapping[str, bytes]) -> tuple[dict, dict]:
    """(state dict, config dict) from verified adapter bytes."""
    from safetensors.torch import load as load_safetensors

    weights_name = next((n for n in blobs if n.endswith(".safetensors")), None)
    if weights_name is None:
        raise AdapterSignatureError("the signature covers no safetensors weights")
    try:
        config = json.loads(blobs["adapter_config.json"]) if "adapter_config.json" in blobs else {}
        return load_safetensors(blobs[weights_name]), config
    except Exception as exc:  # safetensors raises its own errors on bad headers
        raise AdapterSignatureError(f"signed adapter bytes do not parse: {type(exc).__name__}: {exc}") from exc
