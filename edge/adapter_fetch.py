"""Fetching a published adapter version from the cloud, trusting nothing the server sends.

The cloud streams each file of a version in chunks with the file's SHA-256. The edge treats every
field as hostile: names must be plain file names (no `..`, no separators, no absolute paths), sizes
stay under per-file and total limits, chunks arrive in order. The files are held in memory until
the version's signature verifies under the edge's trusted key and its signed metadata names the
version asked for, with a sequence number not older than any version the edge already holds. Only
then are they written, into a temp directory inside the edge's own adapter folder that is renamed
into place: a refused adapter leaves nothing behind, and nothing is ever written outside that folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedge.edge.client_types import EdgeError
from fedge.protocol import fedge_pb2, fedge_pb2_grpc
from fedge.protocol.signing import (
    AdapterMetadata,
    AdapterSignatureError,
    check_plain_name,
    load_public_key,
    read_signed_dir,
    verify_received,
)


class AdapterFetchError(EdgeError):
    """The cloud's adapter was refused (unsafe name, too big, bad signature, older version, ...)."""


@dataclass(frozen=True)
class FetchLimits:
    max_total_bytes: int = 256 << 20
    max_file_bytes: int = 128 << 20
    max_files: int = 32


def fetch_adapter(server: str, version: str, out_dir: str | Path, public_key: Ed25519PublicKey | str | Path,
                  timeout_s: float = 60.0, *, tls_dir: str | None = None, device_id: str | None = None,
                  limits: FetchLimits | None = None, base_model_fingerprint: str | None = None
                  ) -> tuple[str, list[str]]:
    """Download a published adapter version ("" = latest) into out_dir/<version>/ and return
    (version, file names). With `tls_dir` (a `fedge certs create` directory) the fetch runs over
    mutual TLS as `device_id`. Raises AdapterFetchError (an EdgeError) on any refusal."""
    trusted = load_public_key(public_key) if isinstance(public_key, (str, Path)) else public_key
    limits = limits or FetchLimits()
    if version:
        _plain(version, "requested version")
    channel = _channel(server, tls_dir, device_id)
    try:
        got, files = _receive(fedge_pb2_grpc.AdaptersStub(channel), version, timeout_s, limits)
    finally:
        channel.close()
    metadata = _verify(files, trusted, got, version, base_model_fingerprint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held = held_sequence(out, trusted)
    if metadata.sequence < held:
        raise AdapterFetchError(f"adapter {got!r} has sequence {metadata.sequence}, older than the version "
                                f"{held} this edge already holds: refusing a rollback")
    _install(out, got, files)
    return got, sorted(files)


def held_sequence(out_dir: Path, trusted: Ed25519PublicKey) -> int:
    """The highest signed sequence among the versions already in `out_dir` that still verify (0: none)."""
    highest = 0
    for entry in out_dir.iterdir():
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            _, signed = read_signed_dir(entry, trusted)
            highest = max(highest, AdapterMetadata.from_signed(signed, entry.name).sequence)
        except (AdapterSignatureError, OSError):
            continue
    return highest


def _plain(name: str, what: str) -> str:
    try:
        return check_plain_name(name, what)
    except AdapterSignatureError as exc:
        raise AdapterFetchError(f"refusing the adapter: {exc}") from None


def _channel(server: str, tls_dir: str | None, device_id: str | None) -> grpc.Channel:
    if not tls_dir:
        return grpc.insecure_channel(server)
    from fedge.protocol.tls import device_channel_credentials

    if not device_id:
        raise AdapterFetchError("tls_dir is set but device_id is not: mutual TLS needs this device's certificate")
    return grpc.secure_channel(server, device_channel_credentials(tls_dir, device_id))


def _receive(stub, version: str, timeout_s: float, limits: FetchLimits) -> tuple[str, dict[str, bytes]]:
    """The version's files, checked chunk by chunk (names, order, sizes, digests) as they arrive."""
    stream = stub.Fetch(fedge_pb2.FetchAdapterRequest(version=version), timeout=timeout_s)
    files: dict[str, bytearray] = {}
    done: set[str] = set()
    got, total = "", 0
    try:
        for chunk in stream:
            got = got or _plain(chunk.version, "served version")
            if chunk.version != got or (version and got != version):
                raise AdapterFetchError(f"asked for {version or 'the latest'!r}, the server sent "
                                        f"{chunk.version[:80]!r} (after {got!r})")
            name = _plain(chunk.file_name, "served file name")
            if name in done:
                raise AdapterFetchError(f"{name}: data after the file's last chunk")
            if name not in files and len(files) >= limits.max_files:
                raise AdapterFetchError(f"the server sent more than {limits.max_files} files")
            buf = files.setdefault(name, bytearray())
            if chunk.offset != len(buf):
                raise AdapterFetchError(f"{name}: chunk at offset {chunk.offset}, expected {len(buf)}")
            total += len(chunk.data)
            if max(chunk.file_size, len(buf) + len(chunk.data)) > limits.max_file_bytes:
                raise AdapterFetchError(f"{name} is over the {limits.max_file_bytes}-byte per-file limit")
            if total > limits.max_total_bytes:
                raise AdapterFetchError(f"the adapter is over the {limits.max_total_bytes}-byte total limit")
            buf.extend(chunk.data)
            if chunk.sha256:
                if len(buf) != chunk.file_size or hashlib.sha256(buf).hexdigest() != chunk.sha256:
                    raise AdapterFetchError(f"{name}: size or checksum mismatch, refusing the adapter")
                done.add(name)
    except grpc.RpcError as exc:
        raise AdapterFetchError(f"adapter fetch failed: {exc.code().name}: {exc.details()}") from None
    finally:
        stream.cancel()  # stop the server's stream on an early refusal
    if set(files) != done or not files:
        raise AdapterFetchError(f"the stream ended before {sorted(set(files) - done) or 'any file'} was complete")
    return got, {name: bytes(data) for name, data in files.items()}


def _verify(files: dict[str, bytes], trusted: Ed25519PublicKey, got: str, version: str,
            base_model_fingerprint: str | None) -> AdapterMetadata:
    try:
        metadata = AdapterMetadata.from_signed(verify_received(files, trusted), got)
    except (AdapterSignatureError, ValueError, TypeError) as exc:
        raise AdapterFetchError(f"refusing adapter {got!r}: {str(exc)[:300]}") from None
    if base_model_fingerprint and metadata.base_model_fingerprint != base_model_fingerprint:
        raise AdapterFetchError(f"adapter {got!r} was trained on base model {metadata.base_model!r} "
                                f"({metadata.base_model_fingerprint}), not {base_model_fingerprint}")
    return metadata


def _install(out: Path, version: str, files: dict[str, bytes]) -> None:
    """Write into a temp dir inside `out`, then rename it to out/<version> (replacing an older copy)."""
    target = out / version
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise AdapterFetchError(f"{target} exists and is not a directory: not replacing it")
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=out))
    old = None
    try:
        for name, data in files.items():
            fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        os.chmod(tmp, 0o755)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=out))
            os.rename(target, old / "v")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.rename(old / "v", target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
