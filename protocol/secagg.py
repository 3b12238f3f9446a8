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

Layout (all in protocol/, one role per module): `secagg_config` (SecAggConfig, fixed point, vector
layout) <- `secagg_masks` (X25519/HKDF/ChaCha20) and `secagg_shamir` (sharing) <- `secagg_messages`
<- `secagg_client_role` / `secagg_server_role` (the two roles) <- this module, which re-exports the public
names and runs a whole round in process (`run_in_process`). `secagg_records` maps the messages to
Flower records.

Threat model: a semi-honest server (follows the protocol, tries to learn from what it sees) and up to
t - 1 colluding parties in total. Against a malicious server that lies about who survived to
different clients, Bonawitz et al. add a signed consistency round; this module omits it (stated in
the README), and clients authenticate to the server with mTLS device identities instead.
"""


from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedge.protocol.secagg_client_role import SecAggClient
from fedge.protocol.secagg_config import (
    MODULUS,
    MODULUS_BITS,
    SecAggConfig,
    SecAggError,
    VectorLayout,
    decode_fixed_point,
    encode_fixed_point,
    flatten_arrays,
    unflatten_arrays,
)
from fedge.protocol.secagg_masks import expand_mask, pairwise_mask_seed
from fedge.protocol.secagg_messages import AdvertisedKeys, EncryptedShare, MaskedInput, SecAggResult, UnmaskShares
from fedge.protocol.secagg_server_role import SecAggServer
from fedge.protocol.secagg_shamir import FIELD_BYTES, FIELD_PRIME, shamir_combine, shamir_split

__all__ = [
    "FIELD_BYTES", "FIELD_PRIME", "MODULUS", "MODULUS_BITS", "AdvertisedKeys", "EncryptedShare", "MaskedInput",
    "SecAggClient", "SecAggConfig", "SecAggError", "SecAggResult", "SecAggServer", "UnmaskShares", "VectorLayout",
    "decode_fixed_point", "encode_fixed_point", "expand_mask", "flatten_arrays", "pairwise_mask_seed",
    "run_in_process", "shamir_combine", "shamir_split", "unflatten_arrays",
]


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
