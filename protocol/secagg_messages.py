"""Secure aggregation's messages: plain data, so any transport can carry them (Flower records, gRPC,
a test harness). One dataclass per step of the round, plus the result the server learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_CLIENT_ID = (1 << 63) - 1


@dataclass(frozen=True)
class AdvertisedKeys:
    """Step 1, client -> server: public keys for share encryption and for mask agreement."""

    client_id: int
    cipher_public_key: bytes
    mask_public_key: bytes
    device_id: str = ""  # the device whose signing key signed this advertisement
    signature: bytes = b""  # Ed25519 over secagg_identity.advertisement_message(...)


@dataclass(frozen=True)
class EncryptedShare:
    """Step 2, client -> server -> peer: the peer's shares of the sender's secrets, encrypted to the peer."""

    sender: int
    receiver: int
    ciphertext: bytes  # 12-byte nonce || ChaCha20-Poly1305(mask-key share || self-seed share)


@dataclass(frozen=True)
class MaskedInput:
    """Step 3, client -> server: the masked fixed-point vector and a commitment to the self-mask seed."""

    client_id: int
    masked: np.ndarray  # uint32, config.vector_length
    self_seed_commitment: bytes  # SHA-256 of the seed: lets the server check its reconstruction
    n_clipped: int = 0


@dataclass(frozen=True)
class SurvivorSignature:
    """Consistency round, client -> server -> survivors: a client's signature over the survivor set it was told."""

    client_id: int
    signature: bytes  # Ed25519 over secagg_identity.survivors_message(config, survivors)


@dataclass(frozen=True)
class UnmaskShares:
    """Step 4, client -> server: shares of dropped peers' mask keys and of survivors' self-mask seeds."""

    client_id: int
    mask_key_shares: dict[int, bytes]  # dropped peer id -> share
    self_seed_shares: dict[int, bytes]  # surviving peer id -> share


@dataclass
class SecAggResult:
    """What the server learns: the decoded sum over `survivors` and who they were."""

    total: np.ndarray  # float64 sum of the survivors' clipped inputs
    survivors: list[int]
    dropped_after_sharing: list[int]
    n_clipped: int = 0  # coordinates clipped by the fixed-point range, summed over survivors


def check_client_id(client_id: int) -> None:
    if not isinstance(client_id, int) or not 0 < client_id <= MAX_CLIENT_ID:
        raise ValueError(f"client ids must be integers in [1, 2^63) (got {client_id!r})")
