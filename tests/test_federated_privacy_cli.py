"""`fedge simulate federated --secagg --dp-epsilon E --dp-clip C` on a tiny model with real Flower and Ray:
the flags reach the run (the secure-aggregation sum path, epsilon per round, noise in the update)."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedge.cli import main
from fedge.cloud.federated_config import FederatedConfig
from fedge.peft_methods.aggregation import LORA_B


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = tmp_path_factory.mktemp("fedpriv") / "corpus.jsonl"
    with path.open("w") as f:
        for group in ("json", "email", "http", "logging"):
            text = "".join(p.read_text(encoding="utf-8", errors="replace")
                           for p in sorted((stdlib / group).glob("*.py"))[:3])
            for i in range(8):
                f.write(json.dumps({"text": text[i * 500:(i + 1) * 500], "group": group}) + "\n")
    return path


def test_dp_config_calibrates_the_budget_and_picks_who_adds_noise():
    off = FederatedConfig(num_clients=8, clients_per_round=8)
    assert off.dp_config() is None and off.delta == 1e-3
    assert FederatedConfig(num_clients=1000, clients_per_round=8).delta == pytest.approx(1e-4)
    secure = FederatedConfig(num_clients=8, clients_per_round=8, rounds=3, secagg=True, dp_epsilon=8, dp_clip=0.2)
    dp = secure.dp_config(min_clients=6)
    assert dp.noise_at == "client" and dp.min_clients == 6 and dp.clip_norm == 0.2 and dp.max_epsilon == 8
    assert dp.noise_multiplier > 0.3
    central = FederatedConfig(num_clients=8, clients_per_round=8, rounds=3, dp_epsilon=8).dp_config(min_clients=6)
    assert central.noise_at == "server" and central.min_clients == 1
    assert central.noise_multiplier == dp.noise_multiplier  # the same accounting either way
    assert FederatedConfig(dp_epsilon=math.inf).dp_config().noise_multiplier == 0.0  # clip only
    with pytest.raises(ValueError, match="dp-epsilon"):
        FederatedConfig(dp_epsilon=-1)


def test_secagg_and_dp_flags_reach_the_run(corpus_path, tmp_path):
    """A clip so small that the mean of clipped updates is at most 1e-4 in norm: an adapter that moved
    much further carries the DP noise; the round went through the secure sum (survivors, masked bytes)."""
    out = tmp_path / "run"
    clip = 1e-4
    rc = main(["simulate", "federated", "--model", "tiny-random-llama", "--data", f"jsonl:{corpus_path}",
               "--partition", "natural", "--clients", "4", "--clients-per-round", "3", "--rounds", "1",
               "--steps", "1", "--seq-len", "32", "--rank", "4", "--noop-rounds", "0", "--no-baselines",
               "--method", "ffa", "--secagg", "--dp-epsilon", "8", "--dp-clip", str(clip), "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "federated.json").read_text())
    record = report["rounds"][-1]
    assert record["round"] == 1 and record["secagg_survivors"] == 3 and record["secure"] is True
    assert record["aggregation_error"] is None  # the strategy never saw an individual update
    assert 0 < record["epsilon"] <= 8 and record["noise_multiplier"] > 0 and record["dp_noise_at"] == "client"
    privacy = report["privacy"]
    assert privacy["secagg"] and privacy["dp"] and privacy["epsilon_per_round"] == [record["epsilon"]]
    assert privacy["dp_delta"] == 1e-3 and privacy["dp_clip"] == clip
    # FFA: B starts at zero, so the final B is the released mean update
    state = load_file(out / "adapter-ffa" / "adapter_model.safetensors")
    b = torch.cat([v.flatten().double() for k, v in state.items() if LORA_B in k])
    assert b.norm() > 3 * clip, "no DP noise in the update"
    assert report["bytes_up_per_client_round"] > 0 and report["bytes_down_per_client_round"] > 0


def test_hetlora_under_secure_aggregation_is_refused_clearly(corpus_path, tmp_path, capsys):
    rc = main(["simulate", "federated", "--model", "tiny-random-llama", "--data", f"jsonl:{corpus_path}",
               "--clients", "4", "--clients-per-round", "2", "--method", "hetlora", "--secagg", "--no-baselines",
               "--out", str(tmp_path)])
    assert rc == 2 and "hetlora" in capsys.readouterr().err
