"""Deliberate client misbehaviour, as a Flower mod, to exercise the server's checks in tests and simulations.

The production ClientApp (`fedge.edge.federated_client.app`) knows nothing of faults: a simulation
that wants bad clients wraps the app's train handler in `fault_mod(spec, round_timeout)`. The spec is
"WHO:KIND[@ROUND],..." with WHO a partition id (simulation) or a device's client name (its node config's
`client`), KIND in nan, inf, shape (a corrupt update), stale (a replay claiming an earlier round), crash
(the client raises), slow (answers after the round timeout) and hang (never answers); "@R" limits a
fault to round R.

Real SuperNodes run whatever ClientApp the run's app folder names, so the deployment tests use a
second app folder whose clientapp is `app` below: the production app's mods plus the fault mod,
reading the spec from the run config (`fedge.faults`). The production ClientApp stays fault-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Context, Message

from fedge.edge.federated_client import client_app
from fedge.edge.secagg_mods import dp_mod, secagg_mod
from fedge.peft_methods.aggregation import StateDict

FAULT_KINDS = ("nan", "inf", "shape", "stale", "crash", "slow", "hang")
Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def parse_faults(spec: str, server_round: int) -> dict[int | str, str]:
    """partition id (or client name) -> the fault it commits in `server_round`."""
    out: dict[int | str, str] = {}
    for item in filter(None, spec.split(",")):
        who, _, kind = item.strip().partition(":")
        kind, _, only_round = kind.partition("@")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {FAULT_KINDS}")
        if not only_round or int(only_round) == server_round:
            out[int(who) if who.isdigit() else who] = kind
    return out


def node_fault(spec: str, server_round: int, context: Context) -> str | None:
    """This node's fault in `server_round`: by its partition id (simulation) or client name (device)."""
    faults = parse_faults(spec, server_round)
    pid = int(context.node_config.get("partition-id", -1))
    return faults.get(pid) if pid >= 0 else faults.get(str(context.node_config.get("client", "")))


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
        server_round = int(config["server-round"])
        kind = node_fault(spec, server_round, context)
        reply = call_next(msg, context)
        if kind is None or reply.has_error():
            return reply
        if kind == "stale":  # the same update, claiming the round before: a replayed or delayed reply
            reply.content.metric_records["metrics"]["server-round"] = server_round - 1
            return reply
        update = reply.content.array_records["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord(inject_fault(kind, update, round_timeout))
        return reply

    return mod


def run_config_fault_mod(msg: Message, context: Context, call_next) -> Message:
    """`fault_mod` with its spec and timeout from the run config (`fedge.faults`, `fedge.round-timeout`)."""
    spec = str(context.run_config.get("fedge.faults", ""))
    if not spec:
        return call_next(msg, context)
    timeout = float(context.run_config.get("fedge.round-timeout", 600.0))
    return fault_mod(spec, timeout)(msg, context, call_next)


# the faulty devices' app (tests/test_deployment.py): the production ClientApp's handlers and mods,
# with the run config's faults innermost
app = client_app([secagg_mod, dp_mod, run_config_fault_mod])
