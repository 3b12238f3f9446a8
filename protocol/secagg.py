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

Against a malicious server (Bonawitz et al. section 4; `secagg_identity`): clients enforce their own
`ClientPolicy` (t >= max(min_threshold, ceil(2n/3)), t >= the DP noise shares), accept only key
advertisements signed by devices in their out-of-band roster, and between steps 3 and 4 run a
consistency round: each survivor signs the survivor set it was told, and a client releases unmask
shares only after checking >= t signatures over exactly the set it signed. Threat model: a server
that deviates arbitrarily, colluding with up to t - 1 - n/3 clients; it learns only sums of >= t
inputs. Not covered: a server that withholds messages (it can always abort a round) and clients
colluding beyond that bound.
"""


from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedge.protocol.secagg_client_role import SecAggClient
from fedge.protocol.secagg_config import (
    MODULUS,
    MODULUS_BITS,
    ClientPolicy,
    SecAggConfig,
    SecAggError,
    VectorLayout,
    decode_fixed_point,
    encode_fixed_point,
    flatten_arrays,
    unflatten_arrays,
)
from fedge.protocol.secagg_identity import DeviceIdentity, DeviceRoster
from fedge.protocol.secagg_masks import expand_mask, pairwise_mask_seed
from fedge.protocol.secagg_messages import (
    AdvertisedKeys,
    EncryptedShare,
    MaskedInput,
    SecAggResult,
    SurvivorSignature,
    UnmaskShares,
)
from fedge.protocol.secagg_server_role import SecAggServer
from fedge.protocol.secagg_shamir import FIELD_BYTES, FIELD_PRIME, shamir_combine, shamir_split

__all__ = [
    "ClientPolicy", "DeviceIdentity", "DeviceRoster", "SurvivorSignature", "make_clients",
    "FIELD_BYTES", "FIELD_PRIME", "MODULUS", "MODULUS_BITS", "AdvertisedKeys", "EncryptedShare", "MaskedInput",
    "SecAggClient", "SecAggConfig", "SecAggError", "SecAggResult", "SecAggServer", "UnmaskShares", "VectorLayout",
    "decode_fixed_point", "encode_fixed_point", "expand_mask", "flatten_arrays", "pairwise_mask_seed",
    "run_in_process", "shamir_combine", "shamir_split", "unflatten_arrays",
]


def make_clients(ids: Iterable[int], config: SecAggConfig, policy: ClientPolicy | None = None,
                 ) -> dict[int, SecAggClient]:
    """Clients with fresh device identities ("device-<id>") and the roster of all of them (tests, simulations)."""
    identities = {cid: DeviceIdentity.generate(f"device-{cid}") for cid in ids}
    roster = DeviceRoster.of(identities.values())
    return {cid: SecAggClient(cid, config, identity, roster, policy) for cid, identity in identities.items()}


def run_in_process(
    updates: Mapping[int, np.ndarray],
    config: SecAggConfig,
    drop_before_sharing: Iterable[int] = (),
    drop_after_sharing: Iterable[int] = (),
    drop_before_unmask: Iterable[int] = (),
    policy: ClientPolicy | None = None,
) -> SecAggResult:
    """Run one round among `updates` (client id -> vector), dropping clients at the given steps.

    drop_before_sharing: advertised keys, then vanished (they are not in U2; nobody masks with them).
    drop_after_sharing: shared keys, then vanished before sending their masked input (the server
        recovers their pairwise masks from the survivors' shares).
    drop_before_unmask: sent a masked input and signed the survivor set, but no unmask response.
    """
    before_sharing, after_sharing, before_unmask = set(drop_before_sharing), set(drop_after_sharing), \
        set(drop_before_unmask)
    clients = make_clients(updates, config, policy)
    server = SecAggServer(config)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    shares = {cid: c.share_keys(roster) for cid, c in clients.items() if cid not in before_sharing}
    inbox = server.route_shares(shares)
    inputs = [clients[cid].masked_input(updates[cid], inbox[cid]) for cid in inbox if cid not in after_sharing]
    survivors = server.collect_masked(inputs)
    signatures = server.collect_signatures([clients[cid].sign_survivors(survivors) for cid in survivors])
    responses = [clients[cid].unmask(survivors, signatures) for cid in survivors if cid not in before_unmask]
    return server.unmask(responses)
