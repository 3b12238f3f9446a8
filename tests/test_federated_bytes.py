"""Only what a method trains travels: FFA-LoRA's frozen A is rebuilt on the client from its seed (bit
for bit, on the int4 draft it trains on too), never sent; the other methods send what they must."""

from __future__ import annotations

import pytest
import torch

from fedge.cloud.federated_config import FederatedConfig
from fedge.cloud.strategies import build_strategy, record_bytes, to_record
from fedge.peft_methods.aggregation import LORA_A, LORA_B, seeded_lora_A, truncate_rank
from fedge.peft_methods.lora_model import AdaptedModel

NODES = {0: 100, 1: 101, 2: 102}


def _config(method: str, **kw) -> FederatedConfig:
    return FederatedConfig(model="tiny-random-llama", num_clients=3, clients_per_round=3, method=method, rank=4,
                           seed=5, **kw)


@pytest.fixture(autouse=True)
def serverapp_identity():
    """Messages are built inside a ServerApp's run: give this process the run id it would have."""
    from flwr.supercore.task_identity import TaskIdentity

    before = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


@pytest.fixture(scope="module")
def server_state() -> dict:
    return AdaptedModel("tiny-random-llama", _config("ffa").adapter_spec).get_state()


def _sent(method: str, state: dict):
    config = _config(method)
    strategy = build_strategy(config, NODES)
    messages = list(strategy.configure_train(1, to_record(state), config.client_config(), None))
    return strategy, [m.content.array_records["arrays"] for m in messages]


@pytest.mark.parametrize("method", ["ffa", "fedavg", "fedsvd", "hetlora"])
def test_what_each_method_sends_down(method, server_state):
    strategy, records = _sent(method, server_state)
    b_bytes = sum(v.numel() * 4 for k, v in server_state.items() if LORA_B in k)
    for record in records:
        keys = set(record.keys())
        assert any(LORA_B in k for k in keys)
        assert any(LORA_A in k for k in keys) == (method != "ffa")  # FFA: the client rebuilds A
    assert strategy.bytes_down == sum(record_bytes(r) for r in records)
    if method == "ffa":  # down carries B only (each array with its 128-byte .npy header)
        n_b = sum(LORA_B in k for k in server_state)
        assert strategy.bytes_down == 3 * (b_bytes + 128 * n_b)
    elif method == "hetlora":  # ranks 4, 2, 1: truncated A and B
        assert [record_bytes(r) for r in records] == sorted((record_bytes(r) for r in records), reverse=True)


def test_the_client_rebuilds_the_servers_A_bitwise_on_its_int4_draft(server_state):
    """The server's A (fp32 target) and the A a client rebuilds for the B-only message, on the int4
    draft it trains on and on a one-layer truncated draft (the dropped layers' A from the target)."""
    from fedge.edge.federated_client import _with_frozen
    from fedge.edge.training_model import load_training_model, served_model

    config = _config("ffa")
    _, records = _sent("ffa", server_state)
    received = records[0].to_torch_state_dict()
    spec, cfg = config.adapter_spec, config.client_config()
    for layers in (None, 1):
        draft = load_training_model(config.model, spec, client_model="draft", quant="int4", keep_layers=layers)
        rebuilt = _with_frozen(received, cfg, lambda d=draft: d, lambda: served_model(config.model, spec))
        assert set(rebuilt) == set(server_state)
        for key, value in server_state.items():
            assert torch.equal(rebuilt[key], value), key
        # and the draft itself starts from that A: the same seed alone decides it
        for key, value in draft.get_state().items():
            if LORA_A in key:
                assert torch.equal(value, server_state[key]), key


def test_seeded_A_is_peft_shaped_rank_nested_and_per_module():
    a8 = seeded_lora_A(0, "m.q_proj.lora_A.weight", (8, 64))
    assert torch.equal(seeded_lora_A(0, "m.q_proj.lora_A.weight", (4, 64)), a8[:4])  # rank r: first r rows
    assert torch.equal(truncate_rank({"x.lora_A.w": a8}, 2)["x.lora_A.w"], a8[:2])
    assert not torch.equal(seeded_lora_A(0, "m.v_proj.lora_A.weight", (8, 64)), a8)
    assert not torch.equal(seeded_lora_A(1, "m.q_proj.lora_A.weight", (8, 64)), a8)
    assert a8.abs().max() <= 1 / 8 and a8.std() > 0.05  # U(-1/sqrt(in), 1/sqrt(in))


def test_a_global_state_with_another_A_is_refused(server_state):
    wrong = {k: (v + 1 if LORA_A in k else v) for k, v in server_state.items()}
    with pytest.raises(ValueError, match="seeded init"):
        _sent("ffa", wrong)
    _sent("fedavg", wrong)  # FedAvg trains A: any A may go down
