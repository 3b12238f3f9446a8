"""Secure aggregation, client role: one client's state machine through the five steps of a round.

The client holds every secret of its side (two X25519 keys, the self-mask seed, the shares peers
sent it) and does not trust the server: it enforces its own `ClientPolicy` (threshold and DP
floors), accepts only key advertisements signed by devices of its out-of-band roster, signs the
survivor set it is told and releases unmasking shares only once >= t survivors signed that same set,
and for no peer does it ever reveal both the share of the mask key and the share of the self-mask
seed. `to_bytes` / `from_bytes` carry that state across a stateless transport (a Flower node's
`context.state`); it never leaves the node, and the signing key is never part of it.
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

from fedge.protocol.secagg_config import ClientPolicy, SecAggConfig, SecAggError, encode_fixed_point
from fedge.protocol.secagg_identity import DeviceIdentity, DeviceRoster, advertisement_message, survivors_message
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
from fedge.protocol.secagg_messages import (
    AdvertisedKeys,
    EncryptedShare,
    MaskedInput,
    SurvivorSignature,
    UnmaskShares,
    check_client_id,
)
from fedge.protocol.secagg_shamir import FIELD_BYTES, shamir_split


class SecAggClient:
    """One client's side of one round. Call the five steps in order; each refuses to run out of order.

    identity / roster: this device's signing key and the device public keys it trusts (out of band);
    required unless `policy.require_signatures` is False. policy: the client's own floors.
    """

    def __init__(self, client_id: int, config: SecAggConfig, identity: DeviceIdentity | None = None,
                 roster: DeviceRoster | None = None, policy: ClientPolicy | None = None) -> None:
        check_client_id(client_id)
        self.policy = policy or ClientPolicy()
        if self.policy.require_signatures and (identity is None or roster is None):
            raise SecAggError("this client requires signed key advertisements: give it its device identity and "
                              "the device roster (or a ClientPolicy(require_signatures=False) to trust the server)")
        self.policy.check_config(config)
        self.client_id, self.config, self.identity, self.device_roster = client_id, config, identity, roster
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = secrets.token_bytes(SECRET_BYTES)
        self._roster: dict[int, AdvertisedKeys] = {}
        self._peer_shares: dict[int, tuple[int, int]] = {}  # peer -> (mask-key share, self-seed share)
        self._mask_peers: list[int] = []  # U2: peers whose shares reached us, pairwise-masked with
        self._signed_survivors: list[int] = []  # U3 as this client was told it and signed it
        self._step = 0

    def to_bytes(self) -> bytes:
        """Serialise the client's secret state (keys, seed, received shares) for a stateless transport."""
        return json.dumps({
            "client_id": self.client_id, "config": self.config.to_dict(), "step": self._step,
            "cipher_key": private_bytes(self._cipher_key).hex(), "mask_key": private_bytes(self._mask_key).hex(),
            "self_seed": self._self_seed.hex(),
            "roster": [[a.client_id, a.cipher_public_key.hex(), a.mask_public_key.hex(), a.device_id]
                       for a in self._roster.values()],
            "peer_shares": [[p, hex(k), hex(b)] for p, (k, b) in self._peer_shares.items()],
            "mask_peers": self._mask_peers, "signed_survivors": self._signed_survivors,
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes, identity: DeviceIdentity | None = None, roster: DeviceRoster | None = None,
                   policy: ClientPolicy | None = None) -> SecAggClient:
        try:
            state = json.loads(data)
            client = cls(int(state["client_id"]), SecAggConfig.from_dict(state["config"]), identity, roster, policy)
            client._step = int(state["step"])
            client._cipher_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["cipher_key"]))
            client._mask_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["mask_key"]))
            client._self_seed = bytes.fromhex(state["self_seed"])
            client._roster = {int(c): AdvertisedKeys(int(c), bytes.fromhex(ck), bytes.fromhex(mk), str(d))
                              for c, ck, mk, d in state["roster"]}
            client._peer_shares = {int(p): (int(k, 16), int(b, 16)) for p, k, b in state["peer_shares"]}
            client._mask_peers = [int(p) for p in state["mask_peers"]]
            client._signed_survivors = [int(p) for p in state["signed_survivors"]]
        except (KeyError, ValueError, TypeError) as exc:
            raise SecAggError(f"corrupt secure-aggregation client state: {exc}") from exc
        return client

    def _advance(self, expected: int, name: str) -> None:
        if self._step != expected:
            raise SecAggError(f"client {self.client_id}: {name} called out of order (step {self._step})")
        self._step = expected + 1

    def check_dp(self, noise_multiplier: float | None, noise_shares: int, noise_at: str = "client") -> None:
        """Refuse DP parameters under which a sum of t survivors would carry too little noise."""
        self.policy.check_dp(self.config, noise_multiplier, noise_shares, noise_at)

    # step 1
    def advertise_keys(self) -> AdvertisedKeys:
        self._advance(0, "advertise_keys")
        cipher_pk, mask_pk = public_bytes(self._cipher_key.public_key()), public_bytes(self._mask_key.public_key())
        if self.identity is None:
            return AdvertisedKeys(self.client_id, cipher_pk, mask_pk)
        device = self.identity.device_id
        signature = self.identity.sign(advertisement_message(self.config, self.client_id, device, cipher_pk, mask_pk))
        return AdvertisedKeys(self.client_id, cipher_pk, mask_pk, device, signature)

    def _check_roster(self, roster: Sequence[AdvertisedKeys]) -> None:
        ids = [a.client_id for a in roster]
        if len(set(ids)) != len(ids):
            raise SecAggError("roster lists a client twice")
        if self.client_id not in ids:
            raise SecAggError(f"roster does not include this client ({self.client_id})")
        if len(roster) < self.config.threshold:
            raise SecAggError(f"roster of {len(roster)} is below the threshold {self.config.threshold}; "
                              "sharing with fewer parties could let them reconstruct our secrets")
        self.policy.check_roster(self.config, len(roster))
        mine = next(a for a in roster if a.client_id == self.client_id)
        if mine.mask_public_key != public_bytes(self._mask_key.public_key()) or \
                mine.cipher_public_key != public_bytes(self._cipher_key.public_key()):
            raise SecAggError("roster carries different public keys for this client")
        public_keys = [a.mask_public_key for a in roster] + [a.cipher_public_key for a in roster]
        if len(set(public_keys)) != len(public_keys):
            raise SecAggError("roster repeats a public key (replayed or forged advertisement)")
        if not self.policy.require_signatures:
            return
        devices = [a.device_id for a in roster]
        if len(set(devices)) != len(devices):
            raise SecAggError("roster lists one device under two client ids (sybil)")
        if mine.device_id != self.identity.device_id:
            raise SecAggError("roster names another device for this client")
        for a in roster:
            message = advertisement_message(self.config, a.client_id, a.device_id, a.cipher_public_key,
                                            a.mask_public_key)
            self.device_roster.verify(a.device_id, message, a.signature, f"key advertisement of client {a.client_id}")

    # step 2
    def share_keys(self, roster: Sequence[AdvertisedKeys]) -> list[EncryptedShare]:
        """Check the roster (signatures, floors), then Shamir-share our mask key and self-mask seed to it."""
        self._advance(1, "share_keys")
        self._check_roster(roster)
        self._roster = {a.client_id: a for a in roster}
        ids = [a.client_id for a in roster]
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

    # step 4 (consistency round)
    def sign_survivors(self, survivors: Sequence[int]) -> SurvivorSignature:
        """Sign the survivor set (U3) the server announced; from here on only that set is answered."""
        self._advance(3, "sign_survivors")
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
        self._signed_survivors = sorted(survivor_set)
        message = survivors_message(self.config, self._signed_survivors)
        return SurvivorSignature(self.client_id, self.identity.sign(message) if self.identity else b"")

    def _check_consistency(self, survivors: Sequence[int], signatures: Sequence[SurvivorSignature]) -> None:
        if sorted(survivors) != self._signed_survivors or len(set(survivors)) != len(survivors):
            raise SecAggError("the server's unmask request names a different survivor set than the one this "
                              "client signed: aborting without releasing shares")
        signers = [s.client_id for s in signatures]
        if len(set(signers)) != len(signers) or not set(signers) <= set(self._signed_survivors):
            raise SecAggError("consistency signatures from clients outside the survivor set, or twice from one")
        if len(signers) < self.config.threshold:
            raise SecAggError(f"only {len(signers)} survivors confirmed the survivor set, below the threshold "
                              f"{self.config.threshold}: aborting without releasing shares")
        if not self.policy.require_signatures:
            return
        message = survivors_message(self.config, self._signed_survivors)
        for s in signatures:
            self.device_roster.verify(self._roster[s.client_id].device_id, message, s.signature,
                                      f"survivor set signed by client {s.client_id} (told a different set?)")

    # step 5
    def unmask(self, survivors: Sequence[int], signatures: Sequence[SurvivorSignature]) -> UnmaskShares:
        """Once >= t survivors signed the same set: mask-key shares of dropped peers, seed shares of survivors.

        A peer is in exactly one of the two sets, and the client answers once: it never reveals both
        shares of one peer, whatever the server asks.
        """
        self._advance(4, "unmask")
        self._check_consistency(survivors, signatures)
        survivor_set = set(self._signed_survivors)
        dropped = (set(self._mask_peers) | {self.client_id}) - survivor_set
        assert not dropped & survivor_set
        return UnmaskShares(
            self.client_id,
            mask_key_shares={p: int_to_bytes(self._peer_shares[p][0], FIELD_BYTES) for p in sorted(dropped)},
            self_seed_shares={p: int_to_bytes(self._peer_shares[p][1], FIELD_BYTES) for p in sorted(survivor_set)},
        )
