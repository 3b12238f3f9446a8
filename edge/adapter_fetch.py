"""Fetching a published adapter version from the cloud, checked file by file.

The cloud streams each file of the version in chunks with the file's SHA-256; the edge writes the
version only if every chunk arrived in order and every file's digest matches, so a phone never
loads a partial or altered adapter.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc

from fedge.edge.client_types import EdgeError
from fedge.protocol import fedge_pb2, fedge_pb2_grpc


def fetch_adapter(server: str, version: str, out_dir: str, timeout_s: float = 60.0) -> tuple[str, list[str]]:
    """Download a published adapter version ("" = latest) into out_dir/<version>/, checking each
    file's SHA-256 against the cloud's; returns (version, file names). Raises EdgeError on a
    mismatch or a missing version."""
    channel = grpc.insecure_channel(server)
    try:
        stub = fedge_pb2_grpc.AdaptersStub(channel)
        files: dict[str, bytearray] = {}
        digests: dict[str, str] = {}
        got = ""
        try:
            for chunk in stub.Fetch(fedge_pb2.FetchAdapterRequest(version=version), timeout=timeout_s):
                got = chunk.version
                buf = files.setdefault(chunk.file_name, bytearray())
                if chunk.offset != len(buf):
                    raise EdgeError(f"{chunk.file_name}: chunk at offset {chunk.offset}, expected {len(buf)}")
                buf.extend(chunk.data)
                if chunk.sha256:
                    digests[chunk.file_name] = chunk.sha256
        except grpc.RpcError as exc:
            raise EdgeError(f"adapter fetch failed: {exc.code().name}: {exc.details()}") from None
        for name, data in files.items():
            if hashlib.sha256(data).hexdigest() != digests.get(name):
                raise EdgeError(f"{name}: checksum mismatch (or missing), refusing the adapter")
        target = Path(out_dir) / got
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (target / Path(name).name).write_bytes(bytes(data))
        return got, sorted(files)
    finally:
        channel.close()
