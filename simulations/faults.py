"""Deliberate client misbehaviour, as a Flower mod, to exercise the server's checks in tests and simulations.

The production ClientApp (`fedge.edge.federated_client.app`) knows nothing of faults: a simulation
that wants bad clients wraps the app's train handler in `fault_mod(spec, round_timeout)`. The spec is
"PID:KIND[@ROUND],..." with KIND in nan, inf, shape (a corrupt update), crash (the client raises),
slow (answers after the round timeout) and hang (never answers); "@R" limits a fault to round R.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Context, Message

from fedge.peft_methods.aggregation import StateDict

FAULT_KINDS = ("nan", "inf", "shape", "crash", "slow", "hang")
Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def parse_faults(spec: str, server_round: int) -> dict[int, str]:
    """partition id -> the fault it commits in `server_round`."""
    out = {}
    for item in filter(None, spec.split(",")):
        pid, _, kind = item.partition(":")
        kind, _, only_round = kind.partition("@")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {FAULT_KINDS}")
        if not only_round or int(only_round) == server_round:
            out[int(pid)] = kind
    return out


def inject_fault(kind: str, update: StateDict, round_timeout: float) -> StateDict:
    """The update as a misbehaving client would send it (or the misbehaviour itself)."""
    if kind == "crash":
        raise RuntimeError("injected client crash")
    if kind == "slow":  # past the round timeout: the server must go on without this client
        time.sleep(round_timeout + 2.0)
        return update
    if kind == "hang":  # a client that never answers (tests kill the run meanwhile)
        time.sleep(3600)
    key = sorted(update)[0]
    bad = dict(update)
    if kind == "nan":
        bad[key] = update[key].clone().fill_(float("nan"))
    elif kind == "inf":
        bad[key] = update[key].clone().fill_(float("inf"))
    elif kind == "shape":
        bad[key] = torch.zeros(update[key].shape[0] + 1, *update[key].shape[1:])
    return bad


def fault_mod(spec: str, round_timeout: float) -> Mod:
    """A Flower mod: after the wrapped train handler ran, this partition's fault (if any) spoils its reply."""
    parse_faults(spec, 0)  # a bad spec fails here, in the caller, not in a Ray actor

    def mod(msg: Message, context: Context, call_next) -> Message:
        config = msg.content.config_records.get("config")
        if not msg.metadata.message_type.startswith("train") or config is None or config.get("noop", False):
            return call_next(msg, context)
        kind = parse_faults(spec, int(config["server-round"])).get(int(context.node_config["partition-id"]))
        reply = call_next(msg, context)
        if kind is None or reply.has_error():
            return reply
        update = reply.content.array_records["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord(inject_fault(kind, update, round_timeout))
        return reply

    return mod
