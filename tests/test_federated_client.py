"""The edge side without Flower: local LoRA training per method (what trains, what is sent), DoRA,
and the faults that simulations inject around the ClientApp."""

from __future__ import annotations

import pytest
import torch

from fedge.data import Example
from fedge.edge.lora_trainer import LocalTrainConfig, train_local
from fedge.peft_methods.aggregation import LORA_A, LORA_B, client_delta, lora_pairs
from fedge.peft_methods.config import AdapterSpec, MethodSpec
from fedge.peft_methods.lora_model import AdaptedModel
from fedge.simulations.faults import inject_fault, parse_faults

TEXT = [Example(text="def add(a, b):\n    return a + b\n" * 8, group="g", doc=f"d{i}") for i in range(4)]
CONFIG = LocalTrainConfig(steps=2, batch_size=2, seq_len=32, lr=1e-2)


@pytest.mark.parametrize("method", ["fedavg", "ffa"])
def test_local_training_moves_exactly_what_the_method_trains(method):
    adapted = AdaptedModel("tiny-random-llama", AdapterSpec(rank=4))
    received = adapted.get_state()
    result = train_local(adapted, TEXT, 4, MethodSpec(method).trains, CONFIG, seed=0)
    assert result.steps == 2 and result.tokens > 0 and result.loss > 0
    trained = adapted.get_state()
    update = client_delta(trained, received, MethodSpec(method).trains)
    for a_key, b_key in lora_pairs(received).values():
        assert torch.any(trained[b_key] != received[b_key])
        if method == "ffa":  # A frozen at the shared init, and not sent
            assert torch.equal(trained[a_key], received[a_key]) and a_key not in update
        else:
            assert a_key in update
    assert all(LORA_B in k or LORA_A in k for k in update)


def test_same_seed_same_update_and_shared_init():
    first = AdaptedModel("tiny-random-llama", AdapterSpec(rank=4, init_seed=3))
    second = AdaptedModel("tiny-random-llama", AdapterSpec(rank=4, init_seed=3))
    received = first.get_state()
    for key, value in second.get_state().items():  # every participant builds the same A
        assert torch.equal(value, received[key])
    train_local(first, TEXT, 4, MethodSpec("ffa").trains, CONFIG, seed=("s", 1))
    train_local(second, TEXT, 4, MethodSpec("ffa").trains, CONFIG, seed=("s", 1))
    for key, value in first.get_state().items():
        assert torch.equal(value, second.get_state()[key])


def test_dora_sends_magnitudes_and_b():
    adapted = AdaptedModel("tiny-random-llama", AdapterSpec(rank=2, peft="dora"))
    received = adapted.get_state()
    assert any("lora_magnitude_vector" in k for k in received)
    train_local(adapted, TEXT, 2, MethodSpec("ffa").trains, CONFIG, seed=0)
    update = client_delta(adapted.get_state(), received, MethodSpec("ffa").trains)
    assert any("lora_magnitude_vector" in k for k in update) and any(LORA_B in k for k in update)
    assert not any(LORA_A in k for k in update)


def test_heterogeneous_rank_adapters_share_one_base():
    adapted = AdaptedModel("tiny-random-llama", AdapterSpec(rank=4))
    adapted.use_rank(2)
    state = adapted.get_state(2)
    assert {v.shape[0] for k, v in state.items() if LORA_A in k} == {2}
    train_local(adapted, TEXT, 2, MethodSpec("hetlora").trains, CONFIG, seed=0)
    assert adapted.ranks == {4, 2}


def test_faults_parse_per_round_and_spoil_the_update():
    assert parse_faults("3:nan,5:crash@2,1:shape", 1) == {3: "nan", 1: "shape"}
    assert parse_faults("3:nan,5:crash@2,1:shape", 2) == {3: "nan", 5: "crash", 1: "shape"}
    with pytest.raises(ValueError, match="unknown fault"):
        parse_faults("1:melt", 1)
    update = {"m.lora_B.weight": torch.ones(3, 2), "n.lora_B.weight": torch.ones(3, 2)}
    assert torch.isnan(inject_fault("nan", update, 0.0)["m.lora_B.weight"]).all()
    assert torch.isinf(inject_fault("inf", update, 0.0)["m.lora_B.weight"]).all()
    assert inject_fault("shape", update, 0.0)["m.lora_B.weight"].shape == (4, 2)
    assert torch.equal(update["m.lora_B.weight"], torch.ones(3, 2))  # the clean update is left as it was
    with pytest.raises(RuntimeError, match="injected client crash"):
        inject_fault("crash", update, 0.0)
