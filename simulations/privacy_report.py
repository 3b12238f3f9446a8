"""Tables and plots of the privacy experiments (`fedge privacy dp`, `fedge privacy secagg-time`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def plot_dp(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = ["inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(x, [r["mia_auc_loss"] for r in rows], "o-", label="loss threshold")
    axes[0].plot(x, [r["mia_auc_reference"] for r in rows], "s-", label="reference model")
    axes[0].axhline(0.5, color="gray", lw=0.8, ls="--")
    axes[0].set(title="membership inference", ylabel="ROC AUC")
    axes[0].legend()
    axes[1].plot(x, [r["canary_exposure"] for r in rows], "o-")
    axes[1].set(title="canary exposure", ylabel="bits")
    axes[2].plot(x, [r["heldout_perplexity"] for r in rows], "o-")
    axes[2].set(title="utility", ylabel="held-out perplexity")
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.set_xlabel("epsilon")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_time(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dropouts = sorted({r["dropout"] for r in report["rows"]})
    x = np.arange(len(dropouts))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for offset, secure in ((-0.2, False), (0.2, True)):
        values = [next(r["round_s"] for r in report["rows"] if r["dropout"] == d and r["secure"] == secure)
                  for d in dropouts]
        ax.bar(x + offset, values, width=0.4, label="secure aggregation" if secure else "plain")
    ax.set_xticks(x, [f"{d:.0%}" for d in dropouts])
    ax.set(xlabel="clients dropping after sharing keys", ylabel="round time (s)",
           title=f"{report['config']['clients_per_round']} clients per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_dp(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"client-level DP + secure aggregation ({report['config']['model']}, "
                        f"{report['config']['rounds']} rounds, q={report['sample_rate']:.2f}, delta={report['delta']})")
    for col in ("epsilon", "sigma", "eps spent", "rounds", "held-out ppl", "ppl cost", "MIA AUC (loss)",
                "MIA AUC (ref)", "canary exposure"):
        table.add_column(col, justify="right")
    for r in report["rows"]:
        table.add_row("inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}", f"{r['noise_multiplier']:.2f}",
                      "inf" if math.isinf(r["epsilon_spent"]) else f"{r['epsilon_spent']:.2f}", str(r["rounds_run"]),
                      f"{r['heldout_perplexity']:.2f}",
                      "" if r["perplexity_cost"] is None else f"{r['perplexity_cost']:+.1%}",
                      f"{r['mia_auc_loss']:.3f}", f"{r['mia_auc_reference']:.3f}",
                      f"{r['canary_exposure']:.2f} / {r['canary_max_exposure']:.1f}")
    Console().print(table)


def print_time(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"secure aggregation vs plain rounds ({report['config']['clients_per_round']} clients per "
                        f"round, {report['vector_length']} values per update)")
    for col in ("dropout", "mode", "round s (median)", "ratio", "survivors"):
        table.add_column(col, justify="right")
    for r in report["rows"]:
        table.add_row(f"{r['dropout']:.0%}", "secure" if r["secure"] else "plain", f"{r['round_s']:.3f}",
                      f"{r['ratio_vs_plain']:.2f}x", ",".join(map(str, r["survivors"])))
    Console().print(table)
    crypto = Table(title="cryptography alone (all parties, in process)")
    for col in ("values", "clients", "dropout", "secure s", "per client s", "plain sum s"):
        crypto.add_column(col, justify="right")
    for c in report["crypto"]:
        crypto.add_row(str(c["vector_length"]), str(c["clients"]), f"{c['dropout']:.0%}",
                       f"{c['secure_s_all_parties']:.3f}", f"{c['secure_s_per_client_avg']:.4f}",
                       f"{c['plain_sum_s']:.4f}")
    Console().print(crypto)
