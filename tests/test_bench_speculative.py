"""`fedge bench speculative` end to end on the tiny model: every method runs, the fedge runs (with the
target's prompt keys/values and with the draft's own prefill) give the target's greedy tokens, and the
report carries both sets of ratios."""

import json

from fedge.simulations.bench_speculative import run


def test_bench_speculative_reports_both_prefills_and_stays_greedy_identical(tmp_path):
    out = tmp_path / "bench.json"
    report = run("tiny-random-llama", ["int4"], n_prompts=1, max_new_tokens=8, k="auto", json_path=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["greedy_identical"] is True
    rows = [r for r in report["rows"] if r["domain"] == "all"]
    assert len(rows) == 1
    row = rows[0]
    for key in ("speedup_vs_target", "speedup_vs_hf_assisted", "own_prefill_speedup_vs_target",
                "own_prefill_speedup_vs_hf_assisted"):
        assert row[key] > 0
    assert 0 <= row["acceptance_rate"] <= 1 and 0 <= row["a"] <= 1
    assert sum(report["prompts_per_domain"].values()) >= 1
