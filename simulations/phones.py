"""`fedge simulate phones`: N phones against a real `fedge cloud serve`, cloud-only vs edge-assisted.

    fedge simulate phones --phones 8 --rtt-ms 40 --jitter-ms 5 --bandwidth-mbps 20 --loss 0 --json out.json

The cloud runs as its own process (Ray + Ray Serve + gRPC on loopback), started here unless
`--server` names one. Each phone is a thread with its own gRPC channel, its own emulated link
(latency, jitter, bandwidth, TCP-style loss in the client transport) and its own draft session; the
phones share one copy of the draft weights (read-only) to keep memory down.

Both modes run in the same cloud process, one after the other, with the same prompts:
- cloud-only: each phone opens a session and the cloud generates every token (`Generate`),
  batching the phones' decoding steps into shared forwards;
- edge-assisted: each phone drafts k tokens and the cloud verifies them (`Verify`), batching the
  phones' rounds into shared forwards.

The phones share this machine's cores with the cloud, so the cloud's cost is its own CPU time
(user + system of the cloud process and its Ray processes, read from its Health reply) per
generated token; `capacity_ratio` = cloud-only CPU-seconds per token / edge-assisted ones, i.e.
how many more tokens the same cloud can serve when phones draft.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedge.simulations.local_federation import free_port

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import json\n\n\ndef load_config(path):\n",
    "class Stack:\n    \"\"\"A last-in first-out stack.\"\"\"\n\n    def __init__(self):\n",
    "def is_prime(n: int) -> bool:\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "def read_lines(path):\n    with open(path) as fh:\n",
    "def merge_sort(items):\n",
    "class Point:\n    def __init__(self, x, y):\n",
    "def word_count(text):\n    counts = {}\n",
    "from dataclasses import dataclass\n\n\n@dataclass\nclass User:\n",
    "def flatten(nested):\n",
    "def binary_search(items, target):\n",
]


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
    acceptance: float = 0.0
    mean_k: float = 0.0
    mean_batch: float = 0.0

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


def start_cloud(model: str, port: int, *extra: str, timeout_s: float = 300.0) -> subprocess.Popen:
    """`fedge cloud serve` in its own process (session), returns once it serves (output in `proc.log`)."""
    proc = subprocess.Popen([sys.executable, "-m", "fedge.cli", "cloud", "serve", "--model", model,
                             "--port", str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]))
    ready = threading.Event()
    log: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            log.append(line)
            if "fedge cloud: serving" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_cloud(proc)
            raise RuntimeError("the cloud did not start:\n" + "".join(log[-30:]))
    proc.log = log  # type: ignore[attr-defined]  # its output so far, and on (tests read it)
    return proc


def stop_cloud(proc: subprocess.Popen) -> None:
    """SIGTERM the cloud and the Ray processes it started (by pid), SIGKILL what lingers."""
    from fedge.processes import stop_tree

    stop_tree(proc.pid, grace_s=20)


def _run_mode(mode: str, clients, prompts: list[list[int]], max_new: int, stop: set[int], progress) -> ModeResult:
    health0 = clients[0].health(timeout_s=30)
    results: list = [None] * len(clients)
    errors: list[BaseException] = []

    def phone(i: int) -> None:
        try:
            if mode == "cloud_only":
                results[i] = clients[i].cloud_generate_ids(prompts[i], max_new, stop)
            else:
                results[i] = clients[i].generate_ids(prompts[i], max_new, stop_ids=stop)
        except BaseException as exc:  # reported after the run
            errors.append(exc)
        progress()

    start = time.perf_counter()
    threads = [threading.Thread(target=phone, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    health1 = clients[0].health(timeout_s=30)
    if errors:
        raise RuntimeError(f"{len(errors)} phone(s) failed in {mode}: {errors[0]!r}")
    outputs = [r.token_ids for r in results]
    drafted = sum(r.stats.drafted for r in results)
    ks = [k for r in results for k in r.stats.ks]
    batches = [b for r in results for b in r.stats.batch_sizes]
    return ModeResult(
        outputs=outputs, tokens=sum(len(o) for o in outputs), wall_s=wall,
        cloud_cpu_s=health1.cloud_cpu_s - health0.cloud_cpu_s,
        latencies_s=[x for r in results for x in r.stats.token_latency_s],
        forwards=health1.target_forwards - health0.target_forwards,
        forward_s=health1.forward_s - health0.forward_s,
        serving_cpu_s=health1.serving_cpu_s - health0.serving_cpu_s,
        acceptance=sum(r.stats.accepted for r in results) / drafted if drafted else 0.0,
        mean_k=sum(ks) / len(ks) if ks else 0.0, mean_batch=sum(batches) / len(batches) if batches else 0.0)


def measure_draft_s(draft, prompt_ids: list[int], tokens: int = 16) -> float:
    """Seconds per drafted token of one phone drafting alone (median of a few proposals)."""
    from fedge.edge.drafter import Drafter
    from fedge.sampling import SamplingParams

    session = Drafter(draft, prompt_ids, SamplingParams())
    session.propose(2)  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        session.propose(tokens)
        times.append((time.perf_counter() - start) / tokens)
    return sorted(times)[1]


def _load_phone_draft(args: argparse.Namespace, console):
    """The phones' draft (built once as a full-depth int4 draft), with the served adapter merged in."""
    from fedge.edge.draft import DraftSpec, build_draft, default_draft_dir, load_draft

    draft_dir = Path(args.draft) if args.draft else default_draft_dir(args.model, None, "int4")
    if not (draft_dir / "draft.json").is_file():
        console.print(f"building an int4 full-depth draft of {args.model} into {draft_dir}")
        build_draft(DraftSpec(target=args.model, quant="int4"), draft_dir)
    draft, tokenizer, info = load_draft(draft_dir)
    adapter_version = getattr(args, "adapter_version", "") or ""
    if adapter_version:  # the phones run the same global adapter on their draft as the cloud on its target
        from fedge.edge.draft import merge_adapter_into_draft

        merge_adapter_into_draft(draft, Path(args.adapters) / adapter_version)
    return draft, tokenizer, info, draft_dir, adapter_version


def _local_reference(args: argparse.Namespace, prompts: list[list[int]], stop: set[int], adapter_version: str,
                     console) -> list[list[int]]:
    """The local target's greedy text per prompt (target + adapter, computed as the cloud serves it)."""
    from rich.progress import Progress

    from fedge.models import load_model
    from fedge.speculative import autoregressive_generate

    target, _ = load_model(args.model)
    reference = []
    with contextlib.ExitStack() as stack, Progress(console=console, transient=True) as bar:
        if adapter_version:
            from fedge.cloud.multi_lora import AdapterBank

            bank = AdapterBank(target)
            bank.load(adapter_version, Path(args.adapters) / adapter_version, args.adapter_pubkey)
            stack.enter_context(bank.rows([bank.row_index(adapter_version)]))
        task = bar.add_task("local target greedy (reference)", total=len(set(map(tuple, prompts))))
        cache: dict[tuple, list[int]] = {}
        for p in prompts:
            if tuple(p) not in cache:
                cache[tuple(p)] = autoregressive_generate(target, p, args.max_new_tokens, stop_ids=stop)
                bar.advance(task)
            reference.append(cache[tuple(p)])
    return reference


def _start_phones_cloud(args: argparse.Namespace, console) -> tuple[subprocess.Popen | None, str]:
    """`--server`, or a `fedge cloud serve` started here (its process, and the address)."""
    if args.server is not None:
        return None, args.server
    port = args.port or free_port()
    console.print(f"starting `fedge cloud serve --model {args.model} --port {port} "
                  f"--batch-wait-ms {args.cloud_batch_wait_ms:g}` ...")
    adapter_flags = ["--adapters", args.adapters] if getattr(args, "adapters", None) else []
    if getattr(args, "adapter_pubkey", None):
        adapter_flags += ["--adapter-pubkey", args.adapter_pubkey]
    proc = start_cloud(args.model, port, "--batch-wait-ms", str(args.cloud_batch_wait_ms), *adapter_flags)
    return proc, f"127.0.0.1:{port}"


def _run_both_modes(args: argparse.Namespace, draft, info, tokenizer, server: str, draft_s: float,
                    adapter_version: str, prompts: list[list[int]], stop: set[int], console) -> dict[str, ModeResult]:
    """One client per phone; cloud-only, then edge-assisted, with the same prompts."""
    from rich.progress import Progress

    from fedge.edge.client import EdgeClient
    from fedge.edge.client_types import EdgeConfig
    from fedge.edge.cloud_link import NetworkProfile

    clients = []
    for i in range(args.phones):
        net = NetworkProfile(args.rtt_ms, args.jitter_ms, args.bandwidth_mbps, args.loss, seed=i)
        # the phones share this machine's cores, so each one's measured drafting time is inflated
        # by the others; k is chosen with the speed a phone drafts at on its own
        cfg = EdgeConfig(server=server, k_max=args.k_max, network=net, rpc_timeout_s=120.0, draft_budget_s=draft_s)
        clients.append(EdgeClient(draft, info.target_fingerprint, info.tokenizer_fingerprint, cfg, tokenizer,
                                  adapter_version=adapter_version))
    # warm-up outside the measurement (first-call costs in the replica and the client)
    clients[0].generate_ids(prompts[0], 4, stop_ids=stop)
    clients[0].cloud_generate_ids(prompts[0], 4, stop)
    results: dict[str, ModeResult] = {}
    with Progress(console=console) as bar:
        for mode in ("cloud_only", "edge_assisted"):
            task = bar.add_task(f"{mode}: {args.phones} phones x {args.max_new_tokens} tokens", total=args.phones)
            results[mode] = _run_mode(mode, clients, prompts, args.max_new_tokens, stop,
                                      lambda task=task: bar.advance(task))
    for c in clients:
        c.close()
    return results


def _report(args: argparse.Namespace, co: ModeResult, ea: ModeResult, identical: bool, checked_reference: bool,
            draft_dir: Path, draft_quant: str, draft_s: float) -> dict:
    return {
        "phones": args.phones, "rtt_ms": args.rtt_ms, "jitter_ms": args.jitter_ms,
        "bandwidth_mbps": args.bandwidth_mbps, "loss": args.loss, "model": args.model, "draft": str(draft_dir),
        "draft_quant": draft_quant, "max_new_tokens": args.max_new_tokens, "cpu_count": os.cpu_count(),
        "draft_ms_per_token_alone": draft_s * 1000,
        "cloud_tokens_per_s_cloud_only": co.tokens_per_s,
        "cloud_tokens_per_s_edge_assisted": ea.tokens_per_s,
        "cloud_cpu_s_per_token_cloud_only": co.cpu_s_per_token,
        "cloud_cpu_s_per_token_edge_assisted": ea.cpu_s_per_token,
        "capacity_ratio": co.cpu_s_per_token / ea.cpu_s_per_token if ea.cpu_s_per_token else 0.0,
        "p50_ms_per_token_cloud_only": co.pct_ms(0.5), "p95_ms_per_token_cloud_only": co.pct_ms(0.95),
        "p50_ms_per_token_edge_assisted": ea.pct_ms(0.5), "p95_ms_per_token_edge_assisted": ea.pct_ms(0.95),
        "greedy_identical": identical,
        "greedy_checked_against": "cloud-only and local target greedy" if checked_reference else "cloud-only",
        "tokens_cloud_only": co.tokens, "tokens_edge_assisted": ea.tokens,
        "wall_s_cloud_only": co.wall_s, "wall_s_edge_assisted": ea.wall_s,
        "cloud_cpu_s_cloud_only": co.cloud_cpu_s, "cloud_cpu_s_edge_assisted": ea.cloud_cpu_s,
        "target_forwards_cloud_only": co.forwards, "target_forwards_edge_assisted": ea.forwards,
        "acceptance_rate": ea.acceptance, "mean_k": ea.mean_k, "mean_batch_edge_assisted": ea.mean_batch,
        # the same cost without Ray's daemons (GCS, raylet, Serve controller), whose CPU grows with
        # wall time rather than with tokens: the ingress plus the verifier replicas only
        "cloud_serving_cpu_s_per_token_cloud_only": co.serving_cpu_s / co.tokens if co.tokens else 0.0,
        "cloud_serving_cpu_s_per_token_edge_assisted": ea.serving_cpu_s / ea.tokens if ea.tokens else 0.0,
        "capacity_ratio_serving_processes": co.serving_cpu_s / ea.serving_cpu_s if ea.serving_cpu_s else 0.0,
        "cloud_batch_wait_ms": args.cloud_batch_wait_ms if args.server is None else None,
        "cloud_forward_s_cloud_only": co.forward_s, "cloud_forward_s_edge_assisted": ea.forward_s,
    }


def _print_table(args: argparse.Namespace, co: ModeResult, ea: ModeResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedge simulate phones: {args.phones} phones, RTT {args.rtt_ms:g}±{args.jitter_ms:g} ms, "
                        f"{args.bandwidth_mbps:g} Mbit/s, loss {args.loss:g}")
    table.add_column("metric")
    table.add_column("cloud-only", justify="right")
    table.add_column("edge-assisted", justify="right")
    table.add_row("tokens", str(co.tokens), str(ea.tokens))
    table.add_row("wall s", f"{co.wall_s:.1f}", f"{ea.wall_s:.1f}")
    table.add_row("cloud tokens/s", f"{co.tokens_per_s:.1f}", f"{ea.tokens_per_s:.1f}")
    table.add_row("cloud CPU s/token", f"{co.cpu_s_per_token * 1000:.1f} ms", f"{ea.cpu_s_per_token * 1000:.1f} ms")
    table.add_row("target forwards", str(co.forwards), str(ea.forwards))
    table.add_row("cloud forward s / serving CPU s / CPU s",
                  f"{co.forward_s:.1f} / {co.serving_cpu_s:.1f} / {co.cloud_cpu_s:.1f}",
                  f"{ea.forward_s:.1f} / {ea.serving_cpu_s:.1f} / {ea.cloud_cpu_s:.1f}")
    table.add_row("p50 ms/token", f"{co.pct_ms(0.5):.0f}", f"{ea.pct_ms(0.5):.0f}")
    table.add_row("p95 ms/token", f"{co.pct_ms(0.95):.0f}", f"{ea.pct_ms(0.95):.0f}")
    table.add_row("acceptance / mean k / mean batch", "", f"{ea.acceptance:.2f} / {ea.mean_k:.1f} / "
                                                          f"{ea.mean_batch:.1f}")
    Console().print(table)


def main(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from fedge.models import encode_prompt

    console = Console(stderr=True)
    if args.phones < 1:
        console.print("fedge: --phones must be >= 1")
        return 2
    draft, tokenizer, info, draft_dir, adapter_version = _load_phone_draft(args, console)
    prompts = [encode_prompt(tokenizer, PROMPTS[i % len(PROMPTS)], chat=False) for i in range(args.phones)]
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    reference = None if args.no_reference else _local_reference(args, prompts, stop, adapter_version, console)
    proc, server = _start_phones_cloud(args, console)
    try:
        # the phones draft on this machine too: one thread each, so they do not fight the cloud for
        # intra-op threads; the cloud's cost is measured as its own CPU time regardless
        torch.set_num_threads(1)
        draft_s = measure_draft_s(draft, prompts[0])
        console.print(f"draft: {draft_s * 1000:.1f} ms/token on one thread, uncontended (each phone's drafting budget)")
        results = _run_both_modes(args, draft, info, tokenizer, server, draft_s, adapter_version, prompts, stop,
                                  console)
    except grpc.RpcError as exc:
        console.print(f"fedge: the cloud failed: {exc.code().name}: {exc.details()}")
        return 1
    finally:
        if proc is not None:
            stop_cloud(proc)

    co, ea = results["cloud_only"], results["edge_assisted"]
    identical = co.outputs == ea.outputs and (reference is None or ea.outputs == reference)
    report = _report(args, co, ea, identical, reference is not None, draft_dir, info.quant, draft_s)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    _print_table(args, co, ea)
    print(f"capacity_ratio {report['capacity_ratio']:.2f} (serving processes only: "
          f"{report['capacity_ratio_serving_processes']:.2f}), greedy_identical {identical} "
          f"(checked against {report['greedy_checked_against']}); JSON: {args.json}")
    return 0
