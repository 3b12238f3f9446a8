"""The report of `fedge simulate federated`: per-method JSON, per-round and summary tables, the plot.

Split from `fedge.simulations.federated` (which runs the simulation) so the run stays readable; every
figure here is read from the run's records, none is computed twice.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from fedge.cloud.federated_config import FederatedConfig


def method_report(config: FederatedConfig, result, base: dict) -> dict:
    from fedge.cloud.federated_rounds import overhead_s_per_round

    records = result.records
    final = records[-1]
    trained = [r for r in records if r["round"] > 0]
    bytes_up = [r["bytes_up_per_client"] for r in trained]
    report = {
        "method": config.method,
        "strategy": config.strategy,
        "final_loss": final["global_loss"],
        "final_perplexity": final["global_perplexity"],
        "initial_perplexity": records[0]["global_perplexity"] if records[0]["round"] == 0 else None,
        "worst_client_perplexity": final["worst_client_perplexity"],
        "worst_client": final["worst_client"],
        "bytes_up_per_client_round": sum(bytes_up) / max(1, len(bytes_up)),
        "bytes_down_per_client_round": sum(r["bytes_down_per_client"] for r in trained) / max(1, len(trained)),
        "model_bytes": result.model_bytes,
        "overhead_s_per_round": overhead_s_per_round(result.overhead_rounds_s),
        "noop_rounds_s": result.overhead_rounds_s,
        "discovery_s": result.discovery_s,
        "resumed_from_round": result.resumed_from,
        "rejected": sum(len(r.get("rejected", [])) for r in trained),
        "rounds": records,
        "config": asdict(config),
    }
    report["privacy"] = privacy_summary(config, trained)
    report["bytes_up_fraction_of_model"] = report["bytes_up_per_client_round"] / max(1, result.model_bytes)
    errors = [r["aggregation_error"] for r in trained if r.get("aggregation_error") is not None]
    report["aggregation_error_mean"] = sum(errors) / len(errors) if errors else None
    report.update({k: v for k, v in base.items() if not k.endswith("_s")})
    return report


def privacy_summary(config: FederatedConfig, trained: list[dict]) -> dict:
    """What protected the run: secure aggregation (survivors per round), DP (budget, epsilon spent
    after each round, the noise multiplier, clip and delta it ran with)."""
    out = {"secagg": config.secagg, "dp": config.dp_enabled,
           "secagg_survivors": [r.get("secagg_survivors") for r in trained] if config.secagg else None}
    if config.dp_enabled:
        last = trained[-1] if trained else {}
        out.update(dp_epsilon_budget=config.dp_epsilon, epsilon_per_round=[r.get("epsilon") for r in trained],
                   epsilon_spent=last.get("epsilon"), noise_multiplier=last.get("noise_multiplier"),
                   dp_clip=config.dp_clip, dp_delta=config.delta, dp_noise_at=last.get("dp_noise_at"),
                   dp_sampling=config.dp_sampling)
    return out


def compare_on_local_only_clients(report: dict, base: dict) -> None:
    """Local-only adapters are evaluated on their own clients only: put the global adapter, the
    initial model and centralised LoRA on the same clients (mean loss per client) beside them."""
    chosen = base.get("local_only_clients")
    if not chosen:
        return
    first, last = report["rounds"][0]["client_loss"], report["rounds"][-1]["client_loss"]
    if not all(c in last for c in chosen):
        return

    def ppl(losses: dict) -> float:
        return math.exp(sum(losses[c] for c in chosen) / len(chosen))

    report["local_only_clients_final_perplexity"] = ppl(last)
    if report["rounds"][0]["round"] == 0:
        report["local_only_clients_initial_perplexity"] = ppl(first)
    if "centralized_client_loss" in base:
        report["local_only_clients_centralized_perplexity"] = ppl(base["centralized_client_loss"])


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def round_table(report: dict):
    from rich.table import Table

    table = Table(title=f"{report['method']} ({report['strategy']}): per round")
    privacy = report.get("privacy") or {}
    extra = (["survivors"] if privacy.get("secagg") else []) + (["epsilon"] if privacy.get("dp") else [])
    for col in ("round", "global ppl", "worst client ppl", "personal ppl (mean)", "bytes up/client",
                "bytes down/client", "rejected", "train s", *extra):
        table.add_column(col, justify="right")
    for r in report["rounds"]:
        personal = list(r.get("personal_loss", {}).values())
        cells = {"survivors": str(r.get("secagg_survivors", "-")),
                 "epsilon": f"{r['epsilon']:.2f}" if r.get("epsilon") is not None else "-"}
        table.add_row(str(r["round"]), f"{r['global_perplexity']:.3f}", f"{r['worst_client_perplexity']:.3f}",
                      f"{math.exp(sum(personal) / len(personal)):.3f}" if personal else "-",
                      fmt_bytes(r.get("bytes_up_per_client", 0)) if r["round"] else "-",
                      fmt_bytes(r.get("bytes_down_per_client", 0)) if r["round"] else "-",
                      str(len(r.get("rejected", []))), f"{r.get('train_s', 0):.1f}" if r["round"] else "-",
                      *[cells[c] for c in extra])
    return table


def summary_table(reports: list[dict]):
    from rich.table import Table

    table = Table(title="federated LoRA: summary")
    for col in ("method", "final ppl", "vs central", "central ppl", "local-only ppl (fed, same clients)",
                "worst client ppl", "agg. error", "bytes up/client/round", "% of model", "overhead s/round"):
        table.add_column(col, justify="right")
    for r in reports:
        central = r.get("centralized_perplexity")
        table.add_row(r["method"], f"{r['final_perplexity']:.3f}",
                      f"{r['final_perplexity'] / central:.3f}x" if central else "-",
                      f"{central:.3f}" if central else "-",
                      f"{r['local_only_perplexity']:.3f} ({r['local_only_clients_final_perplexity']:.3f})"
                      if r.get("local_only_clients_final_perplexity") else "-",
                      f"{r['worst_client_perplexity']:.3f}",
                      f"{r['aggregation_error_mean']:.2e}" if r.get("aggregation_error_mean") is not None else "-",
                      fmt_bytes(r["bytes_up_per_client_round"]),
                      f"{100 * r['bytes_up_fraction_of_model']:.3f}%",
                      f"{r['overhead_s_per_round']:.3f}" if r["overhead_s_per_round"] is not None else "-")
    return table


def plot(reports: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in reports:
        rounds = [x["round"] for x in r["rounds"]]
        line, = ax.plot(rounds, [x["global_loss"] for x in r["rounds"]], marker="o", label=f"{r['method']} global")
        ax.plot(rounds, [x["worst_client_loss"] for x in r["rounds"]], ls=":", color=line.get_color(),
                label=f"{r['method']} worst client")
    if "centralized_loss" in base:
        ax.axhline(base["centralized_loss"], color="k", ls="--", label="centralised LoRA")
    if "local_only_loss" in base:  # on its own few clients, not the whole federation
        ax.axhline(base["local_only_loss"], color="gray", ls="-.",
                   label=f"local-only ({len(base.get('local_only_clients', []))} clients' own held-out)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
