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
from pathlib import Path

import grpc

from fedge.simulations.local_federation import free_port
from fedge.simulations.phones_report import ModeResult, print_table, report

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
    return _mode_result(mode, [r.token_ids for r in results], [r.stats for r in results], wall, health0, health1)


def _mode_result(mode: str, outputs: list[list[int]], stats: list, wall: float, health0, health1) -> ModeResult:
    tokens = sum(len(o) for o in outputs)
    forwards = health1.target_forwards - health0.target_forwards
    drafted, accepted, rejected = (sum(getattr(s, f) for s in stats) for f in ("drafted", "accepted", "rejected"))
    ks = [k for s in stats for k in s.ks]
    batches = [b for s in stats for b in s.batch_sizes]
    if mode == "cloud_only":  # a decoding step gives each session in it one token
        mean_batch = tokens / forwards if forwards else 0.0
    else:
        mean_batch = sum(batches) / len(batches) if batches else 0.0
    draft_s = sum(s.draft_s for s in stats)
    return ModeResult(
        outputs=outputs, tokens=tokens, wall_s=wall, cloud_cpu_s=health1.cloud_cpu_s - health0.cloud_cpu_s,
        latencies_s=[x for s in stats for x in s.token_latency_s], forwards=forwards,
        forward_s=health1.forward_s - health0.forward_s,
        serving_cpu_s=health1.serving_cpu_s - health0.serving_cpu_s,
        ingress_cpu_s=health1.ingress_cpu_s - health0.ingress_cpu_s,
        acceptance=accepted / drafted if drafted else 0.0,
        a_hat=accepted / (accepted + rejected) if accepted + rejected else 0.0,
        mean_k=sum(ks) / len(ks) if ks else 0.0, mean_batch=mean_batch, ks=ks,
        phone_wall_s=sum(s.wall_s for s in stats), network_s=sum(s.network_s for s in stats),
        queue_s=sum(s.queue_s for s in stats), cloud_forward_s=sum(s.forward_s for s in stats), draft_s=draft_s,
        draft_compute_s=sum(s.draft_compute_s for s in stats), draft_overrun_s=sum(s.draft_overrun_s for s in stats),
        draft_replayed=sum(s.draft_replayed for s in stats))


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


def _phone_clients(args: argparse.Namespace, draft, info, tokenizer, server: str, tokens_per_s: float,
                   adapter_version: str, farm) -> list:
    """One client per phone: its own channel, emulated link and draft session (drafted in `farm`)."""
    from fedge.edge.client import EdgeClient
    from fedge.edge.client_types import EdgeConfig
    from fedge.edge.cloud_link import NetworkProfile
    from fedge.edge.drafter import Drafter
    from fedge.simulations.phone_drafts import FarmSequence

    def farm_drafter(model, prompt_ids, params, seed, q_support=None) -> Drafter:
        drafter = Drafter(model, prompt_ids, params, seed, q_support=q_support)
        drafter.sequence = FarmSequence(farm, prompt_ids)
        return drafter

    clients = []
    for i in range(args.phones):
        net = NetworkProfile(args.rtt_ms, args.jitter_ms, args.bandwidth_mbps, args.loss, seed=i)
        # each phone drafts at its device's speed, and chooses k with that speed
        cfg = EdgeConfig(server=server, k_max=args.k_max, fixed_k=getattr(args, "fixed_k", None), network=net,
                         rpc_timeout_s=120.0, draft_budget_s=1 / tokens_per_s, phone_tokens_per_s=tokens_per_s,
                         load_aware=not getattr(args, "no_load_aware", False))
        clients.append(EdgeClient(draft, info.target_fingerprint, info.tokenizer_fingerprint, cfg, tokenizer,
                                  adapter_version=adapter_version,
                                  drafter_factory=farm_drafter if farm is not None else Drafter))
    return clients


def _run_both_modes(args: argparse.Namespace, clients: list, prompts: list[list[int]], stop: set[int], draft,
                    console) -> dict[str, ModeResult]:
    """Cloud-only, then edge-assisted, with the same prompts and clients. With replayed drafts, the
    draft's greedy proposals along the cloud-only output (the target's greedy text) are computed
    in between, outside both measurements."""
    from rich.progress import Progress

    from fedge.simulations.phone_drafts import greedy_draft_table

    # warm-up outside the measurement (first-call costs in the replica and the client)
    clients[0].generate_ids(prompts[0], 4, stop_ids=stop)
    clients[0].cloud_generate_ids(prompts[0], 4, stop)
    results: dict[str, ModeResult] = {}
    with Progress(console=console) as bar:
        for mode in ("cloud_only", "edge_assisted"):
            if mode == "edge_assisted" and _phone_drafts(args) == "replay":
                task = bar.add_task("the draft's greedy proposals along the target's text (untimed)",
                                    total=len(clients))
                for client, prompt, output in zip(clients, prompts, results["cloud_only"].outputs, strict=True):
                    if tuple(prompt) not in client.replay_drafts:
                        client.replay_drafts[tuple(prompt)] = greedy_draft_table(
                            draft, prompt, output, args.k_max, args.max_new_tokens)
                    bar.advance(task)
            task = bar.add_task(f"{mode}: {args.phones} phones x {args.max_new_tokens} tokens", total=args.phones)
            results[mode] = _run_mode(mode, clients, prompts, args.max_new_tokens, stop,
                                      lambda task=task: bar.advance(task))
    return results


def _phone_drafts(args: argparse.Namespace) -> str:
    return getattr(args, "phone_drafts", None) or "replay"


def _yield_to_the_cloud(nice: int) -> None:
    """From here on this process (the phones) runs at a lower priority than the cloud it measures:
    the phones' real drafting then takes only the CPU the cloud leaves idle, as on separate devices,
    while their time is accounted at the device profile. Threads started later inherit it."""
    if nice > 0:
        os.nice(nice)


def _run_facts(args: argparse.Namespace, draft_dir, info, draft_s: float, tokens_per_s: float, farm: bool,
               health, after) -> dict:
    """What the report records about the run's set-up: the draft, the phones' profile, the cost curve."""
    return {"draft": str(draft_dir), "draft_quant": info.quant, "cpu_count": os.cpu_count(),
            "draft_ms_per_token_alone": draft_s * 1000, "phone_tokens_per_s": tokens_per_s,
            "phone_drafts": _phone_drafts(args), "draft_farm": farm,
            "phone_nice": getattr(args, "phone_nice", 10),
            "fixed_k": getattr(args, "fixed_k", None), "load_aware": not getattr(args, "no_load_aware", False),
            "cloud_batch_wait_ms": args.cloud_batch_wait_ms if args.server is None else None,
            "forward_path": health.forward_path, "cost_positions": list(health.cost_positions),
            "cost_seconds_startup": list(health.cost_seconds), "cost_seconds": list(after.cost_seconds),
            "cost_context": health.cost_context}


def main(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from fedge.models import encode_prompt
    from fedge.simulations.phone_drafts import DraftFarm

    console = Console(stderr=True)
    if args.phones < 1:
        console.print("fedge: --phones must be >= 1")
        return 2
    draft, tokenizer, info, draft_dir, adapter_version = _load_phone_draft(args, console)
    prompts = [encode_prompt(tokenizer, PROMPTS[i % len(PROMPTS)], chat=False) for i in range(args.phones)]
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    # this process (the phones, and the reference before them) computes on one thread: it does not
    # fight the cloud for intra-op threads, and a one-thread forward does not stall on a busy machine
    torch.set_num_threads(1)
    reference = None if args.no_reference else _local_reference(args, prompts, stop, adapter_version, console)
    proc, server = _start_phones_cloud(args, console)
    farm = None
    try:
        draft_s = measure_draft_s(draft, prompts[0])  # alone, before the phones yield to the cloud
        tokens_per_s = getattr(args, "phone_tokens_per_s", None) or 1 / draft_s
        console.print(f"draft alone: {draft_s * 1000:.1f} ms/token on one thread; phones draft at "
                      f"{tokens_per_s:.1f} tokens/s (device profile)")
        _yield_to_the_cloud(getattr(args, "phone_nice", 10))
        if _phone_drafts(args) == "live" and not getattr(args, "no_draft_farm", False):
            farm = DraftFarm(draft, threads=os.cpu_count() or 1)
        clients = _phone_clients(args, draft, info, tokenizer, server, tokens_per_s, adapter_version, farm)
        health = clients[0].health(timeout_s=30)
        results = _run_both_modes(args, clients, prompts, stop, draft, console)
        after = clients[0].health(timeout_s=30)  # its cost curve, rescaled by the forwards of the run
        for c in clients:
            c.close()
    except grpc.RpcError as exc:
        console.print(f"fedge: the cloud failed: {exc.code().name}: {exc.details()}")
        return 1
    finally:
        if farm is not None:
            farm.stop()
        if proc is not None:
            stop_cloud(proc)

    co, ea = results["cloud_only"], results["edge_assisted"]
    identical = co.outputs == ea.outputs and (reference is None or ea.outputs == reference)
    extra = _run_facts(args, draft_dir, info, draft_s, tokens_per_s, farm is not None, health, after)
    rep = report(args, co, ea, identical, reference is not None, extra)
    Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    print_table(args, co, ea, rep)
    predicted = (f", predicted {rep['predicted_capacity_ratio']:.2f} from the cost curve"
                 if "predicted_capacity_ratio" in rep else "")
    print(f"capacity_ratio {rep['capacity_ratio']:.2f}{predicted} (serving processes only: "
          f"{rep['capacity_ratio_serving_processes']:.2f}), p50 ms/token {rep['p50_ms_per_token_cloud_only']:.0f} "
          f"cloud-only vs {rep['p50_ms_per_token_edge_assisted']:.0f} edge-assisted, greedy_identical {identical} "
          f"(checked against {rep['greedy_checked_against']}); JSON: {args.json}")
    return 0
