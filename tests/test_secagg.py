"""Secure aggregation: exact sums, masked inputs that look uniform, dropout recovery, refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import chisquare

from fedge.protocol.secagg import (
    FIELD_PRIME,
    ClientPolicy,
    DeviceIdentity,
    DeviceRoster,
    EncryptedShare,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    decode_fixed_point,
    encode_fixed_point,
    expand_mask,
    flatten_arrays,
    make_clients,
    run_in_process,
    shamir_combine,
    shamir_split,
    unflatten_arrays,
)


def _updates(n: int, length: int, seed: int = 0, ids: list[int] | None = None) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = ids or list(range(1, n + 1))
    return {cid: rng.normal(0.0, 0.3, size=length) for cid in ids}


def _tolerance(config: SecAggConfig, n: int) -> float:
    return n * 0.5 / config.scale + 1e-12  # rounding error of n fixed-point encodings


def test_sum_is_exact_without_dropouts():
    config = SecAggConfig(threshold=4, clip_range=2.0, max_clients=8, vector_length=1000, round_id=7)
    updates = _updates(5, 1000, ids=[3, 11, 12, 40, 2**40])
    result = run_in_process(updates, config)
    expected = np.sum(np.clip(np.stack(list(updates.values())), -2.0, 2.0), axis=0)
    assert result.survivors == sorted(updates)
    assert np.max(np.abs(result.total - expected)) <= _tolerance(config, 5)


def test_fixed_point_clips_and_counts():
    config = SecAggConfig(threshold=2, clip_range=1.0, max_clients=4, vector_length=4)
    codes, n_clipped = encode_fixed_point(np.array([0.5, -3.0, 1.5, -0.25]), config)
    assert n_clipped == 2
    np.testing.assert_allclose(decode_fixed_point(codes, config), [0.5, -1.0, 1.0, -0.25], atol=1e-8)
    # max_clients inputs at the clip bound must not wrap
    full = np.full(4, 1.0)
    total = sum(encode_fixed_point(full * s, config)[0] for s in (1, 1, 1, 1))
    np.testing.assert_allclose(decode_fixed_point(total, config), 4 * full, atol=1e-7)
    with pytest.raises(ValueError, match="NaN"):
        encode_fixed_point(np.array([0.0, np.nan, 0.0, 0.0]), config)


def _chi_square_bytes(codes: np.ndarray) -> float:
    counts = np.bincount(codes.view(np.uint8), minlength=256)
    return chisquare(counts).pvalue


def _chi_square_top_bits(codes: np.ndarray, bins: int = 1024) -> float:
    counts = np.bincount((codes >> np.uint32(32 - 10)).astype(np.int64), minlength=bins)
    return chisquare(counts).pvalue


def test_single_masked_input_is_indistinguishable_from_uniform():
    length = 200_000
    config = SecAggConfig(threshold=3, clip_range=1.0, max_clients=4, vector_length=length)
    # a highly structured input: all coordinates equal, so its plain encoding is one repeated word
    update = np.full(length, 0.125)
    clients = make_clients((1, 2, 3), config)
    server = SecAggServer(config)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    inbox = server.route_shares({cid: c.share_keys(roster) for cid, c in clients.items()})
    masked = clients[1].masked_input(update, inbox[1]).masked

    plain, _ = encode_fixed_point(update, config)
    # the test has power: the plain encoding is rejected outright
    assert _chi_square_bytes(plain) < 1e-100
    assert _chi_square_top_bits(plain) < 1e-100
    # the masked one passes at a 0.1% level (a correct implementation fails this 0.2% of the time)
    assert _chi_square_bytes(masked) > 1e-3
    assert _chi_square_top_bits(masked) > 1e-3
    # and it is uncorrelated with the input pattern: adjacent words are independent
    diffs = (masked[1:] - masked[:-1]).astype(np.uint32)
    assert _chi_square_top_bits(diffs) > 1e-3


def test_recovers_from_dropouts_after_masking_keys_were_shared():
    n, length = 12, 500
    config = SecAggConfig(threshold=8, clip_range=1.0, max_clients=n, vector_length=length, round_id=1)
    updates = _updates(n, length, seed=1)
    result = run_in_process(updates, config, drop_before_sharing=[10], drop_after_sharing=[2, 5],
                            drop_before_unmask=[9])
    survivors = sorted(set(updates) - {10, 2, 5})
    assert result.survivors == survivors
    assert result.dropped_after_sharing == [2, 5]
    expected = np.sum([np.clip(updates[c], -1, 1) for c in survivors], axis=0)
    assert np.max(np.abs(result.total - expected)) <= _tolerance(config, len(survivors))


def test_below_threshold_is_refused_at_every_step():
    config = SecAggConfig(threshold=4, clip_range=1.0, max_clients=6, vector_length=16)
    updates = _updates(5, 16)
    # too many drop after sharing: only 3 masked inputs arrive
    with pytest.raises(SecAggError, match="below the threshold"):
        run_in_process(updates, config, drop_after_sharing=[1, 2])
    # too few unmask responses
    with pytest.raises(SecAggError, match="below the threshold"):
        run_in_process(updates, config, drop_before_unmask=[1, 2])
    # a client refuses to share with a roster smaller than t
    clients = list(make_clients((1, 2, 3), config).values())
    roster = [c.advertise_keys() for c in clients]
    with pytest.raises(SecAggError, match="below the threshold"):
        clients[0].share_keys(roster)


def test_shamir_threshold():
    secret = 2**255 + 12345
    shares = shamir_split(secret, 3, [1, 2, 3, 4, 5])
    assert shamir_combine({k: shares[k] for k in (2, 4, 5)}, 3) == secret
    assert shamir_combine({k: shares[k] for k in (1, 3, 5)}, 3) == secret
    with pytest.raises(SecAggError, match="below the threshold"):
        shamir_combine({k: shares[k] for k in (1, 2)}, 3)
    # t - 1 shares plus a forged one interpolate to an unrelated value
    forged = {1: shares[1], 2: shares[2], 3: (shares[3] + 1) % FIELD_PRIME}
    assert shamir_combine(forged, 3) != secret


def test_client_never_reveals_both_shares_and_answers_once():
    config = SecAggConfig(threshold=3, clip_range=1.0, max_clients=5, vector_length=8)
    clients = make_clients((1, 2, 3, 4), config)
    server = SecAggServer(config)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    inbox = server.route_shares({cid: c.share_keys(roster) for cid, c in clients.items()})
    for cid in (1, 2, 3):
        clients[cid].masked_input(np.zeros(8), inbox[cid])
    signatures = [clients[cid].sign_survivors([1, 2, 3]) for cid in (1, 2, 3)]
    response = clients[1].unmask([1, 2, 3], signatures)
    assert set(response.mask_key_shares) == {4}
    assert set(response.self_seed_shares) == {1, 2, 3}
    assert not set(response.mask_key_shares) & set(response.self_seed_shares)
    # a second request (e.g. now claiming 3 dropped) would expose 3's mask key next to its seed share
    with pytest.raises(SecAggError, match="out of order"):
        clients[1].unmask([1, 2, 4], signatures)
    # a survivor list naming a client that never shared keys is refused
    clients[4].masked_input(np.zeros(8), inbox[4])
    with pytest.raises(SecAggError, match="never shared"):
        clients[4].sign_survivors([1, 2, 3, 99])


def test_tampered_share_is_rejected():
    config = SecAggConfig(threshold=3, clip_range=1.0, max_clients=3, vector_length=4)
    clients = make_clients((1, 2, 3), config)
    server = SecAggServer(config)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    inbox = server.route_shares({cid: c.share_keys(roster) for cid, c in clients.items()})
    first = inbox[1][0]
    flipped = bytearray(first.ciphertext)
    flipped[20] ^= 1
    with pytest.raises(SecAggError, match="authentication"):
        clients[1].masked_input(np.zeros(4), [EncryptedShare(first.sender, first.receiver, bytes(flipped))])


def test_masks_come_from_chacha20_and_differ_per_seed():
    a, b = expand_mask(b"\x01" * 32, 1000), expand_mask(b"\x02" * 32, 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.array_equal(a, expand_mask(b"\x01" * 32, 1000))
    assert np.mean(a == b) < 0.01
    # ChaCha20 keystream of the all-zero key and nonce (RFC 7539 test vector, first word 0xade0b876)
    assert expand_mask(b"\x00" * 32, 1)[0] == 0xADE0B876


def test_flatten_round_trip():
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(4, dtype=np.float32)}
    vector, layout = flatten_arrays(arrays)
    assert layout.length == 10 and vector[:4].tolist() == [1, 1, 1, 1]
    back = unflatten_arrays(vector, layout)
    assert back.keys() == arrays.keys()
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])
        assert back[k].dtype == arrays[k].dtype


def test_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        SecAggConfig(threshold=1, clip_range=1.0, max_clients=4, vector_length=4)
    with pytest.raises(ValueError, match="max_clients"):
        SecAggConfig(threshold=5, clip_range=1.0, max_clients=4, vector_length=4)
    with pytest.raises(ValueError, match="scale"):
        SecAggConfig(threshold=2, clip_range=1e9, max_clients=10, vector_length=4)


# ----------------------------------------------------------------------------------------------
# a malicious server: every deviation below must be refused by the honest clients


def _through_masking(n: int, t: int, length: int = 8) -> tuple[SecAggConfig, dict, SecAggServer, dict]:
    config = SecAggConfig(threshold=t, clip_range=1.0, max_clients=n, vector_length=length, round_id=5)
    clients = make_clients(range(1, n + 1), config)
    server = SecAggServer(config)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    inbox = server.route_shares({cid: c.share_keys(roster) for cid, c in clients.items()})
    for cid, c in clients.items():
        c.masked_input(np.full(length, 0.1 * cid), inbox[cid])
    return config, clients, server, inbox


def test_malicious_server_low_threshold_is_refused_before_anything_is_shared():
    # below the client's fixed floor (3): the client will not even advertise keys
    with pytest.raises(SecAggError, match="below this client's minimum 3"):
        make_clients((1, 2, 3, 4, 5, 6), SecAggConfig(threshold=2, clip_range=1.0, max_clients=6, vector_length=4))
    # 3 of a roster of 6 is below ceil(2n/3) = 4: no share leaves the client
    config = SecAggConfig(threshold=3, clip_range=1.0, max_clients=6, vector_length=4)
    clients = make_clients(range(1, 7), config)
    roster = SecAggServer(config).collect_keys([c.advertise_keys() for c in clients.values()])
    with pytest.raises(SecAggError, match="below this client's floor 4 for 6 clients"):
        clients[1].share_keys(roster)
    # the floor is the client's own: a server-sent max_clients smaller than the roster is refused too
    assert ClientPolicy().required_threshold(6) == 4 and ClientPolicy().required_threshold(2) == 3


def test_malicious_server_substituting_or_injecting_keys_is_detected():
    config = SecAggConfig(threshold=3, clip_range=1.0, max_clients=4, vector_length=4)
    clients = make_clients((1, 2, 3, 4), config)
    adverts = [c.advertise_keys() for c in clients.values()]
    # (1) the server swaps client 2's mask key for one it knows (keeping 2's signature)
    own = SecAggClient(2, config, policy=ClientPolicy(require_signatures=False)).advertise_keys()
    swapped = list(adverts)
    swapped[1] = dataclasses.replace(adverts[1], mask_public_key=own.mask_public_key)
    with pytest.raises(SecAggError, match="client 2: signature of device 'device-2' does not verify"):
        clients[1].share_keys(swapped)
    # (2) it injects a device of its own that is not in the clients' roster (signed by itself)
    fake = DeviceIdentity.generate("server-sybil")
    evil = make_clients((9,), config)[9]
    evil.identity, evil.device_roster = fake, DeviceRoster.of([fake])
    injected = adverts[:3] + [evil.advertise_keys()]
    with pytest.raises(SecAggError, match="not in this client's roster"):
        clients[2].share_keys(injected)
    # (3) it replays client 2's signed advertisement under another client id (one device twice)
    with pytest.raises(SecAggError, match="repeats a public key"):
        clients[3].share_keys(adverts[:3] + [dataclasses.replace(adverts[1], client_id=7)])
    # (4) it tells client 4 a different threshold than the others signed: signatures bind the config
    other = make_clients((4,), SecAggConfig(threshold=4, clip_range=1.0, max_clients=4, vector_length=4))[4]
    other.identity, other.device_roster = clients[4].identity, clients[4].device_roster
    mine = other.advertise_keys()
    with pytest.raises(SecAggError, match="does not verify"):
        other.share_keys(adverts[:3] + [mine])


def test_malicious_server_telling_clients_different_survivor_sets_is_caught():
    _, clients, _, _ = _through_masking(6, 4)
    # clients 1-3 are told everyone survived; client 4 is told 5 and 6 dropped: the server would get 5's
    # and 6's mask-key shares from 4 and their self-seed shares from 1-3
    view_a, view_b = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4]
    signatures_a = [clients[c].sign_survivors(view_a) for c in (1, 2, 3)]
    signature_b = clients[4].sign_survivors(view_b)
    relayed = signatures_a + [signature_b]
    # relaying all signatures: each side sees one over another set and aborts before releasing a share
    with pytest.raises(SecAggError, match="signed by client 4 .told a different set"):
        clients[1].unmask(view_a, relayed)
    with pytest.raises(SecAggError, match="signed by client 1 .told a different set"):
        clients[4].unmask(view_b, relayed)
    # relaying only the matching signature leaves client 4 with 1 < t confirmations: it releases nothing
    _, clients, _, _ = _through_masking(6, 4)
    lone = clients[4].sign_survivors(view_b)
    with pytest.raises(SecAggError, match="only 1 survivors confirmed"):
        clients[4].unmask(view_b, [lone])


def test_malicious_server_asking_for_both_shares_of_one_client_is_refused():
    config, clients, _, _ = _through_masking(5, 4)
    signed = [1, 2, 3, 4, 5]
    signatures = [clients[c].sign_survivors(signed) for c in signed]
    # after every survivor signed {1..5}, the server claims 5 dropped to get its mask-key share
    with pytest.raises(SecAggError, match="different survivor set"):
        clients[1].unmask([1, 2, 3, 4], signatures)
    # client 2 answers the honest request (seed shares of 1..5) ...
    response = clients[2].unmask(signed, signatures)
    assert set(response.self_seed_shares) == set(signed) and not response.mask_key_shares
    # ... and never a second one that would add 5's mask-key share
    with pytest.raises(SecAggError, match="out of order"):
        clients[2].unmask([1, 2, 3, 4], signatures)
    # a state restored from bytes (the Flower transport) keeps both the step and the signed set
    state = SecAggClient.from_bytes(clients[3].to_bytes(), clients[3].identity, clients[3].device_roster)
    with pytest.raises(SecAggError, match="different survivor set"):
        state.unmask([1, 2, 3, 4], signatures)


def test_malicious_server_under_counting_noise_shares_is_refused():
    config, clients, _, _ = _through_masking(6, 4)
    # each client adds sigma C / sqrt(10): a sum of t = 4 survivors would carry 40% of the noise variance
    with pytest.raises(SecAggError, match="below the 10 noise shares DP needs"):
        clients[1].check_dp(1.0, noise_shares=10)
    clients[1].check_dp(1.0, noise_shares=4)
    strict = SecAggClient(1, config, clients[1].identity, clients[1].device_roster,
                          ClientPolicy(min_noise_multiplier=0.8))
    with pytest.raises(SecAggError, match="requires DP noise"):
        strict.check_dp(None, noise_shares=1)
    with pytest.raises(SecAggError, match="below this client's minimum 0.8"):
        strict.check_dp(0.5, noise_shares=4)
    with pytest.raises(SecAggError, match="server would add the noise"):
        strict.check_dp(1.0, noise_shares=4, noise_at="server")


def test_unsigned_clients_need_an_explicit_policy():
    config = SecAggConfig(threshold=3, clip_range=1.0, max_clients=4, vector_length=4)
    with pytest.raises(SecAggError, match="requires signed key advertisements"):
        SecAggClient(1, config)
    updates = _updates(4, 4)
    result = run_in_process(updates, config, policy=ClientPolicy(require_signatures=False))
    assert result.survivors == [1, 2, 3, 4]


def test_device_signing_keys_and_roster_files(tmp_path):
    from fedge.protocol.secagg_identity import create_device_signing_keys, load_device_identity, load_roster

    roster_path = create_device_signing_keys(tmp_path, ["phone-1", "phone-2"])
    roster = load_roster(roster_path)
    assert sorted(roster.keys) == ["phone-1", "phone-2"]
    identity = load_device_identity(tmp_path, "phone-1")
    assert roster.keys["phone-1"] == identity.public_bytes()
    assert (tmp_path / "devices" / "phone-1.sign.key").stat().st_mode & 0o077 == 0
    # a second call keeps existing keys and adds new devices
    create_device_signing_keys(tmp_path, ["phone-3"])
    assert load_roster(roster_path).keys["phone-1"] == identity.public_bytes()
    assert len(load_roster(roster_path).keys) == 3
    roster_path.write_text("{not json")
    with pytest.raises(SecAggError, match="malformed device roster"):
        load_roster(roster_path)
