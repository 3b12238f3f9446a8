"""Secure aggregation, server role: route the round's messages and unmask only the sum.

The server only ever holds masked vectors and fewer than t shares of anything it must not learn.
At the end it strips the survivors' self-masks (from their reconstructed seeds, checked against
the commitments they sent) and cancels the pairwise masks of clients that dropped after sharing
(from their reconstructed mask keys, checked against their advertised public keys).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedge.protocol.secagg_config import SecAggConfig, SecAggError, decode_fixed_point
from fedge.protocol.secagg_masks import SECRET_BYTES, expand_mask, int_to_bytes, pairwise_mask_seed, public_bytes
from fedge.protocol.secagg_messages import (
    AdvertisedKeys,
    EncryptedShare,
    MaskedInput,
    SecAggResult,
    SurvivorSignature,
    UnmaskShares,
    check_client_id,
)
from fedge.protocol.secagg_shamir import shamir_combine


@dataclass
class _ServerState:
    roster: dict[int, AdvertisedKeys] = field(default_factory=dict)
    sharers: list[int] = field(default_factory=list)  # U2
    masked: dict[int, MaskedInput] = field(default_factory=dict)  # U3
    signatures: dict[int, SurvivorSignature] = field(default_factory=dict)  # U4: confirmed U3
    step: int = 0


class SecAggServer:
    """The server's side of one round. It only ever holds masked vectors and fewer than t shares of
    anything it must not learn; `unmask` returns the sum over the clients that survived to step 3."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self._state = _ServerState()

    def _advance(self, expected: int, name: str) -> None:
        if self._state.step != expected:
            raise SecAggError(f"server: {name} called out of order (step {self._state.step})")
        self._state.step = expected + 1

    def _require(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise SecAggError(f"{count} {what}, below the threshold {self.config.threshold}: round aborted")

    # step 1
    def collect_keys(self, adverts: Sequence[AdvertisedKeys]) -> list[AdvertisedKeys]:
        """Accept the advertisements (U1) and return the roster to broadcast."""
        self._advance(0, "collect_keys")
        for a in adverts:
            check_client_id(a.client_id)
        ids = [a.client_id for a in adverts]
        if len(set(ids)) != len(ids):
            raise SecAggError("two advertisements from the same client id")
        if len(adverts) > self.config.max_clients:
            raise SecAggError(f"{len(adverts)} clients exceed max_clients {self.config.max_clients}: "
                              "the fixed-point sum could wrap")
        self._require(len(adverts), "clients advertised keys")
        self._state.roster = {a.client_id: a for a in adverts}
        return sorted(adverts, key=lambda a: a.client_id)

    # step 2
    def route_shares(self, shares_by_sender: Mapping[int, Sequence[EncryptedShare]]) -> dict[int, list[EncryptedShare]]:
        """Take each U2 client's encrypted shares; return, per U2 client, the ones addressed to it."""
        self._advance(1, "route_shares")
        roster = self._state.roster
        sharers = sorted(shares_by_sender)
        for sender in sharers:
            if sender not in roster:
                raise SecAggError(f"shares from {sender}, who did not advertise keys")
            receivers = sorted(m.receiver for m in shares_by_sender[sender])
            if any(m.sender != sender for m in shares_by_sender[sender]):
                raise SecAggError(f"client {sender} sent shares claiming another sender")
            if receivers != sorted(set(roster) - {sender}):
                raise SecAggError(f"client {sender} did not share with exactly the roster")
        self._require(len(sharers), "clients shared keys")
        self._state.sharers = sharers
        inbox: dict[int, list[EncryptedShare]] = {c: [] for c in sharers}
        for sender in sharers:
            for message in shares_by_sender[sender]:
                if message.receiver in inbox:
                    inbox[message.receiver].append(message)
        return inbox

    # step 3
    def collect_masked(self, inputs: Sequence[MaskedInput]) -> list[int]:
        """Accept masked inputs (U3 = their senders) and return the survivor list to broadcast."""
        self._advance(2, "collect_masked")
        u2 = set(self._state.sharers)
        for m in inputs:
            if m.client_id not in u2:
                raise SecAggError(f"masked input from {m.client_id}, who did not share keys")
            if m.client_id in self._state.masked:
                raise SecAggError(f"two masked inputs from {m.client_id}")
            masked = np.asarray(m.masked)
            if masked.dtype != np.uint32 or masked.shape != (self.config.vector_length,):
                raise SecAggError(f"masked input from {m.client_id} is not a uint32[{self.config.vector_length}]")
            self._state.masked[m.client_id] = m
        self._require(len(self._state.masked), "masked inputs arrived")
        return sorted(self._state.masked)

    # step 4
    def collect_signatures(self, signatures: Sequence[SurvivorSignature]) -> list[SurvivorSignature]:
        """The consistency round: survivors' signatures over U3, relayed to all of them with the unmask request."""
        self._advance(3, "collect_signatures")
        for s in signatures:
            if s.client_id in self._state.masked and s.client_id not in self._state.signatures:
                self._state.signatures[s.client_id] = s
        self._require(len(self._state.signatures), "survivors confirmed the survivor set")
        return [self._state.signatures[c] for c in sorted(self._state.signatures)]

    # step 5
    def unmask(self, responses: Sequence[UnmaskShares]) -> SecAggResult:
        """Reconstruct what cancels the masks from >= t responses and return the decoded sum."""
        self._advance(4, "unmask")
        survivors = sorted(self._state.masked)
        dropped = sorted(set(self._state.sharers) - set(survivors))
        responders = {r.client_id: r for r in responses if r.client_id in self._state.signatures}
        self._require(len(responders), "survivors answered the unmask request")
        length, round_id = self.config.vector_length, self.config.round_id

        total = np.zeros(length, dtype=np.uint32)
        for m in self._state.masked.values():
            total += m.masked

        for peer in survivors:
            seed_int = self._reconstruct(responders, peer, "self_seed_shares")
            seed = int_to_bytes(seed_int, SECRET_BYTES) if seed_int < (1 << 256) else b""
            if hashlib.sha256(seed).digest() != self._state.masked[peer].self_seed_commitment:
                raise SecAggError(f"reconstructed self-mask seed of {peer} does not match its commitment "
                                  "(corrupted shares)")
            total -= expand_mask(seed, length)

        for peer in dropped:
            key_int = self._reconstruct(responders, peer, "mask_key_shares")
            if key_int >= (1 << 256):
                raise SecAggError(f"reconstructed mask key of {peer} is malformed (corrupted shares)")
            private = X25519PrivateKey.from_private_bytes(int_to_bytes(key_int, SECRET_BYTES))
            if public_bytes(private.public_key()) != self._state.roster[peer].mask_public_key:
                raise SecAggError(f"reconstructed mask key of {peer} does not match its public key")
            for survivor in survivors:
                survivor_public = X25519PublicKey.from_public_bytes(self._state.roster[survivor].mask_public_key)
                mask = expand_mask(pairwise_mask_seed(private, survivor_public, round_id), length)
                # the survivor added the mask if its id is lower than the dropped peer's: take it back out
                if survivor < peer:
                    total -= mask
                else:
                    total += mask

        return SecAggResult(
            total=decode_fixed_point(total, self.config), survivors=survivors, dropped_after_sharing=dropped,
            n_clipped=sum(m.n_clipped for m in self._state.masked.values()),
        )

    def _reconstruct(self, responders: Mapping[int, UnmaskShares], peer: int, kind: str) -> int:
        shares = {}
        for holder, response in responders.items():
            share = getattr(response, kind).get(peer)
            if share is not None:
                shares[holder] = int.from_bytes(share, "big")
        return shamir_combine(shares, self.config.threshold)
