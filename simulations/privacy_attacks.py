"""What leaks from a global adapter: a canary planted in one client's data, and the attacks that look for it.

`build_dataset` writes a small federated corpus (stdlib package families as clients, a few short
documents each, a random secret at the top of several of one client's documents) and keeps, per
client, documents of the same family that no client ever trains on: the non-members. `roc_auc`
scores membership inference (members vs non-members), `exposure` is Carlini et al. 2019's
rank-based canary exposure among random candidates, with their extrapolated estimate over the whole
secret space beside it. Used by `fedge privacy dp`.

Membership inference needs a model that can memorise, so the settings are the ones under which
memorisation happens in practice: few documents per client, each short enough to be one training
window, seen several times per round.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CANARY_PREFIX = "# the secret access code is "
CANARY_DIGITS = 6


# ------------------------------------------------------------------ data with canaries


@dataclass
class PrivacyData:
    path: Path  # the training corpus (JSONL): what the clients load and train on
    canary: str  # the secret line as planted
    canary_client: str
    candidates: list[str]  # random secrets of the same format, never planted
    nonmembers: dict[str, list[str]] = field(default_factory=dict)  # per client: same family, never trained on


def _secret(rng: random.Random) -> str:
    return CANARY_PREFIX + "".join(rng.choice("0123456789") for _ in range(CANARY_DIGITS))


def build_dataset(out_dir: Path, clients: int, examples_per_client: int, canary_repeats: int, seed: int,
                  doc_chars: int = 240, nonmembers_per_client: int = 8, candidates: int = 1023) -> PrivacyData:
    """A JSONL corpus: `clients` stdlib package families, `examples_per_client` documents of about
    `doc_chars` characters each, the canary at the top of `canary_repeats` of the first client's.

    Each family also gives `nonmembers_per_client` documents that are never written to the corpus.
    """
    from fedge.data import read_source

    if not 1 <= canary_repeats <= examples_per_client:
        raise ValueError(f"canary repeats must be in 1..{examples_per_client} (got {canary_repeats})")
    rng = random.Random(seed)
    by_group: dict[str, list[str]] = {}
    for ex in read_source("stdlib"):
        if len(ex.text.strip()) >= doc_chars // 2:
            by_group.setdefault(ex.group, []).append(ex.text)
    need = examples_per_client + nonmembers_per_client
    groups = sorted((g for g, rows in by_group.items() if len(rows) >= need),
                    key=lambda g: (-len(by_group[g]), g))[:clients]
    if len(groups) < clients:
        raise ValueError(f"the stdlib corpus has only {len(groups)} groups with enough text for {clients} clients")
    canary = _secret(rng)
    pool = sorted({_secret(rng) for _ in range(3 * candidates)} - {canary})
    rows, nonmembers = [], {}
    for i, group in enumerate(sorted(groups)):
        texts = [t.strip()[:doc_chars] for t in rng.sample(by_group[group], need)]
        nonmembers[group] = texts[examples_per_client:]
        for j, text in enumerate(texts[:examples_per_client]):
            if i == 0 and j < canary_repeats:  # the canary client: the secret on top of several documents
                text = f"{canary}\n{text}"
            rows.append({"text": text, "group": group})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "privacy-corpus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return PrivacyData(path, canary, sorted(groups)[0], rng.sample(pool, min(candidates, len(pool))), nonmembers)


# ------------------------------------------------------------------ attacks


def roc_auc(member_scores: list[float], nonmember_scores: list[float]) -> float:
    """P(score of a random member > score of a random non-member) (Mann-Whitney U; ties count half)."""
    m, n = np.asarray(member_scores), np.asarray(nonmember_scores)
    if m.size == 0 or n.size == 0:
        return float("nan")
    greater = (m[:, None] > n[None, :]).sum() + 0.5 * (m[:, None] == n[None, :]).sum()
    return float(greater / (m.size * n.size))


def auc_halfwidth(auc: float, members: int, nonmembers: int) -> float:
    """Half-width of a 95% interval of a ROC AUC (Hanley & McNeil 1982), for reading 0.5 vs not."""
    if members == 0 or nonmembers == 0 or math.isnan(auc):
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (members - 1) * (q1 - auc * auc) + (nonmembers - 1) * (q2 - auc * auc))
    return 1.96 * math.sqrt(max(var, 0.0) / (members * nonmembers))


@torch.no_grad()
def window_nll(model, windows: list[list[int]], pad_id: int, batch_size: int = 32) -> list[tuple[float, int]]:
    """(summed next-token NLL, predicted tokens) of each window, batched (padding masked out)."""
    from fedge.peft_methods.lora_model import collate

    model.eval()
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))  # similar lengths share a batch
    result: dict[int, tuple[float, int]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask, labels = collate([windows[i] for i in idx], pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        for row, i in enumerate(idx):
            result[i] = (float(nll[row].sum()), int((target[row] != -100).sum()))
    return [result[i] for i in range(len(windows))]


def per_window_losses(model, windows: list[list[int]], pad_id: int) -> list[float]:
    """Mean next-token loss of each window."""
    return [total / max(count, 1) for total, count in window_nll(model, windows, pad_id)]


def exposure(model, tokenizer, canary: str, candidates: list[str], pad_id: int) -> dict:
    """Carlini et al. 2019: log2(|candidates| + 1) - log2(rank of the canary by NLL), and the
    extrapolated exposure -log2 P(NLL <= the canary's) under a normal fit to the candidates' NLL
    (their section 4.3), which can exceed the rank's log2(|candidates| + 1) cap."""
    texts = [canary] + candidates
    windows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    nll = [total for total, _ in window_nll(model, windows, pad_id, batch_size=128)]
    rank = 1 + sum(1 for x in nll[1:] if x < nll[0])
    mu, sd = float(np.mean(nll[1:])), float(np.std(nll[1:])) or 1e-12
    tail = 0.5 * math.erfc((mu - nll[0]) / (sd * math.sqrt(2)))  # P(X <= canary) for X ~ N(mu, sd)
    secrets = 10 ** CANARY_DIGITS
    return {"exposure": math.log2(len(texts)) - math.log2(rank), "rank": rank, "candidates": len(texts),
            "max_exposure": math.log2(len(texts)), "canary_nll": nll[0], "candidate_nll_mean": mu,
            "exposure_extrapolated": min(-math.log2(max(tail, 1e-300)), math.log2(secrets)),
            "max_exposure_extrapolated": math.log2(secrets)}
