"""Client side of secure aggregation and client-level DP as Flower ClientApp mods.

Add them to any ClientApp without touching its train function:

    app = ClientApp(mods=[secagg_mod])          # or @app.train(mods=[secagg_mod])

`make_secagg_mod(keys_dir)` answers the five secure-aggregation stages (see fedge.protocol.secagg) as
this device: it signs with `keys_dir/devices/<device>.sign.key` and trusts only the devices of
`keys_dir/secagg-roster.json` (both from `fedge certs create`), never keys the server vouches for.
The device is the node config's `device-id` (a SuperNode's `--node-config`), else
`device-<partition-id>`; a node config `secagg-keys` overrides `keys_dir`. The client's floors
(`ClientPolicy`: threshold, DP noise) are its own. `secagg_mod` (no keys) trusts the server to relay
keys honestly: semi-honest model only, but the threshold and DP floors still apply. At the masked-input
stage it calls the wrapped train function, turns its reply into an update (trained - global, or the
reply itself for methods whose clients send what is summed, e.g. FedSVD products), clips it and adds
this client's share of the DP noise when the server asks for DP, masks it and sends only the masked
vector. Messages without a secure-aggregation record pass straight through, so the same app also
serves plain rounds. `make_dp_mod(floor)` does the clip-and-noise step for plain (unmasked) rounds,
refusing DP parameters below the client's own floor (`dp_mod`: no floor of its own).

The client's secret state between stages lives in `context.state`, which stays on the node.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from fedge.peft_methods.dp import ClientDPTransform, DPConfig
from fedge.protocol.secagg import ClientPolicy, SecAggClient, SecAggError, VectorLayout
from fedge.protocol.secagg_identity import ROSTER_FILE, DeviceIdentity, DeviceRoster, load_device_identity, load_roster
from fedge.protocol.secagg_records import (
    DP_KEY,
    MASKED_KEY,
    SECAGG_KEY,
    STAGE_ADVERTISE,
    STAGE_CONSISTENCY,
    STAGE_MASK,
    STAGE_SHARE,
    STAGE_UNMASK,
    STATE_KEY,
    UPDATE_DELTA,
    advertise_reply,
    config_from_record,
    layout_from_str,
    masked_reply,
    roster_from_request,
    shares_from_record,
    shares_record,
    signature_reply,
    stage_of,
    unmask_from_request,
    unmask_reply,
)

ERROR_SECAGG = 9001  # the protocol refused (below threshold, tampered message, out of order)
ERROR_DROPPED = 9002  # a simulated dropout (experiments)


def _error(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _single_array_record(content: RecordDict, what: str) -> tuple[str, ArrayRecord]:
    records = list(content.array_records.items())
    if len(records) != 1:
        raise ValueError(f"{what} must carry exactly one ArrayRecord (found {len(records)})")
    return records[0]


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: np.asarray(array.numpy()) for name, array in record.items()}


def _update_arrays(sent: dict[str, np.ndarray], trained: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    if mode != UPDATE_DELTA:
        return {k: v.astype(np.float64) for k, v in trained.items()}
    unknown = set(trained) - set(sent)
    if unknown:
        raise ValueError(f"reply has arrays the server did not send: {sorted(unknown)[:3]}")
    # tensors the client did not return (frozen ones) contribute a zero update
    return {k: trained[k].astype(np.float64) - sent[k].astype(np.float64) if k in trained
            else np.zeros(sent[k].shape) for k in sent}


def _vector(update: dict[str, np.ndarray], layout: VectorLayout) -> np.ndarray:
    parts = []
    for name, shape, _ in layout.entries:
        if name not in update:
            raise ValueError(f"update lacks {name!r}, which the server's layout expects")
        if tuple(update[name].shape) != shape:
            raise ValueError(f"{name} has shape {update[name].shape}, the server's layout says {shape}")
        parts.append(update[name].reshape(-1))
    if len(update) != len(layout.entries):
        raise ValueError("update has arrays outside the server's layout")
    return np.concatenate(parts) if parts else np.zeros(0)


def _dp_from_record(record: ConfigRecord, prefix: str = "dp.") -> DPConfig | None:
    if f"{prefix}clip_norm" not in record:
        return None
    return DPConfig(clip_norm=float(record[f"{prefix}clip_norm"]),
                    noise_multiplier=float(record[f"{prefix}noise_multiplier"]),
                    min_clients=int(record[f"{prefix}min_clients"]), noise_at=str(record[f"{prefix}noise_at"]))


def _num_examples(reply: Message) -> int:
    for metrics in reply.content.metric_records.values():
        if "num-examples" in metrics:
            return int(metrics["num-examples"])
    return 1


def make_secagg_mod(keys_dir: str | Path | None = None, policy: ClientPolicy | None = None):
    """A Flower mod running this device's side of secure aggregation around the wrapped train function."""
    policy = policy or ClientPolicy(require_signatures=keys_dir is not None)
    cache: dict[tuple[str, str], tuple[DeviceIdentity, DeviceRoster]] = {}

    def credentials(context: Context) -> tuple[DeviceIdentity | None, DeviceRoster | None]:
        directory = context.node_config.get("secagg-keys", keys_dir)
        if directory is None:
            return None, None
        device = str(context.node_config.get("device-id", f"device-{context.node_config.get('partition-id', '')}"))
        key = (str(directory), device)
        if key not in cache:
            cache[key] = (load_device_identity(directory, device), load_roster(Path(directory) / ROSTER_FILE))
        return cache[key]

    def mod(msg: Message, context: Context, call_next) -> Message:
        stage = stage_of(msg.content) if msg.metadata.message_type.startswith("train") else None
        if stage is None:
            return call_next(msg, context)
        try:
            identity, roster = credentials(context)
            # keys configured on the node (node config) always mean: verify peers against the roster
            active = policy if identity is None else replace(policy, require_signatures=True)
            return _stage(msg, context, call_next, stage, (identity, roster, active))
        except (SecAggError, ValueError, KeyError, TypeError) as exc:
            context.state.config_records.pop(STATE_KEY, None)  # a refused round is over for this client
            return _error(msg, ERROR_SECAGG, f"secure aggregation, stage {stage}: {exc}")

    return mod


def _stage(msg: Message, context: Context, call_next, stage: str, trust: tuple) -> Message:
    record = msg.content.config_records[SECAGG_KEY]
    if stage == STAGE_ADVERTISE:
        client = SecAggClient(int(record["client_id"]), config_from_record(record), *trust)
        out = RecordDict({SECAGG_KEY: advertise_reply(client.advertise_keys())})
    elif stage == STAGE_SHARE:
        client = _load(context, trust)
        out = RecordDict({SECAGG_KEY: shares_record(STAGE_SHARE, client.share_keys(roster_from_request(record)))})
    elif stage == STAGE_MASK:
        if bool(record.get("simulate_drop", False)):
            return _error(msg, ERROR_DROPPED, "simulated dropout after sharing keys")
        client = _load(context, trust)
        reply = _masked(msg, context, call_next, client, record)
        if isinstance(reply, Message):
            return reply
        out = reply
    elif stage == STAGE_CONSISTENCY:
        client = _load(context, trust)
        out = RecordDict({SECAGG_KEY: signature_reply(client.sign_survivors([int(s) for s in record["survivors"]]))})
    elif stage == STAGE_UNMASK:
        client = _load(context, trust)
        del context.state.config_records[STATE_KEY]  # one answer per round, whatever happens next
        out = RecordDict({SECAGG_KEY: unmask_reply(client.unmask(*unmask_from_request(record)))})
        return Message(out, reply_to=msg)
    else:
        raise SecAggError(f"unknown secure-aggregation stage {stage!r}")
    context.state[STATE_KEY] = ConfigRecord({"client": client.to_bytes()})
    return Message(out, reply_to=msg)


def _masked(msg: Message, context: Context, call_next, client: SecAggClient, record: ConfigRecord):
    """Stage 3: check the DP parameters against the client's floors, train, clip + noise, mask."""
    received = shares_from_record(record)
    dp = _dp_from_record(record)
    client.check_dp(dp.noise_multiplier if dp else None, dp.min_clients if dp else 1, dp.noise_at if dp else "client")
    _, sent_record = _single_array_record(msg.content, "the train message")
    sent = _numpy(sent_record)
    del msg.content.config_records[SECAGG_KEY]  # the train function sees a plain train message
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    _, trained_record = _single_array_record(reply.content, "the train reply")
    update = _update_arrays(sent, _numpy(trained_record), str(record["update_mode"]))
    if dp is not None:
        update = ClientDPTransform(dp)(update)
    vector = _vector(update, layout_from_str(str(record["layout"])))
    masked_record, array_record = masked_reply(client.masked_input(vector, received), _num_examples(reply))
    return RecordDict({SECAGG_KEY: masked_record, MASKED_KEY: array_record})


secagg_mod = make_secagg_mod()


def _load(context: Context, trust: tuple) -> SecAggClient:
    record = context.state.config_records.get(STATE_KEY)
    if record is None:
        raise SecAggError("no secure-aggregation state on this node (stages out of order?)")
    return SecAggClient.from_bytes(bytes(record["client"]), *trust)


def make_dp_mod(floor: DPConfig | None = None):
    """A Flower mod for plain rounds: clip the update (trained - global) and add this client's noise share.

    Active when the train message carries a ConfigRecord `fedge.dp` (sent by the server with the
    clip norm, noise multiplier, n_min and who adds noise); otherwise it passes through. `floor` is
    this client's own DP requirement, never taken from the server: with it, a round without DP
    parameters, with the server adding the noise, or with less noise on this client's update than
    the floor asks for is refused before training. In a plain round the server sees each update on
    its own, so what protects it is this client's share alone, sigma C / sqrt(n_min): a server
    claiming a large n_min shrinks every share, and the floor bounds sigma / sqrt(n_min) from below
    (as well as sigma itself, which is what the sum of n_min shares carries).
    """

    def mod(msg: Message, context: Context, call_next) -> Message:
        is_train = msg.metadata.message_type.startswith("train")
        record = msg.content.config_records.get(DP_KEY) if is_train else None
        if not is_train or SECAGG_KEY in msg.content.config_records:  # secagg_mod checks its own floors
            return call_next(msg, context)
        if record is None and floor is None:
            return call_next(msg, context)
        try:
            dp = _dp_from_record(record) if record is not None else None
            if dp is None and record is not None:
                raise ValueError("fedge.dp record lacks dp.clip_norm")
            _check_dp_floor(dp, floor)
            _, sent_record = _single_array_record(msg.content, "the train message")
            sent = _numpy(sent_record)
        except (ValueError, KeyError, TypeError) as exc:
            return _error(msg, ERROR_SECAGG, f"dp: {exc}")
        return _dp_reply(msg, context, call_next, record, dp, sent)

    return mod


def _check_dp_floor(dp: DPConfig | None, floor: DPConfig | None) -> None:
    """Refuse server DP parameters that give this client's update less noise than its own floor."""
    if floor is None:
        return
    if dp is None:
        raise ValueError("this client requires DP noise and the server sent no DP parameters: refusing to train")
    if dp.noise_at != "client":
        raise ValueError(f"noise_at={dp.noise_at!r}: the server would add the noise to an update it sees in "
                         "the clear; this client adds its own")
    if dp.noise_multiplier < floor.noise_multiplier:
        raise ValueError(f"noise multiplier {dp.noise_multiplier} is below this client's minimum "
                         f"{floor.noise_multiplier}: refusing to train")
    share, own_share = dp.noise_multiplier / dp.min_clients ** 0.5, floor.noise_multiplier / floor.min_clients ** 0.5
    if share < own_share * (1 - 1e-9):
        raise ValueError(f"{dp.min_clients} noise shares of sigma {dp.noise_multiplier} leave this client's update "
                         f"sigma {share:.4g}, below its floor {own_share:.4g} (sigma {floor.noise_multiplier} over "
                         f"at most {floor.min_clients} shares): refusing to train")


def _dp_reply(msg: Message, context: Context, call_next, record: ConfigRecord | None, dp: DPConfig | None,
              sent: dict[str, np.ndarray]) -> Message:
    reply = call_next(msg, context)
    if reply.has_error() or dp is None:
        return reply
    key, trained_record = _single_array_record(reply.content, "the train reply")
    mode = str(record.get("update_mode", UPDATE_DELTA))
    trained = _numpy(trained_record)
    update = ClientDPTransform(dp)(_update_arrays(sent, trained, mode))
    if mode == UPDATE_DELTA:
        out = {name: (sent[name] + update[name]).astype(sent[name].dtype) for name in sent}
    else:
        out = {name: update[name].astype(trained[name].dtype) for name in trained}
    reply.content.array_records[key] = ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in out.items()})
    return reply


dp_mod = make_dp_mod()  # no floor of its own: applies what the server asks for
