"""`fedge bench kernels`: the parser wiring and one small end-to-end run of the table and JSON."""

from __future__ import annotations

import json

import torch


def test_bench_kernels_cli_parses():
    from fedge.cli import build_parser

    args = build_parser().parse_args(["bench", "kernels", "--json", "out.json", "--ops", "lora", "--quick"])
    assert args.json == "out.json" and args.ops == "lora" and args.quick and callable(args.func)


def test_bench_kernels_runs_and_writes_json(tmp_path, monkeypatch, capsys):
    from fedge.simulations import bench_kernels

    def tiny_cases(device, quick):  # the real shapes take seconds each on 2 cores
        from fedge.kernels.lora import lora_apply_reference, lora_apply_segmented

        x, a, b = torch.randn(4, 8), torch.randn(2, 2, 8), torch.randn(2, 6, 2)
        ids = torch.tensor([0, 1, -1, 0])
        yield ("multi-LoRA apply", "tiny", "ref", lambda: lora_apply_reference(x, a, b, ids), "segmented",
               lambda: lora_apply_segmented(x, a, b, ids), 1000, 100)

    monkeypatch.setitem(bench_kernels.OPS, "lora", tiny_cases)
    out = tmp_path / "bench.json"
    parser_args = ["bench", "kernels", "--json", str(out), "--ops", "lora", "--device", "cpu", "--budget", "0.01"]
    from fedge.cli import build_parser

    assert bench_kernels.main(build_parser().parse_args(parser_args)) == 0
    report = json.loads(out.read_text())
    assert report["device_type"] == "cpu" and len(report["rows"]) == 1
    row = report["rows"][0]
    assert row["op"] == "multi-LoRA apply" and row["baseline_ms"] > 0 and row["fast_ms"] > 0
    assert abs(row["speedup"] - row["baseline_ms"] / row["fast_ms"]) < 1e-9
    assert "multi-LoRA apply" in capsys.readouterr().out
