"""When to run a Triton kernel: every tensor on CUDA, triton importable, and not switched off.

`FEDGE_DISABLE_TRITON=1` forces the torch paths everywhere (useful to bisect a wrong answer).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton kernel should run for these operands (None operands are ignored)."""
    if os.environ.get("FEDGE_DISABLE_TRITON", "") not in ("", "0"):
        return False
    present = [t for t in tensors if t is not None]
    return bool(present) and all(t.is_cuda for t in present) and triton_available()


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
