"""Checkpoints of a federated run, so a killed server resumes where it stopped with the same adapter.

A checkpoint is `round-NNNN/{adapter,strategy}.safetensors + state.json` (the global adapter, the
server optimiser's moments, the records so far and the run's identity); the `latest` marker is
switched atomically after the directory is complete, so a kill at any moment leaves a usable one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np

from fedge.cloud.federated_config import FederatedConfig
from fedge.peft_methods.aggregation import StateDict

Checkpoint = tuple[StateDict, dict[str, np.ndarray], dict]  # adapter, strategy arrays, state.json


class HasStateArrays(Protocol):
    def state_arrays(self) -> dict[str, np.ndarray]: ...


def save_checkpoint(directory: Path, server_round: int, state: StateDict, strategy: HasStateArrays,
                    payload: dict) -> None:
    """round-NNNN/{adapter,strategy}.safetensors + state.json, then `latest` is switched atomically."""
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"round-{server_round:04d}"
    tmp = directory / f".tmp-round-{server_round:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter.safetensors"))
    save_numpy(strategy.state_arrays() or {"_empty": np.zeros(0)}, str(tmp / "strategy.safetensors"))
    (tmp / "state.json").write_text(json.dumps(payload, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    marker = directory / ".latest.tmp"
    marker.write_text(target.name)
    os.replace(marker, directory / "latest")
    for old in sorted(directory.glob("round-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path) -> Checkpoint | None:
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file

    marker = directory / "latest"
    if not marker.exists():
        return None
    target = directory / marker.read_text().strip()
    payload = json.loads((target / "state.json").read_text())
    arrays = {k: v for k, v in load_numpy(str(target / "strategy.safetensors")).items() if k != "_empty"}
    return load_file(str(target / "adapter.safetensors")), arrays, payload


def load_resume_checkpoint(config: FederatedConfig) -> Checkpoint:
    """The checkpoint `--resume` continues; a missing or foreign one is a clear error, raised before
    any simulation starts."""
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    loaded = load_checkpoint(ckpt_dir) if ckpt_dir else None
    if loaded is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
    payload = loaded[2]
    if payload["identity"] != config.identity():
        raise ValueError(f"--resume: checkpoint in {ckpt_dir} is of a different run configuration "
                         f"({payload['config']}); refusing to mix runs")
    return loaded
