"""Secure aggregation: the server learns the sum of the clients' updates and nothing else.

The protocol is Bonawitz et al. (CCS 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning") in its semi-honest form, with the SecAgg+ choices of Bell et al. (CCS 2020) for the
primitives. One round has four message exchanges, each of which a Flower ServerApp can carry as a
Message round-trip (see `SecAggClient` / `SecAggServer`):

1. advertise keys   client -> server: two X25519 public keys (one for encrypting shares to peers,
                    one for pairwise mask agreement).           server -> all: the roster.
2. share keys       client -> server: for every peer, an authenticated ciphertext (ChaCha20-Poly1305,
                    key from X25519 + HKDF) holding that peer's Shamir share of this client's mask
                    private key and of its self-mask seed.     server -> each: the ones addressed to it.
3. masked input     client -> server: y_u = enc(x_u) + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)
                    (mod 2^32), where s_uv = HKDF(X25519(u, v)) is shared by u and v only, and b_u is a
                    fresh self-mask seed. Pairwise masks cancel in the sum; self-masks do not.
4. unmask           server -> survivors: who survived.  client -> server: for each peer that dropped
                    after sharing, its share of that peer's mask key (so the server can cancel the
                    orphaned pairwise masks); for each survivor, its share of the survivor's self-mask
                    seed (so the server can strip it). Never both for the same peer: with both the server
                    could unmask that peer's individual input. That is why self-masks exist at all: a
                    client that was merely late is not exposed by the recovery of its pairwise masks.

Masks are expanded with ChaCha20 from `cryptography`, never with a general-purpose RNG (Flower's
legacy SecAgg+ uses numpy's RandomState seeded with 32 bits: an attacker can enumerate 2^32 seeds).
Shamir sharing is over the prime field GF(2^521 - 1), large enough to hold a 256-bit secret whole.

Values are encoded in fixed point modulo 2^32: each coordinate is clipped to [-clip_range, clip_range]
and scaled by `scale = (2^31 - 1 - max_clients) / (clip_range * max_clients)`, so a sum of up to `max_clients` inputs
never wraps and decodes exactly (up to rounding, at most max_clients / (2 * scale) per coordinate).

What stays exact under secure aggregation: anything the server can compute from the SUM of client
vectors. That covers FedAvg's weighted sums (clients send w_k * x_k and w_k), FFA-LoRA (A frozen, sum
of B_k), and FedSVD-style aggregation when clients send the product B_k A_k (the server sums the
products, then re-factorises the sum with an SVD on the unmasked sum). It does not cover the SVD of
individual updates, per-client norms or medians (robust aggregation), or naive FedAvg of factors
recovered as mean(B) mean(A) (that is a product of two sums, computable but inexact by itself).

Threat model: a semi-honest server (follows the protocol, tries to learn from what it sees) and up to
t - 1 colluding parties in total. Against a malicious server that lies about who survived to
different clients, Bonawitz et al. add a signed consistency round; this module omits it (stated in
the README), and clients authenticate to the server with mTLS device identities instead.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MODULUS_BITS = 32
MODULUS = 1 << MODULUS_BITS
# A Mersenne prime above 2^256: a 32-byte key or seed is a single field element.
FIELD_PRIME = (1 << 521) - 1
FIELD_BYTES = 66
_SECRET_BYTES = 32
_MAX_CLIENT_ID = (1 << 63) - 1


class SecAggError(RuntimeError):
    """The protocol cannot continue safely (too few parties, inconsistent or tampered messages)."""


# ----------------------------------------------------------------------------------------------
# configuration and fixed-point encoding


@dataclass(frozen=True)
class SecAggConfig:
    """Parameters every party of one secure-aggregation round must agree on.

    threshold: t, the number of parties whose shares reconstruct a secret; also the minimum number
        of clients that must survive each step (fewer and the round aborts rather than leak).
    clip_range: each coordinate is clipped to [-clip_range, clip_range] before encoding.
    max_clients: an upper bound on the number of summands; it sets the fixed-point scale so that
        the modular sum never wraps.
    vector_length: the number of coordinates in every client's input.
    round_id: bound into every key derivation, so keys and masks of different rounds never collide.
    """

    threshold: int
    clip_range: float
    max_clients: int
    vector_length: int
    round_id: int = 0

    def __post_init__(self) -> None:
        if self.threshold < 2:
            raise ValueError(f"threshold must be >= 2 (got {self.threshold}): with 1 a single share is the secret")
        if self.max_clients < self.threshold:
            raise ValueError(f"max_clients ({self.max_clients}) must be >= threshold ({self.threshold})")
        if not (self.clip_range > 0 and np.isfinite(self.clip_range)):
            raise ValueError(f"clip_range must be a positive finite number (got {self.clip_range})")
        if self.vector_length < 1:
            raise ValueError(f"vector_length must be >= 1 (got {self.vector_length})")
        if not 0 <= self.round_id < (1 << 63):
            raise ValueError(f"round_id must be in [0, 2^63) (got {self.round_id})")
        if self.scale < 1.0:
            raise ValueError("clip_range * max_clients is too large for 32-bit fixed point (scale < 1)")

    @property
    def scale(self) -> float:
        """Fixed-point units per 1.0: the largest scale at which max_clients clipped inputs cannot wrap.

        Rounding can push each code up by half a unit, hence the max_clients units of margin.
        """
        return ((1 << (MODULUS_BITS - 1)) - 1 - self.max_clients) / (self.clip_range * self.max_clients)

    def to_dict(self) -> dict[str, int | float]:
        return {"threshold": self.threshold, "clip_range": float(self.clip_range),
                "max_clients": self.max_clients, "vector_length": self.vector_length,
                "round_id": self.round_id}

    @classmethod
    def from_dict(cls, data: Mapping[str, int | float]) -> SecAggConfig:
        return cls(threshold=int(data["threshold"]), clip_range=float(data["clip_range"]),
                   max_clients=int(data["max_clients"]), vector_length=int(data["vector_length"]),
                   round_id=int(data.get("round_id", 0)))


def encode_fixed_point(values: np.ndarray, config: SecAggConfig) -> tuple[np.ndarray, int]:
    """Clip, scale and round `values` into Z_{2^32}; returns (uint32 codes, number of clipped coordinates)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.shape[0] != config.vector_length:
        raise ValueError(f"input has {values.shape[0]} coordinates, config says {config.vector_length}")
    if not np.all(np.isfinite(values)):
        raise ValueError("input contains NaN or infinity; refusing to encode")
    n_clipped = int(np.count_nonzero(np.abs(values) > config.clip_range))
    clipped = np.clip(values, -config.clip_range, config.clip_range)
    codes = np.rint(clipped * config.scale).astype(np.int64)
    return (codes & (MODULUS - 1)).astype(np.uint32), n_clipped


def decode_fixed_point(codes: np.ndarray, config: SecAggConfig) -> np.ndarray:
    """Inverse of `encode_fixed_point` for a sum of up to max_clients encoded vectors (two's complement)."""
    signed = np.asarray(codes, dtype=np.uint32).view(np.int32).astype(np.float64)
    return signed / config.scale


# ----------------------------------------------------------------------------------------------
# primitives: key agreement, mask expansion, Shamir sharing


def _hkdf(shared: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(shared)


def _round_info(label: str, round_id: int) -> bytes:
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
    return _hkdf(own_private.exchange(peer_public), _round_info("pairwise-mask", round_id))


def shamir_split(secret: int, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares of `secret` at the points `xs` (distinct, nonzero): any `threshold` of them reconstruct it."""
    if not 0 <= secret < FIELD_PRIME:
        raise ValueError("secret out of the field")
    if threshold < 1 or threshold > len(xs):
        raise ValueError(f"threshold {threshold} impossible with {len(xs)} share holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < FIELD_PRIME for x in xs):
        raise ValueError("share points must be distinct and nonzero")
    coefficients = [secret] + [secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner's rule
            y = (y * x + c) % FIELD_PRIME
        shares[x] = y
    return shares


def shamir_combine(shares: Mapping[int, int], threshold: int) -> int:
    """Lagrange interpolation at 0 from exactly `threshold` shares (extra shares are ignored).

    With fewer than `threshold` shares this refuses: a polynomial of degree t - 1 through t - 1
    points leaves the secret uniformly undetermined, so any answer would be a guess.
    """
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares are below the threshold {threshold}; the secret is hidden")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = (num * -xj) % FIELD_PRIME
                den = (den * (xi - xj)) % FIELD_PRIME
        secret = (secret + yi * num * pow(den, -1, FIELD_PRIME)) % FIELD_PRIME
    return secret


def _int_to_bytes(value: int, length: int) -> bytes:
    return value.to_bytes(length, "big")


def _public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


# ----------------------------------------------------------------------------------------------
# messages (plain data, so any transport can carry them: Flower records, gRPC, a test harness)


@dataclass(frozen=True)
class AdvertisedKeys:
    """Step 1, client -> server: public keys for share encryption and for mask agreement."""

    client_id: int
    cipher_public_key: bytes
    mask_public_key: bytes


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


def _check_client_id(client_id: int) -> None:
    if not isinstance(client_id, int) or not 0 < client_id <= _MAX_CLIENT_ID:
        raise ValueError(f"client ids must be integers in [1, 2^63) (got {client_id!r})")


def _share_aad(round_id: int, sender: int, receiver: int) -> bytes:
    return b"fedge-secagg/v1/share" + struct.pack(">QQQ", round_id, sender, receiver)


# ----------------------------------------------------------------------------------------------
# client role


class SecAggClient:
    """One client's side of one round. Call the four steps in order; each refuses to run out of order.

    A client never reveals, for the same peer, both the share of its mask key and the share of its
    self-mask seed, and answers the unmask request only once.
    """

    def __init__(self, client_id: int, config: SecAggConfig) -> None:
        _check_client_id(client_id)
        self.client_id = client_id
        self.config = config
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = secrets.token_bytes(_SECRET_BYTES)
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
            "cipher_key": _private_bytes(self._cipher_key).hex(), "mask_key": _private_bytes(self._mask_key).hex(),
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
        return AdvertisedKeys(self.client_id, _public_bytes(self._cipher_key.public_key()),
                              _public_bytes(self._mask_key.public_key()))

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
        if mine.mask_public_key != _public_bytes(self._mask_key.public_key()) or \
                mine.cipher_public_key != _public_bytes(self._cipher_key.public_key()):
            raise SecAggError("roster carries different public keys for this client")
        public_keys = [a.mask_public_key for a in roster] + [a.cipher_public_key for a in roster]
        if len(set(public_keys)) != len(public_keys):
            raise SecAggError("roster repeats a public key (replayed or forged advertisement)")
        self._roster = {a.client_id: a for a in roster}

        key_shares = shamir_split(int.from_bytes(_private_bytes(self._mask_key), "big"),
                                  self.config.threshold, ids)
        seed_shares = shamir_split(int.from_bytes(self._self_seed, "big"), self.config.threshold, ids)
        out = []
        for peer in ids:
            if peer == self.client_id:
                self._peer_shares[peer] = (key_shares[peer], seed_shares[peer])
                continue
            key = self._share_key(peer)
            nonce = secrets.token_bytes(12)
            plaintext = _int_to_bytes(key_shares[peer], FIELD_BYTES) + _int_to_bytes(seed_shares[peer], FIELD_BYTES)
            aad = _share_aad(self.config.round_id, self.client_id, peer)
            ciphertext = nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)
            out.append(EncryptedShare(self.client_id, peer, ciphertext))
        return out

    def _share_key(self, peer: int) -> bytes:
        peer_public = X25519PublicKey.from_public_bytes(self._roster[peer].cipher_public_key)
        return _hkdf(self._cipher_key.exchange(peer_public), _round_info("share-encryption", self.config.round_id))

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
            aad = _share_aad(self.config.round_id, message.sender, self.client_id)
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
            mask_key_shares={p: _int_to_bytes(self._peer_shares[p][0], FIELD_BYTES) for p in sorted(dropped)},
            self_seed_shares={p: _int_to_bytes(self._peer_shares[p][1], FIELD_BYTES) for p in sorted(survivor_set)},
        )


# ----------------------------------------------------------------------------------------------
# server role


@dataclass
class _ServerState:
    roster: dict[int, AdvertisedKeys] = field(default_factory=dict)
    sharers: list[int] = field(default_factory=list)  # U2
    masked: dict[int, MaskedInput] = field(default_factory=dict)  # U3
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
            _check_client_id(a.client_id)
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
    def unmask(self, responses: Sequence[UnmaskShares]) -> SecAggResult:
        """Reconstruct what cancels the masks from >= t responses and return the decoded sum."""
        self._advance(3, "unmask")
        survivors = sorted(self._state.masked)
        dropped = sorted(set(self._state.sharers) - set(survivors))
        responders = {r.client_id: r for r in responses if r.client_id in self._state.masked}
        self._require(len(responders), "survivors answered the unmask request")
        length, round_id = self.config.vector_length, self.config.round_id

        total = np.zeros(length, dtype=np.uint32)
        for m in self._state.masked.values():
            total += m.masked

        for peer in survivors:
            seed_int = self._reconstruct(responders, peer, "self_seed_shares")
            seed = _int_to_bytes(seed_int, _SECRET_BYTES) if seed_int < (1 << 256) else b""
            if hashlib.sha256(seed).digest() != self._state.masked[peer].self_seed_commitment:
                raise SecAggError(f"reconstructed self-mask seed of {peer} does not match its commitment "
                                  "(corrupted shares)")
            total -= expand_mask(seed, length)

        for peer in dropped:
            key_int = self._reconstruct(responders, peer, "mask_key_shares")
            if key_int >= (1 << 256):
                raise SecAggError(f"reconstructed mask key of {peer} is malformed (corrupted shares)")
            private = X25519PrivateKey.from_private_bytes(_int_to_bytes(key_int, _SECRET_BYTES))
            if _public_bytes(private.public_key()) != self._state.roster[peer].mask_public_key:
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


# ----------------------------------------------------------------------------------------------
# an in-process driver: the whole round without a transport (tests, benchmarks)


def run_in_process(
    updates: Mapping[int, np.ndarray],
    config: SecAggConfig,
    drop_before_sharing: Iterable[int] = (),
    drop_after_sharing: Iterable[int] = (),
    drop_before_unmask: Iterable[int] = (),
) -> SecAggResult:
    """Run one round among `updates` (client id -> vector), dropping clients at the given steps.

    drop_before_sharing: advertised keys, then vanished (they are not in U2; nobody masks with them).
    drop_after_sharing: shared keys, then vanished before sending their masked input (the server
        recovers their pairwise masks from the survivors' shares).
    drop_before_unmask: sent a masked input but no unmask response (counted in the sum).
    """
    before_sharing, after_sharing, before_unmask = set(drop_before_sharing), set(drop_after_sharing), \
        set(drop_before_unmask)
    clients = {cid: SecAggClient(cid, config) for cid in updates}
    server = SecAggServer(config)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    shares = {cid: c.share_keys(roster) for cid, c in clients.items() if cid not in before_sharing}
    inbox = server.route_shares(shares)
    inputs = [clients[cid].masked_input(updates[cid], inbox[cid]) for cid in inbox if cid not in after_sharing]
    survivors = server.collect_masked(inputs)
    responses = [clients[cid].unmask(survivors) for cid in survivors if cid not in before_unmask]
    return server.unmask(responses)


# ----------------------------------------------------------------------------------------------
# flattening named arrays into one vector and back (a LoRA update is many tensors)


@dataclass(frozen=True)
class VectorLayout:
    """Names, shapes and dtypes of the arrays packed into one flat vector, in order."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @property
    def length(self) -> int:
        return int(sum(int(np.prod(shape)) for _, shape, _ in self.entries))


def flatten_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, VectorLayout]:
    """Concatenate `arrays` (sorted by name, so every client agrees on the order) into float64."""
    names = sorted(arrays)
    layout = VectorLayout(tuple((n, tuple(np.asarray(arrays[n]).shape), str(np.asarray(arrays[n]).dtype))
                                for n in names))
    if not names:
        return np.zeros(0, dtype=np.float64), layout
    return np.concatenate([np.asarray(arrays[n], dtype=np.float64).reshape(-1) for n in names]), layout


def unflatten_arrays(vector: np.ndarray, layout: VectorLayout) -> dict[str, np.ndarray]:
    if vector.shape != (layout.length,):
        raise ValueError(f"vector has shape {vector.shape}, layout needs ({layout.length},)")
    out, offset = {}, 0
    for name, shape, dtype in layout.entries:
        size = int(np.prod(shape))
        out[name] = vector[offset:offset + size].reshape(shape).astype(dtype)
        offset += size
    return out
