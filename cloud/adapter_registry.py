"""Published global adapters, served to edges in checksummed chunks.

A registry directory holds one sub-directory per version (what the federated server publishes,
peft format: adapter_config.json, adapter_model.safetensors). The latest version is the last in
name order, so publish versions with sortable names (e.g. zero-padded round numbers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 256 * 1024  # well under the default gRPC message limit


@dataclass
class Chunk:
    version: str
    file_name: str
    file_size: int
    offset: int
    data: bytes
    sha256: str  # only on a file's last chunk


class AdapterRegistry:
    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else None

    def versions(self) -> list[str]:
        if self.root is None or not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def resolve(self, version: str) -> str:
        """`version`, or the latest for ""; KeyError when there is no such version."""
        versions = self.versions()
        if not version:
            if not versions:
                raise KeyError("no adapter has been published yet")
            return versions[-1]
        if version not in versions:
            raise KeyError(f"unknown adapter version {version!r} (have: {versions or 'none'})")
        return version

    def chunks(self, version: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
        version = self.resolve(version)
        assert self.root is not None
        for path in sorted((self.root / version).iterdir()):
            if not path.is_file():
                continue
            size = path.stat().st_size
            digest = hashlib.sha256()
            offset = 0
            with path.open("rb") as fh:
                while True:
                    data = fh.read(chunk_bytes)
                    digest.update(data)
                    last = offset + len(data) >= size
                    yield Chunk(version, path.name, size, offset, data, digest.hexdigest() if last else "")
                    offset += len(data)
                    if last:
                        break
