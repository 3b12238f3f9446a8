"""Publishing a global adapter version: the one way a version enters the registry the cloud serves.

The federated ServerApp (after an accepted round, or at the end) and the demo both call
`publish_version`. A version appears in the registry whole or not at all: its files are written
into a hidden temp directory of the registry (which the registry never lists) and renamed into
place. Every version is signed together with its metadata (`fedge.protocol.signing.AdapterMetadata`):
its name, a sequence number that only grows (so nobody can pass an older adapter off as a newer one),
and the base model's registry name and fingerprint. `adapter_config.json` names the base model by
its registry name, never the cache path of the machine that trained it, so any edge or cloud can
resolve it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedge.protocol.signing import (
    SIGNATURE_FILE,
    AdapterMetadata,
    AdapterSignatureError,
    check_plain_name,
    load_signing_key,
    read_plain_file,
    read_signed_dir,
    sign_blobs,
)

STATE_FILE = ".publish-state.json"  # the highest sequence ever published here (survives deleted versions)
_LOCK_FILE = ".publish.lock"
_NOT_PUBLISHED = {"README.md", SIGNATURE_FILE}  # peft's model card repeats the local base-model path


def publish_version(registry_dir: str | Path, adapter: Any, signing_key_path: str | Path, base_model_name: str,
                    version: str | None = None, *, base_model_fingerprint: str | None = None,
                    tokenizer_fingerprint: str | None = None) -> Path:
    """Write `adapter` as a new signed version of the registry at `registry_dir`; returns its directory.

    `adapter` is a peft adapter directory (save_pretrained) or a `(state_dict, config)` pair (config a
    dict or a peft LoraConfig). `version` defaults to `v<sequence, 6 digits>`. The fingerprints are
    computed from the registry model `base_model_name` when not given (loaded once per process)."""
    _check_portable(base_model_name)
    key = load_signing_key(signing_key_path)
    files = _adapter_files(adapter, base_model_name)
    if base_model_fingerprint is None or tokenizer_fingerprint is None:
        model_fp, tok_fp = _fingerprints(base_model_name)
        base_model_fingerprint = base_model_fingerprint or model_fp
        tokenizer_fingerprint = tokenizer_fingerprint or tok_fp
    root = Path(registry_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        sequence = next_sequence(root, key.public_key())
        version = check_plain_name(version or f"v{sequence:06d}", "adapter version")
        final = root / version
        if final.exists() or final.is_symlink():
            raise FileExistsError(f"adapter version {version!r} already exists in {root}: versions are immutable")
        metadata = AdapterMetadata(version, sequence, base_model_name, base_model_fingerprint, tokenizer_fingerprint)
        signature = sign_blobs(files, metadata.to_dict(), key)
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=root))
        try:
            for name, data in {**files, SIGNATURE_FILE: signature.to_json().encode()}.items():
                _write_synced(tmp / name, data)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _write_synced(root / STATE_FILE, json.dumps({"sequence": sequence, "version": version}).encode(), atomic=True)
        _fsync_dir(root)
    return final


def next_sequence(root: Path, public_key) -> int:
    """One more than the highest sequence published here (state file, or any version this key signed)."""
    highest = 0
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        highest = int(json.loads((root / STATE_FILE).read_text()).get("sequence", 0))
    for entry in root.iterdir():
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            _, metadata = read_signed_dir(entry, public_key)
        except (AdapterSignatureError, OSError):
            continue  # not ours, or not a version: the registry refuses it anyway
        sequence = metadata.get("sequence")
        if isinstance(sequence, int) and not isinstance(sequence, bool):
            highest = max(highest, sequence)
    return highest + 1


def _check_portable(name: str) -> None:
    if (not isinstance(name, str) or not name or os.path.isabs(name) or name.startswith((".", "~"))
            or "\\" in name or name.count("/") > 1 or ".." in name):
        raise ValueError(f"base model {name!r} is not a portable registry name (or hub id): a published "
                         "adapter must not name a path on the machine that trained it")


def _adapter_files(adapter: Any, base_model_name: str) -> dict[str, bytes]:
    if isinstance(adapter, (str, Path)):
        files = _dir_files(Path(adapter))
    elif isinstance(adapter, tuple) and len(adapter) == 2:
        from safetensors.torch import save

        state, config = adapter
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        files = {"adapter_model.safetensors": save({k: v.detach().contiguous().cpu() for k, v in state.items()}),
                 "adapter_config.json": json.dumps(config, default=_jsonable).encode()}
    else:
        raise TypeError("adapter must be a peft adapter directory or a (state_dict, config) pair")
    for required in ("adapter_model.safetensors", "adapter_config.json"):
        if required not in files:
            raise ValueError(f"the adapter has no {required}")
    files["adapter_config.json"] = _portable_config(files["adapter_config.json"], base_model_name)
    return files


def _dir_files(adapter_dir: Path) -> dict[str, bytes]:
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir} is not an adapter directory")
    files = {}
    for path in sorted(adapter_dir.iterdir()):
        if path.name in _NOT_PUBLISHED or path.name.startswith("."):
            continue
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"{path} is not a regular file: only plain files are published")
        files[check_plain_name(path.name, "adapter file name")] = read_plain_file(path)
    return files


def _portable_config(raw: bytes, base_model_name: str) -> bytes:
    config = json.loads(raw)
    if not isinstance(config, Mapping):
        raise ValueError("adapter_config.json is not a JSON object")
    config = dict(config)
    config["base_model_name_or_path"] = base_model_name  # the registry name, not the trainer's cache path
    return json.dumps(config, indent=2, sort_keys=True, default=_jsonable).encode()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):  # enums (peft's TaskType, PeftType)
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@functools.lru_cache(maxsize=4)
def _fingerprints(base_model_name: str) -> tuple[str, str]:
    from fedge.models import load_model, model_fingerprint, tokenizer_fingerprint

    model, tokenizer = load_model(base_model_name)
    return model_fingerprint(model), tokenizer_fingerprint(tokenizer)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One publisher at a time per registry (sequence numbers are never handed out twice)."""
    with open(root / _LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_synced(path: Path, data: bytes, atomic: bool = False) -> None:
    target = path.with_name(path.name + ".tmp") if atomic else path
    with open(target, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    if atomic:
        os.replace(target, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
