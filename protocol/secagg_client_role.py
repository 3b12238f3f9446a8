"""Secure aggregation, client role: one client's state machine through the four steps of a round.

The client holds every secret of its side (two X25519 keys, the self-mask seed, the shares peers
sent it) and enforces the rule that keeps its input private: for no peer does it reveal both the
share of the mask key and the share of the self-mask seed. `to_bytes` / `from_bytes` carry that
state across a stateless transport (a Flower node's `context.state`); it never leaves the node.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedge.protocol.secagg_config import SecAggConfig, SecAggError, encode_fixed_point
from fedge.protocol.secagg_masks import (
    SECRET_BYTES,
    expand_mask,
    hkdf,
    int_to_bytes,
    pairwise_mask_seed,
    private_bytes,
    public_bytes,
    round_info,
    share_aad,
)
from fedge.protocol.secagg_messages import AdvertisedKeys, EncryptedShare, MaskedInput, UnmaskShares, check_client_id
from fedge.protocol.secagg_shamir import FIELD_BYTES, shamir_split


class SecAggClient:
    """One client's side of one round. Call the four steps in order; each refuses to run out of order.

    A client never reveals, for the same peer, both the share of its mask key and the share of its
    self-mask seed, and answers the unmask request only once.
    """

    def __init__(self, client_id: int, config: SecAggConfig) -> None:
        check_client_id(client_id)
        self.client_id = client_id
        self.config = config
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = secrets.token_bytes(SECRET_BYTES)
        self._roster: dict[int, AdvertisedKeys] = {}
        self._peer_shares: dict[int, tuple[int, int]] = {}  # peer -> (mask-key share, self-seed share)
        self._mask_peers: list[int] = []  # U2: peers whose shares reached us, pairwise-masked with
        self._step = 0

    def to_bytes(self) -> bytes:
        """Serialise the client's secret state (keys, seed, received shares) for a stateless transport.

        Flower keeps a node's `context.state` on the node between messages; the state never leaves it.
        """
        return json.dumps({
            "client_id": self.client_id, "config": self.config.to_dict(), "step": self._step,
            "cipher_key": private_bytes(self._cipher_key).hex(), "mask_key": private_bytes(self._mask_key).hex(),
            "self_seed": self._self_seed.hex(),
            "roster": [[a.client_id, a.cipher_public_key.hex(), a.mask_public_key.hex()]
                       for a in self._roster.values()],
            "peer_shares": [[p, hex(k), hex(b)] for p, (k, b) in self._peer_shares.items()],
            "mask_peers": self._mask_peers,
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecAggClient:
        try:
            state = json.loads(data)
            client = cls(int(state["client_id"]), SecAggConfig.from_dict(state["config"]))
            client._step = int(state["step"])
            client._cipher_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["cipher_key"]))
            client._mask_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["mask_key"]))
            client._self_seed = bytes.fromhex(state["self_seed"])
            client._roster = {int(c): AdvertisedKeys(int(c), bytes.fromhex(ck), bytes.fromhex(mk))
                              for c, ck, mk in state["roster"]}
            client._peer_shares = {int(p): (int(k, 16), int(b, 16)) for p, k, b in state["peer_shares"]}
            client._mask_peers = [int(p) for p in state["mask_peers"]]
        except (KeyError, ValueError, TypeError) as exc:
            raise SecAggError(f"corrupt secure-aggregation client state: {exc}") from exc
        return client

    def _advance(self, expected: int, name: str) -> None:
        if self._step != expected:
            raise SecAggError(f"client {self.client_id}: {name} called out of order (step {self._step})")
        self._step = expected + 1

    # step 1
    def advertise_keys(self) -> AdvertisedKeys:
        self._advance(0, "advertise_keys")
        return AdvertisedKeys(self.client_id, public_bytes(self._cipher_key.public_key()),
                              public_bytes(self._mask_key.public_key()))

    # step 2
    def share_keys(self, roster: Sequence[AdvertisedKeys]) -> list[EncryptedShare]:
        """Shamir-share our mask key and self-mask seed to everyone in `roster`, encrypted per peer."""
        self._advance(1, "share_keys")
        ids = [a.client_id for a in roster]
        if len(set(ids)) != len(ids):
            raise SecAggError("roster lists a client twice")
        if self.client_id not in ids:
            raise SecAggError(f"roster does not include this client ({self.client_id})")
        if len(roster) < self.config.threshold:
            raise SecAggError(f"roster of {len(roster)} is below the threshold {self.config.threshold}; "
                              "sharing with fewer parties could let them reconstruct our secrets")
        mine = next(a for a in roster if a.client_id == self.client_id)
        if mine.mask_public_key != public_bytes(self._mask_key.public_key()) or \
                mine.cipher_public_key != public_bytes(self._cipher_key.public_key()):
            raise SecAggError("roster carries different public keys for this client")
        public_keys = [a.mask_public_key for a in roster] + [a.cipher_public_key for a in roster]
        if len(set(public_keys)) != len(public_keys):
            raise SecAggError("roster repeats a public key (replayed or forged advertisement)")
        self._roster = {a.client_id: a for a in roster}

        key_shares = shamir_split(int.from_bytes(private_bytes(self._mask_key), "big"),
                                  self.config.threshold, ids)
        seed_shares = shamir_split(int.from_bytes(self._self_seed, "big"), self.config.threshold, ids)
        out = []
        for peer in ids:
            if peer == self.client_id:
                self._peer_shares[peer] = (key_shares[peer], seed_shares[peer])
                continue
            key = self._share_key(peer)
            nonce = secrets.token_bytes(12)
            plaintext = int_to_bytes(key_shares[peer], FIELD_BYTES) + int_to_bytes(seed_shares[peer], FIELD_BYTES)
            aad = share_aad(self.config.round_id, self.client_id, peer)
            ciphertext = nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)
            out.append(EncryptedShare(self.client_id, peer, ciphertext))
        return out

    def _share_key(self, peer: int) -> bytes:
        peer_public = X25519PublicKey.from_public_bytes(self._roster[peer].cipher_public_key)
        return hkdf(self._cipher_key.exchange(peer_public), round_info("share-encryption", self.config.round_id))

    # step 3
    def masked_input(self, update: np.ndarray, received: Iterable[EncryptedShare]) -> MaskedInput:
        """Decrypt the shares addressed to us (their senders are U2) and mask `update` against U2."""
        self._advance(2, "masked_input")
        senders = []
        for message in received:
            if message.receiver != self.client_id:
                raise SecAggError(f"share addressed to {message.receiver} was delivered to {self.client_id}")
            if message.sender not in self._roster or message.sender == self.client_id:
                raise SecAggError(f"share from unknown sender {message.sender}")
            if message.sender in self._peer_shares:
                raise SecAggError(f"two shares from sender {message.sender}")
            nonce, body = message.ciphertext[:12], message.ciphertext[12:]
            aad = share_aad(self.config.round_id, message.sender, self.client_id)
            try:
                plaintext = ChaCha20Poly1305(self._share_key(message.sender)).decrypt(nonce, body, aad)
            except InvalidTag as exc:
                raise SecAggError(f"share from {message.sender} failed authentication (tampered?)") from exc
            self._peer_shares[message.sender] = (int.from_bytes(plaintext[:FIELD_BYTES], "big"),
                                                 int.from_bytes(plaintext[FIELD_BYTES:], "big"))
            senders.append(message.sender)
        if len(senders) + 1 < self.config.threshold:
            raise SecAggError(f"only {len(senders) + 1} clients shared keys, below the threshold "
                              f"{self.config.threshold}; refusing to send a masked input")
        self._mask_peers = sorted(senders)

        codes, n_clipped = encode_fixed_point(update, self.config)
        length = self.config.vector_length
        masked = codes + expand_mask(self._self_seed, length)  # uint32 arithmetic wraps mod 2^32
        for peer in self._mask_peers:
            peer_public = X25519PublicKey.from_public_bytes(self._roster[peer].mask_public_key)
            mask = expand_mask(pairwise_mask_seed(self._mask_key, peer_public, self.config.round_id), length)
            # the lower id adds, the higher id subtracts: the pair cancels in the sum
            masked = masked + mask if self.client_id < peer else masked - mask
        return MaskedInput(self.client_id, masked, hashlib.sha256(self._self_seed).digest(), n_clipped)

    # step 4
    def unmask(self, survivors: Sequence[int]) -> UnmaskShares:
        """Reveal mask-key shares of peers that dropped, self-seed shares of peers that survived."""
        self._advance(3, "unmask")
        survivor_set = set(survivors)
        if len(survivor_set) != len(survivors):
            raise SecAggError("survivor list repeats a client")
        u2 = set(self._mask_peers) | {self.client_id}
        if not survivor_set <= u2:
            raise SecAggError(f"survivors {sorted(survivor_set - u2)} never shared keys with this client")
        if self.client_id not in survivor_set:
            raise SecAggError("this client is not listed among the survivors")
        if len(survivor_set) < self.config.threshold:
            raise SecAggError(f"{len(survivor_set)} survivors are below the threshold {self.config.threshold}")
        dropped = u2 - survivor_set
        return UnmaskShares(
            self.client_id,
            mask_key_shares={p: int_to_bytes(self._peer_shares[p][0], FIELD_BYTES) for p in sorted(dropped)},
            self_seed_shares={p: int_to_bytes(self._peer_shares[p][1], FIELD_BYTES) for p in sorted(survivor_set)},
        )
