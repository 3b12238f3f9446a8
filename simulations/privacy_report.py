"""Tables and plots of the privacy experiments (`fedge privacy dp`, `fedge privacy secagg-time`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:g}"


def plot_dp(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, marker, label in (("mia_auc_loss", "o", "loss threshold"), ("mia_auc_reference", "s", "reference model")):
        axes[0].errorbar(x, [r[key] for r in rows], yerr=[r[f"{key}_ci95"] for r in rows], fmt=f"{marker}-",
                         capsize=3, label=label)
    axes[0].axhline(0.5, color="gray", lw=0.8, ls="--")
    axes[0].set(title=f"membership inference ({report['members']} vs {report['nonmembers']} docs, 95% CI)",
                ylabel="ROC AUC")
    axes[0].legend(fontsize=8)
    axes[1].plot(x, [r["canary_exposure"] for r in rows], "o-", label="rank among candidates")
    axes[1].plot(x, [r["canary_exposure_extrapolated"] for r in rows], "s--", label="extrapolated (normal fit)")
    axes[1].axhline(report["init"]["canary_exposure"], color="gray", lw=0.8, ls=":", label="before training")
    axes[1].set(title=f"canary exposure (max {rows[0]['canary_max_exposure']:.0f} bits by rank)", ylabel="bits")
    axes[1].legend(fontsize=8)
    axes[2].plot(x, [r["heldout_perplexity"] for r in rows], "o-", label="trained")
    axes[2].axhline(report["init"]["heldout_perplexity"], color="gray", lw=0.8, ls=":", label="before training")
    ppl = [r["heldout_perplexity"] for r in rows] + [report["init"]["heldout_perplexity"]]
    if max(ppl) > 10 * min(ppl):
        axes[2].set_yscale("log")
    axes[2].set(title="utility", ylabel="held-out perplexity")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, [_eps(r["epsilon"]) for r in rows])
        ax.set_xlabel("epsilon")
    fig.suptitle(f"{report['config']['model']}: {report['config']['num_clients']} clients, "
                 f"{report['config']['rounds']} rounds, secure aggregation + distributed DP", fontsize=10)
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
        rows = [next(r for r in report["rows"] if r["dropout"] == d and r["secure"] == secure) for d in dropouts]
        median = [r["round_s"] for r in rows]
        err = [[m - r["round_s_min"] for m, r in zip(median, rows, strict=True)],
               [r["round_s_max"] - m for m, r in zip(median, rows, strict=True)]]
        ax.bar(x + offset, median, width=0.4, yerr=err, capsize=3,
               label="secure aggregation" if secure else "plain")
    ax.set_xticks(x, [f"{d:.0%}" for d in dropouts])
    ax.set(xlabel="clients dropping after sharing keys", ylabel="round time (s, median, min-max)",
           title=f"{report['config']['clients_per_round']} clients per round, {report['vector_length']} values")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_dp(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = report["config"]
    table = Table(title=f"client-level DP + secure aggregation ({cfg['model']}, {cfg['num_clients']} clients, "
                        f"{cfg['rounds']} rounds x {cfg['steps']} steps, q=1, delta={report['delta']}; "
                        f"{report['members']} member / {report['nonmembers']} non-member docs; the "
                        f"{report['canary_copies_trained']} canary docs apart)")
    for col in ("epsilon", "sigma", "clip", "eps spent", "held-out ppl", "ppl cost", "MIA AUC loss (95% CI)",
                "MIA AUC ref (95% CI)", "canary exposure (rank)", "exposure (extrap.)"):
        table.add_column(col, justify="right")
    init = report["init"]
    base_auc = init.get("mia_auc_loss")
    table.add_row("(before)", "", "", "", f"{init['heldout_perplexity']:.2f}", "",
                  "" if base_auc is None else f"{base_auc:.3f}", "",
                  f"{init['canary_exposure']:.2f}", f"{init['canary_exposure_extrapolated']:.1f}")
    for r in report["rows"]:
        table.add_row(_eps(r["epsilon"]), f"{r['noise_multiplier']:.2f}",
                      "-" if r["clip_norm"] is None else f"{r['clip_norm']:g}",
                      _eps(r["epsilon_spent"]) if math.isinf(r["epsilon_spent"]) else f"{r['epsilon_spent']:.2f}",
                      f"{r['heldout_perplexity']:.2f}",
                      "" if r["perplexity_cost"] is None else f"{r['perplexity_cost']:+.1%}",
                      f"{r['mia_auc_loss']:.3f} +-{r['mia_auc_loss_ci95']:.2f}",
                      f"{r['mia_auc_reference']:.3f} +-{r['mia_auc_reference_ci95']:.2f}",
                      f"{r['canary_exposure']:.2f} / {r['canary_max_exposure']:.1f} (rank {r['canary_rank']})",
                      f"{r['canary_exposure_extrapolated']:.1f}")
    Console().print(table)


def print_time(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"secure aggregation vs plain rounds ({report['config']['clients_per_round']} clients per "
                        f"round, {report['vector_length']} values per update, "
                        f"{report['experiment_settings']['repeats']} runs each)")
    for col in ("dropout", "mode", "round s median", "min-max", "ratio (median)", "ratio per run min-max",
                "survivors", "adv/share/mask/cons/unmask s"):
        table.add_column(col, justify="right")
    for r in report["rows"]:
        stages = "/".join(f"{v:.2f}" for v in r["stage_s_median"].values()) if r["secure"] else ""
        table.add_row(f"{r['dropout']:.0%}", "secure" if r["secure"] else "plain", f"{r['round_s']:.2f}",
                      f"{r['round_s_min']:.2f}-{r['round_s_max']:.2f}", f"{r['ratio_vs_plain']:.2f}x",
                      f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}x", ",".join(map(str, r["survivors"])), stages)
    Console().print(table)
    crypto = Table(title="cryptography alone (all parties, in process)")
    for col in ("values", "clients", "dropout", "secure s", "per client s", "plain sum s"):
        crypto.add_column(col, justify="right")
    for c in report["crypto"]:
        crypto.add_row(str(c["vector_length"]), str(c["clients"]), f"{c['dropout']:.0%}",
                       f"{c['secure_s_all_parties']:.3f}", f"{c['secure_s_per_client_avg']:.4f}",
                       f"{c['plain_sum_s']:.4f}")
    Console().print(crypto)
