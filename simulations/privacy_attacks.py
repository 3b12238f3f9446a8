"""What leaks from a global adapter: a canary planted in one client's data, and the attacks that look for it.

`build_dataset` writes a small federated corpus (stdlib package families as clients, a random secret
repeated in one client's documents); `roc_auc` scores membership inference (members vs non-members by
loss), `exposure` is Carlini et al. 2019's rank-based canary exposure. Used by `fedge privacy dp`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CANARY_PREFIX = "the secret access code is "
CANARY_DIGITS = 6


# ------------------------------------------------------------------ data with canaries


@dataclass
class PrivacyData:
    path: Path
    canary: str
    canary_client: str
    candidates: list[str]


def build_dataset(out_dir: Path, clients: int, examples_per_client: int, canary_repeats: int, seed: int) -> PrivacyData:
    """A JSONL corpus: `clients` stdlib package families, a few chunks each, a canary in one client.

    Small per-client data is deliberate: membership inference needs a model that can memorise.
    """
    from fedge.data import read_source

    rng = random.Random(seed)
    by_group: dict[str, list[str]] = {}
    for ex in read_source("stdlib"):
        by_group.setdefault(ex.group, []).append(ex.text)
    groups = sorted((g for g, rows in by_group.items() if len(rows) >= examples_per_client + 4),
                    key=lambda g: (-len(by_group[g]), g))[:clients]
    if len(groups) < clients:
        raise ValueError(f"the stdlib corpus has only {len(groups)} groups with enough text for {clients} clients")
    canary = CANARY_PREFIX + "".join(rng.choice("0123456789") for _ in range(CANARY_DIGITS))
    candidates = sorted({CANARY_PREFIX + "".join(rng.choice("0123456789") for _ in range(CANARY_DIGITS))
                         for _ in range(2000)} - {canary})[:999]
    rows = []
    for i, group in enumerate(sorted(groups)):
        texts = rng.sample(by_group[group], examples_per_client + 4)  # + 4 documents to hold out
        for j, text in enumerate(texts):
            text = text[:600]
            if i == 0 and j < canary_repeats:  # the canary client: the secret inside several documents
                text = f"# {canary}\n{text}"
            rows.append({"text": text, "group": group})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "privacy-corpus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return PrivacyData(path, canary, sorted(groups)[0], candidates)


# ------------------------------------------------------------------ attacks


def roc_auc(member_scores: list[float], nonmember_scores: list[float]) -> float:
    """P(score of a random member > score of a random non-member) (Mann-Whitney U; ties count half)."""
    m, n = np.asarray(member_scores), np.asarray(nonmember_scores)
    if m.size == 0 or n.size == 0:
        return float("nan")
    greater = (m[:, None] > n[None, :]).sum() + 0.5 * (m[:, None] == n[None, :]).sum()
    return float(greater / (m.size * n.size))


def per_window_losses(model, windows: list[list[int]], pad_id: int) -> list[float]:
    from fedge.peft_methods.lora_model import mean_token_loss

    return [mean_token_loss(model, [w], pad_id) for w in windows]


def exposure(model, tokenizer, canary: str, candidates: list[str], pad_id: int) -> dict:
    """Carlini et al. 2019: log2(|candidates| + 1) - log2(rank of the canary by loss)."""
    texts = [canary] + candidates
    windows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    losses = per_window_losses(model, windows, pad_id)
    rank = 1 + sum(1 for loss in losses[1:] if loss < losses[0])
    return {"exposure": math.log2(len(texts)) - math.log2(rank), "rank": rank, "candidates": len(texts),
            "max_exposure": math.log2(len(texts))}
