"""`fedge privacy dp` on a tiny model with real Flower and Ray, and the attack measures it reports."""

from __future__ import annotations

import json
import math

import pytest

from fedge.cli import main
from fedge.simulations.privacy_attacks import CANARY_PREFIX, auc_halfwidth, build_dataset, exposure


def test_dataset_plants_the_canary_in_one_client_and_keeps_nonmembers_out(tmp_path):
    data = build_dataset(tmp_path, clients=3, examples_per_client=4, canary_repeats=2, seed=1, doc_chars=120,
                         nonmembers_per_client=3, candidates=50)
    rows = [json.loads(line) for line in data.path.read_text().splitlines()]
    assert len(rows) == 12 and len({r["group"] for r in rows}) == 3
    with_canary = [r for r in rows if data.canary in r["text"]]
    assert len(with_canary) == 2 and {r["group"] for r in with_canary} == {data.canary_client}
    assert data.canary.startswith(CANARY_PREFIX) and data.canary not in data.candidates
    assert len(data.candidates) == 50 and len(set(data.candidates)) == 50
    trained = {r["text"] for r in rows}
    assert all(len(v) == 3 and not set(v) & trained for v in data.nonmembers.values())
    with pytest.raises(ValueError, match="canary repeats"):
        build_dataset(tmp_path, clients=3, examples_per_client=4, canary_repeats=5, seed=1)


def test_exposure_ranks_the_most_likely_secret_first(tiny):
    """With candidates the model finds no less likely than the canary the rank is 1 + those below it:
    the canary itself among identical copies ranks first (ties do not count against it)."""
    model, tok = tiny
    canary = CANARY_PREFIX + "123456"
    same = exposure(model, tok, canary, [canary] * 7, pad_id=0)
    assert same["rank"] == 1 and same["exposure"] == pytest.approx(3.0) and same["max_exposure"] == 3.0
    others = [CANARY_PREFIX + f"{i:06d}" for i in range(31)]
    out = exposure(model, tok, canary, others, pad_id=0)
    assert 1 <= out["rank"] <= 32 and out["exposure"] == pytest.approx(5 - math.log2(out["rank"]))
    assert 0 <= out["exposure_extrapolated"] <= out["max_exposure_extrapolated"]


def test_auc_interval_narrows_with_more_samples():
    assert auc_halfwidth(0.5, 10, 10) > auc_halfwidth(0.5, 100, 100) > 0
    assert auc_halfwidth(1.0, 10, 10) == 0.0 and math.isnan(auc_halfwidth(0.5, 0, 3))


def test_privacy_dp_cli_tiny(tmp_path):
    """Both epsilons train through secure aggregation; DP spends at most its budget, inf spends none."""
    out = tmp_path / "dp.json"
    rc = main(["privacy", "dp", "--model", "tiny-random-llama", "--epsilons", "inf,2", "--clients", "3",
               "--rounds", "1", "--steps", "1", "--seq-len", "32", "--examples-per-client", "4",
               "--nonmembers-per-client", "2", "--canary-repeats", "2", "--candidates", "15", "--rank", "4",
               "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    inf, dp = report["rows"]
    assert inf["epsilon"] == "inf" or math.isinf(float(inf["epsilon"]))
    assert inf["noise_multiplier"] == 0 and inf["clip_norm"] is None
    assert 0 < dp["epsilon_spent"] <= 2 and dp["noise_multiplier"] > 1 and dp["clip_norm"] == 0.01
    assert all(r["rounds_run"] == 1 and r["survivors"] == [3] for r in report["rows"])
    assert report["members"] > 0 and report["nonmembers"] > 0 and report["canary_copies_trained"] >= 1
    # the canary's documents (a secret line no non-member has) are scored apart from the members
    assert report["members"] + report["canary_copies_trained"] == report["trained_docs"]
    for r in report["rows"]:
        assert 0 <= r["mia_auc_loss"] <= 1 and 0 <= r["mia_auc_reference"] <= 1
        assert r["canary_candidates"] == 16 and math.isfinite(r["heldout_perplexity"])
        scores = r["mia_scores_reference"]
        assert len(scores["members"]) == report["members"] and len(scores["nonmembers"]) == report["nonmembers"]
        assert 0 <= r["mia_auc_reference_with_canary_docs"] <= 1
    assert 0 <= report["init"]["mia_auc_loss"] <= 1
    assert out.with_suffix(".png").stat().st_size > 0
