"""The verifier's cost curve: its forward time against the positions one batched forward carries.

Why: phones choose their draft length k to spend as little cloud time per accepted token as they
can (`fedge.speculative.DraftLengthController`), and only the cloud knows what a forward over
`sessions x (k + 1)` positions costs on its hardware, at its context lengths. It measures that
once at start-up (a few forwards) and reports it, with its current load, to phones (Health).

    curve = measure_cost_curve(target)             # CostCurve((1, 2, 4, ...), (s, s, s, ...))
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from fedge.speculative import CostCurve


def _forward_s(model: torch.nn.Module, sessions: int, width: int, context: int, repeats: int) -> float:
    """Median seconds of a (sessions, width) forward after a `context`-token cache."""
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (sessions, context), generator=gen)
    step = torch.randint(0, vocab, (sessions, width), generator=gen)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            cache = DynamicCache(config=model.config)
            model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
            start = time.perf_counter()
            model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=width)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_cost_curve(model: torch.nn.Module, sessions: tuple[int, ...] = (1, 4, 8),
                       widths: tuple[int, ...] = (1, 3, 5), context: int = 64, repeats: int = 3) -> CostCurve:
    """Forward time per total positions (sessions x width); where two shapes give the same total,
    the slower one counts (a conservative curve)."""
    if not sessions or not widths or min(sessions) < 1 or min(widths) < 1 or context < 1:
        raise ValueError("sessions, widths and context must be positive")
    cost: dict[int, float] = {}
    for n_sessions in sessions:
        for width in widths:
            total = n_sessions * width
            cost[total] = max(cost.get(total, 0.0), _forward_s(model, n_sessions, width, context, repeats))
    positions = sorted(cost)
    if len(positions) < 2:
        raise ValueError("a cost curve needs at least two distinct batch sizes")
    seconds, running = [], 0.0
    for n in positions:  # a wider forward never costs less (timing noise aside)
        running = max(running, cost[n])
        seconds.append(running)
    return CostCurve(tuple(positions), tuple(seconds))
