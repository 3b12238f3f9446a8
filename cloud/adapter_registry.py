"""Published global adapters: verified on every load, served to edges in checksummed chunks.

A registry directory holds one sub-directory per version, written by
`fedge.cloud.adapter_publisher.publish_version` (peft files plus `adapter.sig.json`). The cloud
trusts nothing on that disk: a version is served only if its signature verifies under the
configured public key, its signed name and sequence number match the directory (an older signed
adapter copied in under a newer name is refused), its base model is the one served, and no file
of it is a symlink. Anything else is skipped with a logged reason; the cloud still starts.

The registry is read as immutable `RegistrySnapshot`s: every request takes one snapshot, so Health
(the list), Fetch (the bytes) and OpenSession (the check before a replica loads it) agree on what is
served. A snapshot is rescanned when it is older than `poll_s`, or at once (rate-limited) when a
request names a version it does not know: versions published while the cloud runs appear without a
restart. Fetch streams the very bytes that were verified, never re-opening a path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedge.peft_methods.lora_files import AdapterFileError, lora_from_state
from fedge.protocol.signing import (
    MAX_ADAPTER_FILE_BYTES,
    SIGNATURE_FILE,
    AdapterMetadata,
    AdapterSignatureError,
    check_plain_name,
    load_public_key,
    parse_adapter_blobs,
    read_signed_dir,
)

CHUNK_BYTES = 256 * 1024  # well under the default gRPC message limit
log = logging.getLogger("fedge.adapters")


@dataclass
class Chunk:
    version: str
    file_name: str
    file_size: int
    offset: int
    data: bytes
    sha256: str  # only on a file's last chunk


@dataclass(frozen=True)
class PublishedVersion:
    """One verified version: its signed metadata and the exact bytes that verified."""

    metadata: AdapterMetadata
    files: dict[str, bytes] = field(repr=False)  # signature file included

    @property
    def version(self) -> str:
        return self.metadata.version

    @property
    def digest(self) -> str:
        """Names these exact signed bytes (the signature file covers every other file's digest)."""
        return hashlib.sha256(self.files[SIGNATURE_FILE]).hexdigest()[:16]


@dataclass(frozen=True)
class RegistrySnapshot:
    """What the registry serves at one moment; refused versions keep their reason."""

    served: dict[str, PublishedVersion]  # in publication (sequence) order
    refused: dict[str, str]
    taken_at: float = 0.0

    def versions(self) -> list[str]:
        return list(self.served)

    def get(self, version: str) -> PublishedVersion:
        """`version`, or the latest for ""; KeyError with the reason when it is not served."""
        if not version:
            if not self.served:
                raise KeyError("no adapter has been published yet")
            return next(reversed(self.served.values()))
        if version in self.served:
            return self.served[version]
        if version in self.refused:
            raise KeyError(f"adapter version {version[:80]!r} is refused: {self.refused[version]}")
        raise KeyError(f"unknown adapter version {version[:80]!r} (have: {self.versions() or 'none'})")

    def chunks(self, version: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
        published = self.get(version)
        for name, data in sorted(published.files.items()):
            digest = hashlib.sha256(data).hexdigest()
            for offset in range(0, max(1, len(data)), chunk_bytes):
                piece = data[offset:offset + chunk_bytes]
                last = offset + len(piece) >= len(data)
                yield Chunk(published.version, name, len(data), offset, piece, digest if last else "")


class AdapterRegistry:
    def __init__(self, root: str | Path | None, public_key: Ed25519PublicKey | str | Path | None = None,
                 base_model_fingerprint: str | None = None, poll_s: float = 2.0, min_rescan_s: float = 0.2,
                 max_file_bytes: int = MAX_ADAPTER_FILE_BYTES):
        self.root = Path(root) if root else None
        self.public_key = _public_key(public_key)
        self.base_model_fingerprint = base_model_fingerprint
        self.poll_s = poll_s
        self.min_rescan_s = min_rescan_s
        self.max_file_bytes = max_file_bytes
        self._lock = threading.Lock()
        self._snapshot = RegistrySnapshot({}, {}, taken_at=-float("inf"))
        self._cache: dict[str, tuple[tuple, PublishedVersion | str]] = {}  # name -> (stat stamp, verdict)

    def snapshot(self, wanted: str = "") -> RegistrySnapshot:
        """The current snapshot: rescanned when older than poll_s, or when `wanted` is unknown to it."""
        with self._lock:
            age = time.monotonic() - self._snapshot.taken_at
            unknown = bool(wanted) and wanted not in self._snapshot.served
            if age >= self.poll_s or (unknown and age >= self.min_rescan_s):
                self._snapshot = self._scan()
            return self._snapshot

    # the old single-call API, each on one snapshot
    def versions(self) -> list[str]:
        return self.snapshot().versions()

    def resolve(self, version: str) -> str:
        return self.snapshot(version).get(version).version

    def chunks(self, version: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
        return self.snapshot(version).chunks(version, chunk_bytes)

    # ---- scanning ------------------------------------------------------------------------------
    def _scan(self) -> RegistrySnapshot:
        now = time.monotonic()
        if self.root is None or not self.root.is_dir():
            return RegistrySnapshot({}, {}, now)
        verdicts: dict[str, PublishedVersion | str] = {}
        cache = {}
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as exc:  # keep serving what was verified before
            log.warning("adapter registry %s unreadable, keeping the last snapshot: %s", self.root, exc)
            return dataclasses.replace(self._snapshot, taken_at=now)
        for entry in entries:
            if entry.name.startswith(".") or (entry.is_file(follow_symlinks=False)):
                continue  # publisher temp dirs, its state file, stray files
            stamp = _stamp(entry)
            cached = self._cache.get(entry.name)
            verdict = cached[1] if cached and cached[0] == stamp else self._verify(entry)
            if isinstance(verdict, str) and not (cached and cached[0] == stamp):
                log.warning("adapter version %r skipped: %s", entry.name[:80], verdict)
            cache[entry.name] = (stamp, verdict)
            verdicts[entry.name] = verdict
        self._cache = cache
        return _order(verdicts, now)

    def _verify(self, entry: os.DirEntry) -> PublishedVersion | str:
        """The verified version, or the reason it is refused."""
        try:
            name = check_plain_name(entry.name, "version directory")
            if entry.is_symlink():
                return "the version directory is a symlink (the registry serves nothing outside itself)"
            if not entry.is_dir(follow_symlinks=False):
                return "not a directory"
            if self.public_key is None:
                return "no adapter public key is configured (--adapter-pubkey): unsigned serving is off"
            files, signed = read_signed_dir(entry.path, self.public_key, self.max_file_bytes)
            metadata = AdapterMetadata.from_signed(signed, name)
            if self.base_model_fingerprint and metadata.base_model_fingerprint != self.base_model_fingerprint:
                return (f"signed for base model {metadata.base_model!r} ({metadata.base_model_fingerprint}), "
                        f"this cloud serves {self.base_model_fingerprint}")
            state, config = parse_adapter_blobs(files)
            lora_from_state(config, state, f"version {name!r}")  # a LoRA adapter, or refused here already
            return PublishedVersion(metadata, files)
        except (AdapterSignatureError, AdapterFileError, OSError) as exc:
            return str(exc)
        except Exception as exc:  # whatever a hostile file makes a parser raise: this version only is skipped
            return f"malformed adapter: {type(exc).__name__}: {str(exc)[:200]}"


def _public_key(key: Ed25519PublicKey | str | Path | None) -> Ed25519PublicKey | None:
    if not isinstance(key, (str, Path)):
        return key
    try:
        return load_public_key(key)
    except (OSError, ValueError) as exc:
        raise AdapterSignatureError(f"cannot use {str(key)[:200]} as the adapter public key: {exc}") from exc


def _stamp(entry: os.DirEntry) -> tuple:
    """Changes whenever the directory or any file in it changes (then the version is verified again)."""
    try:
        info = entry.stat(follow_symlinks=False)
        files = []
        if entry.is_dir(follow_symlinks=False):
            for sub in os.scandir(entry.path):
                s = sub.stat(follow_symlinks=False)
                files.append((sub.name, s.st_ino, s.st_size, s.st_mtime_ns, s.st_mode))
        return (info.st_ino, info.st_mtime_ns, info.st_mode, tuple(sorted(files)))
    except OSError:
        return ("unreadable", time.monotonic())


def _order(verdicts: dict[str, PublishedVersion | str], now: float) -> RegistrySnapshot:
    """Served versions in sequence order; a sequence number used twice is served once, for the first name."""
    refused = {name: v for name, v in verdicts.items() if isinstance(v, str)}
    served: dict[str, PublishedVersion] = {}
    by_sequence: dict[int, str] = {}
    for published in sorted((v for v in verdicts.values() if not isinstance(v, str)),
                            key=lambda p: (p.metadata.sequence, p.version)):
        seq = published.metadata.sequence
        if seq in by_sequence:
            refused[published.version] = f"sequence {seq} is already used by version {by_sequence[seq]!r}"
            continue
        by_sequence[seq] = published.version
        served[published.version] = published
    return RegistrySnapshot(served, refused, now)
