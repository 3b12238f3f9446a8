"""`fedge bench aggregation`: the summary's statistics, and a tiny run with real Flower and Ray."""

from __future__ import annotations

import json

import pytest

from fedge.cli import main
from fedge.simulations.bench_aggregation import AggregationBench, best_per_partition, summarise


def _run(method: str, seed: int, ppl: float, partition: str = "natural") -> dict:
    return {"method": method, "partition": partition, "seed": seed, "final_perplexity": ppl,
            "initial_perplexity": 20.0, "bytes_up_per_client_round": 10.0, "bytes_down_per_client_round": 20.0}


def test_summary_is_paired_by_seed():
    bench = AggregationBench(methods=("fedavg", "ffa"), partitions=("natural",), seeds=(0, 1, 2))
    runs = [_run("fedavg", 0, 10.0), _run("fedavg", 1, 12.0), _run("fedavg", 2, 14.0),
            _run("ffa", 0, 9.0), _run("ffa", 1, 11.0), _run("ffa", 2, 15.0)]
    rows = {r["method"]: r for r in summarise(runs, bench)}
    assert rows["fedavg"]["final_perplexity"]["mean"] == pytest.approx(12.0)
    assert rows["fedavg"]["final_perplexity"]["std"] == pytest.approx(2.0)
    assert rows["ffa"]["vs_fedavg"]["mean"] == pytest.approx(-1 / 3)  # -1, -1, +1
    assert rows["ffa"]["wins"] == 2 and rows["fedavg"]["wins"] == 1
    assert best_per_partition(list(rows.values())) == {"natural": "ffa"}
    with pytest.raises(ValueError, match="methods"):
        AggregationBench(methods=("fedavg", "nope"))


def test_bench_aggregation_cli_tiny(tmp_path):
    out = tmp_path / "agg.json"
    args = ["bench", "aggregation", "--model", "tiny-random-llama", "--methods", "fedavg,ffa", "--seeds", "0",
            "--partitions", "natural", "--rounds", "2", "--clients", "3", "--steps", "1", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    runs = {r["method"]: r for r in report["runs"]}
    assert set(runs) == {"fedavg", "ffa"} and all(len(r["perplexity_per_round"]) == 3 for r in runs.values())
    # FFA trains (and sends) B only; FedAvg sends A and B
    assert 0 < runs["ffa"]["bytes_up_per_client_round"] < runs["fedavg"]["bytes_up_per_client_round"]
    assert all(r["bytes_down_per_client_round"] > 0 and r["rejected"] == 0 for r in runs.values())
    # FFA is exact (A frozen: the mean of B is the mean product); FedAvg of the factors is not
    assert all(e == pytest.approx(0, abs=1e-6) for e in runs["ffa"]["aggregation_error_per_round"])
    assert all(e > 0 for e in runs["fedavg"]["aggregation_error_per_round"][1:])
    assert all(len(r["global_loss_per_round"]) == 3 and len(r["personal_loss_per_round"]) == 2
               and None not in r["personal_loss_per_round"] for r in runs.values())
    assert report["best"]["natural"] in ("fedavg", "ffa") and out.with_suffix(".png").stat().st_size > 0
    # --resume reuses the runs of the same settings (nothing left to run here) and refuses other settings
    assert main(args + ["--resume"]) == 0
    again = json.loads(out.read_text())
    assert again["runs"] == report["runs"]
    assert main(args[:-2] + ["--lr", "1e-2", "--json", str(out), "--resume"]) == 2
