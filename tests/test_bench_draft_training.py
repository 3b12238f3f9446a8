"""`fedge bench draft-training` end to end on the tiny model: real training client processes (one per
variant), their peak memory, the losses on the target and the acceptance of each draft + adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import SHARED_DATA


def test_bench_draft_training_runs_clients_in_their_own_processes(tmp_path):
    out = tmp_path / "bench.json"
    env = os.environ | {"FEDGE_DATA_DIR": str(SHARED_DATA)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "bench", "draft-training", "--model", "tiny-random-llama",
         "--datasets", "gsm8k", "--draft-layers", "1", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
         "--eval-examples", "4", "--prompts", "1", "--max-new-tokens", "6", "--threads", "1",
         "--loss-chunk-tokens", "16", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["datasets"]["gsm8k"]["variants"]
    assert set(rows) == {"target", "draft", "draft-L1"}
    for variant, row in rows.items():
        assert row["peak_rss_mb"] > row["model_rss_mb"] > 0, variant
        assert row["heldout_loss"] > 0 and row["step_s"] > 0
    assert rows["target"]["reduction_kept"] in (None, 1.0)  # the reference keeps all of its own reduction
    for variant in ("draft", "draft-L1"):
        assert 0.0 <= rows[variant]["acceptance_plain"] <= 1.0
        assert 0.0 <= rows[variant]["acceptance_adapted"] <= 1.0
    assert "LoRA trained on the int4 draft" in proc.stdout
