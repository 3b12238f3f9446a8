"""`fedge demo`: the whole phone-plus-server scenario on the embedded defaults, with a report.

1. the default model (from its PyPI wheel) and its int4 edge draft;
2. phones fine-tune the shared LoRA adapter on their own stdlib packages (training on their int4 draft;
   evaluation on the target), federated on Flower + Ray, with secure aggregation; client-level DP
   (epsilon accounted and enforced) with `--epsilon E` (off by default: with 8 phones its noise
   outweighs the updates, the README gives the measured price);
3. the cloud publishes the global adapter signed; each phone checks the signature and folds the
   adapter into its draft;
4. code completions: edge drafting + cloud verification (the cloud serving target + adapter) side
   by side with cloud-only serving, on a real `fedge cloud serve`;
5. a report: printed, `report.json` and PNG plots in a run directory named at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedge.models import DEFAULT_MODEL

console = Console(width=max(Console().width, 110))  # a report: wide enough that no column is cut


# What each phone does per round: STEPS AdamW steps on 2 windows of 128 tokens of its own code, on B only
# (FFA-LoRA). A frozen A makes B's gradient small, so FFA wants a larger step than full LoRA's usual
# 1e-4..1e-3; LR is the learning rate of the `fedge simulate federated` default run.
STEPS = 8
LR = 1e-2


@dataclass
class DemoConfig:
    """`fedge demo`'s knobs; everything else is the embedded default scenario."""

    model: str = DEFAULT_MODEL
    phones: int = 8
    rounds: int = 3
    steps: int = STEPS  # local LoRA steps per phone per round
    lr: float = LR
    epsilon: float = 0.0  # client-level DP budget for the whole run; 0 = off
    delta: float = 1e-3
    clip: float = 0.5  # L2 clip of one phone's update (DP only)
    rtt_ms: float = 40.0
    max_new_tokens: int = 48
    seed: int = 0
    out: str = "runs"  # the run directory is created under this


def _step(n: int, text: str) -> None:
    console.rule(f"[bold]{n}. {text}")


def _models(config: DemoConfig) -> tuple[object, Path]:
    """Step 1: the target (fetched once) and its int4 edge draft (built once)."""
    from fedge.edge.draft import DraftSpec, build_draft, default_draft_dir, load_draft
    from fedge.models import resolve_model

    _step(1, f"models: target {config.model} and its int4 edge draft")
    with console.status("fetching the target (first run: ~30 s from its PyPI wheel)"):
        resolve_model(config.model)
    draft_dir = default_draft_dir(config.model, None, "int4")
    if not (draft_dir / "draft.json").is_file():
        with console.status("building the int4 draft"):
            build_draft(DraftSpec(target=config.model, quant="int4"), draft_dir, progress=False)
    draft, _, draft_info = load_draft(draft_dir)
    console.print(f"draft: {draft_info.keep_layers}/{draft_info.num_target_layers} layers, {draft_info.quant}, "
                  f"{draft_info.bytes / 1e6:.0f} MB")
    return draft, draft_dir


def _print_round(record: dict) -> None:
    eps = record.get("epsilon")
    console.print(f"round {record['round']}: held-out loss {record['global_loss']:.3f} "
                  f"(ppl {record['global_perplexity']:.1f}), up {record.get('bytes_up', 0) / 1e3:.0f} kB"
                  + (f", epsilon {eps:.2f}" if eps is not None else ""))


def _federated(config: DemoConfig, run_dir: Path):
    """Step 2: the phones fine-tune the adapter, federated, under secure aggregation (and DP if asked)."""
    from fedge.cloud.federated_config import FederatedConfig
    from fedge.data import load_corpus
    from fedge.simulations.federated import run_federated

    dp = config.epsilon > 0
    _step(2, f"federated fine-tuning: {config.phones} phones, {config.rounds} rounds, secure aggregation"
             + (f" + DP (epsilon {config.epsilon:g})" if dp else ""))
    corpus = load_corpus("stdlib", "natural", num_clients=config.phones, seed=config.seed)
    fed = FederatedConfig(model=config.model, data="stdlib", partition="natural", num_clients=len(corpus.clients),
                          clients_per_round=len(corpus.clients), rounds=config.rounds, method="ffa",
                          steps=config.steps, batch_size=2, seq_len=128, lr=config.lr, eval_examples=2,
                          seed=config.seed, noop_rounds=1, checkpoint_dir=str(run_dir / "checkpoints"),
                          secagg=True, dp_epsilon=config.epsilon, dp_clip=config.clip, dp_delta=config.delta)
    console.print(f"phones: {', '.join(c.name for c in corpus.clients)}")
    console.print(f"each phone: {fed.steps} steps/round of LoRA (FFA: B only, lr {fed.lr:g}) on its "
                  f"{fed.draft_quant} draft; the global adapter is evaluated on the target")
    if dp:
        console.print(f"DP: clip {config.clip}, epsilon <= {config.epsilon:g} at delta {config.delta:g}; noise added "
                      "on the phones (distributed), the sum revealed only by secure aggregation")
    else:
        console.print("DP off (--epsilon E turns it on; the README gives its measured price at 8 phones)")
    with console.status("Flower simulation on Ray (phones train LoRA on their own packages)"):
        result, fed = run_federated(fed, corpus, on_round=_print_round)
    return result, fed, corpus


def _save_adapter(fed, result, run_dir: Path) -> tuple[str, Path]:
    """The trained global adapter, as version NNNN (the number of rounds it has seen); step 3 publishes it."""
    from fedge.simulations.federated import save_adapter

    version = f"{len(result.records) - 1:04d}"
    adapter_dir = run_dir / "trained" / version
    save_adapter(fed, result.final_state, adapter_dir)
    return version, adapter_dir


def _publish(config: DemoConfig, version: str, adapter_dir: Path, draft, run_dir: Path) -> None:
    """Step 3: the adapter published signed; a phone verifies it and folds it into its draft."""
    from fedge.cloud.adapter_publisher import publish_version
    from fedge.edge.draft import merge_adapter_into_draft
    from fedge.protocol.signing import generate_signing_key, load_verified_adapter, save_signing_key

    _step(3, f"publish adapter {version}, signed; phones verify it and fold it into their draft")
    signing_key = generate_signing_key()
    save_signing_key(signing_key, run_dir / "adapter-signing.key", run_dir / "adapter-signing.pub")
    published = publish_version(run_dir / "adapters", adapter_dir, run_dir / "adapter-signing.key", config.model,
                                version)
    load_verified_adapter(published, signing_key.public_key())  # what an edge does before use
    changed = merge_adapter_into_draft(draft, published)  # what each phone does (again) in step 4
    console.print(f"adapter {version}: signature verified, applies to {changed} draft layers")


def _serving(config: DemoConfig, draft_dir: Path, registry: Path, version: str, run_dir: Path) -> dict:
    """Step 4: the phones against a real `fedge cloud serve`, edge-assisted vs cloud-only."""
    from fedge.simulations import phones

    _step(4, f"serving: {config.phones} phones at {config.rtt_ms:g} ms RTT, edge-assisted vs cloud-only")
    serving_json = run_dir / "serving.json"
    phone_args = argparse.Namespace(
        phones=config.phones, rtt_ms=config.rtt_ms, jitter_ms=config.rtt_ms / 8, bandwidth_mbps=20.0, loss=0.0,
        model=config.model, draft=str(draft_dir), max_new_tokens=config.max_new_tokens, k_max=8, port=0,
        server=None, no_reference=False, json=str(serving_json), cloud_batch_wait_ms=200.0,
        adapters=str(registry), adapter_version=version, adapter_pubkey=str(run_dir / "adapter-signing.pub"))
    if phones.main(phone_args) != 0:
        raise RuntimeError("the serving simulation failed (see above)")
    return json.loads(serving_json.read_text())


def _federated_report(config: DemoConfig, fed, result, version: str, adapter_dir: Path) -> dict:
    rounds = [r for r in result.records if r["round"] > 0]
    first, last = result.records[0], result.records[-1]
    dp = config.epsilon > 0
    return {
        "method": fed.method, "rounds": rounds, "initial_loss": first["global_loss"],
        "initial_perplexity": first["global_perplexity"], "initial_client_loss": first["client_loss"],
        "final_loss": last["global_loss"],
        "final_perplexity": last["global_perplexity"],
        "perplexity_change": last["global_perplexity"] / first["global_perplexity"] - 1,
        "secagg": True, "dp": dp, "epsilon": rounds[-1].get("epsilon") if rounds and dp else None,
        "delta": config.delta if dp else None, "noise_multiplier": rounds[-1].get("noise_multiplier") if dp else None,
        "clip_norm": config.clip if dp else None, "adapter_version": version,
        "bytes_down_per_client_round": sum(r["bytes_down_per_client"] for r in rounds) / max(1, len(rounds)),
        "bytes_up_per_client_round": sum(r["bytes_up_per_client"] for r in rounds) / max(1, len(rounds)),
        "adapter_dir": str(adapter_dir), "model_bytes": result.model_bytes,
    }


def run_demo(config: DemoConfig) -> dict:
    """The four steps, then `report.json`, plots and a printed report in `OUT/demo-YYYYmmdd-HHMMSS`."""
    started = time.perf_counter()
    run_dir = Path(config.out) / time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    draft, draft_dir = _models(config)
    timings["models_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result, fed, corpus = _federated(config, run_dir)
    version, adapter_dir = _save_adapter(fed, result, run_dir)
    timings["federated_s"] = time.perf_counter() - t0
    _publish(config, version, adapter_dir, draft, run_dir)
    t0 = time.perf_counter()
    serving = _serving(config, draft_dir, run_dir / "adapters", version, run_dir)
    timings["serving_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    report = {
        "run_dir": str(run_dir), "model": config.model, "phones": [c.name for c in corpus.clients],
        "federated": _federated_report(config, fed, result, version, adapter_dir),
        "serving": serving,
        # a forward serves mean_batch phones' rounds at once; per phone, a round yields this many tokens
        "tokens_per_verify_round": serving["tokens_edge_assisted"] / max(
            1.0, serving["mean_batch_edge_assisted"] * serving["target_forwards_edge_assisted"]),
        "timings": timings, "config": asdict(config), "federated_config": asdict(fed),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _plots(report, run_dir)
    _print_report(report)
    return report


def _plots(report: dict, run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fed = report["federated"]
    rounds = fed["rounds"]
    xs = [0] + [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(xs, [fed["initial_loss"]] + [r["global_loss"] for r in rounds], "o-", label="global held-out")
    worst0 = max(fed["initial_client_loss"].values(), default=math.nan)
    axes[0].plot(xs, [worst0] + [r["worst_client_loss"] for r in rounds], "s--", label="worst phone")
    axes[0].set(title="federated LoRA: held-out loss", xlabel="round", ylabel="loss")
    axes[0].legend()
    axes[1].bar([r["round"] - 0.18 for r in rounds], [r["bytes_up"] / 1e3 for r in rounds], width=0.35, label="up")
    axes[1].bar([r["round"] + 0.18 for r in rounds], [r["bytes_down"] / 1e3 for r in rounds], width=0.35,
                label="down")
    axes[1].set(title="bytes per round (all phones)", xlabel="round", ylabel="kB")
    axes[1].legend()
    for ax in axes[:2]:
        ax.set_xticks(xs)
    if fed["dp"]:
        axes[2].plot(xs, [0.0] + [r.get("epsilon") or 0.0 for r in rounds], "o-")
        axes[2].axhline(report["config"]["epsilon"], color="red", linestyle=":", label="budget")
        axes[2].set(title=f"privacy spent (delta {fed['delta']:g})", xlabel="round", ylabel="epsilon")
        axes[2].set_xticks(xs)
    else:  # each phone's own held-out perplexity before and after
        phones = sorted(fed["initial_client_loss"])
        pos = range(len(phones))
        axes[2].bar([i - 0.2 for i in pos], [math.exp(fed["initial_client_loss"][p]) for p in phones], 0.4,
                    label="round 0", color="grey")
        axes[2].bar([i + 0.2 for i in pos], [math.exp(rounds[-1]["client_loss"].get(p, math.nan)) for p in phones],
                    0.4, label=f"round {rounds[-1]['round']}", color="tab:green")
        axes[2].set_xticks(list(pos), phones, rotation=45, ha="right", fontsize=7)
        axes[2].set(title="each phone's held-out perplexity", ylabel="perplexity")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "federated.png", dpi=110)
    plt.close(fig)

    s = report["serving"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    modes = ["cloud-only", "edge-assisted"]
    axes[0].bar(modes, [s["cloud_cpu_s_per_token_cloud_only"] * 1e3, s["cloud_cpu_s_per_token_edge_assisted"] * 1e3],
                color=["grey", "tab:green"])
    axes[0].set(title=f"cloud CPU per token (capacity x{s['capacity_ratio']:.2f})", ylabel="ms CPU / token")
    width = 0.35
    p50 = [s["p50_ms_per_token_cloud_only"], s["p50_ms_per_token_edge_assisted"]]
    p95 = [s["p95_ms_per_token_cloud_only"], s["p95_ms_per_token_edge_assisted"]]
    axes[1].bar([0 - width / 2, 1 - width / 2], p50, width, label="p50")
    axes[1].bar([0 + width / 2, 1 + width / 2], p95, width, label="p95")
    axes[1].set_xticks([0, 1], modes)
    axes[1].set(title="latency per token seen by a phone", ylabel="ms")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "serving.png", dpi=110)
    plt.close(fig)


def _print_report(report: dict) -> None:
    fed, s = report["federated"], report["serving"]
    table = Table(title="federated rounds (secure aggregation" + (" + DP)" if fed["dp"] else ", DP off)"))
    cols = ["round", "held-out loss", "perplexity", "worst phone loss", "up kB/phone", "down kB/phone", "survivors"]
    for col in cols + (["epsilon"] if fed["dp"] else []):
        table.add_column(col, justify="right")
    table.add_row("0", f"{fed['initial_loss']:.3f}", f"{fed['initial_perplexity']:.2f}", "", "", "", "",
                  *([""] if fed["dp"] else []))
    for r in fed["rounds"]:
        eps = r.get("epsilon")
        table.add_row(str(r["round"]), f"{r['global_loss']:.3f}", f"{r['global_perplexity']:.2f}",
                      f"{r['worst_client_loss']:.3f}", f"{r['bytes_up_per_client'] / 1e3:.0f}",
                      f"{r['bytes_down_per_client'] / 1e3:.0f}", str(r.get("secagg_survivors", "-")),
                      *([f"{eps:.2f}" if eps is not None else "-"] if fed["dp"] else []))
    console.print(table)
    console.print(f"phones' held-out perplexity {fed['initial_perplexity']:.2f} -> {fed['final_perplexity']:.2f} "
                  f"([bold]{100 * fed['perplexity_change']:+.1f}%[/bold]) after {len(fed['rounds'])} rounds")
    table = Table(title=f"serving: {len(report['phones'])} phones, RTT {s['rtt_ms']:g} ms")
    table.add_column("metric")
    table.add_column("cloud-only", justify="right")
    table.add_column("edge-assisted", justify="right")
    table.add_row("cloud CPU ms / token", f"{s['cloud_cpu_s_per_token_cloud_only'] * 1e3:.1f}",
                  f"{s['cloud_cpu_s_per_token_edge_assisted'] * 1e3:.1f}")
    table.add_row("cloud tokens / s", f"{s['cloud_tokens_per_s_cloud_only']:.1f}",
                  f"{s['cloud_tokens_per_s_edge_assisted']:.1f}")
    table.add_row("p50 / p95 ms per token", f"{s['p50_ms_per_token_cloud_only']:.0f} / "
                  f"{s['p95_ms_per_token_cloud_only']:.0f}", f"{s['p50_ms_per_token_edge_assisted']:.0f} / "
                  f"{s['p95_ms_per_token_edge_assisted']:.0f}")
    table.add_row("target forwards", str(s["target_forwards_cloud_only"]), str(s["target_forwards_edge_assisted"]))
    table.add_row("acceptance / mean k", "", f"{s['acceptance_rate']:.2f} / {s['mean_k']:.1f}")
    table.add_row("tokens per verify round of a phone", "1", f"{report['tokens_per_verify_round']:.2f}")
    console.print(table)
    eps = f"{fed['epsilon']:.2f}" if fed["epsilon"] is not None else "DP off"
    console.print(f"capacity ratio (cloud CPU per token, cloud-only / edge-assisted): [bold]{s['capacity_ratio']:.2f}"
                  f"[/bold]; greedy output identical: {s['greedy_identical']}; epsilon spent: {eps}")
    console.print(f"total {report['timings']['total_s']:.0f} s; report, plots, adapter and draft in "
                  f"[bold]{report['run_dir']}[/bold]")
