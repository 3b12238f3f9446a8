"""The verifier's cost curve: its forward time against the positions one batched forward carries.

Why: phones choose their draft length k to spend as little cloud time per accepted token as they
can (`fedge.speculative.DraftLengthController`), and only the cloud knows what a forward over
`sessions x (k + 1)` positions costs on its hardware, at its context lengths, on the forward path
it serves with. It times that path once at start-up (a few forwards) and keeps the curve current
from the forwards it serves (`LiveCostCurve`: each point rescaled by what forwards near it took
lately, so a loaded or throttled machine shows up); Health reports it with the current load.

    curve = measure_cost_curve(target)             # CostCurve((1, 3, 4, ...), (s, s, s, ...))
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import torch

from fedge.cloud.batching import KVBuffer, Row, batched_forward
from fedge.speculative import CostCurve

Forward = Callable[[list[Row]], list[torch.Tensor]]


def serving_forward(model: torch.nn.Module) -> Forward:
    """The forward a verifier serves with: the lean packed one where the model allows, else HF's."""
    from fedge.cloud.lean_batch import LeanBatchForward

    if LeanBatchForward.available(model):
        return LeanBatchForward(model)
    return lambda rows: batched_forward(model, rows)


def _forward_s(forward: Forward, vocab: int, sessions: int, width: int, context: int, repeats: int) -> float:
    """Seconds of a (sessions x width) step after a `context`-token cache per session: the fastest of
    `repeats` after one warm-up (other work on the machine only ever adds time)."""
    gen = torch.Generator().manual_seed(0)
    kvs = [KVBuffer() for _ in range(sessions)]
    with torch.inference_mode():
        forward([Row(kv, torch.randint(0, vocab, (context,), generator=gen).tolist(), 1) for kv in kvs])
        step = [torch.randint(0, vocab, (width,), generator=gen).tolist() for _ in kvs]
        times = []
        for _ in range(repeats + 1):
            for kv in kvs:
                kv.truncate(context)
            start = time.perf_counter()
            forward([Row(kv, ids, width) for kv, ids in zip(kvs, step, strict=True)])
            times.append(time.perf_counter() - start)
    return min(times[1:])


def measure_cost_curve(model: torch.nn.Module, sessions: tuple[int, ...] = (1, 4, 8),
                       widths: tuple[int, ...] = (1, 3, 5), context: int = 64, repeats: int = 3,
                       forward: Forward | None = None) -> CostCurve:
    """Forward time per total positions (sessions x width) on `forward` (default: the serving one);
    where two shapes give the same total, the slower one counts (a conservative curve)."""
    if not sessions or not widths or min(sessions) < 1 or min(widths) < 1 or context < 1 or repeats < 1:
        raise ValueError("sessions, widths, context and repeats must be positive")
    forward = forward or serving_forward(model)
    vocab = int(model.config.vocab_size)
    cost: dict[int, float] = {}
    for n_sessions in sessions:
        for width in widths:
            total = n_sessions * width
            cost[total] = max(cost.get(total, 0.0), _forward_s(forward, vocab, n_sessions, width, context, repeats))
    positions = sorted(cost)
    if len(positions) < 2:
        raise ValueError("a cost curve needs at least two distinct batch sizes")
    seconds, running = [], 0.0
    for n in positions:  # a wider forward never costs less (timing noise aside)
        running = max(running, cost[n])
        seconds.append(running)
    return CostCurve(tuple(positions), tuple(seconds))


class LiveCostCurve:
    """The start-up curve, each point scaled by the recent ratio of served forwards' times to what
    the curve predicted for them (a forward updates the point nearest it, on a log scale; a point
    no forward came near takes the ratio of the nearest point one did)."""

    def __init__(self, base: CostCurve, context: int, smoothing: float = 0.8):
        self.base = base
        self.context = context
        self.smoothing = smoothing
        self.ratio = [1.0] * len(base.positions)
        self.seen = [False] * len(base.positions)  # a point no served forward came near takes its nearest seen one's
        self._lock = threading.Lock()

    def observe(self, positions: int, seconds: float) -> None:
        predicted = self.base(positions)
        if positions < 1 or predicted <= 0 or not math.isfinite(seconds):
            return
        i = min(range(len(self.base.positions)), key=lambda j: abs(math.log(self.base.positions[j] / positions)))
        with self._lock:
            self.ratio[i] = self.smoothing * self.ratio[i] + (1 - self.smoothing) * seconds / predicted
            self.seen[i] = True

    def curve(self) -> CostCurve:
        with self._lock:
            seen = [i for i, s in enumerate(self.seen) if s]
            ratio = [self.ratio[min(seen, key=lambda j: abs(j - i))] if seen else 1.0 for i in range(len(self.ratio))]
            scaled = [s * r for s, r in zip(self.base.seconds, ratio, strict=True)]
        seconds, running = [], 0.0
        for s in scaled:
            running = max(running, s)
            seconds.append(running)
        return CostCurve(self.base.positions, tuple(seconds))


class LoadMeter:
    """Sessions per target forward, an exponentially weighted recent average (0 before any forward)."""

    def __init__(self, smoothing: float = 0.8):
        self.smoothing = smoothing
        self.value = 0.0

    def observe(self, rows: int) -> None:
        self.value = float(rows) if self.value == 0.0 else self.smoothing * self.value + (1 - self.smoothing) * rows
