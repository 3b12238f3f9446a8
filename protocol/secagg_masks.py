"""Secure aggregation's key agreement and masking primitives.

X25519 + HKDF give each pair of clients a secret only they share (the pairwise mask seed, and the
key that encrypts Shamir shares to a peer); ChaCha20 expands a 32-byte seed into a uint32 mask.
Masks come from a stream cipher, never from a general-purpose RNG (Flower's legacy SecAgg+ seeds
numpy's RandomState with 32 bits: an attacker can enumerate 2^32 seeds). Every derivation binds
the round id, so keys and masks of different rounds never collide.
"""

from __future__ import annotations

import struct

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_BYTES = 32  # a mask private key or a self-mask seed


def hkdf(shared: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(shared)


def round_info(label: str, round_id: int) -> bytes:
    return f"fedge-secagg/v1/{label}/".encode() + struct.pack(">Q", round_id)


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """A pseudo-random uint32 vector: the ChaCha20 keystream under the 32-byte key `seed`.

    Each seed is used for exactly one mask (fresh keys every round), so a fixed nonce is safe.
    """
    if len(seed) != 32:
        raise ValueError(f"mask seed must be 32 bytes (got {len(seed)})")
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\x00" * (4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def pairwise_mask_seed(own_private: X25519PrivateKey, peer_public: X25519PublicKey, round_id: int) -> bytes:
    """s_uv: the same 32 bytes for (u_sk, v_pk) and (v_sk, u_pk), unknown to anyone else."""
    return hkdf(own_private.exchange(peer_public), round_info("pairwise-mask", round_id))


def int_to_bytes(value: int, length: int) -> bytes:
    return value.to_bytes(length, "big")


def public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def share_aad(round_id: int, sender: int, receiver: int) -> bytes:
    return b"fedge-secagg/v1/share" + struct.pack(">QQQ", round_id, sender, receiver)
