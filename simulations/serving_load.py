"""`fedge bench serving-load`: many phones on one verifier replica, mixed prompt lengths.

Why: the serving path must hold up under load, not only answer one phone right. Each simulated
phone opens a session with a prompt drawn between --min-prompt and --max-prompt tokens (so long
prefills land between other phones' rounds), then runs verify rounds of k drafted tokens with a
think time between them (the phone drafting). The phones drive the replica's real engine and
continuous-batching scheduler in this process (no gRPC, no Ray: what is measured is the replica,
not the network). Two configurations run side by side on the same phones: prefill in chunks (the
server's default) and prefill in one forward, so the effect of chunking on other phones' round
latency is a ratio from one run.

Reported per configuration: p50/p95/max round latency, p50 open (prefill) latency, peak KV cache
allocated vs held (bytes) and peak process RSS. Table (rich) + JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

import psutil

from fedge.cloud.engine import Limits, Refusal, Round, VerifierEngine
from fedge.cloud.scheduler import ContinuousBatchScheduler, OpenRequest
from fedge.sampling import SamplingParams


@dataclass
class LoadResult:
    config: str
    phones: int
    rounds: int
    refused: int
    round_p50_ms: float
    round_p95_ms: float
    round_max_ms: float
    open_p50_ms: float
    peak_kv_allocated_mb: float
    peak_kv_held_mb: float
    peak_rss_mb: float
    forwards: int
    mean_batch: float
    wall_s: float


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _phone(scheduler: ContinuousBatchScheduler, engine: VerifierEngine, prompt: list[int], start_s: float,
                 rounds: int, k: int, think_s: float, rng: random.Random, out: dict) -> None:
    await asyncio.sleep(start_s)
    t0 = time.perf_counter()
    opened = await scheduler.open_session(OpenRequest(engine.tokenizer_fingerprint, "", "", SamplingParams(),
                                                      prompt))
    if isinstance(opened, Refusal):
        out["refused"] += 1
        return
    out["open"].append(time.perf_counter() - t0)
    position = opened.position
    for _ in range(rounds):
        draft = [rng.randrange(engine.vocab_size) for _ in range(k)]
        t0 = time.perf_counter()
        reply = await scheduler.verify(Round(opened.session_id, position, draft))
        if isinstance(reply, Refusal):
            out["refused"] += 1
            break
        out["round"].append(time.perf_counter() - t0)
        position = reply.position
        await asyncio.sleep(think_s * rng.uniform(0.5, 1.5))
    scheduler.close_session(opened.session_id)


async def _monitor(engine: VerifierEngine, peaks: dict, stop: asyncio.Event) -> None:
    proc = psutil.Process()
    while not stop.is_set():
        sessions = list(engine.sessions.values())
        allocated = sum(s.sequence.kv.nbytes for s in sessions)
        per_position = [s.sequence.kv.nbytes / s.sequence.kv.capacity for s in sessions if s.sequence.kv.capacity]
        held = sum(s.sequence.kv.length * p for s, p in zip([s for s in sessions if s.sequence.kv.capacity],
                                                            per_position, strict=True))
        peaks["allocated"] = max(peaks["allocated"], allocated)
        peaks["held"] = max(peaks["held"], held)
        peaks["rss"] = max(peaks["rss"], proc.memory_info().rss)
        try:
            await asyncio.wait_for(stop.wait(), 0.02)
        except TimeoutError:
            pass


async def _run_config(name: str, model, fingerprints: tuple[str, str], args: argparse.Namespace,
                      prefill_chunk: int) -> LoadResult:
    limits = Limits(max_sessions=args.phones, max_draft_len=max(1, args.k), prefill_chunk=prefill_chunk,
                    max_batch=args.phones)
    engine = VerifierEngine(model, fingerprints[0], fingerprints[1], limits)
    scheduler = ContinuousBatchScheduler(engine, args.batch_wait_ms / 1000)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(1, engine.vocab_size) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
               for _ in range(args.phones)]
    starts = [rng.uniform(0, args.ramp_s) for _ in range(args.phones)]
    out = {"open": [], "round": [], "refused": 0}
    peaks = {"allocated": 0, "held": 0, "rss": 0}
    stop = asyncio.Event()
    monitor = asyncio.create_task(_monitor(engine, peaks, stop))
    t0 = time.perf_counter()
    await asyncio.gather(*(_phone(scheduler, engine, prompts[i], starts[i], args.rounds, args.k,
                                  args.think_ms / 1000, random.Random(args.seed * 1000 + i), out)
                           for i in range(args.phones)))
    wall = time.perf_counter() - t0
    stop.set()
    await monitor
    await scheduler.stop()
    info = engine.info()
    ms, mb = 1000.0, 1 / 2**20
    return LoadResult(name, args.phones, len(out["round"]), out["refused"],
                      _percentile(out["round"], 0.5) * ms, _percentile(out["round"], 0.95) * ms,
                      max(out["round"], default=0.0) * ms, statistics.median(out["open"] or [0.0]) * ms,
                      peaks["allocated"] * mb, peaks["held"] * mb, peaks["rss"] * mb, info.forwards,
                      info.mean_batch, wall)


def run(args: argparse.Namespace) -> list[LoadResult]:
    import torch

    from fedge.models import load_model, model_fingerprint, tokenizer_fingerprint

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    fingerprints = (model_fingerprint(model), tokenizer_fingerprint(tok))
    configs = [(f"chunked prefill ({args.prefill_chunk})", args.prefill_chunk), ("one-shot prefill", 1 << 30)]
    return [asyncio.run(_run_config(name, model, fingerprints, args, chunk)) for name, chunk in configs]


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if not 1 <= args.min_prompt <= args.max_prompt:
        raise SystemExit("fedge: need 1 <= --min-prompt <= --max-prompt")
    results = run(args)
    table = Table(title=f"{args.phones} phones on one verifier replica ({args.model}), prompts "
                        f"{args.min_prompt}-{args.max_prompt} tokens, k={args.k}")
    for col in ("config", "rounds", "refused", "round p50 ms", "round p95 ms", "round max ms", "open p50 ms",
                "KV alloc MB", "KV held MB", "peak RSS MB", "forwards", "mean batch"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in results:
        table.add_row(r.config, str(r.rounds), str(r.refused), f"{r.round_p50_ms:.1f}", f"{r.round_p95_ms:.1f}",
                      f"{r.round_max_ms:.1f}", f"{r.open_p50_ms:.1f}", f"{r.peak_kv_allocated_mb:.1f}",
                      f"{r.peak_kv_held_mb:.1f}", f"{r.peak_rss_mb:.0f}", str(r.forwards), f"{r.mean_batch:.1f}")
    Console(width=200).print(table)
    base, chunked = results[1], results[0]
    ratio = base.round_p95_ms / chunked.round_p95_ms if chunked.round_p95_ms else float("nan")
    print(f"round p95, one-shot / chunked prefill: {ratio:.2f}x (same phones, one run)")
    with open(args.json, "w") as handle:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"},
                   "results": [asdict(r) for r in results], "p95_ratio_one_shot_over_chunked": ratio}, handle,
                  indent=2)
    print(f"wrote {args.json}")
    return 0
