"""Secure aggregation + DP over Flower's Message API: a real run_simulation with a stock FedAvg strategy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from fedge.cloud.secagg_server import SecureAggregationGrid, SecureAggregationSettings
from fedge.edge.secagg_mods import dp_mod, make_secagg_mod
from fedge.peft_methods.dp import DPConfig, PrivacyBudgetExceeded
from fedge.protocol.secagg import SecAggError
from fedge.protocol.secagg_identity import create_device_signing_keys

N_CLIENTS = 6


def _delta(partition: int) -> dict[str, np.ndarray]:
    # deterministic, distinct per client, so the expected mean is known for any set of survivors
    return {"lora_B": np.full((4, 3), 0.01 * (partition + 1), dtype=np.float32),
            "bias": np.arange(5, dtype=np.float32) * 0.001 * (partition + 1)}


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    # what `fedge certs create --num-devices 6` writes: one signing key per device and the roster
    out = tmp_path_factory.mktemp("keys")
    create_device_signing_keys(out, [f"device-{i}" for i in range(N_CLIENTS)])
    return out


def _client_app(keys_dir) -> ClientApp:
    app = ClientApp(mods=[make_secagg_mod(keys_dir), dp_mod])

    @app.train()
    def train(msg: Message, context) -> Message:
        partition = int(context.node_config["partition-id"])
        sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        delta = _delta(partition)
        trained = ArrayRecord({k: Array(sent[k] + delta[k]) for k in sent})
        return Message(RecordDict({"arrays": trained, "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)

    return app


def _run(settings: SecureAggregationSettings, rounds: int, keys_dir,
         grid_class=SecureAggregationGrid) -> tuple[dict, SecureAggregationGrid]:
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        wrapped = grid_class(grid, settings)
        out["grid"] = wrapped
        initial = ArrayRecord({"lora_B": Array(np.zeros((4, 3), np.float32)), "bias": Array(np.zeros(5, np.float32))})
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=N_CLIENTS,
                          min_train_nodes=N_CLIENTS)
        try:
            result = strategy.start(grid=wrapped, initial_arrays=initial, num_rounds=rounds)
        except (SecAggError, PrivacyBudgetExceeded) as exc:
            out["error"] = exc
            return
        out["arrays"] = {k: v.numpy() for k, v in result.arrays.items()}

    run_simulation(server, _client_app(keys_dir), num_supernodes=N_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    if "error" in out:
        raise out["error"]
    return out["arrays"], out["grid"]


def test_flower_secure_rounds_with_dropouts_and_dp_budget(keys_dir):
    # Round 1-2: secure aggregation with 2 of 6 clients dropping after sharing keys. Exactness: the
    # new global equals the plain mean of the surviving clients' updates (any 4 of them: the mean of
    # partition+1 over the survivors is what we check through the sum of both rounds' means).
    arrays, grid = _run(SecureAggregationSettings(threshold=0.6, simulate_dropout=0.34, seed=3), rounds=2,
                       keys_dir=keys_dir)
    assert [h.survivors for h in grid.history] == [4, 4]
    assert all(h.dropped == 2 for h in grid.history)
    # bytes up are the masked vectors the survivors sent: 4 x one serialised array (a 128-byte .npy header
    # and 4*3 + 5 uint32 values)
    assert [h.bytes_up for h in grid.history] == [4 * (128 + 17 * 4)] * 2
    lora_b = arrays["lora_B"]
    assert np.allclose(lora_b, lora_b.flat[0], atol=1e-6)  # every coordinate got the same mean
    # each round's mean of 0.01 * (p + 1) over 4 distinct partitions lies in [0.025, 0.05] and is a multiple
    # of 0.0025: an exact secure sum, not an approximation
    total_units = lora_b.flat[0] / 0.0025
    assert abs(total_units - round(total_units)) < 1e-3 and 20 <= round(total_units) <= 40
    np.testing.assert_allclose(arrays["bias"], np.arange(5) * lora_b.flat[0] / 10, atol=1e-6)

    # With DP and a budget the wrapper stops training before max_epsilon: sigma 0.8 on 6 of 6 clients
    # allows exactly one round under epsilon 6 (the second would pass it), so 3 requested rounds run 1.
    dp = DPConfig(clip_norm=0.05, noise_multiplier=0.8, delta=1e-3, max_epsilon=6.0, min_clients=4)
    arrays, grid = _run(SecureAggregationSettings(threshold=4, dp=dp, seed=1), rounds=3, keys_dir=keys_dir)
    assert grid.budget_exhausted and len(grid.history) == 1
    assert grid.privacy_log[0].epsilon <= 6.0 < grid.budget.epsilon_after_next(1.0)
    assert np.all(np.isfinite(arrays["lora_B"])) and not np.allclose(arrays["lora_B"], 0.0)


class _LowThresholdGrid(SecureAggregationGrid):
    """A malicious server: asks for t = 3 of 6 (below every client's ceil(2n/3) = 4)."""

    def _secagg_config(self, messages, layout):
        config = super()._secagg_config(messages, layout)
        return type(config)(threshold=3, clip_range=config.clip_range, max_clients=config.max_clients,
                            vector_length=config.vector_length, round_id=config.round_id)


class _FailsAfterUnmaskGrid(SecureAggregationGrid):
    """A server that unmasks the sum and then "fails" the round."""

    def _release(self, total, n_in_sum):
        raise SecAggError("round failed after unmasking")


def test_flower_malicious_server_refused_and_unmasked_round_charged(keys_dir):
    # every client refuses to share keys under t = 3 of 6: no masked input exists, the round aborts
    with pytest.raises(SecAggError, match="clients shared keys, below the threshold"):
        _run(SecureAggregationSettings(seed=1), rounds=1, keys_dir=keys_dir, grid_class=_LowThresholdGrid)
    # a round whose sum was unmasked counts against the budget even though the server then failed it
    dp = DPConfig(clip_norm=0.05, noise_multiplier=0.8, delta=1e-3, min_clients=4)
    out: dict = {}

    class Recording(_FailsAfterUnmaskGrid):
        def __init__(self, grid, settings):
            super().__init__(grid, settings)
            out["grid"] = self

    with pytest.raises(SecAggError, match="failed after unmasking"):
        _run(SecureAggregationSettings(dp=dp, seed=1), rounds=1, keys_dir=keys_dir, grid_class=Recording)
    assert [r.sample_rate for r in out["grid"].privacy_log] == [1.0] and out["grid"].budget.epsilon > 0
