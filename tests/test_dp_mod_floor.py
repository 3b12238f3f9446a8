"""dp_mod against a server that asks for too little noise: the client's own floor decides, not the server."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedge.edge.secagg_mods import ERROR_SECAGG, dp_mod, make_dp_mod
from fedge.peft_methods.dp import DPConfig
from fedge.protocol.secagg_records import DP_KEY, dp_fields

SENT = {"lora_B": np.zeros((4, 3), np.float32)}


def _train_message(dp: DPConfig | None) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in SENT.items()})})
    if dp is not None:
        content[DP_KEY] = ConfigRecord(dp_fields(dp))
    # as a SuperNode receives it (a Message built outside a run needs its metadata spelled out)
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    return Message(content=content, metadata=metadata)


def _run(mod, dp: DPConfig | None) -> tuple[Message, list[int]]:
    trained: list[int] = []

    def train(msg: Message, context: Context) -> Message:
        trained.append(1)
        arrays = ArrayRecord({k: Array(v + 0.5) for k, v in SENT.items()})
        return Message(RecordDict({"arrays": arrays}), reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return mod(_train_message(dp), context, train), trained


FLOOR = DPConfig(clip_norm=1.0, noise_multiplier=1.0, min_clients=4)


@pytest.mark.parametrize("server_dp, why", [
    (DPConfig(clip_norm=1.0, noise_multiplier=0.5, min_clients=4), "below this client's minimum"),
    # sigma is fine but spread over 100 shares: this client's own update would carry sigma 0.2 < 1/2
    (DPConfig(clip_norm=1.0, noise_multiplier=2.0, min_clients=100), "noise shares"),
    (DPConfig(clip_norm=1.0, noise_multiplier=1.0, min_clients=4, noise_at="server"), "noise_at"),
    (None, "sent no DP parameters"),
])
def test_a_server_asking_for_less_noise_than_the_clients_floor_is_refused(server_dp, why):
    reply, trained = _run(make_dp_mod(FLOOR), server_dp)
    assert reply.has_error() and reply.error.code == ERROR_SECAGG
    assert why in reply.error.reason
    assert not trained, "the client trained (and would have sent its update) before refusing"


def test_dp_at_or_above_the_floor_is_applied():
    # sigma 2 over 16 shares = 0.5 per update, exactly the floor's 1 / sqrt(4)
    server_dp = DPConfig(clip_norm=1.0, noise_multiplier=2.0, min_clients=16)
    reply, trained = _run(make_dp_mod(FLOOR), server_dp)
    assert not reply.has_error() and trained
    update = reply.content["arrays"]["lora_B"].numpy() - SENT["lora_B"]
    # clipped to C = 1 (the raw update has norm 0.5 * sqrt(12) > 1), then noised: not the raw update
    assert not np.allclose(update, 0.5)


def test_without_a_floor_the_plain_mod_passes_rounds_without_dp_through():
    reply, trained = _run(dp_mod, None)
    assert not reply.has_error() and trained
    assert np.allclose(reply.content["arrays"]["lora_B"].numpy(), 0.5)
