"""Secure-aggregation messages as Flower records: what the ServerApp and the ClientApp mod exchange.

Every stage travels as a Flower `train` message whose RecordDict carries a ConfigRecord under
`SECAGG_KEY` with a `stage` field, so the stages pass through the same client mods as training.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedge.protocol.secagg import (
    AdvertisedKeys,
    EncryptedShare,
    MaskedInput,
    SecAggConfig,
    SurvivorSignature,
    UnmaskShares,
    VectorLayout,
)

SECAGG_KEY = "fedge.secagg"
DP_KEY = "fedge.dp"
MASKED_KEY = "fedge.secagg.masked"
STATE_KEY = "fedge.secagg.state"
STAGE_ADVERTISE, STAGE_SHARE, STAGE_MASK, STAGE_UNMASK = "advertise", "share", "mask", "unmask"
STAGE_CONSISTENCY = "consistency"
UPDATE_DELTA, UPDATE_DIRECT = "delta", "direct"


def dp_fields(dp) -> dict:
    """The DP parameters a client needs (a fedge.peft_methods.dp.DPConfig), as ConfigRecord fields."""
    return {"dp.clip_norm": float(dp.clip_norm), "dp.noise_multiplier": float(dp.noise_multiplier),
            "dp.min_clients": int(dp.min_clients), "dp.noise_at": str(dp.noise_at)}


def stage_of(content: RecordDict) -> str | None:
    record = content.config_records.get(SECAGG_KEY)
    return None if record is None else str(record["stage"])


def config_fields(config: SecAggConfig) -> dict:
    return {f"cfg.{k}": v for k, v in config.to_dict().items()}


def config_from_record(record: ConfigRecord) -> SecAggConfig:
    return SecAggConfig.from_dict({k[4:]: v for k, v in record.items() if k.startswith("cfg.")})


def layout_to_str(layout: VectorLayout) -> str:
    return json.dumps([[name, list(shape), dtype] for name, shape, dtype in layout.entries])


def layout_from_str(text: str) -> VectorLayout:
    return VectorLayout(tuple((str(n), tuple(int(d) for d in s), str(t)) for n, s, t in json.loads(text)))


# stage 1
def advertise_request(config: SecAggConfig, client_id: int) -> ConfigRecord:
    return ConfigRecord({"stage": STAGE_ADVERTISE, "client_id": client_id, **config_fields(config)})


def advertise_reply(keys: AdvertisedKeys) -> ConfigRecord:
    return ConfigRecord({"stage": STAGE_ADVERTISE, "client_id": keys.client_id,
                         "cipher_pk": keys.cipher_public_key, "mask_pk": keys.mask_public_key,
                         "device_id": keys.device_id, "signature": keys.signature})


def keys_from_reply(record: ConfigRecord) -> AdvertisedKeys:
    return AdvertisedKeys(int(record["client_id"]), bytes(record["cipher_pk"]), bytes(record["mask_pk"]),
                          str(record.get("device_id", "")), bytes(record.get("signature", b"")))


# stage 2
def share_request(roster: list[AdvertisedKeys]) -> ConfigRecord:
    return ConfigRecord({"stage": STAGE_SHARE, "ids": [a.client_id for a in roster],
                         "cipher_pks": [a.cipher_public_key for a in roster],
                         "mask_pks": [a.mask_public_key for a in roster],
                         "device_ids": [a.device_id for a in roster],
                         "signatures": [a.signature for a in roster]})


def roster_from_request(record: ConfigRecord) -> list[AdvertisedKeys]:
    return [AdvertisedKeys(int(i), bytes(c), bytes(m), str(d), bytes(s))
            for i, c, m, d, s in zip(record["ids"], record["cipher_pks"], record["mask_pks"], record["device_ids"],
                                     record["signatures"], strict=True)]


def shares_record(stage: str, shares: list[EncryptedShare]) -> ConfigRecord:
    # an empty list has no element type for Flower to check, so a count travels alongside
    return ConfigRecord({"stage": stage, "n": len(shares), "senders": [s.sender for s in shares] or [0],
                         "receivers": [s.receiver for s in shares] or [0],
                         "ciphertexts": [s.ciphertext for s in shares] or [b""]})


def shares_from_record(record: ConfigRecord) -> list[EncryptedShare]:
    n = int(record["n"])
    return [EncryptedShare(int(s), int(r), bytes(c)) for s, r, c in
            list(zip(record["senders"], record["receivers"], record["ciphertexts"], strict=True))[:n]]


# stage 3
def masked_reply(masked: MaskedInput, num_examples: int) -> tuple[ConfigRecord, ArrayRecord]:
    record = ConfigRecord({"stage": STAGE_MASK, "client_id": masked.client_id,
                           "commitment": masked.self_seed_commitment, "n_clipped": masked.n_clipped,
                           "num_examples": num_examples})
    return record, ArrayRecord({"masked": Array(np.ascontiguousarray(masked.masked, dtype=np.uint32))})


def masked_from_reply(content: RecordDict) -> tuple[MaskedInput, int]:
    record = content.config_records[SECAGG_KEY]
    array = content.array_records[MASKED_KEY]["masked"].numpy()
    return MaskedInput(int(record["client_id"]), np.asarray(array, dtype=np.uint32), bytes(record["commitment"]),
                       int(record["n_clipped"])), int(record["num_examples"])


# stage 4: the consistency round
def consistency_request(survivors: list[int]) -> ConfigRecord:
    return ConfigRecord({"stage": STAGE_CONSISTENCY, "survivors": survivors})


def signature_reply(signature: SurvivorSignature) -> ConfigRecord:
    return ConfigRecord({"stage": STAGE_CONSISTENCY, "client_id": signature.client_id,
                         "signature": signature.signature})


def signature_from_reply(record: ConfigRecord) -> SurvivorSignature:
    return SurvivorSignature(int(record["client_id"]), bytes(record["signature"]))


# stage 5
def unmask_request(survivors: list[int], signatures: list[SurvivorSignature]) -> ConfigRecord:
    return ConfigRecord({"stage": STAGE_UNMASK, "survivors": survivors,
                         "signers": [s.client_id for s in signatures],
                         "signatures": [s.signature for s in signatures]})


def unmask_from_request(record: ConfigRecord) -> tuple[list[int], list[SurvivorSignature]]:
    signatures = [SurvivorSignature(int(c), bytes(s))
                  for c, s in zip(record["signers"], record["signatures"], strict=True)]
    return [int(s) for s in record["survivors"]], signatures


def unmask_reply(shares: UnmaskShares) -> ConfigRecord:
    key_ids, seed_ids = list(shares.mask_key_shares), list(shares.self_seed_shares)
    return ConfigRecord({
        "stage": STAGE_UNMASK, "client_id": shares.client_id,
        "n_key": len(key_ids), "key_ids": key_ids or [0],
        "key_shares": [shares.mask_key_shares[i] for i in key_ids] or [b""],
        "seed_ids": seed_ids, "seed_shares": [shares.self_seed_shares[i] for i in seed_ids],
    })


def unmask_from_reply(record: ConfigRecord) -> UnmaskShares:
    n_key = int(record["n_key"])
    key_ids, key_shares = list(record["key_ids"])[:n_key], list(record["key_shares"])[:n_key]
    return UnmaskShares(int(record["client_id"]),
                        {int(i): bytes(s) for i, s in zip(key_ids, key_shares, strict=True)},
                        {int(i): bytes(s) for i, s in zip(record["seed_ids"], record["seed_shares"], strict=True)})
