"""What `fedge simulate phones` measured, and what the cloud's cost curve predicted: JSON and a table.

The prediction is the issue's arithmetic on the verifier's own measured curve C(n) (forward seconds
for n positions, from Health): cloud-only serves P phones at C(P) / P per token; edge-assisted
rounds of k drafts cost C(P (k + 1)) / P each and yield E(a, k) = (1 - a^(k+1)) / (1 - a) tokens,
with a estimated as accepted / (accepted + rejections) (the per-token acceptance accepted / drafted
that benchmarks print is not that a; both are reported). The same prediction is also given at the
batch sizes the cloud really saw, which separates "the forward costs what the curve says" from
"the phones' rounds shared forwards as well as they could". The curve is the one the verifier
measured when it started, the one Health gave the phones to choose k by; the prediction from the
curve Health reports after the run (each point rescaled by the forwards the run served near it,
so a machine loaded by other work shows up) is given too.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from fedge.speculative import CostCurve, expected_tokens_per_round


@dataclass
class ModeResult:
    outputs: list[list[int]]
    tokens: int
    wall_s: float
    cloud_cpu_s: float
    latencies_s: list[float]
    forwards: int
    forward_s: float
    serving_cpu_s: float
    ingress_cpu_s: float = 0.0
    acceptance: float = 0.0  # accepted / drafted
    a_hat: float = 0.0  # accepted / (accepted + rejections): the a of E(a, k)
    mean_k: float = 0.0
    mean_batch: float = 0.0  # sessions per forward that carried this mode's rounds
    ks: list[int] = field(default_factory=list)  # every round's k
    # summed over phones: where their time went (seconds)
    phone_wall_s: float = 0.0
    network_s: float = 0.0
    queue_s: float = 0.0
    cloud_forward_s: float = 0.0
    draft_s: float = 0.0
    draft_compute_s: float = 0.0
    draft_overrun_s: float = 0.0
    draft_replayed: int = 0  # rounds whose drafts were computed before the timed run

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_s_per_token(self) -> float:
        return self.cloud_cpu_s / self.tokens if self.tokens else float("inf")

    def pct_ms(self, q: float) -> float:
        if not self.latencies_s:
            return 0.0
        xs = sorted(self.latencies_s)
        return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]

    def split_ms(self) -> dict[str, float]:
        """Mean milliseconds per delivered token of each part of a phone's wait."""
        if not self.tokens:
            return {}
        parts = {"drafting": self.draft_s, "network": self.network_s, "queueing": self.queue_s,
                 "cloud_forward": self.cloud_forward_s}
        parts["rpc_and_serving"] = max(0.0, self.phone_wall_s - sum(parts.values()))
        return {name: 1000 * s / self.tokens for name, s in parts.items()}


def _cpu_split(m: ModeResult) -> dict[str, float]:
    if not m.tokens:
        return {}
    return {"replicas": 1000 * (m.serving_cpu_s - m.ingress_cpu_s) / m.tokens,
            "ingress": 1000 * m.ingress_cpu_s / m.tokens,
            "ray_daemons": 1000 * (m.cloud_cpu_s - m.serving_cpu_s) / m.tokens}


def predicted_capacity(curve: CostCurve, a: float, ks: list[int], cloud_only_batch: float,
                       edge_batch: float) -> float:
    """Cloud cost per token cloud-only over edge-assisted, from the curve, a and the rounds' k."""
    if not ks or cloud_only_batch <= 0 or edge_batch <= 0:
        return 0.0
    cloud_only = curve(cloud_only_batch) / cloud_only_batch
    cost = sum(curve(edge_batch * (k + 1)) / edge_batch for k in ks)
    tokens = sum(expected_tokens_per_round(min(a, 0.999), k) for k in ks)
    return cloud_only / (cost / tokens) if cost else 0.0


def report(args: argparse.Namespace, co: ModeResult, ea: ModeResult, identical: bool, checked_reference: bool,
           extra: dict) -> dict:
    """The JSON record: the settings, both modes' measurements, the prediction next to the result."""
    curve = startup = None
    if len(extra.get("cost_positions", ())) >= 2:  # the curve after the run, and as measured at start-up
        curve = CostCurve(tuple(extra["cost_positions"]), tuple(extra["cost_seconds"]))
        startup = CostCurve(tuple(extra["cost_positions"]), tuple(extra["cost_seconds_startup"]))
    out = {
        "phones": args.phones, "rtt_ms": args.rtt_ms, "jitter_ms": args.jitter_ms,
        "bandwidth_mbps": args.bandwidth_mbps, "loss": args.loss, "model": args.model,
        "max_new_tokens": args.max_new_tokens, **extra,
        "cloud_tokens_per_s_cloud_only": co.tokens_per_s, "cloud_tokens_per_s_edge_assisted": ea.tokens_per_s,
        "cloud_cpu_s_per_token_cloud_only": co.cpu_s_per_token,
        "cloud_cpu_s_per_token_edge_assisted": ea.cpu_s_per_token,
        "capacity_ratio": co.cpu_s_per_token / ea.cpu_s_per_token if ea.cpu_s_per_token else 0.0,
        "p50_ms_per_token_cloud_only": co.pct_ms(0.5), "p95_ms_per_token_cloud_only": co.pct_ms(0.95),
        "p50_ms_per_token_edge_assisted": ea.pct_ms(0.5), "p95_ms_per_token_edge_assisted": ea.pct_ms(0.95),
        "latency_split_ms_per_token_cloud_only": co.split_ms(),
        "latency_split_ms_per_token_edge_assisted": ea.split_ms(),
        "draft_compute_ms_per_token": 1000 * ea.draft_compute_s / max(1, sum(ea.ks)),
        "draft_overrun_fraction": ea.draft_overrun_s / ea.draft_s if ea.draft_s else 0.0,
        "greedy_identical": identical,
        "greedy_checked_against": "cloud-only and local target greedy" if checked_reference else "cloud-only",
        "tokens_cloud_only": co.tokens, "tokens_edge_assisted": ea.tokens,
        "wall_s_cloud_only": co.wall_s, "wall_s_edge_assisted": ea.wall_s,
        "cloud_cpu_s_cloud_only": co.cloud_cpu_s, "cloud_cpu_s_edge_assisted": ea.cloud_cpu_s,
        "target_forwards_cloud_only": co.forwards, "target_forwards_edge_assisted": ea.forwards,
        "acceptance_rate": ea.acceptance, "acceptance_a_hat": ea.a_hat, "mean_k": ea.mean_k,
        "rounds_edge_assisted": len(ea.ks), "rounds_with_replayed_drafts": ea.draft_replayed,
        "mean_batch_cloud_only": co.mean_batch, "mean_batch_edge_assisted": ea.mean_batch,
        # the same cost without Ray's daemons (GCS, raylet, Serve controller), whose CPU grows with
        # wall time rather than with tokens: the ingress plus the verifier replicas only
        "cloud_serving_cpu_s_per_token_cloud_only": co.serving_cpu_s / co.tokens if co.tokens else 0.0,
        "cloud_serving_cpu_s_per_token_edge_assisted": ea.serving_cpu_s / ea.tokens if ea.tokens else 0.0,
        "capacity_ratio_serving_processes": co.serving_cpu_s / ea.serving_cpu_s if ea.serving_cpu_s else 0.0,
        # where the cloud's CPU went, ms per token: the verifier replicas, the gRPC ingress, Ray's daemons
        "cloud_cpu_split_ms_per_token_cloud_only": _cpu_split(co),
        "cloud_cpu_split_ms_per_token_edge_assisted": _cpu_split(ea),
        "cloud_forward_s_cloud_only": co.forward_s, "cloud_forward_s_edge_assisted": ea.forward_s,
        # forward seconds per token: the measured counterpart of the curve's prediction
        "capacity_ratio_forward_time": (co.forward_s / co.tokens) / (ea.forward_s / ea.tokens)
        if co.tokens and ea.tokens and ea.forward_s else 0.0,
    }
    if curve is not None:
        out["predicted_capacity_ratio"] = predicted_capacity(startup, ea.a_hat, ea.ks, args.phones, args.phones)
        out["predicted_capacity_ratio_at_measured_batches"] = predicted_capacity(
            startup, ea.a_hat, ea.ks, co.mean_batch, ea.mean_batch)
        out["predicted_capacity_ratio_after_run_curve"] = predicted_capacity(curve, ea.a_hat, ea.ks, args.phones,
                                                                             args.phones)
        predicted = out["predicted_capacity_ratio"]
        out["measured_over_predicted"] = out["capacity_ratio"] / predicted if predicted else 0.0
    return out


def print_table(args: argparse.Namespace, co: ModeResult, ea: ModeResult, rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedge simulate phones: {args.phones} phones, RTT {args.rtt_ms:g}±{args.jitter_ms:g} ms, "
                        f"{args.bandwidth_mbps:g} Mbit/s, loss {args.loss:g}, phone drafts at "
                        f"{rep['phone_tokens_per_s']:.0f} tokens/s")
    table.add_column("metric")
    table.add_column("cloud-only", justify="right")
    table.add_column("edge-assisted", justify="right")
    table.add_row("tokens", str(co.tokens), str(ea.tokens))
    table.add_row("wall s", f"{co.wall_s:.1f}", f"{ea.wall_s:.1f}")
    table.add_row("cloud tokens/s", f"{co.tokens_per_s:.1f}", f"{ea.tokens_per_s:.1f}")
    table.add_row("cloud CPU s/token", f"{co.cpu_s_per_token * 1000:.1f} ms", f"{ea.cpu_s_per_token * 1000:.1f} ms")
    table.add_row("target forwards / sessions per forward", f"{co.forwards} / {co.mean_batch:.1f}",
                  f"{ea.forwards} / {ea.mean_batch:.1f}")
    table.add_row("cloud forward s / serving CPU s / CPU s",
                  f"{co.forward_s:.1f} / {co.serving_cpu_s:.1f} / {co.cloud_cpu_s:.1f}",
                  f"{ea.forward_s:.1f} / {ea.serving_cpu_s:.1f} / {ea.cloud_cpu_s:.1f}")
    table.add_row("p50 / p95 ms/token", f"{co.pct_ms(0.5):.0f} / {co.pct_ms(0.95):.0f}",
                  f"{ea.pct_ms(0.5):.0f} / {ea.pct_ms(0.95):.0f}")
    split_co, split_ea = co.split_ms(), ea.split_ms()
    for part in split_ea:
        table.add_row(f"  ms/token: {part.replace('_', ' ')}", f"{split_co.get(part, 0.0):.1f}",
                      f"{split_ea[part]:.1f}")
    table.add_row("acceptance: accepted/drafted, a (for E) / mean k", "",
                  f"{ea.acceptance:.3f}, {ea.a_hat:.3f} / {ea.mean_k:.1f}")
    table.add_row("phone drafting: real ms/token, overrun", "",
                  f"{rep['draft_compute_ms_per_token']:.1f}, {100 * rep['draft_overrun_fraction']:.0f}%")
    if "predicted_capacity_ratio" in rep:
        table.add_row("capacity measured / predicted by the start-up curve (all phones per forward; at "
                      "measured batches) / by the curve after the run", "",
                      f"{rep['capacity_ratio']:.2f} / {rep['predicted_capacity_ratio']:.2f} "
                      f"({rep['predicted_capacity_ratio_at_measured_batches']:.2f}) / "
                      f"{rep['predicted_capacity_ratio_after_run_curve']:.2f}")
    Console().print(table)
